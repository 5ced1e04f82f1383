"""Keep glibc's heap from fragmenting while a checkpoint loads.

Loading interleaves tensors that stay (the weights, or their quantised form) with larger ones that are dropped
at once (each weight read from the file, and with --quantize its float32 blocks). glibc serves allocations below
its mmap threshold from the heap, and raises that threshold (up to 32 MiB) every time a mapped block is freed, so
after the first few weights every later one comes from the heap, and the dropped blocks leave holes between the
kept ones that the heap never returns. Measured on real-width Tiny quantised to int8 while loading (4.8 GiB of
weights): peak RSS 7.0 GiB with glibc's default, 5.9 GiB with every block above 128 KiB mapped on its own; for
Small (~17 GiB) the difference decides whether it loads on a 24 GiB machine.

`while_loading()` maps every allocation above LOADING_THRESHOLD on its own for the duration of a load (freed
blocks go straight back to the system), then sets the threshold to RUNNING_THRESHOLD, the value glibc's dynamic
threshold reaches in a long run anyway, so inference allocates as it would have. Elsewhere than glibc (macOS,
musl) it does nothing. Process-wide by nature: the setting is malloc's, not this library's.

`huge_page_buffer(nbytes)` is memory for weights that decode streams: a mapping of its own, aligned to and advised
for 2 MiB pages (Linux's transparent huge pages, where the system allows them on request), so that a step's reads
cross a page, with its TLB miss and the hardware prefetcher's stop, every 2 MiB instead of every 4 KiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Iterator

import torch

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
LOADING_THRESHOLD = 128 * 1024
RUNNING_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
HUGE_PAGE = 2 * 2**20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError when the C library is not glibc)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def while_loading() -> Iterator[None]:
    """Inside: every allocation above 128 KiB is its own mapping. After: glibc's long-run threshold, and the
    heap's free top returned to the system."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, RUNNING_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * RUNNING_THRESHOLD)  # the pair glibc's dynamic rule keeps
        libc.malloc_trim(0)


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of uint8 CPU memory starting on a 2 MiB boundary of an anonymous mapping advised for huge pages
    (MADV_HUGEPAGE; a plain allocation where the platform has no such advice, 4 KiB pages where the kernel refuses
    it). The tensor keeps the mapping alive; pages are taken as they are first written."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel built without transparent huge pages refuses the advice (EINVAL)
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]
