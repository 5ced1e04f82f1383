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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
LOADING_THRESHOLD = 128 * 1024
RUNNING_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


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
