"""The `dsvl2` command line: thin Typer commands. Each document command is made from its task's module
(pipelines/tasks.py: name, help, examples, its own options), plus the options every document command
shares (dsvl2.flags); its body builds the task and one `Options` and calls dsvl2.session.run_task. Exit
codes are defined in dsvl2.errors."""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dsvl2 import flags as o
from dsvl2 import models_cmd, quantize_cmd, signals
from dsvl2.model.hub import DEFAULT_MODEL
from dsvl2.options import Options
from dsvl2.pipelines.base import OptionError
from dsvl2.pipelines.schema import record_schema
from dsvl2.pipelines.task import Task, TaskOption
from dsvl2.pipelines.tasks import TASKS
from dsvl2.progress import Reporter
from dsvl2.reparse import run_reparse
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


# fmt: off
def _shared_options(
    inputs: o.Inputs = None,
    glob: o.Glob = None, stdin_data: o.StdinData = False, pages: o.Pages = None, password: o.Password = None,
    dpi: o.Dpi = 144.0, max_side: o.MaxSide = 2048, output: o.Output = None, format: o.FormatOpt = None,
    resume: o.Resume = False, manifest: o.Manifest = None, shard: o.ShardOpt = None, fail_fast: o.FailFast = False,
    batch_size: o.BatchSize = None, quiet: o.Quiet = False, verbose: o.Verbose = 0, model: o.Model = DEFAULT_MODEL,
    revision: o.Revision = None, device: o.DeviceOpt = "auto", dtype: o.DTypeOpt = "auto",
    max_new_tokens: o.MaxNewTokens = None, temperature: o.Temperature = 0.0, top_p: o.TopP = 1.0, seed: o.Seed = 0,
    repetition_penalty: o.RepetitionPenalty = 1.0, repetition_guard: o.RepetitionGuard = None,
    retry_repetition: o.RetryRepetition = False, page_timeout: o.PageTimeout = None, server: o.Server = None,
    server_model: o.ServerModel = None, api_key_env: o.ApiKeyEnv = "DSVL2_API_KEY", max_concurrent: o.MaxConcurrent = 8,
    request_timeout: o.RequestTimeout = 600.0, max_retries: o.MaxRetries = 3, quantize: o.Quantize = "none",
    ray: o.Ray = None, workers: o.Workers = None, cpus_per_worker: o.CpusPerWorker = None,
    gpus_per_worker: o.GpusPerWorker = 0.0,
) -> None:
    """The options every document command has, in `--help` order (only its signature is used)."""
# fmt: on


SHARED_OPTIONS = inspect.signature(_shared_options, eval_str=True).parameters


def _task_parameter(option: TaskOption) -> inspect.Parameter:
    """A task's own option as a Typer parameter: `--name TEXT` (repeatable when `many`; a FILE for a
    `lines_file`)."""
    kind: Any = list[str] | None if option.many else str | None
    flag = typer.Option(f"--{option.name.replace('_', '-')}", metavar=option.metavar, help=option.help,
                        show_default=False)  # fmt: skip
    keyword = inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(option.name, keyword, default=None, annotation=Annotated[kind, flag])


def _run(task_type: type[Task], values: dict[str, Any]) -> int:
    """Build the task and the options from a command's values, then run; a bad option is one line, exit 2."""
    own = {option.name: values.pop(option.name) for option in task_type.options}
    inputs = values.pop("inputs") or []
    try:
        task = task_type.from_options(**own)
        options = Options.create(**values)
    except ValueError as exc:
        return Reporter(total_pages=0, total_docs=0, quiet=False, verbose=0).fail(exc)
    return run_task(task=task, paths=inputs, options=options)


def document_command(task_type: type[Task]) -> None:
    """Register `dsvl2 NAME` for a task. Typer reads the callback's `__signature__`: INPUTS, then the task's
    own options (and `--annotate` for tasks with boxes), then the shared ones (so panels and `--help` order
    are the same for every command)."""
    own = [_task_parameter(option) for option in task_type.options]
    if task_type.has_boxes:
        own.append(inspect.Parameter("annotate", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=o.Annotate))
    if clash := {p.name for p in own} & SHARED_OPTIONS.keys():
        raise TypeError(f"{task_type.name}: {sorted(clash)} are shared options already")
    inputs, *shared = SHARED_OPTIONS.values()
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in (inputs, *own, *shared)]

    def callback(**values: Any) -> None:
        raise typer.Exit(_run(task_type, values))

    callback.__name__ = task_type.name
    callback.__doc__ = task_type.summary
    callback.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    callback.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    app.command(task_type.name, cls=o.DocumentCommand, help=task_type.summary,
                epilog=_examples(*task_type.examples))(callback)


for _task_type in TASKS.values():
    document_command(_task_type)


@app.command(help="Print the JSON Schema of a page record (the same as schema/page-record.schema.json).")
def schema() -> None:
    typer.echo(json.dumps(record_schema(), indent=2))


@app.command(
    epilog=_examples(
        "dsvl2 reparse out.jsonl -o out.jsonl",
        "dsvl2 reparse tables.jsonl --format csv -o tables.csv",
        "cat out.jsonl | dsvl2 reparse - | jq -r .status",
    )
)
def reparse(
    records: Annotated[
        list[str] | None,
        typer.Argument(
            help="Record files as the commands write them (JSONL, or a JSON array from --format json); "
            "'-' reads records from stdin.",
            show_default=False,
            metavar="RECORDS",
        ),
    ] = None,
    output: o.Output = None,
    format: o.FormatOpt = None,
    quiet: o.Quiet = False,
    verbose: o.Verbose = 0,
) -> None:
    """Re-read saved answers with the current parsers, without the model: each record's `text` is parsed
    again for its task and prompt; `result`, `status` and `parser` are updated, everything else is kept.
    `failed` records pass through; `truncated` and `repetition` keep their status. Default format: jsonl."""
    raise typer.Exit(run_reparse(paths=records or [], output=output, fmt=format, quiet=quiet, verbose=verbose))


@app.command(
    epilog=_examples(
        "dsvl2 serve --model deepseek-ai/deepseek-vl2-tiny --port 8000",
        "DSVL2_API_KEY=secret dsvl2 serve --host 0.0.0.0 --batch-size 16",
        "dsvl2 ocr scans/ --server http://127.0.0.1:8000 -o out/",
    )
)
def serve(
    model: o.Model = DEFAULT_MODEL,
    revision: o.Revision = None,
    device: o.DeviceOpt = "auto",
    dtype: o.DTypeOpt = "auto",
    batch_size: o.BatchSize = None,
    quantize: o.Quantize = "none",
    host: Annotated[str, typer.Option(help="Address to listen on (loopback; 0.0.0.0 for all).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="DSVL2_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 requests.",
                     show_default=False),
    ] = None,
    served_model_name: Annotated[
        str | None, typer.Option(help="The model's name in the API. Default: --model as given.", show_default=False)
    ] = None,
    allow_remote_images: Annotated[
        bool, typer.Option(help="Fetch http(s) image URLs; by default only data: URLs are accepted.")
    ] = False,
    max_images: Annotated[int, typer.Option(help="Images one request may carry.")] = 8,
    max_image_mb: Annotated[float, typer.Option(help="Largest image, in MiB (decoded).")] = 20.0,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, in MiB.")] = 64.0,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds requests in flight get to finish after SIGTERM or Ctrl-C.")
    ] = 30.0,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (POST /v1/chat/completions, streaming included;
    GET /v1/models; GET /health, ready once the model is loaded). Concurrent requests share the engine's
    continuous batching; `dsvl2 ocr ... --server URL` and any OpenAI client can use it."""
    from dsvl2.openai_api import Limits
    from dsvl2.server import ServerConfig
    from dsvl2.server import serve as run_server

    try:
        Options.create(model=model, revision=revision, device=device, dtype=dtype, batch_size=batch_size,
                       quantize=quantize)
        checks = [("port", 0 <= port <= 65535), ("max_images", max_images >= 1), ("max_image_mb", max_image_mb > 0),
                  ("max_body_mb", max_body_mb > 0), ("shutdown_timeout", shutdown_timeout >= 0)]
        for option, ok in checks:
            if not ok:
                raise OptionError(option, "is out of range")
    except ValueError as exc:
        raise typer.Exit(Reporter(total_pages=0, total_docs=0, quiet=False, verbose=0).fail(exc)) from None
    limits = Limits(max_images=max_images, max_image_bytes=int(max_image_mb * 2**20),
                    allow_remote_images=allow_remote_images)
    config = ServerConfig(model_name=served_model_name or model, api_key=api_key or None, limits=limits,
                          max_body_bytes=int(max_body_mb * 2**20))
    raise typer.Exit(run_server(model=model, revision=revision, device=getattr(device, "value", device),
                                dtype=getattr(dtype, "value", dtype), batch_size=batch_size, quantize=quantize,
                                host=host, port=port,
                                config=config, shutdown_timeout=shutdown_timeout))


@app.command(
    epilog=_examples(
        "dsvl2 quantize deepseek-ai/deepseek-vl2-small -o small-int8 --bits 8",
        "dsvl2 quantize ./deepseek-vl2 -o base-int4 --bits 4 && dsvl2 ocr doc.pdf --model base-int4",
    )
)
def quantize(
    model: Annotated[str, typer.Argument(help="Float checkpoint: a local directory or a Hugging Face repo id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (new or empty).")],
    bits: Annotated[int, typer.Option("--bits", help="8: int8 per output channel; 4: int4 in groups of 128.")] = 8,
    revision: o.Revision = None,
    shard_gb: Annotated[float, typer.Option("--shard-gb", help="Largest shard, in GiB.")] = 2.0,
) -> None:
    """Write a weight-only quantised checkpoint (language model linears in int8 or int4, bf16 scales) that
    `--model DIR` loads as it is, without quantising again. Prints the output directory."""
    raise typer.Exit(quantize_cmd.quantize(model=model, out=out, bits=bits, revision=revision, shard_gb=shard_gb))


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
