"""The `table` task: its default prompt, and parsers that turn Markdown or HTML tables in an answer into
rows and columns.

Rules, so that output is predictable: ragged rows are padded with "" to the widest row; a merged cell
(HTML colspan/rowspan) has its text repeated in every grid cell it covers; several header rows are joined
per column with " / "; a table that cannot be read keeps its raw text with status "parse_error".
Parsers never raise on any input string.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from dsvl2.pipelines.base import Page, PageRecord, Parsed
from dsvl2.pipelines.task import PROMPT_OPTION, Task, TaskOption, markdown_table, one_prompt

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_PROMPT = (
    "Extract every table on this page. Write each table as a Markdown table with a header row, "
    "in reading order, separated by a blank line. Output only the tables; if there is no table, answer NONE."
)
MAX_CELLS = 200_000  # a runaway colspan/rowspan or answer must not eat memory
MAX_SPAN = 1000  # HTML caps colspan at 1000

_SEPARATOR_CELL = re.compile(r"^:?-{1,}:?$")
_NUMBER = re.compile(r"^[-+−(]?[$€£¥]?\s*\d[\d,. ]*%?\)?$")
_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
_TABLE_TAG = re.compile(r"<(/?)table\b[^>]*>", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Table:
    """One table found in an answer. `rows` excludes the header; every row has `n_columns` cells."""

    index: int
    format: Literal["markdown", "html"]
    header: tuple[str, ...] | None
    rows: tuple[tuple[str, ...], ...]
    status: Literal["ok", "parse_error"] = "ok"
    raw: str = ""
    notes: tuple[str, ...] = ()

    @property
    def n_columns(self) -> int:
        return len(self.header) if self.header is not None else (len(self.rows[0]) if self.rows else 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "format": self.format,
            "header": list(self.header) if self.header is not None else None,
            "rows": [list(r) for r in self.rows],
            "n_columns": self.n_columns,
            "status": self.status,
            "raw": self.raw,
            "notes": list(self.notes),
        }


def is_number(cell: str) -> bool:
    return bool(_NUMBER.match(cell.strip())) and any(ch.isdigit() for ch in cell)


def _looks_like_header(first: tuple[str, ...], rest: list[tuple[str, ...]]) -> bool:
    """Without a Markdown separator or <th>: the first row is a header when it is all words and the body
    holds numbers (the common shape of a data table)."""
    if not rest or not first or any(not c or is_number(c) for c in first):
        return False
    return any(is_number(c) for row in rest for c in row)


def _rectangular(
    header: tuple[str, ...] | None, rows: list[tuple[str, ...]], notes: list[str]
) -> tuple[tuple[str, ...] | None, tuple[tuple[str, ...], ...]]:
    width = max([len(r) for r in rows] + [len(header) if header else 0])
    short = sum(1 for r in rows if len(r) < width)
    if short:
        notes.append(f"padded {short} ragged row(s) to {width} columns")
    if header is not None and len(header) < width:
        notes.append(f"padded the header to {width} columns")
        header = header + ("",) * (width - len(header))
    return header, tuple(r + ("",) * (width - len(r)) for r in rows)


def _split_row(line: str) -> tuple[str, ...]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return tuple(c.strip().replace("\\|", "|") for c in _UNESCAPED_PIPE.split(s))


def _is_separator(cells: tuple[str, ...]) -> bool:
    return bool(cells) and all(_SEPARATOR_CELL.match(c) for c in cells if c) and any(cells)


def parse_markdown_table(block: str, index: int = 0) -> Table:
    """One block of consecutive `|` lines → a Table (status parse_error when it has no cells)."""
    rows = [_split_row(line) for line in block.splitlines() if line.strip()]
    notes: list[str] = []
    header: tuple[str, ...] | None = None
    if len(rows) >= 2 and _is_separator(rows[1]) and not _is_separator(rows[0]):
        header, body = rows[0], rows[2:]
    else:
        body = rows
    dropped = [r for r in body if _is_separator(r)]
    if dropped:
        notes.append(f"ignored {len(dropped)} separator row(s) inside the table")
        body = [r for r in body if not _is_separator(r)]
    if header is None and body and _looks_like_header(body[0], body[1:]):
        header, body = body[0], body[1:]
        notes.append("header row detected without a separator")
    if header is None and not body:
        return Table(index, "markdown", None, (), "parse_error", block, ("no cells in the table",))
    header, grid = _rectangular(header, body, notes)
    return Table(index, "markdown", header, grid, "ok", block, tuple(notes))


@dataclass(slots=True)
class _Cell:
    text: list[str] = field(default_factory=list)
    colspan: int = 1
    rowspan: int = 1
    is_header: bool = False


@dataclass(slots=True)
class _Row:
    cells: list[_Cell] = field(default_factory=list)
    in_thead: bool = False


class _TableReader(HTMLParser):
    """Collects the rows of the outermost table; text of nested tables is folded into the enclosing cell."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[_Row] = []
        self.depth = 0
        self.in_thead = False
        self.cell: _Cell | None = None
        self.nested = False

    def _span(self, attrs: list[tuple[str, str | None]], name: str) -> int:
        for k, v in attrs:
            if k == name and v is not None and v.strip().isdigit():
                return min(max(int(v.strip()), 1), MAX_SPAN)
        return 1

    def _close_cell(self) -> None:
        if self.cell is not None:
            if not self.rows:
                self.rows.append(_Row(in_thead=self.in_thead))
            self.rows[-1].cells.append(self.cell)
            self.cell = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.depth += 1
            self.nested = self.nested or self.depth > 1
        if self.depth != 1 or tag == "table":
            if self.cell is not None and tag in ("br", "table", "tr", "td", "th"):
                self.cell.text.append(" ")
            return
        if tag == "thead":
            self.in_thead = True
        elif tag in ("tbody", "tfoot"):
            self.in_thead = False
        elif tag == "tr":
            self._close_cell()
            self.rows.append(_Row(in_thead=self.in_thead))
        elif tag in ("td", "th"):
            self._close_cell()
            self.cell = _Cell(colspan=self._span(attrs, "colspan"), rowspan=self._span(attrs, "rowspan"))
            self.cell.is_header = tag == "th"
        elif tag == "br" and self.cell is not None:
            self.cell.text.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            if self.depth == 1:
                self._close_cell()
            self.depth = max(self.depth - 1, 0)
        elif self.depth == 1:
            if tag in ("td", "th", "tr"):
                self._close_cell()
            elif tag == "thead":
                self.in_thead = False
        elif self.depth > 1 and tag in ("td", "th") and self.cell is not None:
            self.cell.text.append(" ")

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.text.append(data)


def _layout(rows: list[_Row], notes: list[str]) -> list[list[str]] | None:
    """Place cells on a grid, honouring spans; None when the grid would exceed MAX_CELLS."""
    grid: list[dict[int, str]] = [{} for _ in rows]
    merged = 0
    for r, row in enumerate(rows):
        c = 0
        for cell in row.cells:
            while c in grid[r]:
                c += 1
            text = " ".join("".join(cell.text).split())
            if cell.colspan > 1 or cell.rowspan > 1:
                merged += 1
            for dr in range(cell.rowspan):
                if r + dr >= len(rows):
                    break
                for dc in range(cell.colspan):
                    grid[r + dr][c + dc] = text
            c += cell.colspan
        if sum(len(g) for g in grid) > MAX_CELLS:
            return None
    if merged:
        notes.append(f"flattened {merged} merged cell(s): their text is repeated in every cell they cover")
    width = max((max(g) + 1 for g in grid if g), default=0)
    return [[g.get(i, "") for i in range(width)] for g in grid]


def parse_html_table(fragment: str, index: int = 0) -> Table:
    """One `<table>…</table>` fragment → a Table (status parse_error when no cell could be read)."""
    reader = _TableReader()
    notes: list[str] = []
    try:
        reader.feed(fragment)
        reader.close()
    except Exception as exc:  # HTMLParser is lenient, but a parser must never raise
        return Table(index, "html", None, (), "parse_error", fragment, (f"unreadable HTML: {exc}",))
    reader._close_cell()
    rows = [r for r in reader.rows if r.cells]
    if not rows:
        return Table(index, "html", None, (), "parse_error", fragment, ("no cells in the table",))
    if reader.nested:
        notes.append("nested table(s) folded into their enclosing cell as text")
    grid = _layout(rows, notes)
    if grid is None:
        return Table(index, "html", None, (), "parse_error", fragment, (f"more than {MAX_CELLS} cells",))
    n_head = 0
    for row in rows:
        if row.in_thead or all(c.is_header for c in row.cells):
            n_head += 1
        else:
            break
    if n_head == len(rows) and not any(r.in_thead for r in rows):
        n_head = min(n_head, 1)  # an all-<th> table: first row is the header, the rest is data
    header: tuple[str, ...] | None = None
    if n_head:
        header = tuple(_join_header([grid[r][c] for r in range(n_head)]) for c in range(len(grid[0])))
        if n_head > 1:
            notes.append(f"joined {n_head} header rows with ' / '")
    body = [tuple(r) for r in grid[n_head:]]
    if header is None and body and _looks_like_header(body[0], body[1:]):
        header, body = body[0], body[1:]
        notes.append("header row detected without <th>")
    header, rect = _rectangular(header, body, notes)
    return Table(index, "html", header, rect, "ok", fragment, tuple(notes))


def _join_header(parts: list[str]) -> str:
    out: list[str] = []
    for p in parts:
        if p and p not in out:
            out.append(p)
    return " / ".join(out)


def _html_spans(text: str) -> list[tuple[int, int]]:
    """Spans of outermost <table> elements; an unclosed one runs to the end of the text."""
    spans: list[tuple[int, int]] = []
    depth, start = 0, 0
    for m in _TABLE_TAG.finditer(text):
        if m.group(1) == "":
            if depth == 0:
                start = m.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                spans.append((start, m.end()))
    if depth > 0:
        spans.append((start, len(text)))
    return spans


def _markdown_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, block) for each run of consecutive lines holding an unescaped `|`."""
    blocks: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for i, line in enumerate([*text.splitlines(), ""]):
        if _UNESCAPED_PIPE.search(line):
            if not current:
                start = i
            current.append(line)
            continue
        if len(current) >= 2 or (current and current[0].strip().startswith("|")):
            blocks.append((start, "\n".join(current)))
        current = []
    return blocks


def find_tables(text: str) -> list[Table]:
    """Every Markdown and HTML table in `text`, in order of appearance."""
    found: list[tuple[int, str, str]] = []
    rest: list[str] = []
    pos = 0
    for a, b in _html_spans(text):
        found.append((text.count("\n", 0, a), "html", text[a:b]))
        rest.append(text[pos:a])
        rest.append("\n" * text.count("\n", a, b))  # blank out the HTML but keep line numbers
        pos = b
    rest.append(text[pos:])
    found.extend((line, "markdown", block) for line, block in _markdown_blocks("".join(rest)))
    found.sort(key=lambda t: t[0])
    return [
        parse_html_table(chunk, i) if kind == "html" else parse_markdown_table(chunk, i)
        for i, (_, kind, chunk) in enumerate(found)
    ]


def parse_tables(text: str) -> Parsed:
    """The table task's parse: every table, ok only when each one parsed; NONE or nothing means no tables."""
    tables = find_tables(text)
    result = {"tables": [t.to_dict() for t in tables]}
    if not tables:
        if text.strip().strip(".").upper() in ("", "NONE"):
            return Parsed(result)
        return Parsed(result, ok=False, error="no Markdown or HTML table in the answer")
    bad = [t.index for t in tables if t.status != "ok"]
    if bad:
        return Parsed(result, ok=False, error=f"could not read table(s) {', '.join(str(i + 1) for i in bad)}")
    return Parsed(result)


_NOTES = {"type": "array", "items": {"type": "string"}}
TABLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "format": {"enum": ["markdown", "html"]},
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
        "properties": {"tables": {"type": "array", "items": TABLE_SCHEMA}},
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
