"""One task over a set of inputs with checked options: the path the CLI (dsvl2.session) and the Python API
(dsvl2.api) both take. It opens the inputs (hash, sniff, count pages; this shard's documents only), knows
the settings and model identity that every record and resume key carries, which pages still need rendering
(per page, or per window of pages for `ask --per document`), and streams the runner's events for a runtime.
It neither writes outputs nor prints; bad inputs become error records, never exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsvl2.backend import Identity
from dsvl2.inputs import Blob, InputFile, Opened, expand_inputs, open_document
from dsvl2.options import Options
from dsvl2.pages import iter_pages
from dsvl2.pipelines import runner
from dsvl2.pipelines.base import Document, OptionError, Runtime, Settings, record_key
from dsvl2.pipelines.task import Task
from dsvl2.pipelines.windows import plan

DEFAULT_BATCH_SIZE = 4  # pages at once when the runtime does not say


class Unloaded:
    """Stands in for the runtime when no page needs the model (all done, or only unreadable documents)."""

    max_batch_size = 1
    has_work = False
    load_seconds = 0.0
    kernels = None

    def __init__(self, model: str, revision: str | None) -> None:
        self.model_id, self.revision = model, revision

    def submit(self, request: Any) -> None:
        raise RuntimeError("the model was not loaded")  # unreachable: no page needing it is sent

    def step(self) -> list[Any]:
        return []

    def cancel(self, request_id: str) -> None:
        pass


@dataclass
class Job:
    """A task, its options and its opened inputs; `identity` is set once the model is known."""

    task: Task
    options: Options
    opened: list[Opened]
    warnings: list[str] = field(default_factory=list)
    identity: Identity | None = None

    @classmethod
    def open(
        cls,
        task: Task,
        options: Options,
        args: Sequence[str | Blob],
        *,
        stdin_paths: Sequence[str] = (),
        stdin_data: bytes | None = None,
    ) -> Job:
        """Expand and open the inputs (paths, directories, blobs), keeping this shard's documents."""
        if options.annotate is not None and not task.has_boxes:
            raise OptionError("annotate", f"is only for tasks whose results have boxes (not {task.name})")
        files, warnings = expand_inputs(args, globs=options.globs, stdin_paths=stdin_paths, stdin_data=stdin_data)
        return cls.from_files(task, options, files, warnings)

    @classmethod
    def from_files(cls, task: Task, options: Options, files: list[InputFile], warnings: list[str]) -> Job:
        if options.shard is not None:
            files = [f for f in files if options.shard.takes(f.key)]
        opened = [open_document(f, password=options.password, pages=options.pages) for f in files]
        warnings = [*warnings, *(o.warning for o in opened if o.warning)]
        warnings += [
            f"{o.doc.source}: --pages selects none of its {o.doc.n_pages} pages"
            for o in opened
            if o.doc.error is None and not o.pages
        ]
        return cls(task, options, opened, warnings)

    @property
    def docs(self) -> list[Document]:
        return [o.doc for o in self.opened]

    @property
    def window(self) -> int | None:
        """Pages one request covers: a task that asks over several pages at once says how many in its
        `window` (ask --per document); None is one page per request."""
        return getattr(self.task, "window", None)

    @property
    def total(self) -> int:
        """Records the job will end with: one per selected page, or window of pages, (one for a document that
        failed to open) and prompt."""
        per_doc = (max(len(plan(o.pages, self.window)), 1 if o.doc.error else 0) for o in self.opened)
        return sum(per_doc) * len(self.task.prompts)

    @property
    def has_pages(self) -> bool:
        return any(o.doc.error is None and o.pages for o in self.opened)

    def identify(self, identify: Callable[..., Identity]) -> Identity:
        """Ask `identify` (dsvl2.backend.identify) which model, device and dtype the options mean."""
        o = self.options
        self.identity = identify(o.model, revision=o.revision, device=o.device, dtype=o.dtype, quantize=o.quantize)
        return self.identity

    @property
    def settings(self) -> Settings:
        i = self.resolved_identity()
        return self.options.settings(type(self.task), device=i.device, dtype=i.dtype, quantize=i.quantize)

    def resolved_identity(self) -> Identity:
        if self.identity is None:
            raise RuntimeError("Job.identify (or a runtime's identity) must come before records are made")
        return self.identity

    def key(self, doc: Document, number: int, prompt: str, *, pages: tuple[int, ...] | None = None) -> str:
        """The resume key of the record for `prompt` on page `number`, or over the window `pages` (several)."""
        return record_key(
            sha256=doc.sha256,
            page=number,
            task=self.task.name,
            prompt=prompt,
            settings=self.settings.to_dict(),
            model=self.resolved_identity().record_model(),
            pages=pages,
        )

    def needs(self, is_done: Callable[[str], bool]) -> Callable[[Document, int], bool]:
        """`want(doc, page)` for rendering: some prompt of the page is not done yet; per window, some prompt
        of the page's window (every page of a window is rendered, or none)."""
        if self.window is None:
            return lambda doc, number: any(not is_done(self.key(doc, number, p)) for p in self.task.prompts)
        window_of = {(o.doc.key, n): w for o in self.opened for w in plan(o.pages, self.window) for n in w}
        wanted: dict[tuple[str, tuple[int, ...]], bool] = {}

        def want(doc: Document, number: int) -> bool:
            numbers = window_of[doc.key, number]
            if (doc.key, numbers) not in wanted:
                keys = (self.key(doc, numbers[0], p, pages=numbers) for p in self.task.prompts)
                wanted[doc.key, numbers] = any(not is_done(key) for key in keys)
            return wanted[doc.key, numbers]

        return want

    def batch_size(self, runtime: Runtime) -> int:
        """Pages at once: --batch-size, else what the runtime says, else DEFAULT_BATCH_SIZE."""
        return self.options.batch_size or runtime.max_batch_size or DEFAULT_BATCH_SIZE

    def events(
        self,
        runtime: Runtime,
        *,
        is_done: Callable[[str], bool] = lambda key: False,
        stats: runner.RunStats | None = None,
    ) -> Iterator[runner.Event]:
        """The runner's events for every page of the job (pages that `is_done` are skipped, unrendered)."""
        o = self.options
        return runner.events(
            runtime=runtime,
            task=self.task,
            settings=self.settings,
            model=self.resolved_identity().record_model(),
            batch_size=self.batch_size(runtime),
            adaptive_batch=o.batch_size is None,
            is_done=is_done,
            fail_fast=o.fail_fast,
            page_timeout=o.page_timeout,
            window=self.window,
            stats=stats,
            pages=iter_pages(
                self.opened, dpi=o.dpi, max_side=o.max_side, password=o.password, want=self.needs(is_done)
            ),
        )

