"""Shared `Annotated` option aliases, so every command spells an option, its help and its default the same
way. Help panels group them as Inputs, Output, Run and Model in `--help`. Values are checked in one place,
dsvl2.options.Options, not here (so the CLI and the API say the same thing about a bad one). The one option
Typer cannot spell, `--ray` with an optional value, is read by the document commands' class, DocumentCommand."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperCommand

from dsvl2.model.devices import DTYPE_NAMES
from dsvl2.pipelines.tasks import TASKS
from dsvl2.writers import Format

IN, OUT, RUN, MODEL, SERVER, RAY = "Inputs", "Output", "Run", "Model", "Server", "Ray"
RAY_ADDRESS = re.compile(r"local|auto|ray://.*|[\w.-]+:\d+")  # what may follow --ray as its value

Inputs = Annotated[
    list[str] | None,
    typer.Argument(
        help="PDFs, images (PNG, JPEG, WebP, TIFF, BMP, GIF) or directories (searched recursively). "
        "'-' reads paths from stdin, one per line (or NUL-separated).",
        show_default=False,
        metavar="INPUTS",
    ),
]
Glob = Annotated[
    list[str] | None,
    typer.Option(
        "--glob",
        "-g",
        metavar="PATTERN",
        help="Only files in directories matching this pattern, e.g. '*.pdf' "
        "(a pattern with '/' matches the path below the directory). Repeatable. "
        "Default: every PDF and image suffix.",
        rich_help_panel=IN,
    ),
]
StdinData = Annotated[
    bool,
    typer.Option("--stdin-data", help="Read one PDF or image's bytes from stdin (source '-').", rich_help_panel=IN),
]
Pages = Annotated[
    str | None,
    typer.Option(
        "--pages",
        "-p",
        metavar="RANGES",
        help="Pages to process, 1-based, e.g. '1-3,7,10-'. Default: all.",
        rich_help_panel=IN,
    ),
]
Password = Annotated[
    str | None,
    typer.Option(
        "--password",
        metavar="TEXT",
        envvar="DSVL2_PDF_PASSWORD",
        help="Password for encrypted PDFs (or set DSVL2_PDF_PASSWORD to keep it out of shell history).",
        rich_help_panel=IN,
    ),
]
Dpi = Annotated[float, typer.Option("--dpi", help="Resolution PDF pages are rendered at.", rich_help_panel=IN)]
MaxSide = Annotated[
    int,
    typer.Option(
        "--max-side",
        help="Cap on the longest side of a page image in pixels (PDF pages render smaller, images are scaled down).",
        rich_help_panel=IN,
    ),
]
Output = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-o",
        metavar="PATH",
        help="'-' or absent: stdout. A directory (existing, ending "
        "in '/', or a new name without suffix): outputs per document, keeping the input tree. "
        "Otherwise one file for the whole run.",
        rich_help_panel=OUT,
    ),
]
FormatOpt = Annotated[
    Format | None,
    typer.Option(
        "--format",
        "-f",
        help="Output format; default per command, or from the -o file's suffix.",
        rich_help_panel=OUT,
        show_default=False,
    ),
]
Annotate = Annotated[
    Path | None,
    typer.Option(
        "--annotate",
        metavar="DIR",
        help="Write each page with its boxes drawn, as PNG under DIR.",
        rich_help_panel=OUT,
        show_default=False,
    ),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Skip pages already done (same file hash, page, task, prompt, settings "
        "and model) in the -o file or directory; failed pages are redone.",
        rich_help_panel=OUT,
    ),
]
Manifest = Annotated[
    Path | None,
    typer.Option(
        "--manifest",
        help="Where to write the run manifest. Default: DIR/TASK.manifest.json or FILE.manifest.json; none for stdout.",
        rich_help_panel=OUT,
        show_default=False,
    ),
]
ShardOpt = Annotated[
    str | None,
    typer.Option(
        "--shard",
        metavar="I/N",
        help="Process only the I-th of N deterministic "
        "parts of the documents (1-based), so N processes can share a job.",
        rich_help_panel=RUN,
    ),
]
FailFast = Annotated[
    bool,
    typer.Option("--fail-fast", help="Stop after the first page that fails or cannot be parsed.", rich_help_panel=RUN),
]
BatchSize = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        help="Pages the model answers at once; a page that finishes frees its row for the next at once "
        "(continuous batching). Default: chosen by the runtime from available memory.",
        rich_help_panel=RUN,
        show_default=False,
    ),
]
PageTimeout = Annotated[
    float | None,
    typer.Option(
        "--page-timeout",
        metavar="SECONDS",
        help="Longest a page's answer may take, counted from when the page is handed to the model. A page over "
        "it is stopped and recorded as failed (its partial answer kept), and the run goes on. Default: no limit.",
        rich_help_panel=RUN,
        show_default=False,
    ),
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress, warnings or summary on stderr.", rich_help_panel=RUN)
]
Verbose = Annotated[
    int, typer.Option("--verbose", "-v", count=True, help="More detail on stderr (-vv: more).", rich_help_panel=RUN)
]
Model = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        metavar="REPO|DIR",
        envvar="DSVL2_MODEL",
        help="Hugging Face repo id or local checkpoint directory.",
        rich_help_panel=MODEL,
    ),
]
Revision = Annotated[
    str | None,
    typer.Option("--revision", metavar="REV", help="Branch, tag or commit of the model repo.", rich_help_panel=MODEL),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="auto|cpu|cuda[:N]",
        help="Where to run the model: auto is CUDA when torch sees a GPU, else the CPU.",
        rich_help_panel=MODEL,
    ),
]
DTypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        metavar="auto|" + "|".join(DTYPE_NAMES),
        help="Weight and activation dtype; auto is bfloat16 where the hardware computes it natively and the "
        "checkpoint is bf16, else float32.",
        rich_help_panel=MODEL,
    ),
]
MaxNewTokens = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens",
        help="Longest answer in tokens; a page that hits it is marked 'truncated'. Default per command.",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
Temperature = Annotated[
    float,
    typer.Option(
        "--temperature",
        help="0 is greedy (best for documents); the model authors advise at most 0.7.",
        rich_help_panel=MODEL,
    ),
]
TopP = Annotated[
    float,
    typer.Option(
        "--top-p", help="Nucleus sampling mass (with --temperature > 0).", rich_help_panel=MODEL
    ),
]
Seed = Annotated[int, typer.Option("--seed", help="Random seed for sampling.", rich_help_panel=MODEL)]
RepetitionPenalty = Annotated[
    float,
    typer.Option(
        "--repetition-penalty",
        metavar="P",
        help="Divide the score of every token already in the prompt or the answer by P (multiply, when negative), "
        "as transformers does; 1 is off. DeepSeek's demos sample with 1.1.",
        rich_help_panel=MODEL,
    ),
]
RepetitionGuard = Annotated[
    int | None,
    typer.Option(
        "--repetition-guard",
        metavar="N",
        help="Stop an answer once its last N tokens repeat earlier text (a generation loop); the page gets "
        "status 'repetition'. 0 turns the guard off. Default per command: "
        + ", ".join(f"{name} {task.repetition_guard[0]}" for name, task in TASKS.items())
        + ".",
        rich_help_panel=MODEL,
        show_default=False,
    ),
]
RetryRepetition = Annotated[
    bool,
    typer.Option(
        "--retry-repetition",
        help="Answer a page the repetition guard stopped once more, sampling (temperature 0.5, or yours if "
        "higher than 0; top-p 0.9; the next seed). Both attempts are kept in the record's 'attempts'.",
        rich_help_panel=MODEL,
    ),
]
Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        metavar="URL[,URL...]",
        help="Send each page to OpenAI-compatible servers (dsvl2 serve, vLLM, SGLang) instead of loading the model "
        "here, round-robin over the URLs. Records, resume and exit codes are the same; the record's model names "
        "the server that answered.",
        rich_help_panel=SERVER,
        show_default=False,
    ),
]
ServerModel = Annotated[
    str | None,
    typer.Option("--server-model", metavar="NAME", help="The served model to ask. Default: the server's only model.",
                 rich_help_panel=SERVER, show_default=False),
]
ApiKeyEnv = Annotated[
    str,
    typer.Option("--api-key-env", metavar="VAR", help="Environment variable holding the servers' API key.",
                 rich_help_panel=SERVER),
]
MaxConcurrent = Annotated[
    int,
    typer.Option("--max-concurrent", metavar="N", help="Requests in flight at once, over all servers.",
                 rich_help_panel=SERVER),
]
RequestTimeout = Annotated[
    float,
    typer.Option("--request-timeout", metavar="SECONDS", help="Longest one request may take before it is retried.",
                 rich_help_panel=SERVER),
]
MaxRetries = Annotated[
    int,
    typer.Option("--max-retries", metavar="N", help="Retries of a request after a 429, a 5xx or a connection "
                 "error, with exponential backoff; then the page is recorded as failed.", rich_help_panel=SERVER),
]
Quantize = Annotated[
    str,
    typer.Option(
        "--quantize",
        metavar="none|int8|int4",
        help="Weight-only quantisation of the language model at load time (int8 per output channel, int4 in "
        "groups; activations stay bf16): less memory and faster decode on a CPU. A checkpoint written by "
        "'dsvl2 quantize' is used as it is.",
        rich_help_panel=MODEL,
    ),
]
Ray = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="[local|auto|ray://HOST:PORT]",
        help="Answer the pages on a Ray cluster: 'local' (the default when --ray is given alone) starts one on "
        "this machine, 'auto' or ray://host:port joins a running cluster. Outputs, resume and exit codes are a local "
        "run's. Needs pip install 'dsvl2[ray]'.",
        rich_help_panel=RAY,
        show_default=False,
    ),
]
Workers = Annotated[
    str | None,
    typer.Option("--workers", metavar="N|MIN,MAX", help="Model workers on Ray (MIN,MAX to autoscale). Default: 1.",
                 rich_help_panel=RAY, show_default=False),
]
CpusPerWorker = Annotated[
    float | None,
    typer.Option("--cpus-per-worker", metavar="N", help="CPUs Ray reserves for each model worker.",
                 rich_help_panel=RAY, show_default=False),
]
GpusPerWorker = Annotated[
    float,
    typer.Option("--gpus-per-worker", metavar="N", help="GPUs Ray reserves for each model worker.",
                 rich_help_panel=RAY),
]


def with_ray_default(args: list[str], takes_value: set[str]) -> list[str]:
    """`--ray` with an optional value, which Typer cannot declare: a bare `--ray` (last, or before anything
    that is not an address: another option, an input path) becomes `--ray local`. `--ray=ADDR`, `--ray ADDR`,
    the values of the options in `takes_value` and everything after `--` are left as they are. A host:port
    after `--ray` is taken as its value (and refused by Options, naming --ray), not as an input path."""
    out: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return [*out, *args[i:]]
        if token == "--ray" and (i + 1 == len(args) or not RAY_ADDRESS.fullmatch(args[i + 1])):
            out += ["--ray", "local"]
            i += 1
            continue
        if token in takes_value:
            out += args[i : i + 2]
            i += 2
            continue
        out.append(token)
        i += 1
    return out


class DocumentCommand(TyperCommand):
    """A document command: its arguments are read after `with_ray_default`, so `--ray` alone means local."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        takes_value = {
            name
            for p in self.get_params(ctx)
            if p.param_type_name == "option" and not getattr(p, "is_flag", False) and not getattr(p, "count", False)
            for name in p.opts
        }
        return super().parse_args(ctx, with_ray_default(args, takes_value))
