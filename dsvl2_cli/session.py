"""One command run end to end: check how inputs and outputs fit together, open the inputs (dsvl2.job),
check that no output path escapes the output or overwrites an input, load resume state, load the model
only if some page still needs it, stream the job's events into the output, then write the manifest and the
summary. Returns the exit code; never raises for user errors. Writing a record and finishing the outputs
are shielded from SIGINT / SIGTERM (dsvl2.signals), so a stop never cuts one. With `--ray` the pages are
answered on a Ray cluster (dsvl2.ray_run) and everything else here stays the same.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dsvl2 import backend
from dsvl2.annotate import annotate, annotation_path
from dsvl2.errors import ExitCode, OutputError, UsageError, describe
from dsvl2.inputs import read_path_list
from dsvl2.job import Job, Unloaded
from dsvl2.manifest import Ending, manifest_path, now, write_manifest
from dsvl2.options import Options
from dsvl2.pipelines import runner
from dsvl2.pipelines.limits import OutOfMemory
from dsvl2.pipelines.task import Task
from dsvl2.progress import Reporter
from dsvl2.signals import shielded
from dsvl2.writers import DirSink, FileSink, Format, Sink, StreamSink

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


def destination(output: str | None, fmt: Format | None, task: type[Task]) -> Destination:
    """`-o`: none or '-' is stdout; an existing directory, a trailing '/', or a new name without a suffix is
    a directory; anything else a file (whose suffix picks the format when --format is not given)."""
    default = Format(task.default_format)
    if output in (None, "-"):
        return Destination("stdout", None, fmt or default)
    path = Path(output)
    if path.is_dir() or output.endswith(("/", os.sep)) or (not path.exists() and not path.suffix):
        return Destination("dir", path, fmt or default)
    return Destination("file", path, fmt or _FORMAT_BY_SUFFIX.get(path.suffix.lower(), default))


def _check(*, paths: Sequence[str], options: Options, dest: Destination) -> None:
    """How the inputs and the output fit together (each option's own value was checked by Options)."""
    if options.stdin_data and "-" in paths:
        raise UsageError("'-' (paths on stdin) and --stdin-data (a document on stdin) cannot be combined")
    if not paths and not options.stdin_data:
        raise UsageError("no inputs: give files, directories, '-' for paths on stdin, or --stdin-data")
    if paths.count("-") > 1:
        raise UsageError("'-' may be given only once")
    if options.resume and dest.kind == "stdout":
        raise UsageError("--resume needs an output to resume: -o FILE.jsonl or -o DIR/")
    if options.resume and dest.kind == "file" and dest.fmt not in (Format.json, Format.jsonl):
        raise UsageError("--resume into a single file needs --format json or jsonl (or use -o DIR/)")


def run_task(*, task: Task, paths: Sequence[str], options: Options) -> int:
    """Run `task` over the inputs with checked `options`; returns the exit code (see dsvl2.errors)."""
    reporter = Reporter(total_pages=0, total_docs=0, quiet=options.quiet, verbose=options.verbose)
    try:
        dest = destination(options.output, options.format, type(task))
        _check(paths=paths, options=options, dest=dest)
        stdin = sys.stdin.buffer.read() if (options.stdin_data or "-" in paths) else b""
        job = Job.open(
            task,
            options,
            list(paths),
            stdin_paths=read_path_list(stdin) if "-" in paths else (),
            stdin_data=stdin if options.stdin_data else None,
        )
        return _Session(job=job, dest=dest, reporter=reporter).run(
            manifest=manifest_path(dest.kind, dest.path, options.manifest, task.name, options.shard)
        )
    except BaseException as exc:
        known = describe(exc)
        if known is None:
            raise
        reporter.error(known[0])
        return int(known[1])


class _Session:
    """A run whose options are checked and inputs opened."""

    def __init__(self, *, job: Job, dest: Destination, reporter: Reporter) -> None:
        self.job, self.task, self.options, self.dest = job, job.task, job.options, dest
        self.reporter = reporter
        self.started = now()

    def _check_outputs(self, planned: list[Path]) -> None:
        """Refuse, before any page is processed, an output that would overwrite an input or (for
        annotations) leave its directory; DirSink.planned has already refused paths that leave -o DIR."""
        annotate_dir = self.options.annotate
        if annotate_dir is not None:
            for o in self.job.opened:
                for number in o.pages:
                    for index in range(len(self.task.prompts)) if len(self.task.prompts) > 1 else (None,):
                        planned.append(annotation_path(o.doc, number, annotate_dir, prompt_index=index))
        inputs = {os.path.realpath(o.input.path) for o in self.job.opened if o.input.path is not None}
        for path in planned:
            if os.path.realpath(path) in inputs:
                raise OutputError(f"{path} is also an input; choose another output")

    def _sink(self) -> Sink:
        dest, task = self.dest, self.task
        if dest.kind == "dir" and dest.path is not None:
            return DirSink(dest.path, dest.fmt, task.name, prompts=task.prompts)
        if dest.kind == "file" and dest.path is not None:
            return FileSink(dest.path, dest.fmt, task.name, prompts=task.prompts)
        return StreamSink(sys.stdout, dest.fmt, task.name, headers=self.job.total > 1)

    def _runtime(self, needs_model: bool, remote: Any) -> backend.Runtime | Unloaded:
        """The model, loaded only when some page needs it (or the servers of `--server`). A line says it is
        loading (on a terminal; -v elsewhere), one more says when the CPU kernels are compiled (first run only,
        always shown: it takes a while), a failed build is one warning, and -v says how the kernels came to be."""
        o, identity = self.options, self.job.identity
        if not needs_model:
            return Unloaded(o.model, o.revision)
        if remote is not None:
            self.reporter.info(f"answering through {', '.join(remote.urls)} ({remote.model_id})", level=1)
            return remote
        where = f" on {identity.device} in {identity.dtype}" if identity is not None else ""
        self.reporter.notice(f"loading {o.model}{where} …")
        runtime = backend.runtime_factory(
            o.model,
            revision=o.revision,
            device=o.device,
            dtype=o.dtype,
            batch_size=o.batch_size,
            quantize=o.quantize,
            on_kernel_build=lambda: self.reporter.info("building the CPU kernels (first run only) …", level=0),
        )
        for kernels in (runtime.kernels, getattr(runtime, "quant_kernels", None)):
            if kernels is not None and kernels.state == "failed":
                self.reporter.warn(kernels.describe())
            elif kernels is not None:
                self.reporter.info(kernels.describe(), level=1)
        if (paths := getattr(runtime, "paths", None)) is not None:
            self.reporter.info("kernel paths: " + ", ".join(f"{r.family} {r.use} ({r.reason})" for r in paths.routes),
                               level=1)
        if (quant := getattr(runtime, "quant_paths", None)) is not None:
            from dsvl2.model.quant import describe_paths

            self.reporter.info(describe_paths(quant), level=1)
        return runtime

    @staticmethod
    def _load_record(runtime: backend.Runtime | Unloaded) -> dict[str, Any]:
        """What the manifest says about loading: seconds, and each compiled library's state and times (the bf16
        kernels with the op families' paths; the quantised products' kernels with what those products run)."""

        def library(kernels: Any, paths: Any) -> dict[str, Any] | None:
            if kernels is None:
                return None
            return {"state": kernels.state, "reason": kernels.reason, "build_seconds": round(kernels.build_seconds, 3),
                    "load_seconds": round(kernels.load_seconds, 3), "paths": paths}

        paths = getattr(runtime, "paths", None)
        return {
            "load_seconds": round(runtime.load_seconds, 3),
            "kernels": library(runtime.kernels, paths.as_dict() if paths is not None else None),
            "quant_kernels": library(getattr(runtime, "quant_kernels", None), getattr(runtime, "quant_paths", None)),
        }

    def _events(self, model: Any, *, is_done: Any, stats: runner.RunStats) -> Iterator[runner.Event]:
        if not self.options.ray:
            return self.job.events(model, is_done=is_done, stats=stats)
        from dsvl2 import ray_run

        return ray_run.events(self.job, is_done=is_done, stats=stats, workers=model)

    def run(self, *, manifest: Path | None) -> int:
        job, options = self.job, self.options
        remote, identify = None, backend.identify
        if options.ray:  # Ray is imported, and its cluster reached, before anything else
            from dsvl2 import ray_run

            ray_run.start(options)
            identify = ray_run.identify(options)
        if options.server:  # the servers say which model answers: connect before anything is identified
            from dsvl2.remote import connect

            remote = connect(options)
            job.options = self.options = replace(options, model=remote.served.name,
                                                 revision=remote.served.revision)
        try:
            return self._run(manifest=manifest, identify=remote.identify if remote else identify, remote=remote)
        finally:
            if remote is not None:
                remote.close()

    def _run(self, *, manifest: Path | None, identify: Any, remote: Any) -> int:
        job, options, n_prompts = self.job, self.job.options, len(self.task.prompts)
        sink = self._sink()
        docs = job.docs
        self._check_outputs([*sink.planned(docs), *([manifest] if manifest else [])])
        warnings = [*job.warnings, *sink.prepare(docs, resume=options.resume)]
        for w in warnings:
            self.reporter.warn(w)
        identity = job.identify(identify) if job.has_pages else None
        want = job.needs(sink.is_done) if identity is not None else None
        needs_model = want is not None and any(
            o.doc.error is None and any(want(o.doc, n) for n in o.pages) for o in job.opened
        )
        if identity is None:  # nothing to render: every record is an unreadable document's
            job.identity = backend.Identity(options.model, options.revision, None, options.device, options.dtype)
        if options.ray:  # the workers load it, and report to this stand-in
            from dsvl2 import ray_run

            model = ray_run.Workers(options)
        else:
            model = self._runtime(needs_model, remote)
        reporter = Reporter(
            total_pages=job.total,
            total_docs=len(docs),
            quiet=self.reporter.quiet,
            verbose=self.reporter.verbose,
            console=self.reporter.console,
        )
        self.reporter = reporter
        annotations: list[Path] = []
        size = job.batch_size(model)
        sizes = [size]
        stats = runner.RunStats()

        def on_event(event: runner.Event) -> None:
            with shielded():
                if isinstance(event, runner.RecordDone):
                    sink.write(event.record, event.page.doc)
                    if options.annotate is not None:
                        index = self.task.prompts.index(event.record.prompt) if n_prompts > 1 else None
                        path = annotate(event.page, event.record, options.annotate, prompt_index=index)
                        annotations.extend([path] if path else [])
                elif isinstance(event, runner.DocumentDone):
                    sink.document_done(event.doc)
                elif isinstance(event, runner.BatchResized):
                    sizes.append(event.new)
            reporter(event)

        stopped_by: BaseException | None = None
        try:
            with reporter:
                for event in self._events(model, is_done=sink.is_done, stats=stats):
                    on_event(event)
        except (KeyboardInterrupt, OutOfMemory) as exc:
            stopped_by = exc
        except BaseException:
            with shielded():
                sink.close(complete=False)
            raise
        interrupted = isinstance(stopped_by, KeyboardInterrupt)
        ending = Ending(
            interrupted=interrupted,
            stopped_early=stats.stopped_early,
            error=None if stopped_by is None or interrupted else str(stopped_by),
            final_batch_size=model.final_batch_size if options.ray else sizes[-1],
        )
        with shielded():
            sink.close(complete=stopped_by is None and not stats.stopped_early)
            if manifest is not None:
                write_manifest(
                    manifest,
                    task=self.task.name,
                    prompts=self.task.prompts,
                    settings=job.settings.to_dict(),
                    model=job.resolved_identity().record_model(),
                    runtime={
                        "device": options.device,
                        "dtype": options.dtype,
                        "batch_size": size,
                        "page_timeout": options.page_timeout,
                        **self._load_record(model),
                        **(model.manifest() if options.ray else {}),  # the workers' batch size and load time
                    },
                    shard=options.shard,
                    output={
                        "kind": self.dest.kind,
                        "path": str(self.dest.path) if self.dest.path else None,
                        "format": self.dest.fmt.value,
                    },
                    started=self.started,
                    ending=ending,
                    opened=job.opened,
                    outputs=[*sink.outputs, *annotations],
                    incomplete=sink.incomplete,
                    warnings=warnings,
                    summary=reporter.tally.summary(),
                )
        where = str(self.dest.path) if self.dest.path is not None else None
        reporter.print_summary(
            command=self.task.name,
            interrupted=interrupted,
            incomplete=len(sink.incomplete),
            where=where,
            load_seconds=model.load_seconds,
        )
        if stopped_by is not None and not interrupted:
            raise stopped_by  # reported by run_task as one line with its exit code
        if interrupted:
            return int(ExitCode.INTERRUPTED)
        return int(ExitCode.PAGES_FAILED if reporter.tally.failed else ExitCode.OK)
