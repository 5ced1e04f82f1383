"""Readers that find tables in a model's answer and turn each into rows and columns: Markdown (GFM pipe tables),
HTML `<table>` and LaTeX `tabular` (pipelines/table_latex.py). The table task and the chart task both use them.

Rules, so that output is predictable: ragged rows are padded with "" to the widest row; a merged cell (HTML
colspan/rowspan, LaTeX \\multicolumn/\\multirow) has its text repeated in every grid cell it covers; several
header rows are joined per column with " / "; a table that cannot be read keeps its raw text with status
"parse_error". `locate_tables` also says which answer lines each table used, so callers can keep the rest.
Readers never raise on any input string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Literal

from dsvl2.pipelines.table_latex import latex_spans, read_tabular

MAX_CELLS = 200_000  # a runaway colspan/rowspan or answer must not eat memory
MAX_SPAN = 1000  # HTML caps colspan at 1000

_SEPARATOR_CELL = re.compile(r"^:?-{1,}:?$")
_NUMBER = re.compile(r"^[-+−(~≈]?[$€£¥]?\s*\d[\d,. ]*%?\)?$")
_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")
_TABLE_TAG = re.compile(r"<(/?)table\b[^>]*>", re.IGNORECASE)
# DeepSeek-VL2's special tokens (`<|ref|>`, `<|det|>`, `<|grounding|>`) hold pipes that are not table columns
_SPECIAL_TOKEN = re.compile(r"<\|/?[A-Za-z_]{1,32}\|>")


@dataclass(frozen=True, slots=True)
class Table:
    """One table found in an answer. `rows` excludes the header; every row has `n_columns` cells."""

    index: int
    format: Literal["markdown", "html", "latex"]
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


def looks_like_header(first: tuple[str, ...], rest: list[tuple[str, ...]]) -> bool:
    """Without a Markdown separator or <th>: the first row is a header when it is all words and the body
    holds numbers (the common shape of a data table)."""
    if not rest or not first or any(not c or is_number(c) for c in first):
        return False
    return any(is_number(c) for row in rest for c in row)


def join_header(parts: list[str]) -> str:
    out: list[str] = []
    for p in parts:
        if p and p not in out:
            out.append(p)
    return " / ".join(out)


def rectangular(
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


# --- Markdown ----------------------------------------------------------------------------------------------


def _split_row(line: str) -> tuple[str, ...]:
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return tuple(c.strip().replace("\\|", "|") for c in _UNESCAPED_PIPE.split(s))


def _is_separator(cells: tuple[str, ...]) -> bool:
    return bool(cells) and all(_SEPARATOR_CELL.match(c) for c in cells if c) and any(cells)


def _leading_prose(lines: list[str]) -> int:
    """How many lines of a `|` block come before its header: GFM's header is the one line above the
    delimiter row, so a caption such as "Table 3 | Results" written just above a table is not a row."""
    rows = [_split_row(line) for line in lines]
    for i in range(1, len(rows)):
        if _is_separator(rows[i]) and not _is_separator(rows[i - 1]):
            return i - 1
    return 0


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
    if header is None and body and looks_like_header(body[0], body[1:]):
        header, body = body[0], body[1:]
        notes.append("header row detected without a separator")
    if header is None and not body:
        return Table(index, "markdown", None, (), "parse_error", block, ("no cells in the table",))
    header, grid = rectangular(header, body, notes)
    return Table(index, "markdown", header, grid, "ok", block, tuple(notes))


def _markdown_blocks(text: str) -> list[tuple[int, int, str]]:
    """(first line, end line, block) for each run of consecutive lines holding an unescaped `|`."""
    blocks: list[tuple[int, int, str]] = []
    current: list[str] = []
    start = 0
    for i, line in enumerate([*text.splitlines(), ""]):
        if _UNESCAPED_PIPE.search(line):
            if not current:
                start = i
            current.append(line)
            continue
        skip = _leading_prose(current) if len(current) >= 3 else 0
        current = current[skip:]
        if len(current) >= 2 or (current and current[0].strip().startswith("|")):
            blocks.append((start + skip, i, "\n".join(current)))
        current = []
    return blocks


# --- HTML --------------------------------------------------------------------------------------------------


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

    def close_cell(self) -> None:
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
            self.close_cell()
            self.rows.append(_Row(in_thead=self.in_thead))
        elif tag in ("td", "th"):
            self.close_cell()
            self.cell = _Cell(colspan=self._span(attrs, "colspan"), rowspan=self._span(attrs, "rowspan"))
            self.cell.is_header = tag == "th"
        elif tag == "br" and self.cell is not None:
            self.cell.text.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            if self.depth == 1:
                self.close_cell()
            self.depth = max(self.depth - 1, 0)
        elif self.depth == 1:
            if tag in ("td", "th", "tr"):
                self.close_cell()
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


def _html_header_rows(rows: list[_Row], grid: list[list[str]], notes: list[str]) -> int:
    """How many leading rows are the header: <thead> or all-<th> rows; failing those (answers often have
    neither), a first row of words over a body with numbers, extended over the rows its rowspans cover."""
    n_head = 0
    for row in rows:
        if row.in_thead or all(c.is_header for c in row.cells):
            n_head += 1
        else:
            break
    if n_head == len(rows) and not any(r.in_thead for r in rows):
        return min(n_head, 1)  # an all-<th> table: first row is the header, the rest is data
    if n_head:
        return n_head
    span = max(c.rowspan for c in rows[0].cells)
    for n in range(min(span, len(grid) - 1), 0, -1):
        head = [tuple(r) for r in grid[:n]]
        if all(looks_like_header(h, [tuple(r) for r in grid[n:]]) for h in head):
            notes.append("header row(s) detected without <th>")
            return n
    return 0


def parse_html_table(fragment: str, index: int = 0) -> Table:
    """One `<table>…</table>` fragment → a Table (status parse_error when no cell could be read)."""
    reader = _TableReader()
    notes: list[str] = []
    try:
        reader.feed(fragment)
        reader.close()
    except Exception as exc:  # HTMLParser is lenient, but a parser must never raise
        return Table(index, "html", None, (), "parse_error", fragment, (f"unreadable HTML: {exc}",))
    reader.close_cell()
    rows = [r for r in reader.rows if r.cells]
    if not rows:
        return Table(index, "html", None, (), "parse_error", fragment, ("no cells in the table",))
    if reader.nested:
        notes.append("nested table(s) folded into their enclosing cell as text")
    grid = _layout(rows, notes)
    if grid is None:
        return Table(index, "html", None, (), "parse_error", fragment, (f"more than {MAX_CELLS} cells",))
    n_head = _html_header_rows(rows, grid, notes)
    header: tuple[str, ...] | None = None
    if n_head:
        header = tuple(join_header([grid[r][c] for r in range(n_head)]) for c in range(len(grid[0])))
        if n_head > 1:
            notes.append(f"joined {n_head} header rows with ' / '")
    header, rect = rectangular(header, [tuple(r) for r in grid[n_head:]], notes)
    return Table(index, "html", header, rect, "ok", fragment, tuple(notes))


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


# --- all formats -------------------------------------------------------------------------------------------


def parse_latex_table(fragment: str, index: int = 0) -> Table:
    """One `\\begin{tabular}…\\end{tabular}` fragment → a Table (status parse_error when it has no cells)."""
    header, body, notes = read_tabular(fragment)
    if not body and header is None:
        return Table(index, "latex", None, (), "parse_error", fragment, tuple(notes) or ("no cells in the table",))
    if header is None and body and looks_like_header(body[0], body[1:]):
        header, body = body[0], body[1:]
        notes.append("header row detected without a rule below it")
    header, rect = rectangular(header, body, notes)
    return Table(index, "latex", header, rect, "ok", fragment, tuple(notes))


def locate_tables(text: str) -> list[tuple[Table, range]]:
    """Every HTML, LaTeX and Markdown table in `text` in order of appearance, each with the range of answer
    lines (0-based, as `str.splitlines` counts them) that it was read from."""
    found: list[tuple[int, int, str, str]] = []
    blanked = _SPECIAL_TOKEN.sub(lambda m: " " * len(m.group()), text)
    for kind, spans in (("html", _html_spans(text)), ("latex", latex_spans(text))):
        for a, b in spans:
            if blanked[a:b].strip() != text[a:b].strip():
                continue  # inside a table of the other kind, already read as that
            first = text.count("\n", 0, a)
            found.append((first, first + text.count("\n", a, b) + 1, kind, text[a:b]))
            blanked = blanked[:a] + re.sub(r"[^\n]", " ", blanked[a:b]) + blanked[b:]  # keep line numbers
    found.extend((a, b, "markdown", block) for a, b, block in _markdown_blocks(blanked))
    found.sort(key=lambda t: t[0])
    readers = {"html": parse_html_table, "latex": parse_latex_table, "markdown": parse_markdown_table}
    return [(readers[kind](chunk, i), range(a, b)) for i, (a, b, kind, chunk) in enumerate(found)]


def find_tables(text: str) -> list[Table]:
    """Every Markdown, HTML and LaTeX table in `text`, in order of appearance."""
    return [table for table, _ in locate_tables(text)]
