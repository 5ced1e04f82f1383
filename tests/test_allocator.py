"""model/allocator.py: while a checkpoint loads, large blocks are mapped on their own (so the blocks a load reads
and drops leave no holes in the heap); afterwards they come from the heap again, as in a long glibc run. Zero pages
(the KV cache's memory on a CPU) read as zeros, and released pages read as zeros again; a refused release is no
error."""

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


@pytest.mark.skipif(not allocator.has_zero_pages(), reason="this platform maps no anonymous memory (Windows)")
def test_zero_pages_read_as_zeros_and_released_pages_read_as_zeros_again():
    """Catches zero pages that hold anything but zeros, and a release that misses whole pages or touches the
    partial pages at its ends: after writing ones, releasing an unaligned middle range zeroes the whole pages
    inside it (on Linux) and keeps the bytes of the pages it only partly covers."""
    page = 4096
    t = allocator.zero_pages(8 * page)
    assert t.numel() == 8 * page and not t.any()
    t.fill_(1)
    released = allocator.release(t[page + 100 : 6 * page + 100])
    if allocator._glibc() is None:
        assert released == 0 and t.all()
        return
    assert released == 4 * page
    assert t[: 2 * page].all() and not t[2 * page : 6 * page].any() and t[6 * page :].all()


def test_a_release_the_kernel_refuses_is_no_error(monkeypatch):
    """Catches a refused advice failing a batch: a cache row that starts a new page releases its old pages, and
    where the kernel refuses (madvise returns -1) nothing is released and nothing raises."""

    class Refusing:
        @staticmethod
        def madvise(*args):
            return -1

    monkeypatch.setattr(allocator, "_glibc", lambda: Refusing)
    t = allocator.zero_pages(4 * 4096)
    t.fill_(1)
    assert allocator.release(t) == 0 and t.all()
