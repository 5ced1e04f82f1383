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

`zero_pages(nbytes)` is memory that reads as zeros and takes a page only where it is written (the KV cache on a CPU:
a row costs the slots it has used), and `release(t)` gives back the pages inside a tensor of it (a cache row that
starts a new sequence): they read as zeros again and cost nothing until written.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
from collections.abc import Iterator

import torch

MADV_DONTNEED = 4  # Linux's madvise advice: the pages go back, and read as zeros (private anonymous memory)
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


def has_zero_pages() -> bool:
    """Whether this platform maps anonymous memory that `zero_pages` can hand out (POSIX systems; not Windows)."""
    return hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE")


def zero_pages(nbytes: int) -> torch.Tensor:
    """`nbytes` of uint8 CPU memory in an anonymous mapping of its own, page-aligned: it reads as zeros, and a page
    takes memory only when first written (reading an untouched one takes none). The tensor keeps the mapping alive."""
    region = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]


def release(t: torch.Tensor) -> int:
    """Give back the memory of the whole pages inside contiguous CPU tensor `t`, which must lie in a `zero_pages`
    mapping: on Linux they read as zeros again and take memory only when next written; elsewhere (another kernel's
    advice keeps pages' contents) nothing happens. The partial pages at either end keep their contents. Returns the
    bytes released: 0 where the kernel refuses the advice, which only leaves the memory taken (never an error: a
    cache row that starts a new page must not fail the batch over it)."""
    libc = _glibc()
    if libc is None or not t.is_contiguous() or t.device.type != "cpu":
        return 0
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end <= start:
        return 0
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) != 0:
        return 0
    return end - start
