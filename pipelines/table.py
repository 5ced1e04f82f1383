"""The `table` task: its default prompt, the parse of an answer into tables (readers in
pipelines/table_readers.py: Markdown, HTML, LaTeX tabular), the result schema and its renderers.

DeepSeek-VL2 answers a table page with a Markdown, HTML or LaTeX table, often with a sentence before or after,
and says "there is no table" in words. So: every table is read; every other non-blank answer line is kept
in the result's `notes` (never dropped silently); an answer with no table is ok only when it says, in a
short recognisable sentence, that there is none (or answers NONE), and a parse_error otherwise.
Parsers never raise on any input string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from dsvl2.pipelines.base import Page, PageRecord, Parsed
from dsvl2.pipelines.table_readers import (
    Table,
    find_tables,
    is_number,
    locate_tables,
    parse_html_table,
    parse_latex_table,
    parse_markdown_table,
)
from dsvl2.pipelines.task import PROMPT_OPTION, Task, TaskOption, markdown_table, one_prompt

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_PROMPT = (
    "Extract every table on this page. Write each table as a Markdown table with a header row, "
    "in reading order, separated by a blank line. Output only the tables; if there is no table, answer NONE."
)
__all__ = [
    "Table",
    "TableTask",
    "find_tables",
    "is_number",
    "locate_tables",
    "parse_html_table",
    "parse_latex_table",
    "parse_markdown_table",
    "parse_tables",
    "says_no_table",
]

# Sentences that say there is no table. Conservative on purpose: a whole short sentence in one of these
# shapes, so an answer that talks about something else stays a parse_error.
_SUBJECT = r"(?:the|this|that) (?:provided |given |attached )?(?:image|page|picture|document|photo|screenshot|figure)"
_NO_TABLE = re.compile(
    r"^(?:none|n/?a|no tables?(?: (?:found|detected|present|visible|available))?"
    r"|there (?:is|are) no tables?\b[^.!?]*"
    r"|i (?:do not|don't|did not|didn't|cannot|can't|could not|couldn't) (?:see|find|detect|identify)"
    r" (?:any|a) tables?\b[^.!?]*"
    rf"|{_SUBJECT}\b[^.!?]*? (?:does not|doesn't|do not|don't|did not) (?:contain|have|include|show|appear to contain)"
    r" (?:any |a )?tables?\b[^.!?]*"
    r"|no tables? (?:is |are |was |were |could be |can be )?(?:found|detected|present|visible|shown)\b[^.!?]*"
    r")[.!]?$"
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MAX_NO_TABLE_ANSWER = 400  # characters: a refusal is a sentence or two, not a page of prose


def says_no_table(text: str) -> bool:
    """True when a short answer's first sentence says there is no table (or the answer is NONE)."""
    s = " ".join(text.replace("*", "").replace("`", "").split()).lower()
    if len(s) > _MAX_NO_TABLE_ANSWER:
        return False
    first = _SENTENCE_END.split(s, maxsplit=1)[0] if s else s
    return bool(_NO_TABLE.match(first.strip()))


def unused_lines(text: str, used: set[int]) -> list[str]:
    """Notes for the non-blank answer lines outside `used` (0-based line numbers); code fences are not text."""
    notes = []
    for i, line in enumerate(text.splitlines()):
        s = line.strip()
        if i not in used and s and not s.startswith("```"):
            notes.append(f"line {i + 1} not used: {s}")
    return notes


def parse_tables(text: str) -> Parsed:
    """The table task's parse: every table and the answer lines around them (`notes`); ok only when each table
    parsed. No table is ok when the answer says so (`says_no_table`) or is empty, a parse_error otherwise."""
    located = locate_tables(text)
    used = {line for _, lines in located for line in lines}
    if not located and says_no_table(text):
        first = next(i for i, line in enumerate(text.splitlines()) if line.strip())
        return Parsed({"tables": [], "notes": unused_lines(text, {first})})
    result = {"tables": [t.to_dict() for t, _ in located], "notes": unused_lines(text, used)}
    if not located:
        if not text.strip():
            return Parsed(result)
        return Parsed(result, ok=False, error="no Markdown, HTML or LaTeX table in the answer, and it does not say "
                      "there is none")
    bad = [t.index for t, _ in located if t.status != "ok"]
    if bad:
        return Parsed(result, ok=False, error=f"could not read table(s) {', '.join(str(i + 1) for i in bad)}")
    return Parsed(result)


_NOTES = {"type": "array", "items": {"type": "string"}}
TABLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "format": {"enum": ["markdown", "html", "latex"]},
        "header": {"type": ["array", "null"], "items": {"type": "string"}},
        "rows": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
        "n_columns": {"type": "integer", "minimum": 0},
        "status": {"enum": ["ok", "parse_error"]},
        "raw": {"type": "string"},
        "notes": _NOTES,
    },
    "required": ["index", "format", "header", "rows", "n_columns", "status", "raw", "notes"],
}


@dataclass(frozen=True, slots=True)
class TableTask(Task):
    """Every table on the page → rows and columns (result: {"tables": [Table.to_dict(), ...]})."""

    prompt: str = DEFAULT_PROMPT

    name: ClassVar[str] = "table"
    summary: ClassVar[str] = (
        "Every table on the page → rows and columns. CSV to stdout or a file is tidy (one row per cell); "
        f"-o DIR/ gets one CSV per table plus the records.\n\nDefault prompt: *{DEFAULT_PROMPT}*"
    )
    examples: ClassVar[tuple[str, ...]] = (
        "dsvl2 table samples/invoice.pdf --format md",
        "dsvl2 table reports/ -o out/ --resume",
        "dsvl2 table samples/invoice.pdf -f jsonl | jq '.result.tables[].rows'",
    )
    options: ClassVar[tuple[TaskOption, ...]] = (PROMPT_OPTION,)
    max_new_tokens: ClassVar[int] = 2048
    default_format: ClassVar[str] = "csv"
    repetition_guard: ClassVar[tuple[int, int]] = (64, 1024)
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "tables": {"type": "array", "items": TABLE_SCHEMA},
            "notes": {**_NOTES, "description": "answer lines that are not part of any table, e.g. prose around it"},
        },
        "required": ["tables"],
    }
    csv_columns: ClassVar[tuple[str, ...]] = ("table", "row", "column", "header", "value", "error")

    @classmethod
    def from_options(cls, *, prompt: str | None = None) -> TableTask:
        return cls(one_prompt(prompt, DEFAULT_PROMPT))

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,)

    def parse(self, text: str, *, page: Page, prompt: str) -> Parsed:
        return parse_tables(text)

    @classmethod
    def markdown(cls, record: PageRecord) -> str:
        parts = []
        for t in (record.result or {}).get("tables", []):
            title = f"**Table {t['index'] + 1}**"
            if t["status"] == "ok":
                parts.append(f"{title}\n\n{markdown_table(t['header'], t['rows'])}")
            else:
                parts.append(f"{title} (could not be parsed: {'; '.join(t['notes'])})\n\n```\n{t['raw']}\n```")
        return "\n\n".join(parts) or "_no tables_"

    @classmethod
    def csv_rows(cls, record: PageRecord) -> list[list[Any]]:
        """One row per cell (table, row and column 1-based); a table that could not be parsed is one row
        holding its raw text."""
        err = record.error or ""
        rows: list[list[Any]] = []
        for t in (record.result or {}).get("tables", []):
            if t["status"] != "ok":
                rows.append([t["index"] + 1, "", "", "", t["raw"], "; ".join(t["notes"])])
            for i, row in enumerate(t["rows"], start=1):
                for j, value in enumerate(row, start=1):
                    name = t["header"][j - 1] if t["header"] else ""
                    rows.append([t["index"] + 1, i, j, name, value, err])
        return rows or [["", "", "", "", "", err]]

    @classmethod
    def frames(cls, record: PageRecord) -> list[tuple[str, pd.DataFrame, bool]]:
        import pandas as pd  # imported here: only DataFrame output needs it

        frames = []
        for t in (record.result or {}).get("tables", []):
            if t["status"] == "ok":
                frame = pd.DataFrame(t["rows"], columns=t["header"] or range(1, t["n_columns"] + 1))
                frames.append((f"p{record.page}.t{t['index'] + 1}", frame, t["header"] is not None))
        return frames

    @classmethod
    def columns(cls, result: Mapping[str, Any]) -> dict[str, Any]:
        tables = result.get("tables", [])
        return {"n_tables": len(tables), "tables": tables}
