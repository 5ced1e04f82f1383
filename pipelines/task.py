"""What a document task is, in one place: `Task`, the base every task module (ocr.py, table.py, ...)
subclasses once, and `TaskOption`, the options of its own that a command and an API function take.

A task module holds everything about its task: prompt or template, default token budget, output format
and repetition guard, the parser, the JSON Schema of its result, how a result renders to Markdown, CSV,
plain text and DataFrames. The CLI, the Python API, the writers and the schema read it from the registry
(pipelines/tasks.py), so adding a task is one new module plus one registry line. Pure: no I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dsvl2.pipelines.base import OptionError, Page, PageRecord, Parsed

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True, slots=True)
class TaskOption:
    """An option of one task: `name=` in the API, `--name` on the command line (repeatable when `many`).
    With `lines_file`, the value is a file whose non-blank lines are the values (ask's `--prompts FILE`)."""

    name: str
    help: str
    many: bool = False
    lines_file: bool = False
    metavar: str = "TEXT"


PROMPT_OPTION = TaskOption("prompt", "Replace the command's default prompt (shown in the description above).")


def one_prompt(prompt: str | None, default: str) -> str:
    """A single-prompt task's prompt: the user's, else the task's default; a blank one is an OptionError."""
    if prompt is None:
        return default
    if not prompt.strip():
        raise OptionError("prompt", "must not be empty")
    return prompt


def read_lines(option: str, path: str | Path) -> tuple[str, ...]:
    """The non-blank lines of a `lines_file` option's file, stripped; OptionError when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise OptionError(option, f"cannot read {path}: {reason}") from exc
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def texts(value: str | Any | None) -> tuple[str, ...]:
    """A `many` option's value as a tuple: None → (), one string → (it,), an iterable of strings → tuple."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def unique(values: tuple[str, ...]) -> tuple[str, ...]:
    """Blank values and repeats dropped, order kept."""
    return tuple(dict.fromkeys(v for v in values if v.strip()))


def cell(value: Any) -> str:
    """A value as one Markdown table cell: whitespace collapsed, pipes escaped, None empty."""
    return " ".join(str("" if value is None else value).split()).replace("|", "\\|")


def markdown_table(header: list[str] | None, rows: list[list[Any]]) -> str:
    """A Markdown table, ragged rows padded; without a header, an empty header row."""
    width = max([len(header or [])] + [len(r) for r in rows] + [1])
    head = [*(header or [])] + [""] * (width - len(header or []))
    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "---|" * width]
    lines += ["| " + " | ".join(cell(v) for v in [*r, *[""] * (width - len(r))]) + " |" for r in rows]
    return "\n".join(lines)


class Task:
    """One document task. Subclasses are frozen dataclasses holding the run's prompts; the ClassVars say
    what the task is. `parse` must not raise on any text: malformed answers become `Parsed(ok=False)`."""

    __slots__ = ()

    name: ClassVar[str]
    summary: ClassVar[str]  # the command's help
    examples: ClassVar[tuple[str, ...]]  # command lines for `--help`
    options: ClassVar[tuple[TaskOption, ...]]
    max_new_tokens: ClassVar[int]  # the default answer budget
    default_format: ClassVar[str]  # a dsvl2.writers.Format value: md, csv, jsonl, json or text
    # (n, window) of the repetition guard (model.requests.Sampling.no_repeat_ngram / repeat_window): an answer
    # stops when its last n tokens already occurred within its last `window`. A loop of period p repeats every
    # n-gram once it has run n + p tokens, so a large n only delays the stop by n tokens, while it keeps honest
    # repetition (table rows of equal cells, repeated headings) from tripping it.
    repetition_guard: ClassVar[tuple[int, int]]
    result_schema: ClassVar[dict[str, Any]]  # JSON Schema of `PageRecord.result`
    csv_columns: ClassVar[tuple[str, ...]]  # the task's columns of tidy CSV, after source, page, status
    has_boxes: ClassVar[bool] = False  # results carry boxes that `--annotate` can draw
    prompt_in_markdown: ClassVar[bool] = False  # Markdown shows each record's prompt (several per page)

    @classmethod
    def from_options(cls, **values: Any) -> Task:
        """The task for one run from its own options (`options`); OptionError names a bad one."""
        raise NotImplementedError

    @property
    def prompts(self) -> tuple[str, ...]:
        raise NotImplementedError

    def parse(self, text: str, *, page: Page, prompt: str) -> Parsed:
        raise NotImplementedError

    # How a record's result looks. `markdown`, `answer` and `frames` see only records with a result (the writer
    # frames failed pages); `csv_rows` sees every record, its result None for a failed page.

    @classmethod
    def markdown(cls, record: PageRecord) -> str:
        return record.text or ""

    @classmethod
    def answer(cls, record: PageRecord) -> str | None:
        """What `--format text` prints for the page; None prints the raw answer."""
        return None

    @classmethod
    def csv_rows(cls, record: PageRecord) -> list[list[Any]]:
        """Rows of `csv_columns` values (the writer puts source, page, status in front); at least one."""
        return [[json.dumps(record.result)]]

    @classmethod
    def frames(cls, record: PageRecord) -> list[tuple[str, pd.DataFrame, bool]]:
        """(file suffix, DataFrame, has header) for each table-like part of the result, each its own CSV file."""
        return []

    @classmethod
    def columns(cls, result: Mapping[str, Any]) -> dict[str, Any]:
        """The result flattened into the columns of `dsvl2.to_dataframe`'s one row per record."""
        return dict(result)
