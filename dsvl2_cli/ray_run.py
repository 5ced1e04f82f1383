"""`--ray`: the driver side of a run on a Ray cluster. `start` imports Ray (the optional extra) and joins the
cluster or starts a local instance, before any page; `identify` asks a worker-sized Ray task which device
and dtype the workers resolve; `events` plans the windows that still need an answer (the resume keys are
read here, on the driver), streams them through Ray Data (render tasks, then an actor pool of
dsvl2.ray_stages.Answerer) and yields the runner's events in input order, so that dsvl2.session writes,
reports and resumes exactly as it does for a local run; `Workers` stands in for the runtime on the driver and
gathers what the workers report (load time, batch size) for the manifest. Ray is never imported unless
`--ray` is used.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from itertools import groupby
from pathlib import Path
from typing import Any

from PIL import Image

from dsvl2.backend import Identity
from dsvl2.errors import one_line
from dsvl2.job import DEFAULT_BATCH_SIZE, Job
from dsvl2.options import Options, parse_workers
from dsvl2.pipelines import runner, windows
from dsvl2.pipelines.base import FAILURES, Page, RecordContext
from dsvl2.pipelines.windows import Window, plan
from dsvl2.ray_stages import Answered, Answerer, Chunk, WorkerReport, render

RENDER_CPUS = 1.0  # logical CPUs a render task takes, kept free of the actor pool on a local instance
# Memory a render task reserves (one page image and its PNG at --max-side). Being a request the workers do not
# make, it also keeps rendering in tasks of its own: Ray Data fuses a map into the next one when they ask alike.
RENDER_MEMORY = 256 * 1024 * 1024
CHUNK_WINDOWS = 8  # windows of one document per render task: a document's bytes travel once per chunk
INIT_DEATHS = 3  # workers in a row that may die while starting before the run fails
ROWS_PER_SLOT = 4  # windows per worker call, per page the runtime answers at once (continuous batching)


class RayUnavailable(OSError):
    """Ray is not installed, or the cluster of `--ray` cannot be reached; raised before any page."""


class RayRunFailed(OSError):
    """The Ray pipeline stopped on an error Ray could not recover from; the records written are kept."""


@dataclass(frozen=True, slots=True)
class Pool:
    """The actor pool: between `low` and `high` workers, each with `cpus` CPUs and `gpus` GPUs."""

    low: int
    high: int
    cpus: float
    gpus: float

    @classmethod
    def of(cls, options: Options) -> Pool:
        low, high = parse_workers(options.workers or "1")
        return cls(low, high, options.cpus_per_worker or 1.0, options.gpus_per_worker)

    def local_cpus(self) -> int:
        """Logical CPUs for a local instance: the machine's, but never fewer than the whole pool plus one
        render task. A pool that holds every CPU slot starves the tasks that feed it, and the run hangs."""
        return max(os.cpu_count() or 1, math.ceil(self.high * self.cpus + RENDER_CPUS))


class Workers:
    """The runtime as the driver of a `--ray` run sees it: loaded by the pool's workers, not here. It gathers
    each worker's latest report as the answers come back, so the manifest and summary say what the workers
    did (their load time and batch size), not what the driver would have done."""

    has_work = False
    kernels = None  # each worker has its own; see `reports`

    def __init__(self, options: Options) -> None:
        self.address, self.pool = options.ray, Pool.of(options)
        self.reports: dict[str, WorkerReport] = {}

    def add(self, report: WorkerReport) -> None:
        self.reports[report.worker] = report

    @property
    def max_batch_size(self) -> int | None:
        """The batch size the workers started with (the largest, should they differ); None before any answer."""
        return max((r.batch_size for r in self.reports.values()), default=None)

    @property
    def final_batch_size(self) -> int | None:
        """The smallest batch size any worker ended with."""
        return min((r.final_batch_size for r in self.reports.values()), default=None)

    @property
    def load_seconds(self) -> float:
        """The longest any worker took to load: what the run waited before its pool was whole."""
        return max((r.load_seconds for r in self.reports.values()), default=0.0)

    def manifest(self) -> dict[str, Any]:
        """The manifest's runtime entries for a Ray run: the workers' batch sizes and load time, the pool asked
        for, and every worker's report (a worker Ray replaced appears beside its replacement)."""
        return {
            "batch_size": self.max_batch_size,
            "load_seconds": self.load_seconds,
            "kernels": None,
            "ray": {
                "address": self.address,
                "workers": {"min": self.pool.low, "max": self.pool.high},
                "cpus_per_worker": self.pool.cpus,
                "gpus_per_worker": self.pool.gpus,
                "reports": [asdict(r) for r in self.reports.values()],
            },
        }


def start(options: Options) -> None:
    """Join the cluster of `options.ray` (or start a local instance without the dashboard); reuses a Ray
    connection this process already has. RayUnavailable with one line when Ray is missing or unreachable."""
    try:
        import ray
        import ray.data  # the extra: Ray without its data library cannot run the pipeline
    except ImportError as exc:
        raise RayUnavailable(f"--ray needs Ray ({exc.name} is not installed): pip install 'dsvl2[ray]'") from None
    if not ray.is_initialized():
        quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        if options.ray == "local":
            extra = {"num_cpus": Pool.of(options).local_cpus(), "include_dashboard": False}
        else:
            extra = {}
            _check_reachable(options.ray)
        try:
            with warnings.catch_warnings():  # Ray Client warns before it raises: the error below says it all
                warnings.simplefilter("ignore")
                ray.init(address=options.ray, **quiet, **extra)
        except Exception as exc:
            raise RayUnavailable(f"--ray {options.ray}: cannot reach the Ray cluster ({one_line(str(exc), 300)})") \
                from None
    _configure_data(ray)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A `ray://host:port` that refuses connections fails at once, not after Ray Client's ~30 s of retries."""
    if not address.startswith("ray://"):
        return
    host, _, port = address.removeprefix("ray://").rstrip("/").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise RayUnavailable(f"--ray {address}: cannot reach the Ray cluster ({reason})") from None


def _configure_data(ray: Any) -> None:
    """Ray Data as a library under our progress bar: input order kept, no bars or stats of its own."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False
    context.verbose_stats_logs = False
    # A worker that dies while it starts (killed, out of memory while loading) is replaced rather than failing
    # the run, a few times in a row; a model that can never load still fails it.
    context.max_consecutive_actor_init_deaths = INIT_DEATHS
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    logging.getLogger("ray").setLevel(logging.ERROR)


def _model_path(options: Options) -> str:
    """The model as a worker loads it: a local directory named absolutely (a worker's working directory is
    not the driver's); a hub id as given."""
    model = Path(options.model)
    return str(model.absolute()) if model.exists() else options.model


def identify(options: Options) -> Callable[..., Identity]:
    """`backend.identify`, run in a Ray task with a worker's resources: the device and dtype of the records
    are those the workers will resolve, not the driver's (which may have no GPU, or one the workers lack)."""

    def on_a_worker(model: str, *, revision: str | None, device: str, dtype: str, quantize: str = "none") -> Identity:
        import ray

        from dsvl2 import backend

        pool = Pool.of(options)
        task = ray.remote(num_cpus=pool.cpus, num_gpus=pool.gpus, max_retries=0)(backend.identify)
        try:
            found = ray.get(task.remote(_model_path(options), revision=revision, device=device, dtype=dtype,
                                        quantize=quantize))
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause from None  # the model's own error (not found, bad config), reported as locally
        return replace(found, model=model)  # the model as the user gave it, as in a local run's records

    return on_a_worker


@dataclass(frozen=True, slots=True)
class _Unit:
    """One window of the plan: `sent` to the workers, or skipped whole because every prompt is done."""

    index: int
    doc: int  # index into job.opened
    numbers: tuple[int, ...]  # () for a document that could not be opened
    done: frozenset[str]
    sent: bool


def _plan(job: Job, is_done: Callable[[str], bool]) -> list[_Unit]:
    """Every window of the job in input order, with the keys an earlier run already wrote; a document that
    could not be opened is always sent (a local run records it again too)."""
    units: list[_Unit] = []
    prompts = job.task.prompts
    for d, o in enumerate(job.opened):
        if o.doc.error is not None:
            units.append(_Unit(len(units), d, (), frozenset(), True))
            continue
        for numbers in plan(o.pages, job.window):
            if job.window is None:
                keys = [job.key(o.doc, numbers[0], p) for p in prompts]
            else:
                keys = [job.key(o.doc, numbers[0], p, pages=numbers) for p in prompts]
            done = frozenset(k for k in keys if is_done(k))
            units.append(_Unit(len(units), d, numbers, done, len(done) < len(keys)))
    return units


def _chunks(job: Job, units: list[_Unit]) -> list[Chunk]:
    chunks: list[Chunk] = []
    for d, group in groupby((u for u in units if u.sent), key=lambda u: u.doc):
        o = job.opened[d]
        file = o.input if o.input.path is None else replace(o.input, path=o.input.path.absolute())
        sent = list(group)
        for i in range(0, len(sent), CHUNK_WINDOWS):
            part = sent[i : i + CHUNK_WINDOWS]
            chunks.append(Chunk(file, o.doc, tuple(u.index for u in part), tuple(u.numbers for u in part),
                                tuple(u.done for u in part)))  # fmt: skip
    return chunks


def _answers(job: Job, chunks: list[Chunk]) -> Iterator[Answered]:
    """The workers' answers, one per sent window, in plan order (Ray Data keeps the order of the input)."""
    import ray

    o, pool = job.options, Pool.of(job.options)
    remote: dict[str, Any] = {"num_cpus": pool.cpus}
    if pool.gpus:
        remote["num_gpus"] = pool.gpus
    if o.server and (key := os.environ.get(o.api_key_env)):
        remote["runtime_env"] = {"env_vars": {o.api_key_env: key}}  # a worker on another node has no such var
    data = ray.data.from_items([{"chunk": pickle.dumps(c)} for c in chunks], override_num_blocks=len(chunks))
    rendered = data.map_batches(
        render,
        batch_size=1,
        num_cpus=RENDER_CPUS,
        memory=RENDER_MEMORY,
        fn_kwargs={"dpi": o.dpi, "max_side": o.max_side, "password": o.password},
    )
    answered = rendered.map_batches(
        Answerer,
        batch_size=ROWS_PER_SLOT * (o.batch_size or DEFAULT_BATCH_SIZE),
        fn_constructor_kwargs={"task": job.task, "options": o, "identity": job.resolved_identity(),
                               "model": _model_path(o)},
        concurrency=pool.high if pool.low == pool.high else (pool.low, pool.high),
        **remote,
    )  # fmt: skip
    try:
        for row in answered.iter_rows():
            yield pickle.loads(row["payload"])
    except (ray.exceptions.RayError, ray.data.exceptions.RayDataUserCodeException) as exc:
        # What Ray could not recover from (a worker that never starts); what was written stays, --resume goes on.
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise RayRunFailed(f"the Ray run failed: {one_line(first, 300)}") from None


def _lost(job: Job, unit: _Unit, doc_page: Page) -> Answered:
    """Failed records for a window no worker returned (never expected: Ray retries a lost worker's batch)."""
    ctx = RecordContext(job.task.name, job.settings, job.resolved_identity().record_model())
    pages = tuple(Page(doc_page.doc, n) for n in unit.numbers) or (doc_page,)
    window = Window(pages, several=job.window is not None and bool(unit.numbers))
    error = "the Ray workers returned no answer"
    return Answered(unit.index, tuple(windows.failed(ctx, window, p, error) for p in job.task.prompts), ())


def _page(doc_page: Page, number: int | None, images: dict[int, bytes]) -> Page:
    """The page of a record as the driver hands it on: with its image only when a worker sent it (--annotate)."""
    if number not in images:
        return Page(doc_page.doc, number)
    with Image.open(io.BytesIO(images[number])) as im:
        return Page(doc_page.doc, number, im.convert("RGB"))


def events(
    job: Job, *, is_done: Callable[[str], bool], stats: runner.RunStats, workers: Workers | None = None
) -> Iterator[runner.Event]:
    """The events a local run would yield for `job` (see pipelines.runner.events), answered on Ray; `start`
    came first. `workers`, when given, gathers the workers' reports. With --fail-fast the run stops after the
    window of the first failed record."""
    units = _plan(job, is_done)
    chunks = _chunks(job, units)
    answers = _answers(job, chunks) if chunks else iter(())
    pending: Answered | None = None
    begin = time.perf_counter()
    try:
        for d, group in groupby(units, key=lambda u: u.doc):
            doc = job.opened[d].doc
            for unit in group:
                first = Page(doc, unit.numbers[0] if unit.numbers else None, error=doc.error)
                if not unit.sent:
                    stats.skipped += len(job.task.prompts)
                    yield from (runner.PageSkipped(first, p) for p in job.task.prompts)
                    continue
                while pending is None or pending.unit < unit.index:  # an earlier unit twice: drop it
                    pending = next(answers, None) or Answered(len(units), (), ())
                answer, pending = (pending, None) if pending.unit == unit.index else (_lost(job, unit, first), pending)
                if workers is not None and answer.worker is not None:
                    workers.add(answer.worker)
                stats.skipped += len(answer.skipped)
                yield from (runner.PageSkipped(first, p) for p in answer.skipped)
                images = dict(answer.images)
                for record in answer.records:
                    stats.statuses[record.status] += 1
                    yield runner.RecordDone(record, _page(first, record.page, images))
                if job.options.fail_fast and any(r.status in FAILURES for r in answer.records):
                    stats.stopped_early = True
                    return
            yield runner.DocumentDone(doc)
    finally:
        close = getattr(answers, "close", None)
        if close is not None:
            close()
        stats.seconds = time.perf_counter() - begin

