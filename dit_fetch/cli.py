"""dit-fetch NAME [NAME ...] [--dest weights/]: fetch weights before serving (never at request time)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .fetch import fetch, verify
from .sources import SOURCES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dit-fetch", description=__doc__ + "\n\nSources:\n" + "\n".join(
        f"  {s.name:24} {s.note}" for s in SOURCES.values()), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", metavar="NAME", choices=sorted(SOURCES))
    p.add_argument("--dest", type=Path, default=Path("weights"), help="folder that receives NAME/ (default weights/)")
    p.add_argument("--hub-url", default="https://huggingface.co", help="base URL of the model hub")
    p.add_argument("--files-url", default="https://dl.fbaipublicfiles.com", help="base URL of the original checkpoints")
    p.add_argument("--verify", action="store_true", help="only re-check what was fetched against its manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    status = 0
    for name in args.names:
        src = SOURCES[name]
        if args.verify:
            problems = verify(name, args.dest)
            print(f"{name}: " + ("verified" if not problems else "; ".join(problems)))
            status |= bool(problems)
            continue
        try:
            folder = fetch(name, args.dest, hub_url=args.hub_url, files_url=args.files_url, progress=not args.quiet)
        except Exception as e:  # one clear line per failed source, then a non-zero exit
            print(f"dit-fetch: {name}: {e}", file=sys.stderr)
            status = 1
            continue
        print(f"{name}: ready in {folder}\n  licence: {src.license}\n  {src.note}")
    return status


if __name__ == "__main__":
    sys.exit(main())
