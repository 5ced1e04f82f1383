"""Run a task over a stream of pages: batch them through `runtime.generate`, turn answers into records,
isolate failures to the page that caused them, and report progress through an event callback.

Records are emitted in input order (a reorder buffer no longer than one batch), so output does not depend
on batch size or on the order the engine finishes requests. Pages are pulled from the input a bounded
number ahead of the model (a render thread and a queue of `read_ahead` pages). Nothing here prints or
writes files; the CLI listens to the events.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from model.requests import Completion, Request, user_prompt
from pipelines.base import (
    FAILURES,
    Document,
    Page,
    PageRecord,
    RecordContext,
    Runtime,
    Settings,
    Task,
    answered_record,
    failed_record,
    page_key,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RecordDone:
    """A record is final. `page` still holds the rendered image (for annotation)."""

    record: PageRecord
    page: Page


@dataclass(frozen=True, slots=True)
class PageSkipped:
    """A page and prompt already done in an earlier run (`--resume`)."""

    page: Page
    prompt: str


@dataclass(frozen=True, slots=True)
class DocumentDone:
    """Every record of the document has been emitted (or skipped)."""

    doc: Document


@dataclass(frozen=True, slots=True)
class BatchStarted:
    size: int


Event = RecordDone | PageSkipped | DocumentDone | BatchStarted


@dataclass(slots=True)
class RunStats:
    """Counts for the end-of-run summary."""

    statuses: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in FAILURES)


@dataclass(slots=True)
class _Slot:
    page: Page
    prompt: str
    record: PageRecord | None = None
    request: Request | None = None


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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Run:
    """State of one run: the reorder buffer, per-document bookkeeping, counters."""

    def __init__(
        self, *, runtime: Runtime, task: Task, settings: Settings, fail_fast: bool, on_event: Callable[[Event], None]
    ) -> None:
        self.runtime = runtime
        self.task = task
        self.sampling = settings.sampling()
        self.ctx = RecordContext(task.name, settings, {"id": runtime.model_id, "revision": runtime.revision})
        self.fail_fast = fail_fast
        self.on_event = on_event
        self.stats = RunStats()
        self.slots: deque[_Slot] = deque()
        self.docs: deque[Document] = deque()
        self.outstanding: Counter[str] = Counter()
        self.enumerated: set[str] = set()
        self.next_id = 0
        self.listener_error: Exception | None = None  # raised by on_event during generate; re-raised after it

    def add_page(self, page: Page, is_done: Callable[[str], bool]) -> None:
        if not self.docs or self.docs[-1].key != page.doc.key:
            if self.docs:
                self.enumerated.add(self.docs[-1].key)
            self.docs.append(page.doc)
        for prompt in self.task.prompts:
            if page.error is not None or page.number is None:
                self._add(_Slot(page, prompt, failed_record(self.ctx, page, prompt, page.error or "no pages")))
            elif is_done(page_key(page, task=self.task.name, prompt=prompt, settings=self.ctx.settings)):
                self.stats.skipped += 1
                self.on_event(PageSkipped(page, prompt))
            elif page.image is None:
                self._add(_Slot(page, prompt, failed_record(self.ctx, page, prompt, "page was not rendered")))
            else:
                self._add(self._pending(page, prompt))

    def _add(self, slot: _Slot) -> None:
        self.outstanding[slot.page.doc.key] += 1
        self.slots.append(slot)

    def _pending(self, page: Page, prompt: str) -> _Slot:
        slot = _Slot(page, prompt)
        try:
            conversation = user_prompt(prompt, (page.image,))
            slot.request = Request(f"r{self.next_id}", conversation, self.sampling)
            self.next_id += 1
        except Exception as exc:
            slot.record = failed_record(self.ctx, page, prompt, _describe(exc))
        return slot

    @property
    def n_pending(self) -> int:
        return sum(1 for s in self.slots if s.record is None)

    @property
    def stop(self) -> bool:
        return self.fail_fast and self.stats.failed > 0

    def _complete(self, slot: _Slot, completion: Completion) -> None:
        if slot.record is None:
            slot.record = answered_record(self.ctx, slot.page, slot.prompt, completion, self.task)

    def _release(self) -> None:
        """Emit the resolved prefix of the buffer in input order, each document's end right after its last record."""
        self._finish_documents()
        while self.slots and self.slots[0].record is not None:
            slot = self.slots.popleft()
            record = slot.record
            assert record is not None
            self.stats.statuses[record.status] += 1
            if record.tokens:
                self.stats.prompt_tokens += record.tokens["prompt"]
                self.stats.generated_tokens += record.tokens["generated"]
            self.outstanding[slot.page.doc.key] -= 1
            self.on_event(RecordDone(record, slot.page))
            self._finish_documents()

    def _finish_documents(self) -> None:
        while self.docs and self.docs[0].key in self.enumerated and self.outstanding[self.docs[0].key] == 0:
            self.on_event(DocumentDone(self.docs.popleft()))

    def _generate(self, slots: list[_Slot]) -> None:
        by_id = {s.request.id: s for s in slots if s.request is not None}

        def on_completion(completion: Completion) -> None:
            slot = by_id.get(completion.id)
            if slot is not None:
                self._complete(slot, completion)
                if self.listener_error is None:
                    try:
                        self._release()
                    except Exception as exc:  # the listener's (e.g. a closed pipe), not the model's: raised below
                        self.listener_error = exc

        completions = self.runtime.generate([s.request for s in slots], on_completion=on_completion)
        for completion in completions:
            if completion.id in by_id:
                self._complete(by_id[completion.id], completion)

    def flush(self) -> None:
        pending = [s for s in self.slots if s.record is None]
        if pending:
            self.on_event(BatchStarted(len(pending)))
            try:
                self._generate(pending)
            except Exception as exc:
                # Isolate the page that broke the batch: retry the unfinished ones one at a time.
                rest = [s for s in pending if s.record is None]
                for slot in rest:
                    if len(rest) == 1 or self.listener_error is not None:
                        slot.record = failed_record(self.ctx, slot.page, slot.prompt, _describe(exc))
                        continue
                    try:
                        self._generate([slot])
                    except Exception as one:
                        slot.record = failed_record(self.ctx, slot.page, slot.prompt, _describe(one))
            if self.listener_error is not None:
                raise self.listener_error
            for slot in pending:
                if slot.record is None:
                    slot.record = failed_record(self.ctx, slot.page, slot.prompt, "the runtime returned no answer")
        self._release()

    def finish(self) -> None:
        if self.docs:
            self.enumerated.add(self.docs[-1].key)
        self.flush()


def run(
    *,
    runtime: Runtime,
    task: Task,
    pages: Iterable[Page],
    settings: Settings,
    batch_size: int,
    on_event: Callable[[Event], None],
    is_done: Callable[[str], bool] = lambda key: False,
    fail_fast: bool = False,
    read_ahead: int | None = None,
) -> RunStats:
    """Answer `task.prompts` for every page. Pages whose record key `is_done` are skipped. With
    `fail_fast`, stops after the batch in which the first failed or unparseable page was found."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    state = _Run(runtime=runtime, task=task, settings=settings, fail_fast=fail_fast, on_event=on_event)
    start = time.perf_counter()
    stream = prefetch(pages, batch_size if read_ahead is None else read_ahead)
    try:
        for page in stream:
            state.add_page(page, is_done)
            if state.n_pending >= batch_size or state.n_pending == 0:
                state.flush()
            if state.stop:
                state.stats.stopped_early = True
                break
        else:
            state.finish()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        state.stats.seconds = time.perf_counter() - start
    return state.stats
