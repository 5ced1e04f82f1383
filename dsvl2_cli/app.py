"""The `dsvl2` command line: thin Typer commands, each one call into dsvl2.session or dsvl2.models_cmd.
Options are shared aliases from dsvl2.options; the document commands get the ones they all share from
`document_command`. Exit codes are defined in dsvl2.errors."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
from dsvl2 import models_cmd, signals
from dsvl2 import options as o
from dsvl2.backend import DEFAULT_MODEL
from dsvl2.pipelines import chart, ground, ocr, table
from dsvl2.pipelines.ask import AskTask
from dsvl2.pipelines.base import Task
from dsvl2.pipelines.chart import ChartTask
from dsvl2.pipelines.ground import GroundTask
from dsvl2.pipelines.ocr import OcrTask
from dsvl2.pipelines.schema import record_schema
from dsvl2.pipelines.table import TableTask
from dsvl2.session import run_task

app = typer.Typer(
    name="dsvl2",
    help="Batch document understanding with DeepSeek-VL2: OCR, tables, charts, grounding and questions over "
    "PDFs, images, directories and stdin. Data goes to stdout or -o; progress and errors to stderr. "
    "Exit codes: 0 ok, 1 some pages failed, 2 usage or setup error, 130 interrupted.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Download and list cached models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _examples(*lines: str) -> str:
    return "**Examples**\n\n" + "\n\n".join(f"`{line}`" for line in lines)


@dataclass(frozen=True, slots=True)
class PromptFile:
    prompts: tuple[str, ...]


def read_prompt_file(path: str) -> PromptFile:
    """`--prompts FILE`: one prompt per non-blank line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return PromptFile(tuple(line.strip() for line in text.splitlines() if line.strip()))


def ask_prompts(prompt: list[str] | None, prompts: PromptFile | None) -> tuple[str, ...]:
    """`--prompt` values then `--prompts` lines, blanks and repeats dropped, order kept."""
    texts = [*(prompt or ()), *(prompts.prompts if prompts else ())]
    return tuple(dict.fromkeys(t for t in texts if t.strip()))


class Run(Protocol):
    """run_task with the shared options already bound: a document command passes only what is its own."""

    def __call__(self, *, task: Task, annotate_dir: Path | None = None) -> int: ...


# fmt: off
def _shared_options(
    inputs: o.Inputs = None,
    glob: o.Glob = None, stdin_data: o.StdinData = False, pages: o.Pages = None, password: o.Password = None,
    dpi: o.Dpi = 144.0, max_side: o.MaxSide = 2048, output: o.Output = None, format: o.FormatOpt = None,
    resume: o.Resume = False, manifest: o.Manifest = None, shard: o.ShardOpt = None, fail_fast: o.FailFast = False,
    batch_size: o.BatchSize = None, quiet: o.Quiet = False, verbose: o.Verbose = 0, model: o.Model = DEFAULT_MODEL,
    revision: o.Revision = None, device: o.DeviceOpt = o.Device.auto, dtype: o.DTypeOpt = o.DType.auto,
    max_new_tokens: o.MaxNewTokens = None, temperature: o.Temperature = 0.0, top_p: o.TopP = 1.0, seed: o.Seed = 0,
    repetition_guard: o.RepetitionGuard = None, retry_repetition: o.RetryRepetition = False,
    page_timeout: o.PageTimeout = None,
) -> Run:
    """The options every document command has, in `--help` order, bound onto run_task's keywords."""
    return functools.partial(
        run_task,
        paths=inputs or [], globs=glob or (), stdin_data=stdin_data, pages=pages, password=password, dpi=dpi,
        max_side=max_side, output=output, fmt=format, resume=resume, manifest=manifest, shard=shard,
        fail_fast=fail_fast, batch_size=batch_size, quiet=quiet, verbose=verbose, model=model, revision=revision,
        device=device.value, dtype=dtype.value, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, seed=seed,
        repetition_guard=repetition_guard, retry_repetition=retry_repetition, page_timeout=page_timeout,
    )
# fmt: on


SHARED_OPTIONS = inspect.signature(_shared_options, eval_str=True).parameters


def document_command(name: str, *, help: str, epilog: str) -> Callable[[Callable[..., int]], Callable[..., None]]:
    """Register `command(run, **own_options) -> exit code` as `dsvl2 NAME`. Typer reads the callback's
    `__signature__`: INPUTS, then the command's own options, then the shared ones of `_shared_options` (so
    panels and `--help` order are the same for every command); `run` is run_task with the shared ones bound."""

    def register(command: Callable[..., int]) -> Callable[..., None]:
        own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]  # all but `run`
        if clash := {p.name for p in own} & SHARED_OPTIONS.keys():
            raise TypeError(f"{command.__name__}: {sorted(clash)} are shared options already")
        inputs, *shared = SHARED_OPTIONS.values()
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in (inputs, *own, *shared)]

        @functools.wraps(command)
        def callback(**values: Any) -> None:
            run = _shared_options(**{key: values.pop(key) for key in SHARED_OPTIONS})
            raise typer.Exit(command(run, **values))

        callback.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        callback.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        app.command(name, help=help, epilog=epilog)(callback)
        return callback

    return register


@document_command(
    "ocr",
    help=f"Page → Markdown, per page and per document with page markers.\n\nDefault prompt: *{ocr.DEFAULT_PROMPT}*",
    epilog=_examples(
        "dsvl2 ocr samples/report.pdf",
        "dsvl2 ocr scans/ -o out/ --resume",
        "dsvl2 ocr samples/report.pdf --pages 2 --format jsonl | jq -r .result.markdown",
    ),
)
def ocr_(run: Run, prompt: o.Prompt = None) -> int:
    return run(task=OcrTask(prompt or ocr.DEFAULT_PROMPT))


@document_command(
    "table",
    help="Every table on the page → rows and columns. CSV to stdout or a file is tidy (one row per cell); "
    "-o DIR/ gets one CSV per table plus the records.\n\n"
    f"Default prompt: *{table.DEFAULT_PROMPT}*",
    epilog=_examples(
        "dsvl2 table samples/invoice.pdf --format md",
        "dsvl2 table reports/ -o out/ --resume",
        "dsvl2 table samples/invoice.pdf -f jsonl | jq '.result.tables[].rows'",
    ),
)
def table_(run: Run, prompt: o.Prompt = None) -> int:
    return run(task=TableTask(prompt or table.DEFAULT_PROMPT))


@document_command(
    "chart",
    help="Chart → its data (categories, series, values) with title and axes. CSV is tidy "
    "(series, category, value); -o DIR/ gets one wide CSV per chart.\n\n"
    f"Default prompt: *{chart.DEFAULT_PROMPT}*",
    epilog=_examples(
        "dsvl2 chart samples/bar-chart.png",
        "find . -name '*.png' | dsvl2 chart - --format jsonl | jq .result.series",
    ),
)
def chart_(run: Run, prompt: o.Prompt = None) -> int:
    return run(task=ChartTask(prompt or chart.DEFAULT_PROMPT))


@document_command(
    "ground",
    help="Referring-expression grounding: boxes for each --query, on the model's 0–999 grid, in page pixels "
    "and (PDF pages) in points. Malformed boxes are repaired or flagged, never dropped.\n\n"
    f"Default prompt template: *{ground.DEFAULT_TEMPLATE}*",
    epilog=_examples(
        "dsvl2 ground samples/report.pdf --query 'the bar chart' --annotate boxes/",
        "dsvl2 ground photo.jpg --query 'the red car' --query 'the traffic light' -f csv",
        "dsvl2 ground page.png --prompt '<|grounding|>Describe the image.'",
    ),
)
def ground_(
    run: Run,
    query: Annotated[
        list[str] | None,
        typer.Option("--query", metavar="TEXT", help="What to find; repeatable, one record per page and query."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt",
            metavar="TEXT",
            help="Prompt template; '{query}' is replaced by "
            "each query. Without '{query}' it is sent as is, no --query "
            "needed.",
            show_default=False,
        ),
    ] = None,
    annotate: Annotated[
        Path | None,
        typer.Option(
            "--annotate",
            metavar="DIR",
            help="Write each page with its boxes drawn, as PNG under DIR.",
            rich_help_panel=o.OUT,
        ),
    ] = None,
) -> int:
    return run(task=GroundTask(tuple(query or ()), prompt or ground.DEFAULT_TEMPLATE), annotate_dir=annotate)


@document_command(
    "ask",
    help="Free-form questions: every --prompt asked of every page, batched. With one page and one prompt the "
    "answer alone is printed; otherwise each answer follows a '==> source (page N): prompt <==' line.",
    epilog=_examples(
        "dsvl2 ask samples/bar-chart.png --prompt 'Which fruit sold best?'",
        "dsvl2 ask invoices/ --prompts questions.txt -o answers.jsonl",
    ),
)
def ask(
    run: Run,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", metavar="TEXT", help="A question; repeatable.")
    ] = None,
    prompts: Annotated[
        PromptFile | None,
        typer.Option("--prompts", metavar="FILE", parser=read_prompt_file, help="Questions, one per line."),
    ] = None,
) -> int:
    return run(task=AskTask(ask_prompts(prompt, prompts)))


@app.command(help="Print the JSON Schema of a page record (the same as schema/page-record.schema.json).")
def schema() -> None:
    typer.echo(json.dumps(record_schema(), indent=2))


@models_app.command(
    "download",
    epilog=_examples("dsvl2 models download", "dsvl2 models download deepseek-ai/deepseek-vl2-small --revision main"),
)
def models_download(
    repo_id: Annotated[str, typer.Argument(help="Hugging Face repo id.")] = DEFAULT_MODEL,
    revision: o.Revision = None,
) -> None:
    """Download a model into the Hugging Face cache and print its local directory."""
    raise typer.Exit(models_cmd.download(repo_id=repo_id, revision=revision))


@models_app.command("list", epilog=_examples("dsvl2 models list", "dsvl2 models list --json"))
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List cached models with revision and size."""
    raise typer.Exit(models_cmd.list_models(as_json=as_json))


def main() -> None:
    """Console-script entry: SIGINT and SIGTERM stop a run in order (never in the middle of writing an
    output; finished work kept; exit 130); a closed stdout pipe ends the run quietly instead of with a
    traceback at exit."""
    signals.install()
    try:
        app(prog_name="dsvl2")
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
