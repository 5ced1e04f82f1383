"""The values pipelines work on and produce: documents, pages, settings, page records, option errors, and
the seam to the model (`Runtime`). What a task is lives in pipelines/task.py.

Pure data and small pure functions. Nothing here renders, prints, writes files or loads a model; the CLI
builds `Document`s and `Page`s, the runner turns them into `PageRecord`s.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from dsvl2.model.requests import Completion, Request, Sampling

if TYPE_CHECKING:
    from PIL import Image

    from dsvl2.pipelines.task import Task

# 1.1: settings.device and .dtype, model.fingerprint; 1.2: settings.repetition_penalty and .quantize, parser, pages
SCHEMA_VERSION = "1.2"
# Records of these versions are read back (resume, reparse); their missing fields take the defaults.
READABLE_VERSIONS: frozenset[str] = frozenset({"1.0", "1.1", SCHEMA_VERSION})
# The version of the task parsers (pipelines/<task>.py) that made a record's `result`: bumped whenever a
# parser would read some answer differently, so `dsvl2 reparse` output says which parsers read it.
PARSER_VERSION = "2"

Status = Literal["ok", "truncated", "repetition", "parse_error", "failed"]
STATUSES: tuple[Status, ...] = ("ok", "truncated", "repetition", "parse_error", "failed")
# Statuses that count as a failed page: exit code 1, `--fail-fast`, and redone by `--resume`.
FAILURES: frozenset[str] = frozenset({"failed", "parse_error"})

# The one retry of an answer the guard stopped (`--retry-repetition`): sampled instead of greedy, the
# model authors' advice (temperature <= 0.7) kept, a different seed.
RETRY_TEMPERATURE = 0.5
RETRY_TOP_P = 0.9


class OptionError(ValueError):
    """An option value that cannot work, named as the caller wrote it: `option` is the API keyword
    (`top_p`); the CLI shows it as the flag (`--top-p`). Raised before any page is processed."""

    def __init__(self, option: str, problem: str) -> None:
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem

    @property
    def flag(self) -> str:
        return "--" + self.option.replace("_", "-")


class Runtime(Protocol):
    """What pipelines need from the model runtime, in the style of nano-vllm's `add_request` / `step`
    (`dsvl2.load` returns one; `dsvl2.model.engine.Engine` is one). `max_batch_size`: how many requests it
    answers at once (0 when it does not say)."""

    model_id: str
    revision: str | None
    max_batch_size: int

    def submit(self, request: Request) -> None:
        """Queue a request; a later `step` admits it when a row is free. Ids are unique among those in flight."""
        ...

    def step(self) -> list[Completion]:
        """Run one scheduling iteration; the completions that finished in it. If it raises, every request in
        flight was dropped and the runtime is usable again."""
        ...

    @property
    def has_work(self) -> bool:
        """True while a submitted request has not been returned by `step`."""
        ...

    def cancel(self, request_id: str) -> None:
        """Stop a request: dropped if queued, stopped at its next step if running (callable from any thread)."""
        ...


@dataclass(frozen=True, slots=True)
class Document:
    """One input document. `key` is its sanitised relative name, unique within a run (output paths derive
    from it); `error` is set when the file cannot be read or opened at all."""

    source: str
    key: str
    sha256: str | None = None
    kind: Literal["pdf", "image", "unknown"] = "unknown"
    n_pages: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PageSize:
    """The page as the model saw it: pixels of the input (after any `--max-side` cap for PDFs, the original
    image size for images), and for PDF pages also the size in points and the render dpi."""

    width_px: int
    height_px: int
    width_pt: float | None = None
    height_pt: float | None = None
    dpi: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "width_px": self.width_px,
            "height_px": self.height_px,
            "width_pt": self.width_pt,
            "height_pt": self.height_pt,
            "dpi": self.dpi,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PageSize:
        return cls(d["width_px"], d["height_px"], d.get("width_pt"), d.get("height_pt"), d.get("dpi"))


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a document, 1-based `number`. `image` is None when the page was not rendered: it failed
    (`error` set), or every prompt for it is already done. A document that could not be opened arrives as
    one page with `number` None and the document's error."""

    doc: Document
    number: int | None
    image: Image.Image | None = None
    size: PageSize | None = None
    error: str | None = None
    render_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the user chose that can change a page's result; part of every record and resume key."""

    model: str
    revision: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    dpi: float = 144.0
    max_side: int = 2048
    no_repeat_ngram: int = 0
    repeat_window: int = 256
    retry_repetition: bool = False
    repetition_penalty: float = 1.0  # 1.0 is off; transformers' RepetitionPenaltyLogitsProcessor otherwise
    quantize: str = "none"  # weight-only quantisation of the language model: none, int8 or int4
    device: str = "auto"  # as resolved for the run: "cpu" or "cuda" (the kind; which GPU does not matter)
    dtype: str = "auto"  # as resolved for the run: "float32", "bfloat16" or "float16"

    def sampling(self) -> Sampling:
        """How every page is answered; raises ValueError for values the runtime rejects."""
        return Sampling(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            no_repeat_ngram=self.no_repeat_ngram,
            repeat_window=self.repeat_window,
            repetition_penalty=self.repetition_penalty,
        )

    def retry_sampling(self) -> Sampling:
        """The retry of a looping answer: temperature RETRY_TEMPERATURE (or the user's, when already
        sampling), top-p at most RETRY_TOP_P, the next seed, the same guard."""
        return replace(
            self.sampling(),
            temperature=self.temperature or RETRY_TEMPERATURE,
            top_p=min(self.top_p, RETRY_TOP_P),
            seed=self.seed + 1,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "revision": self.revision,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "dpi": self.dpi,
            "max_side": self.max_side,
            "no_repeat_ngram": self.no_repeat_ngram,
            "repeat_window": self.repeat_window,
            "retry_repetition": self.retry_repetition,
            "repetition_penalty": self.repetition_penalty,
            "quantize": self.quantize,
            "device": self.device,
            "dtype": self.dtype,
        }


@dataclass(frozen=True, slots=True)
class Parsed:
    """A task parser's verdict on one answer: the structure (JSON-ready), and whether parsing worked."""

    result: dict[str, Any]
    ok: bool = True
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PageRecord:
    """One result: a page of a document answered for one prompt. Serialised by `to_dict` into the
    versioned record that `schema/page-record.schema.json` documents. `attempts` is None when the page was
    answered once; after a retry it lists every attempt in order (see `attempt`), the last being the one
    that `text`, `result` and `status` describe."""

    source: str
    sha256: str | None
    page: int | None
    page_size: PageSize | None
    task: str
    prompt: str
    model: dict[str, str | None]
    settings: dict[str, Any]
    text: str | None
    result: dict[str, Any] | None
    status: Status
    error: str | None = None
    tokens: dict[str, int] | None = None
    timings: dict[str, float] | None = None
    attempts: list[dict[str, Any]] | None = None
    parser: str | None = PARSER_VERSION  # which parsers made `result`; None when no answer was parsed
    pages: list[int] | None = None  # every page one answer saw (`ask --per document`); None for one page
    schema_version: str = SCHEMA_VERSION

    @property
    def key(self) -> str:
        return record_key(
            sha256=self.sha256,
            page=self.page,
            task=self.task,
            prompt=self.prompt,
            settings=self.settings,
            model=self.model,
            pages=self.pages,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "source": self.source,
            "sha256": self.sha256,
            "page": self.page,
            "page_size": self.page_size.to_dict() if self.page_size else None,
            "task": self.task,
            "prompt": self.prompt,
            "model": dict(self.model),
            "settings": dict(self.settings),
            "text": self.text,
            "result": self.result,
            "status": self.status,
            "error": self.error,
            "tokens": self.tokens,
            "timings": self.timings,
            "attempts": self.attempts,
            "parser": self.parser,
            "pages": self.pages,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PageRecord:
        """Rebuild a record read back from an output file; raises KeyError/TypeError/ValueError if it is not one."""
        if d["schema_version"] not in READABLE_VERSIONS:
            raise ValueError(f"schema version {d['schema_version']!r} is not one this dsvl2 reads "
                             f"({', '.join(sorted(READABLE_VERSIONS))})")
        if d["status"] not in STATUSES:
            raise ValueError(f"unknown status {d['status']!r}")
        size = d.get("page_size")
        return cls(
            source=d["source"],
            sha256=d["sha256"],
            page=d["page"],
            page_size=PageSize.from_dict(size) if size else None,
            task=d["task"],
            prompt=d["prompt"],
            model=dict(d["model"]),
            settings=dict(d["settings"]),
            text=d.get("text"),
            result=d.get("result"),
            status=d["status"],
            error=d.get("error"),
            tokens=d.get("tokens"),
            timings=d.get("timings"),
            attempts=d.get("attempts"),
            parser=d.get("parser"),
            pages=d.get("pages"),
            schema_version=d["schema_version"],
        )


def record_key(
    *,
    sha256: str | None,
    page: int | None,
    task: str,
    prompt: str,
    settings: Mapping[str, Any],
    model: Mapping[str, Any],
    pages: Sequence[int] | None = None,
) -> str:
    """The resume identity of a record: same file content, page, task, prompt, settings (resolved device and
    dtype included) and model → same key. A model with a `fingerprint` (its config, tokenizer and weights:
    `dsvl2.model.weights.fingerprint`) is known by it alone, so the same checkpoint under another path or
    name is the same model and a re-exported one is not; without one, by the name and revision given. A record
    over several pages (`pages`, ask --per document) is its document's key (no page) with the pages folded in,
    so the same question over other pages, or over one page, is another record."""
    if pages is not None:
        family = record_key(sha256=sha256, page=None, task=task, prompt=prompt, settings=settings, model=model)
        return hashlib.sha256(json.dumps([family, list(pages)]).encode()).hexdigest()
    fingerprint = model.get("fingerprint")
    chosen = {k: v for k, v in settings.items() if not (fingerprint and k in ("model", "revision"))}
    blob = json.dumps(
        {"sha256": sha256, "page": page, "task": task, "prompt": prompt, "settings": chosen, "model": fingerprint},
        sort_keys=True,
        ensure_ascii=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def page_key(page: Page, *, task: str, prompt: str, settings: Settings, model: Mapping[str, Any]) -> str:
    return record_key(
        sha256=page.doc.sha256, page=page.number, task=task, prompt=prompt, settings=settings.to_dict(), model=model
    )


_FINISH_STATUS: dict[str, Status] = {"length": "truncated", "repetition": "repetition"}


@dataclass(frozen=True, slots=True)
class RecordContext:
    """What every record of a run shares."""

    task: str
    settings: Settings
    model: dict[str, str | None] = field(default_factory=lambda: {"id": None, "revision": None, "fingerprint": None})


def _identity(ctx: RecordContext, page: Page, prompt: str) -> dict:
    """The fields that say which page, prompt, model and settings a record is for (its resume identity)."""
    return {"source": page.doc.source, "sha256": page.doc.sha256, "page": page.number, "page_size": page.size,
            "task": ctx.task, "prompt": prompt, "model": dict(ctx.model), "settings": ctx.settings.to_dict()}


def failed_record(ctx: RecordContext, page: Page, prompt: str, error: str) -> PageRecord:
    """A page that produced no answer: unreadable document, render failure, or a model error."""
    return PageRecord(
        **_identity(ctx, page, prompt),
        text=None,
        result=None,
        status="failed",
        error=error,
        timings={"render": round(page.render_seconds, 4)} if page.image is not None else None,
        parser=None,
    )


def _truncation(completion: Completion, max_new_tokens: int) -> str:
    """Why an answer that used its whole budget was cut: the model's context, or the user's max_new_tokens."""
    if completion.cut_by_context and completion.n_generated < max_new_tokens:
        return (f"the answer reached the model's {completion.context:,}-position context after "
                f"{completion.n_prompt:,} prompt tokens and {completion.n_generated:,} answer tokens "
                f"(max_new_tokens {max_new_tokens:,}) and was cut")
    return f"the answer hit max_new_tokens ({max_new_tokens}) and was cut"


def attempt(completion: Completion, sampling: Sampling) -> dict[str, Any]:
    """One generation of a page as `PageRecord.attempts` lists it."""
    return {
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "tokens": {"prompt": completion.n_prompt, "generated": completion.n_generated},
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed},
    }


def _answered_by(ctx: RecordContext, completion: Completion) -> dict[str, str | None]:
    """The record's `model`: the run's, plus the server that answered (`--server`)."""
    return dict(ctx.model) | ({"server": completion.origin} if completion.origin else {})


def answered_record(
    ctx: RecordContext,
    page: Page,
    prompt: str,
    completion: Completion,
    task: Task,
    *,
    attempts: list[dict[str, Any]] | None = None,
) -> PageRecord:
    """Parse an answer and pick its status: a truncated or looping generation outranks a parse failure
    (the parse usually failed because the answer was cut), and its parse is still attempted. A completion
    without an answer (finish reason "error": a server that could not answer) is the page's failure; one from a
    server names it in the record's `model`."""
    if completion.finish_reason == "error":
        failed = failed_record(ctx, page, prompt, completion.error or "the runtime gave no answer")
        return replace(failed, model=_answered_by(ctx, completion))
    try:
        parsed = task.parse(completion.text, page=page, prompt=prompt)
    except Exception as exc:  # a parser bug must cost one page, not the run
        parsed = Parsed({}, ok=False, error=f"parser crashed: {type(exc).__name__}: {exc}")
    status: Status
    error = None
    if completion.finish_reason == "cancelled":
        status, error = "failed", "generation was cancelled"
    elif completion.finish_reason in _FINISH_STATUS:
        status = _FINISH_STATUS[completion.finish_reason]
        if status == "truncated":
            error = _truncation(completion, ctx.settings.max_new_tokens)
        else:
            error = "generation stopped by the repetition guard"
    elif parsed.ok:
        status = "ok"
    else:
        status, error = "parse_error", parsed.error
    t = completion.timings
    return PageRecord(
        **(_identity(ctx, page, prompt) | {"model": _answered_by(ctx, completion)}),
        text=completion.text,
        result=parsed.result,
        status=status,
        error=error,
        tokens={"prompt": completion.n_prompt, "generated": completion.n_generated},
        timings={
            "render": round(page.render_seconds, 4),
            "queued": round(t.queued, 4),
            "prefill": round(t.prefill, 4),
            "decode": round(t.decode, 4),
        },
        attempts=attempts,
    )
