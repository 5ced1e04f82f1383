"""Run a task over a stream of pages with continuous batching: each page's requests go to the runtime as
the page is rendered (`Runtime.submit`), the runtime admits them as rows free up, and the runner steps it
(`Runtime.step`) and turns each completion into a record as soon as it arrives, so one long answer never
holds back the pages behind it. Failures stay with the page that caused them; progress is a stream of
events (`events`, a generator: the CLI writes and reports them, the Python API yields the records).

Records are emitted in input order through a bounded reorder buffer, so output does not depend on batch
size or on the order the runtime finishes requests. Pages are pulled from the input a bounded number ahead
of the model (a render thread and a queue of `read_ahead` pages), and only while the requests waiting and
running are fewer than twice the batch size and the reorder buffer holds fewer than `BUFFER_PER_ROW` pages
per row, so memory does not grow with document length. Limits (pipelines.limits): a page over
`page_timeout` (counted from when its request is handed to the runtime) is cancelled and recorded as failed;
a step that runs out of memory halves the requests in flight when the batch size is automatic, else the
run stops with `OutOfMemory`; a step that fails otherwise is retried one request at a time, so the page
that broke it fails alone. With `settings.retry_repetition`, an answer the repetition guard stopped is
generated once more with `settings.retry_sampling()`, both attempts kept in the record. The unit of all
this is a window (pipelines.windows): one page, or with `window` several pages of a document in one request
(`ask --per document`), which batching, limits and retries treat like any other. Nothing here prints or
writes files.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from dsvl2.model.errors import InputError
from dsvl2.model.requests import Completion, Request, Sampling
from dsvl2.pipelines import windows
from dsvl2.pipelines.base import FAILURES, Document, Page, PageRecord, RecordContext, Runtime, Settings, attempt
from dsvl2.pipelines.limits import Deadlines, OutOfMemory, is_out_of_memory
from dsvl2.pipelines.prefetch import prefetch
from dsvl2.pipelines.task import Task
from dsvl2.pipelines.windows import Window


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
    """New requests went to the runtime; `size` requests are now in flight."""

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
    window: Window
    prompt: str
    record: PageRecord | None = None
    request: Request | None = None
    first: Completion | None = None  # the answer the repetition guard stopped, while its retry runs

    @property
    def doc(self) -> Document:
        return self.window.first.doc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


BUFFER_PER_ROW = 8  # pages the reorder buffer may hold per row in flight before the runner stops pulling


class _Run:
    """State of one run: the reorder buffer, the requests waiting and in flight, per-document bookkeeping,
    limits, counters."""

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
        self.cap, self.adaptive_batch = batch_size, adaptive_batch  # requests in flight at most
        self.deadlines = Deadlines(page_timeout, runtime.cancel)
        self.page_timeout = page_timeout
        self.stats = stats
        self.stats.batch_size = batch_size
        self.slots: deque[_Slot] = deque()  # the reorder buffer, in input order
        self.ready: deque[_Slot] = deque()  # requests made, not yet submitted
        self.alone: deque[_Slot] = deque()  # requests of a failed step, to be answered one at a time
        self.in_flight: dict[str, _Slot] = {}
        self.docs: deque[Document] = deque()
        self.outstanding: Counter[str] = Counter()
        self.enumerated: set[str] = set()
        self.next_id = 0

    def on_event(self, event: Event) -> None:
        self.pending_events.append(event)

    def drain(self) -> Iterator[Event]:
        while self.pending_events:
            yield self.pending_events.popleft()

    # -- pages in ------------------------------------------------------------------------------------------
    @property
    def wants_pages(self) -> bool:
        waiting = len(self.ready) + len(self.alone) + len(self.in_flight)
        return not self.stop and waiting < 2 * self.cap and len(self.slots) < BUFFER_PER_ROW * self.cap

    def add_window(self, window: Window, is_done: Callable[[str], bool]) -> None:
        page, ctx = window.first, self.ctx
        if not self.docs or self.docs[-1].key != page.doc.key:
            if self.docs:
                self.enumerated.add(self.docs[-1].key)
            self.docs.append(page.doc)
        for prompt in self.task.prompts:
            if page.number is None or (page.error is not None and not window.several):
                self._add(_Slot(window, prompt, windows.failed(ctx, window, prompt, page.error or "no pages")))
            elif is_done(windows.window_key(window, task=self.task.name, prompt=prompt, settings=ctx.settings,
                                            model=ctx.model)):  # fmt: skip
                self.stats.skipped += 1
                self.on_event(PageSkipped(page, prompt))
            elif not window.rendered:
                self._add(_Slot(window, prompt, windows.unrendered(ctx, window, prompt)))
            else:
                self._add(self._pending(window, prompt))
        self._release()

    def end_of_input(self) -> None:
        if self.docs:
            self.enumerated.add(self.docs[-1].key)
        self._release()

    def _add(self, slot: _Slot) -> None:
        self.outstanding[slot.doc.key] += 1
        self.slots.append(slot)

    def _pending(self, window: Window, prompt: str) -> _Slot:
        slot = _Slot(window, prompt)
        try:
            slot.request = self._request(windows.conversation(window, prompt), self.sampling)
            self.ready.append(slot)
        except Exception as exc:
            slot.record = windows.failed(self.ctx, window, prompt, _describe(exc))
        return slot

    def _request(self, conversation: tuple, sampling: Sampling) -> Request:
        self.next_id += 1
        return Request(f"r{self.next_id - 1}", conversation, sampling)

    # -- the model -----------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.ready or self.alone or self.in_flight)

    @property
    def stop(self) -> bool:
        return self.fail_fast and self.stats.failed > 0

    def submit(self) -> None:
        """Hand waiting requests to the runtime up to the cap (one at a time while isolating a failure).
        After a fail-fast stop, pages not yet handed over are dropped, as if never read: no record, and
        their documents stay unfinished."""
        if self.stop and self.ready:
            unsent = {id(slot) for slot in self.ready}
            for slot in self.ready:
                self.outstanding[slot.doc.key] -= 1
                self.enumerated.discard(slot.doc.key)
            self.slots = deque(slot for slot in self.slots if id(slot) not in unsent)
            self.ready.clear()
        source, limit = (self.alone, 1) if self.alone else (self.ready, self.cap)
        added = 0
        while source and len(self.in_flight) < limit:
            slot = source.popleft()
            assert slot.request is not None
            try:
                self.runtime.submit(slot.request)
            except InputError as exc:  # this request alone is refused (say, a prompt past the context)
                slot.record = windows.failed(self.ctx, slot.window, slot.prompt, _describe(exc))
                continue
            self.in_flight[slot.request.id] = slot
            self.deadlines.start(slot.request.id)
            added += 1
        if added:
            self.on_event(BatchStarted(len(self.in_flight)))
        self._release()

    def step(self) -> None:
        """One step of the runtime; each completion becomes its page's record (or its retry)."""
        try:
            completions = self.runtime.step()
        except Exception as exc:
            self._step_failed(exc)
            return
        for completion in completions:
            slot = self.in_flight.pop(completion.id, None)
            if slot is not None:
                self._complete(slot, completion, late=self.deadlines.late(completion))
        if not completions and self.in_flight and not self.runtime.has_work:
            for slot in self.in_flight.values():  # the runtime dropped them without a word
                slot.record = windows.failed(self.ctx, slot.window, slot.prompt, "the runtime returned no answer")
            self.in_flight.clear()
        self._release()

    def _step_failed(self, exc: Exception) -> None:
        """The runtime dropped every request in flight. Out of memory: fewer at once (automatic batch size),
        or stop (`OutOfMemory`); a request alone that does not fit fails. Other errors: answer them again one
        at a time, so the page that broke the step fails alone."""
        failed = list(self.in_flight.values())
        self.in_flight.clear()
        for slot in failed:
            assert slot.request is not None
            self.deadlines.forget(slot.request.id)
        if not is_out_of_memory(exc):
            error = _describe(exc)
        elif not self.adaptive_batch:
            raise OutOfMemory(len(failed), exc) from None
        elif len(failed) > 1:
            old, self.cap = self.cap, max(1, min(self.cap, len(failed)) // 2)
            self.stats.batch_size = self.cap
            self.on_event(BatchResized(old, self.cap, _describe(exc)))
            self.ready.extendleft(reversed(failed))
            return
        else:
            error = f"out of memory even alone ({_describe(exc)})"
        if len(failed) == 1:
            failed[0].record = windows.failed(self.ctx, failed[0].window, failed[0].prompt, error)
        else:
            self.alone.extend(failed)
        self._release()

    def _complete(self, slot: _Slot, completion: Completion, *, late: bool = False) -> None:
        if slot.record is not None:
            return
        if completion.finish_reason == "repetition" and self.retry_sampling is not None and slot.first is None:
            assert slot.request is not None
            slot.first = completion  # the record waits for the retry, which goes ahead of the waiting pages
            slot.request = self._request(slot.request.conversation, self.retry_sampling)
            self.ready.appendleft(slot)
            return
        attempts = None
        if slot.first is not None:
            assert self.retry_sampling is not None
            attempts = [attempt(slot.first, self.sampling), attempt(completion, self.retry_sampling)]
        record = windows.answered(self.ctx, slot.window, slot.prompt, completion, self.task, attempts=attempts)
        if late:
            error = (
                f"page timeout: no complete answer within {self.page_timeout:g} s (--page-timeout); "
                f"stopped after {completion.n_generated} generated tokens, the partial answer is kept in text"
            )
            record = replace(record, status="failed", error=error)
        slot.record = record

    # -- records out ---------------------------------------------------------------------------------------
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
            self.outstanding[slot.doc.key] -= 1
            self.on_event(RecordDone(record, (slot.window.rendered or slot.window.pages)[0]))
            self._finish_documents()

    def _finish_documents(self) -> None:
        while self.docs and self.docs[0].key in self.enumerated and self.outstanding[self.docs[0].key] == 0:
            self.on_event(DocumentDone(self.docs.popleft()))

    def abandon(self) -> None:
        """After a fail-fast stop or the end of input: whatever never got an answer is failed (never silent)."""
        for slot in self.slots:
            if slot.record is None:
                slot.record = windows.failed(self.ctx, slot.window, slot.prompt, "the runtime returned no answer")
        self._release()


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
    window: int | None = None,
    stats: RunStats | None = None,
) -> Iterator[Event]:
    """Answer `task.prompts` for every page, as a stream of events; every page and prompt ends as exactly one
    `RecordDone` or `PageSkipped`, in input order. With `window` (`ask --per document`), up to that many
    consecutive pages of a document are asked in one request instead, one record per window and prompt
    (pipelines.windows); read-ahead and the buffer then count windows. `model` is the record's model field (default: the
    runtime's id and revision). Pages whose record key `is_done` are skipped. With `fail_fast`, stops after
    the batch in which the first failed or unparseable page was found. `adaptive_batch`: the batch size was
    chosen automatically and may shrink on out-of-memory errors. `page_timeout`: seconds a page's answer may
    take from when its batch starts. `stats`, when given, is filled in as the run goes. The options were
    checked by the caller (dsvl2.options)."""
    assert batch_size >= 1 and (page_timeout is None or page_timeout > 0) and (window is None or window >= 1)
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
    stream = prefetch(windows.windows(pages, window), batch_size if read_ahead is None else read_ahead)
    exhausted = False
    try:
        while True:
            while not exhausted and state.wants_pages:
                item = next(stream, None)
                if item is None:
                    exhausted = True
                    state.end_of_input()
                else:
                    state.add_window(item, is_done)
                yield from state.drain()
            if state.stop and not exhausted:
                stats.stopped_early = True
            if not state.busy:
                # Nothing waits for the model, so every page pulled has its record: more pages, or the end.
                assert exhausted or state.stop or state.wants_pages
                if exhausted or state.stop:
                    break
                continue
            state.submit()
            state.step()
            yield from state.drain()
        state.abandon()
        yield from state.drain()
    finally:
        state.deadlines.close()
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
