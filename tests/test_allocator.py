"""model/allocator.py: while a checkpoint loads, large blocks are mapped on their own (so the blocks a load reads
and drops leave no holes in the heap); afterwards they come from the heap again, as in a long glibc run."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dsvl2.model import allocator

PROBE = textwrap.dedent("""
    import torch
    from dsvl2.model import allocator

    def in_heap(ptr):
        for line in open("/proc/self/maps"):
            if line.rstrip().endswith("[heap]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= ptr < hi:
                    return True
        return False

    keep = []
    def block():  # 1 MiB: above the loading threshold, below the running one
        keep.append(torch.empty(2**20, dtype=torch.uint8))
        return in_heap(keep[-1].data_ptr())

    with allocator.while_loading():
        inside = [block() for _ in range(4)]
    after = [block() for _ in range(4)]
    print(any(inside), all(after))
""")


@pytest.mark.skipif(allocator._glibc() is None, reason="the C library is not glibc: while_loading does nothing")
def test_blocks_are_mapped_while_loading_and_come_from_the_heap_afterwards():
    """Catches a while_loading that sets nothing (1 MiB blocks would stay in the heap while loading) or leaves the
    loading threshold behind (every later block mapped: a page fault per fresh activation tensor)."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
