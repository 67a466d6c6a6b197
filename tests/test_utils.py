"""uniopd.runtime.reuse_freed_cpu_memory: freed large tensors are reused, not faulted in again."""

import platform
import subprocess
import sys

import pytest

# In a child: the setting is process-wide and one-way. The child allocates and frees a 64 MB
# tensor (above glibc's 32 MB mmap ceiling) 40 times, as a training step frees and reallocates
# its large temporaries, and counts the minor page faults of each round: a fresh mapping is
# 16,384 pages of 4 KB. With reuse the heap settles within a few rounds (8 here, glibc 2.36)
# and later rounds fault nothing; without it every round faults all 16,384.
_CHILD = """
import resource, sys, torch
from uniopd.runtime import reuse_freed_cpu_memory
applied = reuse_freed_cpu_memory() if sys.argv[1] == "on" else False
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(2**24)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(applied), sum(faults[-10:]))
"""


def _faults_in_last_rounds(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return bool(int(applied)), int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _faults_in_last_rounds("on")
    assert applied
    assert faults < 1000  # 10 rounds x 16,384 pages if every round got a fresh mapping
