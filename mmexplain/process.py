"""Process-wide settings of the ``mmexplain`` command line (never of the library): a long
``mmexplain video`` run keeps its resident memory low and flat.

- :func:`skip_triton`: without a CUDA device, Triton is never imported. torchvision imports
  ``torch._dynamo`` (for ``torchvision.ops``), which imports Triton when it is installed, as
  the CUDA builds of PyTorch install it: 77-82 MiB of resident memory (and about 0.8 s) for
  a compiler of GPU kernels that a CPU-only process cannot use. ``torch.compile`` on a CPU
  uses Inductor's C++ code, not Triton, and still works.
- :func:`release_large_blocks`: glibc's ``malloc`` serves blocks from ``mmap`` only above a
  threshold that rises, by default, to the size of each large block freed (up to 32 MiB),
  so after the first window a model's activations of a few MiB come from the heap, which
  is not given back and fragments. A fixed threshold gives every large block back when it
  is freed.

Measured on a 2-core CPU (``python scripts/video_memory.py --minutes 0.5 --size 112
--batch-size 1``, R3D-18): peak resident memory 1,057 MiB as before, 934 MiB without
Triton, 861 MiB with both, at the same speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's ``mallopt`` parameter number of ``M_MMAP_THRESHOLD``
_M_MMAP_THRESHOLD = -3
#: blocks at least this large are mapped and given back to the system when freed
LARGE_BLOCK = 256 * 1024


def skip_triton() -> bool:
    """Make ``import triton`` fail in this process when it has no CUDA device and nothing
    imported Triton yet (``MMEXPLAIN_TRITON=1`` keeps it). True when it did so."""
    if "triton" in sys.modules or os.environ.get("MMEXPLAIN_TRITON") == "1":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # import triton -> ImportError
    return True


def release_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Fix glibc's ``mmap`` threshold at ``threshold`` bytes (see the module's docstring).
    False where the C library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
