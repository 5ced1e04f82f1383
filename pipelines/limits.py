"""Resource limits the runner enforces around `Runtime.generate`: the per-page time limit (a watchdog
thread that cancels the requests still running when the limit passes, through the runtime's optional
`cancel(request_id)`), and recognising an out-of-memory failure, so that the runner can halve the batch or
stop with a clear error instead of being killed. Knows nothing about pages; the runner decides what a
timeout or an out-of-memory error does to one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable

from dsvl2.model.requests import Completion

# How allocators word it: torch.OutOfMemoryError ("CUDA out of memory"), torch's CPU allocator
# ("DefaultCPUAllocator: can't allocate memory"), and the C library's ENOMEM text.
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for MemoryError and for a RuntimeError that reports a failed allocation."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


class OutOfMemory(Exception):
    """A batch of the size the user fixed does not fit in memory (with an automatic batch size the runner
    halves the batch instead of raising this)."""

    def __init__(self, batch_size: int, cause: BaseException) -> None:
        reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        super().__init__(
            f"a batch of {batch_size} page(s) does not fit in memory ({reason}); use a smaller --batch-size, "
            "or leave it out to let dsvl2 back off on its own"
        )
        self.batch_size = batch_size


class Deadline:
    """The page-time limit of one `generate` call, counted from when the call begins.

    With a runtime that can `cancel`, a watchdog thread cancels every request still unfinished when the
    limit passes, and such a request's "cancelled" completion is late. A runtime without `cancel` cannot
    be stopped: its completions that arrive after the limit are late. `close()` stops the watchdog.
    """

    def __init__(self, limit: float | None, ids: Iterable[str], cancel: Callable[[str], None] | None) -> None:
        self.limit, self.cancel = limit, cancel
        self.started = time.monotonic()
        self._pending = set(ids)
        self._fired: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if limit is not None and cancel is not None:
            self._thread = threading.Thread(target=self._watch, name="dsvl2-page-timeout", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        assert self.limit is not None and self.cancel is not None
        if self._stop.wait(self.limit):
            return
        with self._lock:
            late = sorted(self._pending)
            self._fired.update(late)
        for request_id in late:
            # A cancel that fails only leaves that page running to its end; nothing to report from here.
            with contextlib.suppress(Exception):
                self.cancel(request_id)

    def late(self, completion: Completion) -> bool:
        """Note that `completion` arrived; True when it missed the limit."""
        with self._lock:
            self._pending.discard(completion.id)
            fired = completion.id in self._fired
        if self.limit is None:
            return False
        if self.cancel is not None:
            return fired and completion.finish_reason == "cancelled"
        return time.monotonic() - self.started > self.limit

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
