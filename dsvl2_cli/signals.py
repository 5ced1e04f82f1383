"""Orderly stops on SIGINT and SIGTERM. `install()` makes either signal raise `Interrupted` (a
KeyboardInterrupt) in the main thread, except inside a `shielded()` block (writing a record, renaming a
finished file, the manifest): there the signal is held and raised when the outermost block ends, so an
interrupt never cuts an output halfway. SIGKILL cannot be caught; writers.py keeps outputs recoverable
for that case (per-record journals, atomic renames)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

from dsvl2.errors import Interrupted


class _Shield:
    depth = 0
    held: int | None = None


def _handler(signum: int, frame: FrameType | None) -> None:
    if _Shield.depth > 0:
        _Shield.held = signum
        return
    raise Interrupted(signal.Signals(signum).name)


def install() -> None:
    """Route SIGINT and SIGTERM through the shield (the console-script entry point calls this)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block ends, then raise `Interrupted` if one came."""
    _Shield.depth += 1
    try:
        yield
    finally:
        _Shield.depth -= 1
    if _Shield.depth == 0 and _Shield.held is not None:
        signum, _Shield.held = _Shield.held, None
        raise Interrupted(signal.Signals(signum).name)
