"""Resource limits the runner enforces around the runtime: the per-page time limit (a watchdog thread that
cancels each request still running when its limit passes, through the runtime's `cancel(request_id)`), and
recognising an out-of-memory failure, so that the runner can halve the batch or
stop with a clear error instead of being killed. Knows nothing about pages; the runner decides what a
timeout or an out-of-memory error does to one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

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


class Deadlines:
    """The page-time limit, per request, counted from when the request is handed to the runtime (`start`).

    A watchdog thread cancels, through the runtime's `cancel`, every request still unfinished when its
    limit passes; such a request's "cancelled" completion is late. `close()` stops the watchdog.
    """

    def __init__(self, limit: float | None, cancel: Callable[[str], None]) -> None:
        self.limit, self.cancel = limit, cancel
        self._started: dict[str, float] = {}
        self._fired: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if limit is not None:
            self._thread = threading.Thread(target=self._watch, name="dsvl2-page-timeout", daemon=True)
            self._thread.start()

    def start(self, request_id: str) -> None:
        if self.limit is not None:
            with self._lock:
                self._started[request_id] = time.monotonic()

    def forget(self, request_id: str) -> None:
        """The request is no longer running (its step failed); it starts again when resubmitted."""
        with self._lock:
            self._started.pop(request_id, None)
            self._fired.discard(request_id)

    def _watch(self) -> None:
        assert self.limit is not None
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                late = [i for i, t in self._started.items() if now - t >= self.limit and i not in self._fired]
                self._fired.update(late)
                waits = [t + self.limit - now for i, t in self._started.items() if i not in self._fired]
            for request_id in late:
                # A cancel that fails only leaves that page running to its end; nothing to report from here.
                with contextlib.suppress(Exception):
                    self.cancel(request_id)
            self._stop.wait(min([*waits, 0.05]) if waits else 0.05)

    def late(self, completion: Completion) -> bool:
        """Note that `completion` arrived; True when it was cancelled for missing the limit."""
        with self._lock:
            self._started.pop(completion.id, None)
            fired = completion.id in self._fired
            self._fired.discard(completion.id)
        return fired and completion.finish_reason == "cancelled"

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
