"""One command run end to end: check options, find and open the inputs, pick this shard's documents,
check that no output path escapes the output or overwrites an input, load resume state, load the model
only if some page still needs it, stream pages through the runner into the output, then write the
manifest and the summary. Returns the exit code; never raises for user errors. Writing a record and
finishing the outputs are shielded from SIGINT / SIGTERM (dsvl2.signals), so a stop never cuts one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from dsvl2 import backend
from dsvl2.annotate import annotate, annotation_path
from dsvl2.errors import ExitCode, OutputError, UsageError, describe
from dsvl2.inputs import (
    Opened,
    PageSelection,
    Shard,
    expand_inputs,
    open_document,
    read_path_list,
)
from dsvl2.manifest import Ending, manifest_path, now, write_manifest
from dsvl2.pages import iter_pages
from dsvl2.pipelines import runner
from dsvl2.pipelines.base import REPETITION_GUARD, Document, Settings, Task, record_key
from dsvl2.pipelines.ground import GroundTask
from dsvl2.pipelines.limits import OutOfMemory
from dsvl2.progress import Reporter
from dsvl2.signals import shielded
from dsvl2.writers import DirSink, FileSink, Format, Sink, StreamSink

DEFAULT_FORMAT = {
    "ocr": Format.md,
    "table": Format.csv,
    "chart": Format.csv,
    "ground": Format.jsonl,
    "ask": Format.text,
}
DEFAULT_MAX_NEW_TOKENS = {"ocr": 2048, "table": 2048, "chart": 1024, "ground": 512, "ask": 512}
DEFAULT_BATCH_SIZE = 4
_FORMAT_BY_SUFFIX = {
    ".json": Format.json,
    ".jsonl": Format.jsonl,
    ".ndjson": Format.jsonl,
    ".md": Format.md,
    ".csv": Format.csv,
    ".txt": Format.text,
}


@dataclass(frozen=True, slots=True)
class Destination:
    kind: str  # "stdout" | "file" | "dir"
    path: Path | None
    fmt: Format


def destination(output: str | None, fmt: Format | None, task: str) -> Destination:
    """`-o`: none or '-' is stdout; an existing directory, a trailing '/', or a new name without a suffix is
    a directory; anything else a file (whose suffix picks the format when --format is not given)."""
    if output in (None, "-"):
        return Destination("stdout", None, fmt or DEFAULT_FORMAT[task])
    path = Path(output)
    if path.is_dir() or output.endswith(("/", os.sep)) or (not path.exists() and not path.suffix):
        return Destination("dir", path, fmt or DEFAULT_FORMAT[task])
    return Destination("file", path, fmt or _FORMAT_BY_SUFFIX.get(path.suffix.lower(), DEFAULT_FORMAT[task]))


class _Unloaded:
    """Stands in for the runtime when no page needs the model (all done, or only unreadable documents)."""

    def __init__(self, settings: Settings) -> None:
        self.model_id, self.revision = settings.model, settings.revision

    def generate(self, requests: Sequence[Any], *, on_completion: Any = None) -> list[Any]:
        raise RuntimeError("the model was not loaded")  # unreachable: no page was sent


def _sink(dest: Destination, task: Task, total: int, stdout: IO[str]) -> Sink:
    if dest.kind == "dir" and dest.path is not None:
        return DirSink(dest.path, dest.fmt, task.name, prompts=task.prompts)
    if dest.kind == "file" and dest.path is not None:
        return FileSink(dest.path, dest.fmt, task.name, prompts=task.prompts)
    return StreamSink(stdout, dest.fmt, task.name, headers=total > 1)


def _check(
    *,
    paths: Sequence[str],
    stdin_data: bool,
    dest: Destination,
    resume: bool,
    batch_size: int | None,
    annotate_dir: Path | None,
    task: Task,
    page_timeout: float | None,
    repetition_guard: int | None,
) -> None:
    if stdin_data and "-" in paths:
        raise UsageError("'-' (paths on stdin) and --stdin-data (a document on stdin) cannot be combined")
    if not paths and not stdin_data:
        raise UsageError("no inputs: give files, directories, '-' for paths on stdin, or --stdin-data")
    if paths.count("-") > 1:
        raise UsageError("'-' may be given only once")
    if resume and dest.kind == "stdout":
        raise UsageError("--resume needs an output to resume: -o FILE.jsonl or -o DIR/")
    if resume and dest.kind == "file" and dest.fmt not in (Format.json, Format.jsonl):
        raise UsageError("--resume into a single file needs --format json or jsonl (or use -o DIR/)")
    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if page_timeout is not None and not page_timeout > 0:
        raise UsageError("--page-timeout must be a positive number of seconds")
    if repetition_guard is not None and repetition_guard < 0:
        raise UsageError("--repetition-guard must be 0 (off) or a number of tokens")
    if annotate_dir is not None and task.name != "ground":
        raise UsageError("--annotate is only for ground")
    if isinstance(task, GroundTask) and task.queries and "{query}" not in task.template:
        raise UsageError("--query needs a --prompt template containing {query}")
    if not task.prompts:
        what = "--query TEXT (or a --prompt without {query})" if task.name == "ground" else "--prompt or --prompts"
        raise UsageError(f"{task.name} needs at least one prompt: give {what}")


def run_task(
    *,
    task: Task,
    paths: Sequence[str],
    globs: Sequence[str] = (),
    stdin_data: bool = False,
    pages: PageSelection | None = None,
    password: str | None = None,
    dpi: float = 144.0,
    max_side: int = 2048,
    output: str | None = None,
    fmt: Format | None = None,
    resume: bool = False,
    manifest: Path | None = None,
    shard: Shard | None = None,
    fail_fast: bool = False,
    batch_size: int | None = None,
    quiet: bool = False,
    verbose: int = 0,
    annotate_dir: Path | None = None,
    model: str = backend.DEFAULT_MODEL,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    page_timeout: float | None = None,
    repetition_guard: int | None = None,
    retry_repetition: bool = False,
) -> int:
    """Run `task` over the inputs; returns the exit code (see dsvl2.errors). `repetition_guard` None
    takes the task's default from pipelines.base.REPETITION_GUARD; 0 turns the guard off."""
    reporter = Reporter(total_pages=0, total_docs=0, quiet=quiet, verbose=verbose)
    try:
        dest = destination(output, fmt, task.name)
        _check(
            paths=paths,
            stdin_data=stdin_data,
            dest=dest,
            resume=resume,
            batch_size=batch_size,
            annotate_dir=annotate_dir,
            task=task,
            page_timeout=page_timeout,
            repetition_guard=repetition_guard,
        )
        ngram, window = REPETITION_GUARD[task.name]
        if repetition_guard is not None:
            ngram, window = repetition_guard, max(window, 4 * repetition_guard)
        try:
            settings = Settings(
                model=model,
                revision=revision,
                max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task.name],
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                dpi=dpi,
                max_side=max_side,
                no_repeat_ngram=ngram,
                repeat_window=window,
                retry_repetition=retry_repetition,
            )
            settings.sampling()
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if dpi <= 0 or max_side < 16:
            raise UsageError("--dpi must be positive and --max-side at least 16")
        stdin = sys.stdin.buffer.read() if (stdin_data or "-" in paths) else b""
        files, warnings = expand_inputs(
            paths,
            globs=globs,
            stdin_paths=read_path_list(stdin) if "-" in paths else (),
            stdin_data=stdin if stdin_data else None,
        )
        if shard is not None:
            files = [f for f in files if shard.takes(f.key)]
        opened = [open_document(f, password=password, pages=pages) for f in files]
        warnings += [o.warning for o in opened if o.warning]
        warnings += [
            f"{o.doc.source}: --pages selects none of its {o.doc.n_pages} pages"
            for o in opened
            if o.doc.error is None and not o.pages
        ]
        return _Session(
            task=task, settings=settings, dest=dest, opened=opened, reporter=reporter, warnings=warnings
        ).run(
            resume=resume,
            manifest=manifest_path(dest.kind, dest.path, manifest, task.name, shard),
            shard=shard,
            fail_fast=fail_fast,
            batch_size=batch_size,
            annotate_dir=annotate_dir,
            device=device,
            dtype=dtype,
            password=password,
            page_timeout=page_timeout,
        )
    except BaseException as exc:
        known = describe(exc)
        if known is None:
            raise
        reporter.error(known[0])
        return int(known[1])


class _Session:
    """A run whose options are checked and inputs opened."""

    def __init__(
        self,
        *,
        task: Task,
        settings: Settings,
        dest: Destination,
        opened: list[Opened],
        reporter: Reporter,
        warnings: list[str],
    ) -> None:
        self.task, self.settings, self.dest, self.opened = task, settings, dest, opened
        self.reporter, self.warnings = reporter, warnings
        self.settings_dict = settings.to_dict()
        self.started = now()

    def _need(self, sink: Sink, doc: Document, number: int) -> bool:
        return any(
            not sink.is_done(
                record_key(sha256=doc.sha256, page=number, task=self.task.name, prompt=p, settings=self.settings_dict)
            )
            for p in self.task.prompts
        )

    def _check_outputs(self, planned: list[Path], annotate_dir: Path | None) -> None:
        """Refuse, before any page is processed, an output that would overwrite an input or (for
        annotations) leave its directory; DirSink.planned has already refused paths that leave -o DIR."""
        if annotate_dir is not None:
            for o in self.opened:
                for number in o.pages:
                    for index in range(len(self.task.prompts)) if len(self.task.prompts) > 1 else (None,):
                        planned.append(annotation_path(o.doc, number, annotate_dir, prompt_index=index))
        inputs = {os.path.realpath(o.input.path) for o in self.opened if o.input.path is not None}
        for path in planned:
            if os.path.realpath(path) in inputs:
                raise OutputError(f"{path} is also an input; choose another output")

    def run(
        self,
        *,
        resume: bool,
        manifest: Path | None,
        shard: Shard | None,
        fail_fast: bool,
        batch_size: int | None,
        annotate_dir: Path | None,
        device: str,
        dtype: str,
        password: str | None,
        page_timeout: float | None,
    ) -> int:
        n_prompts = len(self.task.prompts)
        total = sum(max(len(o.pages), 1 if o.doc.error else 0) for o in self.opened) * n_prompts
        sink = _sink(self.dest, self.task, total, sys.stdout)
        docs = [o.doc for o in self.opened]
        self._check_outputs([*sink.planned(docs), *([manifest] if manifest else [])], annotate_dir)
        self.warnings += sink.prepare(docs, resume=resume)
        for w in self.warnings:
            self.reporter.warn(w)
        needs_model = any(o.doc.error is None and any(self._need(sink, o.doc, n) for n in o.pages) for o in self.opened)
        model = (
            backend.runtime_factory(
                self.settings.model, revision=self.settings.revision, device=device, dtype=dtype, batch_size=batch_size
            )
            if needs_model
            else _Unloaded(self.settings)
        )
        size = batch_size or getattr(model, "max_batch_size", None) or DEFAULT_BATCH_SIZE
        reporter = Reporter(
            total_pages=total,
            total_docs=len(self.opened),
            quiet=self.reporter.quiet,
            verbose=self.reporter.verbose,
            console=self.reporter.console,
        )
        self.reporter = reporter
        annotations: list[Path] = []
        sizes = [size]

        def on_event(event: runner.Event) -> None:
            with shielded():
                if isinstance(event, runner.RecordDone):
                    sink.write(event.record, event.page.doc)
                    if annotate_dir is not None:
                        index = self.task.prompts.index(event.record.prompt) if n_prompts > 1 else None
                        path = annotate(event.page, event.record, annotate_dir, prompt_index=index)
                        annotations.extend([path] if path else [])
                elif isinstance(event, runner.DocumentDone):
                    sink.document_done(event.doc)
                elif isinstance(event, runner.BatchResized):
                    sizes.append(event.new)
            reporter(event)

        stopped_by: BaseException | None = None
        stopped_early = False
        try:
            with reporter:
                stats = runner.run(
                    runtime=model,
                    task=self.task,
                    settings=self.settings,
                    batch_size=size,
                    on_event=on_event,
                    is_done=sink.is_done,
                    fail_fast=fail_fast,
                    adaptive_batch=batch_size is None,
                    page_timeout=page_timeout,
                    pages=iter_pages(
                        self.opened,
                        dpi=self.settings.dpi,
                        max_side=self.settings.max_side,
                        password=password,
                        want=lambda d, n: self._need(sink, d, n),
                    ),
                )
            stopped_early = stats.stopped_early
        except (KeyboardInterrupt, OutOfMemory) as exc:
            stopped_by = exc
        except BaseException:
            with shielded():
                sink.close(complete=False)
            raise
        interrupted = isinstance(stopped_by, KeyboardInterrupt)
        ending = Ending(
            interrupted=interrupted,
            stopped_early=stopped_early,
            error=None if stopped_by is None or interrupted else str(stopped_by),
            final_batch_size=sizes[-1],
        )
        with shielded():
            sink.close(complete=stopped_by is None and not stopped_early)
            if manifest is not None:
                write_manifest(
                    manifest,
                    task=self.task.name,
                    prompts=self.task.prompts,
                    settings=self.settings_dict,
                    model={"id": model.model_id, "revision": model.revision},
                    runtime={"device": device, "dtype": dtype, "batch_size": size, "page_timeout": page_timeout},
                    shard=shard,
                    output={
                        "kind": self.dest.kind,
                        "path": str(self.dest.path) if self.dest.path else None,
                        "format": self.dest.fmt.value,
                    },
                    started=self.started,
                    ending=ending,
                    opened=self.opened,
                    outputs=[*sink.outputs, *annotations],
                    incomplete=sink.incomplete,
                    warnings=self.warnings,
                    summary=reporter.tally.summary(),
                )
        where = str(self.dest.path) if self.dest.path is not None else None
        reporter.print_summary(
            command=self.task.name, interrupted=interrupted, incomplete=len(sink.incomplete), where=where
        )
        if stopped_by is not None and not interrupted:
            raise stopped_by  # reported by run_task as one line with its exit code
        if interrupted:
            return int(ExitCode.INTERRUPTED)
        return int(ExitCode.PAGES_FAILED if reporter.tally.failed else ExitCode.OK)
