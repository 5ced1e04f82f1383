"""Run a task over a stream of pages: batch them through `runtime.generate`, turn answers into records,
isolate failures to the page that caused them, and report progress as a stream of events (`events`, a
generator: the CLI writes and reports them, the Python API yields the records).

Records are emitted in input order (a reorder buffer no longer than one batch), so output does not depend
on batch size or on the order the engine finishes requests. Pages are pulled from the input a bounded
number ahead of the model (a render thread and a queue of `read_ahead` pages). Limits (pipelines.limits):
a page over `page_timeout` is cancelled and recorded as failed; a batch that runs out of memory is halved
and retried when the batch size is automatic, else the run stops with `OutOfMemory`. With
`settings.retry_repetition`, an answer the repetition guard stopped is generated once more with
`settings.retry_sampling()`, both attempts kept in the record. Nothing here prints or writes files.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from dsvl2.model.requests import Completion, Request, Sampling, user_prompt
from dsvl2.pipelines.base import (
    FAILURES,
    Document,
    Page,
    PageRecord,
    RecordContext,
    Runtime,
    Settings,
    answered_record,
    attempt,
    failed_record,
    page_key,
)
from dsvl2.pipelines.limits import Deadline, OutOfMemory, is_out_of_memory
from dsvl2.pipelines.task import Task

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


@dataclass(frozen=True, slots=True)
class BatchResized:
    """The automatic batch size shrank because a batch of `old` pages ran out of memory."""

    old: int
    new: int
    reason: str


Event = RecordDone | PageSkipped | DocumentDone | BatchStarted | BatchResized


@dataclass(slots=True)
class RunStats:
    """Counts for the end-of-run summary."""

    statuses: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    batch_size: int = 0  # at the end of the run (smaller than at the start after an out-of-memory back-off)

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in FAILURES)


@dataclass(slots=True)
class _Slot:
    page: Page
    prompt: str
    record: PageRecord | None = None
    request: Request | None = None
    first: Completion | None = None  # the answer the repetition guard stopped, while its retry runs


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
    """State of one run: the reorder buffer, per-document bookkeeping, limits, counters."""

    def __init__(
        self,
        *,
        runtime: Runtime,
        task: Task,
        settings: Settings,
        model: dict[str, str | None],
        fail_fast: bool,
        batch_size: int,
        adaptive_batch: bool,
        page_timeout: float | None,
        stats: RunStats,
    ) -> None:
        self.runtime = runtime
        self.task = task
        self.sampling = settings.sampling()
        self.retry_sampling = settings.retry_sampling() if settings.retry_repetition else None
        self.ctx = RecordContext(task.name, settings, model)
        self.fail_fast = fail_fast
        self.pending_events: deque[Event] = deque()  # emitted, not yet handed to the consumer
        self.batch_size, self.adaptive_batch, self.page_timeout = batch_size, adaptive_batch, page_timeout
        self.stats = stats
        self.stats.batch_size = batch_size
        self.slots: deque[_Slot] = deque()
        self.docs: deque[Document] = deque()
        self.outstanding: Counter[str] = Counter()
        self.enumerated: set[str] = set()
        self.next_id = 0
        self.answered: set[str] = set()  # request ids that got a completion

    def on_event(self, event: Event) -> None:
        self.pending_events.append(event)

    def add_page(self, page: Page, is_done: Callable[[str], bool]) -> None:
        if not self.docs or self.docs[-1].key != page.doc.key:
            if self.docs:
                self.enumerated.add(self.docs[-1].key)
            self.docs.append(page.doc)
        for prompt in self.task.prompts:
            if page.error is not None or page.number is None:
                self._add(_Slot(page, prompt, failed_record(self.ctx, page, prompt, page.error or "no pages")))
            elif is_done(
                page_key(page, task=self.task.name, prompt=prompt, settings=self.ctx.settings, model=self.ctx.model)
            ):
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
            slot.request = self._request(user_prompt(prompt, (page.image,)), self.sampling)
        except Exception as exc:
            slot.record = failed_record(self.ctx, page, prompt, _describe(exc))
        return slot

    def _request(self, conversation: tuple, sampling: Sampling) -> Request:
        self.next_id += 1
        return Request(f"r{self.next_id - 1}", conversation, sampling)

    @property
    def n_pending(self) -> int:
        return sum(1 for s in self.slots if s.record is None)

    @property
    def stop(self) -> bool:
        return self.fail_fast and self.stats.failed > 0

    def _complete(self, slot: _Slot, completion: Completion, *, late: bool = False) -> None:
        if slot.record is not None:
            return
        if completion.finish_reason == "repetition" and self.retry_sampling is not None and slot.first is None:
            assert slot.request is not None
            slot.first = completion  # the record waits for the retry, which the next flush pass generates
            slot.request = self._request(slot.request.conversation, self.retry_sampling)
            return
        attempts = None
        if slot.first is not None:
            assert self.retry_sampling is not None
            attempts = [attempt(slot.first, self.sampling), attempt(completion, self.retry_sampling)]
        record = answered_record(self.ctx, slot.page, slot.prompt, completion, self.task, attempts=attempts)
        if late:
            error = (
                f"page timeout: no complete answer within {self.page_timeout:g} s (--page-timeout); "
                f"stopped after {completion.n_generated} generated tokens, the partial answer is kept in text"
            )
            record = replace(record, status="failed", error=error)
        slot.record = record

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
        deadline = Deadline(self.page_timeout, by_id, self.runtime.cancel)

        def on_completion(completion: Completion) -> None:
            slot = by_id.get(completion.id)
            if slot is None or completion.id in self.answered:
                return
            self.answered.add(completion.id)
            self._complete(slot, completion, late=deadline.late(completion))
            self._release()

        try:
            completions = self.runtime.generate([s.request for s in slots], on_completion=on_completion)
        finally:
            deadline.close()
        for completion in completions:
            on_completion(completion)

    def _unanswered(self, slots: list[_Slot]) -> list[_Slot]:
        return [s for s in slots if s.record is None and s.request is not None and s.request.id not in self.answered]

    def _batch(self, chunk: list[_Slot], queue: deque[_Slot]) -> None:
        """Generate one batch. Out of memory: halve the batch and requeue (automatic size) or stop
        (`OutOfMemory`); a page alone that does not fit fails. Other errors: retry the unanswered pages one
        at a time, so the page that broke the batch fails alone."""
        self.on_event(BatchStarted(len(chunk)))
        try:
            self._generate(chunk)
            return
        except Exception as exc:
            rest = self._unanswered(chunk)
            if not is_out_of_memory(exc):
                error = _describe(exc)
            elif not self.adaptive_batch:
                raise OutOfMemory(len(chunk), exc) from None
            elif len(chunk) > 1:
                old, self.batch_size = self.batch_size, max(1, min(self.batch_size, len(chunk)) // 2)
                self.stats.batch_size = self.batch_size
                self.on_event(BatchResized(old, self.batch_size, _describe(exc)))
                queue.extendleft(reversed(rest))
                return  # retried outside this handler, so the failed batch's tensors can be freed first
            else:
                error = f"out of memory even alone ({_describe(exc)})"
        if len(rest) == 1:
            rest[0].record = failed_record(self.ctx, rest[0].page, rest[0].prompt, error)
            return
        for slot in rest:
            self._batch([slot], queue)

    def flush(self) -> None:
        """Answer every pending slot, in batches of at most `batch_size`; then the retries of answers the
        repetition guard stopped; then release what is resolved."""
        for _ in range(2 if self.retry_sampling is not None else 1):
            queue = deque(s for s in self.slots if s.record is None and s.request is not None)
            while queue:
                chunk = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
                self._batch(chunk, queue)
        for slot in self.slots:
            if slot.record is None:
                slot.record = failed_record(self.ctx, slot.page, slot.prompt, "the runtime returned no answer")
        self._release()

    def finish(self) -> None:
        if self.docs:
            self.enumerated.add(self.docs[-1].key)
        self.flush()


def events(
    *,
    runtime: Runtime,
    task: Task,
    pages: Iterable[Page],
    settings: Settings,
    batch_size: int,
    model: dict[str, str | None] | None = None,
    is_done: Callable[[str], bool] = lambda key: False,
    fail_fast: bool = False,
    read_ahead: int | None = None,
    adaptive_batch: bool = False,
    page_timeout: float | None = None,
    stats: RunStats | None = None,
) -> Iterator[Event]:
    """Answer `task.prompts` for every page, as a stream of events; every page and prompt ends as exactly one
    `RecordDone` or `PageSkipped`, in input order. `model` is the record's model field (default: the
    runtime's id and revision). Pages whose record key `is_done` are skipped. With `fail_fast`, stops after
    the batch in which the first failed or unparseable page was found. `adaptive_batch`: the batch size was
    chosen automatically and may shrink on out-of-memory errors. `page_timeout`: seconds a page's answer may
    take from when its batch starts. `stats`, when given, is filled in as the run goes. The options were
    checked by the caller (dsvl2.options)."""
    assert batch_size >= 1 and (page_timeout is None or page_timeout > 0)
    stats = stats if stats is not None else RunStats()
    state = _Run(
        runtime=runtime,
        task=task,
        settings=settings,
        model=model or {"id": runtime.model_id, "revision": runtime.revision, "fingerprint": None},
        fail_fast=fail_fast,
        batch_size=batch_size,
        adaptive_batch=adaptive_batch,
        page_timeout=page_timeout,
        stats=stats,
    )
    start = time.perf_counter()
    stream = prefetch(pages, batch_size if read_ahead is None else read_ahead)
    try:
        for page in stream:
            state.add_page(page, is_done)
            if state.n_pending >= state.batch_size or state.n_pending == 0:
                state.flush()
            while state.pending_events:
                yield state.pending_events.popleft()
            if state.stop:
                stats.stopped_early = True
                break
        else:
            state.finish()
            while state.pending_events:
                yield state.pending_events.popleft()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        stats.seconds = time.perf_counter() - start


def run(*, on_event: Callable[[Event], None], **arguments: Any) -> RunStats:
    """`events(**arguments)`, each handed to `on_event`; returns the run's counts."""
    stats = RunStats()
    for event in events(stats=stats, **arguments):
        on_event(event)
    return stats
