"""The Python API: `dsvl2.load`, one function per task (`dsvl2.ocr`, `table`, `chart`, `ground`, `ask`,
or `dsvl2.run(task, ...)` for any registered task), and `dsvl2.to_dataframe` / `dsvl2.tables`.

The same path as the CLI (dsvl2.job): the same options under the same names (checked at the call, raising
`dsvl2.OptionError`, a ValueError), the same inputs (paths and directories, plus bytes and PIL images),
the same records. A task function returns an iterator of page records as dicts, exactly the CLI's JSONL
records, yielded as pages finish; a page that cannot be read or answered is an error record, never an
exception. Nothing here prints.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from os import PathLike
from typing import TYPE_CHECKING, Any, TypedDict

from dsvl2 import backend
from dsvl2.backend import Identity, Runtime
from dsvl2.inputs import Blob
from dsvl2.job import Job, Unloaded
from dsvl2.options import OUTPUT_OPTIONS, Options
from dsvl2.pipelines import runner
from dsvl2.pipelines.base import OptionError, PageRecord
from dsvl2.pipelines.tasks import TASKS, task_type

if TYPE_CHECKING:
    import pandas as pd
    from typing_extensions import Unpack

Inputs = Any  # a path, bytes, a PIL image, or an iterable of them (see `_documents`)
_RAY_OPTIONS = ("ray", "workers", "cpus_per_worker")
_MODEL_OPTIONS = ("model", "revision", "device", "dtype", "batch_size", "quantize")


class RunOptions(TypedDict, total=False):
    """The options every task function takes, named like the CLI's long options (`--top-p` is `top_p`)."""

    glob: str | list[str]
    pages: str
    password: str
    dpi: float
    max_side: int
    shard: str
    fail_fast: bool
    batch_size: int
    page_timeout: float
    model: str
    revision: str
    device: str
    dtype: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    repetition_penalty: float
    repetition_guard: int
    retry_repetition: bool


def load(
    model: str = backend.DEFAULT_MODEL,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    quantize: str = "none",
) -> Runtime:
    """Load a model once, to pass as `runtime=` to any number of task calls.

    `model` is a local checkpoint directory (Hugging Face layout) or a repo id such as
    "deepseek-ai/deepseek-vl2-tiny"; `device` is "auto", "cpu", "cuda" or "cuda:N"; `dtype` "auto",
    "float32", "bfloat16" or "float16"; `batch_size` caps how many pages are answered at once (None: sized
    from free memory); `quantize` "int8" / "int4" quantises the language model's weights while loading (a
    checkpoint written by `dsvl2 quantize` loads as stored, and its records say so without it). Raises
    OptionError for a bad value, dsvl2.model.errors.ModelError when the model cannot be found or loaded."""
    Options(model=model, revision=revision, device=device, dtype=dtype, batch_size=batch_size,
            quantize=quantize)  # checks them
    return backend.load(model, revision=revision, device=device, dtype=dtype, batch_size=batch_size,
                        quantize=quantize)


def _documents(inputs: Inputs) -> list[str | Blob]:
    """Paths stay paths (directories are searched as on the command line); bytes and PIL images become
    documents of their own, named `bytes-N` / `image-N` (or the image's file name)."""
    from PIL import Image

    items = [inputs] if isinstance(inputs, str | bytes | bytearray | PathLike | Image.Image) else list(inputs)
    documents: list[str | Blob] = []
    for n, item in enumerate(items, start=1):
        if isinstance(item, str | PathLike):
            documents.append(str(item))
        elif isinstance(item, bytes | bytearray):
            documents.append(Blob(f"bytes-{n}", bytes(item)))
        elif isinstance(item, Image.Image):
            png = io.BytesIO()
            item.save(png, format="PNG")  # lossless: the page the model sees is the image given
            documents.append(Blob(getattr(item, "filename", "") or f"image-{n}", png.getvalue()))
        else:
            raise OptionError("inputs", f"item {n} is a {type(item).__name__}: give paths, bytes or PIL images")
    return documents


def _records(job: Job, runtime: Runtime | None, identity: Identity | None) -> Iterator[dict[str, Any]]:
    if job.options.server and runtime is None:  # `server=`: the pages go to OpenAI-compatible servers
        from dsvl2.remote import connect

        remote = connect(job.options)
        job.options = replace(job.options, model=remote.served.name, revision=remote.served.revision)
        try:
            job.identity = remote.identity
            yield from _records(job, remote, remote.identity)
        finally:
            remote.close()
        return
    job.identity = identity or job.identify(backend.identify)
    if runtime is None and job.has_pages:
        o = job.options
        runtime = backend.runtime_factory(
            o.model, revision=o.revision, device=o.device, dtype=o.dtype, batch_size=o.batch_size,
            quantize=o.quantize,
        )
    for event in job.events(runtime or Unloaded(job.options.model, job.options.revision)):
        if isinstance(event, runner.RecordDone):
            yield event.record.to_dict()


def run(task: str, inputs: Inputs, *, runtime: Runtime | None = None, **options: Any) -> Iterator[dict[str, Any]]:
    """Run the task called `task` (see `dsvl2.TASKS`) over `inputs`; what the task functions do."""
    kind = task_type(task)
    own = {option.name: options.pop(option.name) for option in kind.options if option.name in options}
    if cli_only := [name for name in options if name in OUTPUT_OPTIONS]:
        raise OptionError(cli_only[0], "is a command-line option: the API returns the records to you")
    if given := [name for name in _RAY_OPTIONS if options.get(name) is not None]:
        raise OptionError(given[0], "is for the command line (--ray); from Python, run Ray Data over dsvl2 yourself")
    if runtime is not None and (given := [name for name in _MODEL_OPTIONS if name in options]):
        raise OptionError(given[0], "comes from runtime= when a runtime is given; load() takes it")
    if runtime is not None:  # the records name the model as it was loaded
        i = runtime.identity
        options |= {"model": i.model, "revision": i.revision, "device": i.device, "dtype": i.dtype,
                    "quantize": i.quantize}
    job = Job.open(kind.from_options(**own), Options.create(**options), _documents(inputs))
    return _records(job, runtime, runtime.identity if runtime is not None else None)


def ocr(
    inputs: Inputs, *, prompt: str | None = None, runtime: Runtime | None = None, **options: Unpack[RunOptions]
) -> Iterator[dict[str, Any]]:
    """Each page as Markdown: records whose `result` is {"markdown": str}.

    `inputs`: a path (PDF, image or directory), bytes of one, a PIL image, or an iterable of these.
    `prompt` replaces the default prompt. `runtime`: a model from `dsvl2.load()` (else one is loaded for
    this call from `model=`, `device=`, `dtype=`). Options as on the command line, e.g. `pages="1-3"`,
    `dpi=144`, `max_new_tokens=2048`, `temperature=0`; bad values raise OptionError at the call.

    >>> for record in dsvl2.ocr("report.pdf", runtime=rt, pages="1-2"):
    ...     print(record["page"], record["status"], record["result"]["markdown"][:80])
    """
    return run("ocr", inputs, runtime=runtime, prompt=prompt, **options)


def table(
    inputs: Inputs, *, prompt: str | None = None, runtime: Runtime | None = None, **options: Unpack[RunOptions]
) -> Iterator[dict[str, Any]]:
    """Every table on each page: records whose `result` is {"tables": [{"header", "rows", ...}]}; see
    `dsvl2.tables(records)` for each table as a DataFrame. Inputs and options as for `dsvl2.ocr`."""
    return run("table", inputs, runtime=runtime, prompt=prompt, **options)


def chart(
    inputs: Inputs, *, prompt: str | None = None, runtime: Runtime | None = None, **options: Unpack[RunOptions]
) -> Iterator[dict[str, Any]]:
    """A chart's data: records whose `result` has "title", "x_axis", "y_axis", "categories" and "series"
    (each {"name", "values"}). Inputs and options as for `dsvl2.ocr`."""
    return run("chart", inputs, runtime=runtime, prompt=prompt, **options)


def ground(
    inputs: Inputs,
    *,
    query: str | list[str] | None = None,
    prompt: str | None = None,
    runtime: Runtime | None = None,
    **options: Unpack[RunOptions],
) -> Iterator[dict[str, Any]]:
    """Boxes for each `query` on each page (one record per page and query): `result["boxes"]` holds each
    box on the model's 0-999 grid (`box`), in page pixels (`box_px`) and, for PDF pages, in points
    (`box_pt`). `prompt` is a template with `{query}`, or a whole prompt without one (then no query).
    Inputs and options as for `dsvl2.ocr`."""
    return run("ground", inputs, runtime=runtime, query=query, prompt=prompt, **options)


def ask(
    inputs: Inputs,
    *,
    prompt: str | list[str] | None = None,
    prompts: str | PathLike[str] | None = None,
    runtime: Runtime | None = None,
    **options: Unpack[RunOptions],
) -> Iterator[dict[str, Any]]:
    """Every question (`prompt`: one or a list; `prompts`: a file, one per line) asked of every page: one
    record per page and question, `result` {"answer": str}. Inputs and options as for `dsvl2.ocr`."""
    return run("ask", inputs, runtime=runtime, prompt=prompt, prompts=prompts, **options)


_COMMON = ("source", "page", "task", "prompt", "status", "error", "text")


def to_dataframe(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per record: source, page, task, prompt, status, error, text, then the result flattened the
    way its task says (ocr: markdown; ask: answer; table: n_tables, tables; chart: title, axes, categories,
    series; ground: query, caption, n_boxes, boxes), then tokens and page size."""
    import pandas as pd

    rows = []
    for record in records:
        row = {key: record.get(key) for key in _COMMON}
        task = TASKS.get(record.get("task", ""))
        if task is not None and record.get("result") is not None:
            row |= task.columns(record["result"])
        size = record.get("page_size") or {}
        tokens = record.get("tokens") or {}
        row |= {"width_px": size.get("width_px"), "height_px": size.get("height_px"),
                "prompt_tokens": tokens.get("prompt"), "generated_tokens": tokens.get("generated")}  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def tables(records: Iterable[Mapping[str, Any]]) -> list[pd.DataFrame]:
    """Each table (of `table` records) and each chart (of `chart` records) as its own DataFrame, in record
    order; `frame.attrs` names its source, page and index."""
    frames = []
    for data in records:
        task = TASKS.get(data.get("task", ""))
        if task is None or data.get("result") is None:
            continue
        record = PageRecord.from_dict(data)
        for n, (_suffix, frame, _header) in enumerate(task.frames(record), start=1):
            frame.attrs = {"source": record.source, "page": record.page, "index": n}
            frames.append(frame)
    return frames
