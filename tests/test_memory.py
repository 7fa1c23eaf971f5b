"""The allocator policy `lmmrec` sets at start: freed tensor memory stays in the process."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys
from pathlib import Path
import torch
from pipeline.core.memory import keep_freed_memory
def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "keep":
    assert keep_freed_memory()
big = torch.ones(64 * 2**20)  # 256 MiB
held = rss_mib()
del big
print(held - rss_mib())  # MiB handed back to the kernel by the free
"""


def _returned_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_freed_tensor_memory_stays_in_the_process():
    assert _returned_mib("default") > 200  # glibc unmaps a freed 256 MiB block at once...
    assert _returned_mib("keep") < 16  # ...and keeps it for the next step with the policy set
