"""Print pip's index options for installing torch's CPU build, or nothing where the index does not answer.

`make install` runs this on a machine without a GPU (see the Makefile). PyPI's torch for Linux is the
CUDA build, which pulls several GB of CUDA libraries; PyTorch's CPU index serves a ~190 MB wheel instead.
The index is probed once, with a short timeout and no retries, so that an unreachable index (a machine
with only a PyPI mirror, or offline with a local wheel) costs seconds on every install, not minutes of
pip retrying; pip's configured index then serves torch as before.

    python3 .ci/torch_index.py [URL] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"


def reachable(url: str, timeout: float) -> str | None:
    """None when `url` answers 2xx within `timeout` seconds; otherwise why not."""
    request = urllib.request.Request(url.rstrip("/") + "/")  # GET: what pip asks; the body is left unread
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return None if 200 <= answer.status < 300 else f"HTTP {answer.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:  # refused, unresolvable, timed out, TLS
        return str(getattr(e, "reason", e))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", nargs="?", default=CPU_INDEX, help=f"the CPU wheel index (default {CPU_INDEX})")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    args = p.parse_args(argv)
    why_not = reachable(args.url, args.timeout)
    if why_not is None:
        # torch from the CPU index (it holds torch's dependencies too); anything else from PyPI.
        print(f"--index-url {args.url} --extra-index-url {PYPI}")
        print(f"torch: the CPU build from {args.url}", file=sys.stderr)
    else:
        print(f"torch: {args.url} did not answer ({why_not}); torch comes from pip's configured index, which "
              "on Linux is the CUDA build unless a local CPU wheel satisfies it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
