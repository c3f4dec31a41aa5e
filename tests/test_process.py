"""The command line's process-wide memory settings (mmexplain.process): Triton stays out of
a process without CUDA, and freed large blocks go back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's malloc and /proc: Linux only")


def _python(code: str, env: dict[str, str] | None = None) -> str:
    import os

    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=True, env={**os.environ, **(env or {})})
    return done.stdout.strip()


FRAGMENTS = """
    import sys
    import numpy as np
    def rss():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
    if {release}:
        from mmexplain.process import release_large_blocks
        assert release_large_blocks()
    big = np.ones(8 << 20, np.uint8)
    del big  # an 8 MiB block freed: glibc's mmap threshold rises to 8 MiB
    blocks = [np.ones(1 << 20, np.uint8) for _ in range(100)]  # 1 MiB blocks, touched
    before = rss()
    del blocks[::2]  # every other one freed: holes in the heap, or unmapped blocks
    print(before - rss())
"""


def test_freed_large_blocks_go_back_to_the_system_only_with_the_fixed_threshold() -> None:
    """50 of 100 1-MiB blocks freed after an 8-MiB one: by default they are holes in the
    heap (nothing given back); with release_large_blocks() each was its own mapping, and
    the 50 MiB leave the process."""
    kept = float(_python(FRAGMENTS.format(release=False)))
    given = float(_python(FRAGMENTS.format(release=True)))
    assert kept < 5, kept
    assert 45 < given < 55, given


def test_triton_is_kept_out_of_a_process_without_cuda() -> None:
    code = """
        import sys
        from mmexplain.process import skip_triton
        skipped = skip_triton()
        import torch, torchvision  # torchvision imports torch._dynamo, which imports Triton
        cuda = torch.cuda.is_available()
        loaded = sys.modules.get("triton") is not None
        print(skipped, cuda, loaded)
    """
    skipped, cuda, loaded = _python(code).split()
    if cuda == "True":
        assert (skipped, loaded) == ("False", _python("import importlib.util; print("
                                                      "importlib.util.find_spec('triton') "
                                                      "is not None)"))
    else:
        assert (skipped, loaded) == ("True", "False")
    kept = _python(code, {"MMEXPLAIN_TRITON": "1"}).split()
    assert kept[0] == "False"  # MMEXPLAIN_TRITON=1: left alone
