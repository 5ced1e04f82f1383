"""The `chart` task: its default prompt, the parse of an answer into the chart's data, the result schema and
its renderers.

An answer holds optional "Title:", "X axis:", "Y axis:" lines and the data: a table (Markdown, HTML, LaTeX, or
DePlot's linearised form with `<0x0A>` line breaks), matplotlib code with literal lists (pipelines/chart_code.py),
or "category: value" lines. The first table column holds the categories, each further column one series.
Values keep what the model wrote about them (pipelines/chart_values.py): `$1.2M` is 1200000 with unit "$",
`~30` is 30 "approximately", `2020: 12 (estimated)` is 12 "estimated"; unreadable values are null. Answer
lines that are not used are kept in `notes`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from dsvl2.pipelines.base import Page, PageRecord, Parsed
from dsvl2.pipelines.chart_code import read_code_chart
from dsvl2.pipelines.chart_values import Quantity, parse_number, parse_quantity
from dsvl2.pipelines.table import Table, locate_tables, unused_lines
from dsvl2.pipelines.task import PROMPT_OPTION, Task, TaskOption, cell, markdown_table, one_prompt

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ChartTask", "parse_chart", "parse_number", "parse_quantity"]

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
_PAIR = re.compile(r"^\s*(?:[-*•]|\d+[.)])?\s*([^:=]{1,80}?)\s*[:=]\s*(.+?)\s*$")


def _meta(lines: list[str]) -> tuple[dict[str, str], set[int]]:
    """Title / axis lines: their values and the line numbers they were on."""
    meta: dict[str, str] = {}
    used: set[int] = set()
    for i, line in enumerate(lines):
        m = _META.match(line)
        if m and m.group(2):
            word = m.group(1).lower().replace("_", " ").replace("-", " ")
            field = "title" if "title" in word else ("x_axis" if word.startswith("x") else "y_axis")
            meta.setdefault(field, m.group(2).strip(" |*_"))
            used.add(i)
    return meta, used


def _series(name: str, quantities: list[Quantity]) -> dict[str, Any]:
    return {
        "name": name,
        "values": [q.value for q in quantities],
        "units": [q.unit for q in quantities],
        "qualifiers": [q.qualifier for q in quantities],
        "texts": [q.text for q in quantities],
    }


def _from_table(table: Table, notes: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    rows = list(table.rows)
    header = list(table.header) if table.header is not None else None
    width = table.n_columns
    if width < 2:
        return [], []
    names = [h or f"series {i}" for i, h in enumerate((header or [""] * width)[1:], start=1)]
    series = []
    unreadable = 0
    for col, name in enumerate(names, start=1):
        quantities = [parse_quantity(r[col]) for r in rows]
        unreadable += sum(1 for q in quantities if q.value is None and q.text)
        series.append(_series(name, quantities))
    if unreadable:
        notes.append(f"{unreadable} value(s) are not numbers and became null")
    return [r[0] for r in rows], series


def _from_pairs(lines: list[str], skip: set[int]) -> tuple[list[str], list[Quantity], set[int]]:
    categories, values, used = [], [], set()
    for i, line in enumerate(lines):
        m = _PAIR.match(line) if i not in skip else None
        if m and (q := parse_quantity(m.group(2).strip("*_ "))).value is not None:
            categories.append(m.group(1).strip("*_ "))
            values.append(q)
            used.add(i)
    return categories, values, used


def parse_chart(text: str) -> Parsed:
    """Answer → {"title", "x_axis", "y_axis", "categories", "series": [{"name", "values", "units", "qualifiers",
    "texts"}], "notes"}; ok when at least one value is a number."""
    normalised = text.replace("<0x0A>", "\n")
    lines = normalised.splitlines()
    meta, used = _meta(lines)
    notes: list[str] = []
    categories: list[str] = []
    series: list[dict[str, Any]] = []
    code = read_code_chart(normalised)
    rest = "\n".join("" if i in used else line for i, line in enumerate(lines))
    tables = [(t, r) for t, r in locate_tables(rest) if t.status == "ok" and t.n_columns >= 2] if not code else []
    if code is not None:
        for key, value in code.meta.items():
            meta.setdefault(key, value)
        categories = code.categories
        series = [_series(name, [Quantity(v, None, None, "" if v is None else repr(v)) for v in values])
                  for name, values in code.series]
        used |= code.code_lines
        notes += ["read the data from the literal lists of the answer's plotting code", *code.notes]
    elif tables:
        if len(tables) > 1:
            notes.append(f"the answer has {len(tables)} tables; the first one was read")
        categories, series = _from_table(tables[0][0], notes)
        used |= set(tables[0][1])
    else:
        categories, values, pairs = _from_pairs(lines, used)
        if categories:
            series = [_series("series 1", values)]
            used |= pairs
            notes.append("no table in the answer; read 'category: value' lines")
    notes += unused_lines(normalised, used)
    result = {
        "title": meta.get("title"),
        "x_axis": meta.get("x_axis"),
        "y_axis": meta.get("y_axis"),
        "categories": categories,
        "series": series,
        "notes": notes,
    }
    if not any(v is not None for s in series for v in s["values"]):
        return Parsed(result, ok=False, error="no numeric data (table, plotting code or 'category: value' lines) "
                      "in the answer")
    return Parsed(result)


_NULLABLE_TEXT = {"type": ["string", "null"]}
_STR = {"type": "string"}


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
                        "units": {
                            "type": "array",
                            "items": _NULLABLE_TEXT,
                            "description": "per value: currency, % or unit as written ($, %, kg, USD), or null",
                        },
                        "qualifiers": {
                            "type": "array",
                            "items": _NULLABLE_TEXT,
                            "description": "per value: approximately, nearly, estimated, projected, preliminary, "
                            "more than, less than, at least, at most, or null",
                        },
                        "texts": {"type": "array", "items": _STR, "description": "per value: the text as written"},
                    },
                    "required": ["name", "values"],
                },
            },
            "notes": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["title", "x_axis", "y_axis", "categories", "series", "notes"],
    }
    csv_columns: ClassVar[tuple[str, ...]] = ("title", "series", "category", "value", "unit", "qualifier", "error")

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
        series = r.get("series", [])
        header = [r.get("x_axis") or "category", *[s["name"] for s in series]]
        rows = [[c, *[_shown(s, i) for s in series]] for i, c in enumerate(r.get("categories", []))]
        lines.append(markdown_table(header, rows))
        return "\n\n".join(lines)

    @classmethod
    def csv_rows(cls, record: PageRecord) -> list[list[Any]]:
        """One row per value: series, category, value, unit, qualifier."""
        r, err = record.result or {}, record.error or ""
        title = r.get("title") or ""
        rows = [
            [title, s["name"], category, value, _at(s, "units", i) or "", _at(s, "qualifiers", i) or "", err]
            for s in r.get("series", [])
            for i, (category, value) in enumerate(zip(r.get("categories", []), s["values"], strict=False))
        ]
        return rows or [[title, "", "", "", "", "", err]]

    @classmethod
    def frames(cls, record: PageRecord) -> list[tuple[str, pd.DataFrame, bool]]:
        """The chart as one wide table: a category column, then one column per series (its unit in brackets
        when all its values share one), and a "<series> qualifier" column where any value has a qualifier."""
        import pandas as pd  # imported here: only DataFrame output needs it

        r = record.result or {}
        if not r.get("series"):
            return []
        data = {r.get("x_axis") or "category": r["categories"]}
        for i, s in enumerate(r["series"]):
            units = {u for u in s.get("units") or [] if u}
            name = f"{s['name']} [{units.pop()}]" if len(units) == 1 else s["name"]
            name = name if name not in data else f"{name} ({i + 1})"
            data[name] = s["values"]
            if any(s.get("qualifiers") or []):
                data[f"{name} qualifier"] = [q or "" for q in s["qualifiers"]]
        return [(f"p{record.page}", pd.DataFrame(data), True)]

    @classmethod
    def columns(cls, result: Mapping[str, Any]) -> dict[str, Any]:
        keys = ("title", "x_axis", "y_axis", "categories", "series", "notes")
        return {k: result.get(k) for k in keys}


def _at(series: Mapping[str, Any], key: str, i: int) -> Any:
    """The i-th entry of a per-value list of a series; None where an older record lacks the list."""
    values = series.get(key) or []
    return values[i] if i < len(values) else None


def _shown(series: Mapping[str, Any], i: int) -> str:
    """A value as Markdown shows it: the number, its unit and qualifier, e.g. "1200000 $ (approximately)"."""
    value = series["values"][i] if i < len(series["values"]) else None
    if value is None:
        return ""
    number = str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else str(value)
    unit, qualifier = _at(series, "units", i), _at(series, "qualifiers", i)
    shown = f"{number}%" if unit == "%" else f"{number} {unit}" if unit else number
    return f"{shown} ({qualifier})" if qualifier else shown
