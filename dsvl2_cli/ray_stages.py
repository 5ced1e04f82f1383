"""The two stages of a `--ray` run that execute in Ray processes, and the values that cross between them.
`render` (a Ray task) opens a chunk of one document and renders the pages of its windows to PNG bytes;
`Answerer` (a callable class: Ray Data's actor pool) loads the runtime once per worker and runs the
pipeline runner over each batch of windows it is given, returning every window's records (with `--annotate`,
its pages' PNG bytes too, for the driver to draw on) and a report of itself. A worker never fails a block:
whatever the runner could not answer becomes a failed record. The driver (dsvl2.ray_run) plans the chunks,
reads the records back in order and writes them; nothing here writes or prints.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from dsvl2.backend import Identity
from dsvl2.inputs import InputFile, Opened
from dsvl2.job import Job
from dsvl2.options import Options
from dsvl2.pages import iter_pages
from dsvl2.pipelines import runner, windows
from dsvl2.pipelines.base import Document, Page, PageRecord, PageSize, RecordContext
from dsvl2.pipelines.task import Task
from dsvl2.pipelines.windows import Window


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive windows of one document for one render task. `units` numbers each window in the run's
    plan; `numbers` are each window's page numbers (() for a document that could not be opened); `done` the
    record keys of each window already written by an earlier run (`--resume`)."""

    input: InputFile  # an absolute path, or the bytes of a document given as data
    doc: Document
    units: tuple[int, ...]
    numbers: tuple[tuple[int, ...], ...]
    done: tuple[frozenset[str], ...]


@dataclass(frozen=True, slots=True)
class RenderedPage:
    number: int | None
    png: bytes | None
    size: PageSize | None
    error: str | None
    render_seconds: float

    def page(self, doc: Document) -> Page:
        image = None
        if self.png is not None:
            with Image.open(io.BytesIO(self.png)) as im:
                image = im.convert("RGB")
        return Page(doc, self.number, image, self.size, self.error, self.render_seconds)


@dataclass(frozen=True, slots=True)
class RenderedWindow:
    """One window of pages, rendered: what the render stage hands the answer stage."""

    unit: int
    doc: Document
    pages: tuple[RenderedPage, ...]
    done: frozenset[str]


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """A pool worker as it reports itself with each answer, for the run manifest: what it loaded ("model", or
    "server" with `--server`, when it loads none), how long that took, and the batch size its runner started
    with and has now (smaller after an out-of-memory back-off)."""

    worker: str  # host:pid
    loaded: str
    load_seconds: float
    batch_size: int
    final_batch_size: int


@dataclass(frozen=True, slots=True)
class Answered:
    """One window's outcome: its records, the prompts skipped because an earlier run answered them, the PNG
    of each answered page by number (with `--annotate` only) and the report of the worker that answered."""

    unit: int
    records: tuple[PageRecord, ...]
    skipped: tuple[str, ...]
    images: tuple[tuple[int, bytes], ...] = ()
    worker: WorkerReport | None = None  # None: the driver's own failed records for a window no worker returned


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # lossless: the worker sees the pixels a local run sees
    return buffer.getvalue()


def render(batch: dict[str, Any], *, dpi: float, max_side: int, password: str | None) -> dict[str, list[Any]]:
    """Ray task: the chunks of `batch["chunk"]` (pickled `Chunk`s) → one row per window, `payload` a pickled
    `RenderedWindow`. A page that cannot be rendered carries its error, as in a local run."""
    units: list[int] = []
    payloads: list[bytes] = []
    for blob in batch["chunk"]:
        chunk: Chunk = pickle.loads(blob)
        wanted = {n for numbers in chunk.numbers for n in numbers}
        opened = Opened(chunk.input, chunk.doc, tuple(sorted(wanted)))
        rendered: dict[int | None, RenderedPage] = {}
        for page in iter_pages([opened], dpi=dpi, max_side=max_side, password=password):
            png = _png(page.image) if page.image is not None else None
            rendered[page.number] = RenderedPage(page.number, png, page.size, page.error, page.render_seconds)
        for unit, numbers, done in zip(chunk.units, chunk.numbers, chunk.done, strict=True):
            pages = tuple(rendered[n] for n in numbers) if numbers else (rendered[None],)
            units.append(unit)
            payloads.append(pickle.dumps(RenderedWindow(unit, chunk.doc, pages, done)))
    return {"unit": units, "payload": payloads}


def load_runtime(options: Options) -> Any:
    """The runtime a worker answers with: the servers of `--server`, else the model, loaded once."""
    if options.server:
        from dsvl2.remote import connect

        return connect(options)
    from dsvl2 import backend

    o = options
    return backend.runtime_factory(
        o.model, revision=o.revision, device=o.device, dtype=o.dtype, batch_size=o.batch_size, quantize=o.quantize
    )


class Answerer:
    """Ray Data callable class: each pool worker holds one runtime for its whole life and answers batches of
    rendered windows with the pipeline runner (continuous batching, retries, page timeouts)."""

    def __init__(self, *, task: Task, options: Options, identity: Identity, model: str) -> None:
        self.job = Job(task, options, [], identity=identity)  # settings and record keys: the driver's options
        self.runtime = load_runtime(replace(options, model=model))  # `model` as this worker can find it
        # Out-of-memory back-off lasts for the worker's life, as it does for a local run: each call starts from
        # the batch size the last one ended with.
        self.batch_size = self.job.batch_size(self.runtime)
        self.report = WorkerReport(f"{socket.gethostname()}:{os.getpid()}", "server" if options.server else "model",
                                   round(self.runtime.load_seconds, 3), self.batch_size, self.batch_size)  # fmt: skip

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        rendered = [pickle.loads(blob) for blob in batch["payload"]]
        answered = self.answer(rendered)
        return {"unit": [a.unit for a in answered], "payload": [pickle.dumps(a) for a in answered]}

    def answer(self, rendered: Sequence[RenderedWindow]) -> list[Answered]:
        """Every window's records, in order; what the runner did not finish is a failed record naming why."""
        job, o = self.job, self.job.options
        windows_ = [self._window(w) for w in rendered]
        unit_of = {(w.doc.key, p.number): w.unit for w in rendered for p in w.pages}
        records: dict[int, list[PageRecord]] = {w.unit: [] for w in rendered}
        skipped: dict[int, list[str]] = {w.unit: [] for w in rendered}
        done = frozenset().union(*(w.done for w in rendered))
        try:
            for event in runner.events(
                runtime=self.runtime,
                task=job.task,
                settings=job.settings,
                model=job.resolved_identity().record_model(),
                batch_size=self.batch_size,
                adaptive_batch=o.batch_size is None,
                is_done=done.__contains__,
                page_timeout=o.page_timeout,
                window=job.window,
                pages=[page for window in windows_ for page in window.pages],
            ):
                if isinstance(event, runner.RecordDone):
                    records[unit_of[event.page.doc.key, event.page.number]].append(event.record)
                elif isinstance(event, runner.PageSkipped):
                    skipped[unit_of[event.page.doc.key, event.page.number]].append(event.prompt)
                elif isinstance(event, runner.BatchResized):
                    self.batch_size = event.new
        except Exception as exc:  # a worker answers for every window it was given, whatever happened
            self._fill(windows_, rendered, records, skipped, f"the Ray worker failed: {type(exc).__name__}: {exc}")
        report = replace(self.report, final_batch_size=self.batch_size)
        return [Answered(w.unit, tuple(records[w.unit]), tuple(skipped[w.unit]), self._images(w), report)
                for w in rendered]  # fmt: skip

    def _images(self, rendered: RenderedWindow) -> tuple[tuple[int, bytes], ...]:
        """The pages' PNGs as rendered, for `--annotate` (the driver draws the boxes): bytes cross back only then."""
        if self.job.options.annotate is None:
            return ()
        return tuple((p.number, p.png) for p in rendered.pages if p.number is not None and p.png is not None)

    def _window(self, rendered: RenderedWindow) -> Window:
        pages = tuple(p.page(rendered.doc) for p in rendered.pages)
        return Window(pages, several=self.job.window is not None and pages[0].number is not None)

    def _fill(
        self,
        windows_: Sequence[Window],
        rendered: Sequence[RenderedWindow],
        records: dict[int, list[PageRecord]],
        skipped: dict[int, list[str]],
        error: str,
    ) -> None:
        job = self.job
        ctx = RecordContext(job.task.name, job.settings, job.resolved_identity().record_model())
        for window, w in zip(windows_, rendered, strict=True):
            answered = {r.prompt for r in records[w.unit]} | set(skipped[w.unit])
            missing = [p for p in job.task.prompts if p not in answered]
            records[w.unit].extend(windows.failed(ctx, window, p, error) for p in missing)
            records[w.unit].sort(key=lambda r: job.task.prompts.index(r.prompt))

