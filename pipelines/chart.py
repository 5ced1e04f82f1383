"""The `chart` task: its default prompt, and the parser that turns an answer into the chart's data.

An answer holds optional "Title:", "X axis:", "Y axis:" lines and a data table (Markdown, HTML, or the
DePlot-style linearised form with `<0x0A>` line breaks); failing a table, "category: value" lines are read
as one series. The first column holds the categories, each further column one series. Values are numbers
(thousands separators, currency signs, % and (negative) accounting forms accepted) or null when unreadable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from dsvl2.pipelines.base import Page, PageRecord, Parsed
from dsvl2.pipelines.table import Table, find_tables
from dsvl2.pipelines.task import PROMPT_OPTION, Task, TaskOption, cell, markdown_table, one_prompt

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_PROMPT = (
    "Extract the data of this chart. First write 'Title: ...', 'X axis: ...' and 'Y axis: ...' lines, then "
    "a Markdown table whose first column holds the categories (x values) and whose other columns hold one "
    "series each, with the series names in the header row."
)

_META = re.compile(
    r"^\s*[#>*_\-\s]*(title|chart title|x[\s_-]?axis|y[\s_-]?axis|x[\s_-]?label|y[\s_-]?label)"
    r"(?:\s+(?:title|label))?\s*[*_]*\s*[:：|]\s*(.*?)\s*[*_]*\s*$",
    re.IGNORECASE,
)
_PAIR = re.compile(r"^\s*[-*•]?\s*(.+?)\s*[:=]\s*([-+−(]?[$€£¥]?\s*\d[\d,. ]*%?\)?)\s*$")
_CURRENCY = str.maketrans("", "", "$€£¥ ,")


def parse_number(cell: str) -> float | None:
    """'1,234.5' → 1234.5, '12%' → 12.0, '(3)' → -3.0, '−2' → -2.0; None when it is not a number."""
    s = cell.strip().replace("−", "-")
    negative = s.startswith("(") and s.endswith(")")
    s = s.strip("()").rstrip("%").translate(_CURRENCY)
    if s.count(".") > 1 or not s or s in ("-", "+", "."):
        return None
    try:
        value = float(s)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return -value if negative else value


def _meta(text: str) -> tuple[dict[str, str], str]:
    """Pull title / axis lines out of the answer; return them and the remaining text."""
    meta: dict[str, str] = {}
    rest: list[str] = []
    for line in text.splitlines():
        m = _META.match(line)
        if m and m.group(2):
            word = m.group(1).lower().replace("_", " ").replace("-", " ")
            field = "title" if "title" in word else ("x_axis" if word.startswith("x") else "y_axis")
            meta.setdefault(field, m.group(2).strip(" |*_"))
        else:
            rest.append(line)
    return meta, "\n".join(rest)


def _from_table(table: Table, notes: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    rows = list(table.rows)
    header = list(table.header) if table.header is not None else None
    width = table.n_columns
    if width < 2:
        return [], []
    names = [h or f"series {i}" for i, h in enumerate((header or [""] * width)[1:], start=1)]
    categories = [r[0] for r in rows]
    series = []
    unreadable = 0
    for col, name in enumerate(names, start=1):
        values = [parse_number(r[col]) for r in rows]
        unreadable += sum(1 for r, v in zip(rows, values, strict=True) if v is None and r[col].strip())
        series.append({"name": name, "values": values})
    if unreadable:
        notes.append(f"{unreadable} value(s) are not numbers and became null")
    return categories, series


def _from_pairs(text: str) -> tuple[list[str], list[dict[str, Any]]]:
    categories, values = [], []
    for line in text.splitlines():
        m = _PAIR.match(line)
        if m:
            categories.append(m.group(1).strip("*_ "))
            values.append(parse_number(m.group(2)))
    return categories, ([{"name": "series 1", "values": values}] if categories else [])


def parse_chart(text: str) -> Parsed:
    """Answer → {"title", "x_axis", "y_axis", "categories", "series": [{"name", "values"}], "notes"}."""
    normalised = text.replace("<0x0A>", "\n")
    meta, rest = _meta(normalised)
    notes: list[str] = []
    tables = [t for t in find_tables(rest) if t.status == "ok" and t.n_columns >= 2]
    if len(tables) > 1:
        notes.append(f"the answer has {len(tables)} tables; the first one was read")
    if tables:
        categories, series = _from_table(tables[0], notes)
    else:
        categories, series = _from_pairs(rest)
        if categories:
            notes.append("no table in the answer; read 'category: value' lines")
    result = {
        "title": meta.get("title"),
        "x_axis": meta.get("x_axis"),
        "y_axis": meta.get("y_axis"),
        "categories": categories,
        "series": series,
        "notes": notes,
    }
    if not any(v is not None for s in series for v in s["values"]):
        return Parsed(result, ok=False, error="no numeric data table in the answer")
    return Parsed(result)


_NULLABLE_TEXT = {"type": ["string", "null"]}


@dataclass(frozen=True, slots=True)
class ChartTask(Task):
    """Chart image or page → the underlying data table with title and axes."""

    prompt: str = DEFAULT_PROMPT

    name: ClassVar[str] = "chart"
    summary: ClassVar[str] = (
        "Chart → its data (categories, series, values) with title and axes. CSV is tidy "
        f"(series, category, value); -o DIR/ gets one wide CSV per chart.\n\nDefault prompt: *{DEFAULT_PROMPT}*"
    )
    examples: ClassVar[tuple[str, ...]] = (
        "dsvl2 chart samples/bar-chart.png",
        "find . -name '*.png' | dsvl2 chart - --format jsonl | jq .result.series",
    )
    options: ClassVar[tuple[TaskOption, ...]] = (PROMPT_OPTION,)
    max_new_tokens: ClassVar[int] = 1024
    default_format: ClassVar[str] = "csv"
    repetition_guard: ClassVar[tuple[int, int]] = (32, 512)
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "title": _NULLABLE_TEXT,
            "x_axis": _NULLABLE_TEXT,
            "y_axis": _NULLABLE_TEXT,
            "categories": {"type": "array", "items": {"type": "string"}},
            "series": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "values": {"type": "array", "items": {"type": ["number", "null"]}},
                    },
                    "required": ["name", "values"],
                },
            },
            "notes": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["title", "x_axis", "y_axis", "categories", "series", "notes"],
    }
    csv_columns: ClassVar[tuple[str, ...]] = ("title", "series", "category", "value", "error")

    @classmethod
    def from_options(cls, *, prompt: str | None = None) -> ChartTask:
        return cls(one_prompt(prompt, DEFAULT_PROMPT))

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,)

    def parse(self, text: str, *, page: Page, prompt: str) -> Parsed:
        return parse_chart(text)

    @classmethod
    def markdown(cls, record: PageRecord) -> str:
        r = record.result or {}
        lines = [f"**{cell(r['title'])}**"] if r.get("title") else []
        axes = [f"{k} axis: {r[f'{k}_axis']}" for k in ("x", "y") if r.get(f"{k}_axis")]
        if axes:
            lines.append(" · ".join(axes))
        header = [r.get("x_axis") or "category", *[s["name"] for s in r.get("series", [])]]
        rows = [[c, *[s["values"][i] for s in r["series"]]] for i, c in enumerate(r.get("categories", []))]
        lines.append(markdown_table(header, rows))
        return "\n\n".join(lines)

    @classmethod
    def csv_rows(cls, record: PageRecord) -> list[list[Any]]:
        """One row per value: series, category, value."""
        r, err = record.result or {}, record.error or ""
        title = r.get("title") or ""
        rows = [
            [title, s["name"], category, value, err]
            for s in r.get("series", [])
            for category, value in zip(r.get("categories", []), s["values"], strict=False)
        ]
        return rows or [[title, "", "", "", err]]

    @classmethod
    def frames(cls, record: PageRecord) -> list[tuple[str, pd.DataFrame, bool]]:
        """The chart as one wide table: a category column, then one column per series."""
        import pandas as pd  # imported here: only DataFrame output needs it

        r = record.result or {}
        if not r.get("series"):
            return []
        data = {r.get("x_axis") or "category": r["categories"]}
        for i, s in enumerate(r["series"]):
            data[s["name"] if s["name"] not in data else f"{s['name']} ({i + 1})"] = s["values"]
        return [(f"p{record.page}", pd.DataFrame(data), True)]

    @classmethod
    def columns(cls, result: Mapping[str, Any]) -> dict[str, Any]:
        keys = ("title", "x_axis", "y_axis", "categories", "series", "notes")
        return {k: result.get(k) for k in keys}
