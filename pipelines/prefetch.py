"""Read ahead of a consumer in a background thread: `prefetch(items, depth)` yields what `items` yields, at
most `depth` items ahead, re-raises its exceptions in the consumer, and stops the producer when closed. The
runner renders pages through it while the model answers earlier ones. Knows nothing about pages."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Iterate `items` in a background thread, at most `depth` items ahead of the consumer. Exceptions
    raised by `items` are re-raised in the consumer; closing this generator stops the producer."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, object]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put(("item", item)):
                    break
            else:
                put(("done", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(("error", exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="dsvl2-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value  # type: ignore[misc]
            elif kind == "error":
                raise value  # type: ignore[misc]
            else:
                return
    finally:
        stop.set()
