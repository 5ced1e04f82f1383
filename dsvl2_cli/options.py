"""The options of a run, built and checked once: `Options.create` takes what the CLI parsed or the keywords
an API call got, turns text into values (`pages="1-3"`, `shard="1/4"`, `format="csv"`), and raises
`OptionError` naming the option as the caller wrote it (the CLI shows `--top-p`, the API `top_p`). What
is checked here is every value on its own; how inputs and outputs fit together is checked by the run.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dsvl2.inputs import PageSelection, Shard, parse_pages, parse_shard
from dsvl2.model.devices import check_device, check_dtype
from dsvl2.model.hub import DEFAULT_MODEL
from dsvl2.pipelines.base import OptionError, Settings
from dsvl2.pipelines.task import Task
from dsvl2.writers import Format

# Options of the command line only: the API returns records instead of writing, drawing or reporting them.
OUTPUT_OPTIONS = ("output", "format", "resume", "manifest", "annotate", "quiet", "verbose", "stdin_data")


def parse_workers(text: str) -> tuple[int, int]:
    """`--workers`: "N" is a pool of N workers, "MIN,MAX" one that autoscales between them."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) in (1, 2) and all(p.isdigit() for p in parts):
        low, high = int(parts[0]), int(parts[-1])
        if 1 <= low <= high:
            return low, high
    raise OptionError("workers", f"must be N or MIN,MAX with 1 <= MIN <= MAX (got {text!r})")


@dataclass(frozen=True, slots=True)
class Options:
    """Every option shared by the document commands and API functions (the task's own are its module's)."""

    # Inputs
    globs: tuple[str, ...] = ()
    stdin_data: bool = False
    pages: PageSelection | None = None
    password: str | None = None
    dpi: float = 144.0
    max_side: int = 2048
    # Output
    output: str | None = None
    format: Format | None = None
    resume: bool = False
    manifest: Path | None = None
    annotate: Path | None = None
    # Run
    shard: Shard | None = None
    fail_fast: bool = False
    batch_size: int | None = None
    page_timeout: float | None = None
    quiet: bool = False
    verbose: int = 0
    # Model
    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    repetition_guard: int | None = None
    retry_repetition: bool = False
    # Server (`--server`: the pages go to OpenAI-compatible servers instead of a model in this process)
    server: tuple[str, ...] = ()
    server_model: str | None = None
    api_key_env: str = "DSVL2_API_KEY"
    max_concurrent: int = 8
    request_timeout: float = 600.0
    max_retries: int = 3
    # Weight-only quantisation of the language model
    quantize: str = "none"
    # Ray (`--ray`: the pages are answered by a pool of workers on a Ray cluster)
    ray: str | None = None
    workers: str | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("dpi", self.dpi > 0, "must be positive"),
            ("max_side", self.max_side >= 16, "must be at least 16"),
            ("batch_size", self.batch_size is None or self.batch_size >= 1, "must be at least 1"),
            ("page_timeout", self.page_timeout is None or self.page_timeout > 0,
             "must be a positive number of seconds"),
            ("max_new_tokens", self.max_new_tokens is None or self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be 0 (greedy) or more"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("repetition_guard", self.repetition_guard is None or self.repetition_guard >= 0,
             "must be 0 (off) or a number of tokens"),
            ("verbose", self.verbose >= 0, "must be 0 or more"),
            ("model", bool(self.model.strip()), "must not be empty"),
            ("server", all(u.startswith(("http://", "https://")) for u in self.server),
             "must be http:// or https:// URLs, separated by commas"),
            ("max_concurrent", self.max_concurrent >= 1, "must be at least 1"),
            ("request_timeout", self.request_timeout > 0, "must be a positive number of seconds"),
            ("max_retries", self.max_retries >= 0, "must be 0 or more"),
            ("quantize", self.quantize in ("none", "int8", "int4"), "must be none, int8 or int4"),
            ("cpus_per_worker", self.cpus_per_worker is None or self.cpus_per_worker > 0, "must be positive"),
            ("gpus_per_worker", self.gpus_per_worker >= 0, "must be 0 or more"),
            ("ray", self.ray is None or self.ray in ("local", "auto") or (self.ray.startswith("ray://")
             and len(self.ray) > len("ray://")), "must be local, auto or ray://HOST:PORT"),
            ("workers", self.workers is None or self.ray is not None, "needs --ray"),
            ("cpus_per_worker", self.cpus_per_worker is None or self.ray is not None, "needs --ray"),
        ]  # fmt: skip
        for option, ok, problem in checks:
            if not ok:
                raise OptionError(option, problem)
        for option, problem in (("device", check_device(self.device)), ("dtype", check_dtype(self.dtype))):
            if problem:
                raise OptionError(option, problem)
        if self.workers is not None:
            parse_workers(self.workers)

    @classmethod
    def create(cls, **values: Any) -> Options:
        """Options from keywords named like the long options (`top_p`, `max_new_tokens`, `glob`, ...), with
        text accepted where the command line takes text; OptionError for an unknown or bad one."""
        known = {f.name for f in fields(cls)}
        if "glob" in values:
            values["globs"] = values.pop("glob")
        if unknown := sorted(set(values) - known):
            raise OptionError(unknown[0], f"is not an option (options: {', '.join(sorted(known))})")
        converters = {
            "globs": lambda v: (v,) if isinstance(v, str) else tuple(v or ()),
            "pages": lambda v: parse_pages(v) if isinstance(v, str) else v,
            "shard": lambda v: parse_shard(v) if isinstance(v, str) else v,
            "format": lambda v: Format(v.value if isinstance(v, Format) else v) if v is not None else None,
            "manifest": lambda v: Path(v) if v is not None else None,
            "annotate": lambda v: Path(v) if v is not None else None,
            "device": lambda v: getattr(v, "value", v),  # a Typer enum or text
            "dtype": lambda v: getattr(v, "value", v),
            "server": lambda v: tuple(u.strip() for u in (v.split(",") if isinstance(v, str) else v or ())
                                      if u.strip()),
        }
        for name, convert in converters.items():
            if name in values:
                try:
                    values[name] = convert(values[name])
                except ValueError as exc:  # parse_pages / parse_shard / Format say what is wrong
                    raise OptionError(name, f"is not valid: {exc}") from None
        return cls(**values)

    def settings(self, task: type[Task], *, device: str = "auto", dtype: str = "auto",
                 quantize: str | None = None) -> Settings:
        """What can change a page's answer, with the task's defaults filled in; `device`, `dtype` and
        `quantize` as the model resolved them (a quantised checkpoint is quantised without --quantize)."""
        ngram, window = task.repetition_guard
        if self.repetition_guard is not None:
            ngram, window = self.repetition_guard, max(window, 4 * self.repetition_guard)
        return Settings(
            model=self.model,
            revision=self.revision,
            max_new_tokens=self.max_new_tokens or task.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            dpi=self.dpi,
            max_side=self.max_side,
            no_repeat_ngram=ngram,
            repeat_window=window,
            retry_repetition=self.retry_repetition,
            quantize=quantize or self.quantize,
            device=device,
            dtype=dtype,
        )
