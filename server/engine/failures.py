"""Classifying a failed step: out of memory (retry smaller) or a fatal device error (restart).

torch raises most CUDA failures as a plain RuntimeError (AcceleratorError in newer versions) whose
message is the only thing that tells them apart, hence the string matching.
"""

from __future__ import annotations

import torch


class DeviceLost(RuntimeError):
    """The device is unusable (a CUDA error that poisons the context): only a restart helps."""


_FATAL_MESSAGES = ("CUDA error", "device-side assert", "illegal memory access", "ECC error")


def is_fatal(e: BaseException) -> bool:
    if isinstance(e, DeviceLost) or type(e).__name__ == "AcceleratorError":
        return True
    return any(s in str(e) for s in _FATAL_MESSAGES)


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
