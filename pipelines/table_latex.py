"""LaTeX `tabular` in a model's answer → header and rows of plain text (pipelines/table_readers.py makes the Table).

Read sensibly, not typeset: rows split on `\\\\` and cells on `&` outside braces; rules (`\\hline`, booktabs,
`\\cline`) only mark where the header ends (rows above the first full rule, joined with " / "); `\\multicolumn`
text fills every column it spans and `\\multirow` text every row it spans; other commands keep their argument
text (`\\textbf{x}` → x), escapes are undone (`\\&` → &) and `$` math delimiters dropped. Never raises.
"""

from __future__ import annotations

import re

_BEGIN = re.compile(r"\\begin\s*\{(tabular[x*]?|array|longtable)\}", re.IGNORECASE)
_END = re.compile(r"\\end\s*\{(tabular[x*]?|array|longtable)\}", re.IGNORECASE)
_FULL_RULE = re.compile(r"\\(hline|toprule|midrule|bottomrule|specialrule)\b")
_RULE = re.compile(r"\\(hline|toprule|midrule|bottomrule|hhline|specialrule|cline|cmidrule)\b\s*(\([^)]*\))?")
_ROW_SKIP = re.compile(r"^\s*(\[[^\]]*\])")  # `\\[2pt]` extra row space
_COMMAND = re.compile(r"\\[A-Za-z]+\*?\s*(\[[^\]]*\])?")
_ESCAPES = {"&": "&", "%": "%", "$": "$", "_": "_", "#": "#", "{": "{", "}": "}"}
_MAX_SPAN = 1000


def latex_spans(text: str) -> list[tuple[int, int]]:
    """Spans of `\\begin{tabular}…\\end{tabular}`; an unclosed one runs to the end of the text."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while (m := _BEGIN.search(text, pos)) is not None:
        end = _END.search(text, m.end())
        stop = end.end() if end else len(text)
        spans.append((m.start(), stop))
        pos = stop
    return spans


def _group(s: str, i: int) -> tuple[str, int]:
    """The text of the brace group opening at s[i] (after blanks) and the index after it; ("", i) if none.
    An unclosed group runs to the end."""
    while i < len(s) and s[i] in " \t\n":
        i += 1
    if i >= len(s) or s[i] != "{":
        return "", i
    depth = 0
    for j in range(i, len(s)):
        if s[j] == "{" and (j == 0 or s[j - 1] != "\\"):
            depth += 1
        elif s[j] == "}" and s[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return s[i + 1 : j], j + 1
    return s[i + 1 :], len(s)


def _split(s: str, sep: str) -> list[str]:
    """Split on `sep` (`\\\\` or `&`) outside braces and not escaped."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and s.startswith("\\\\", i) and sep == "\\\\" and depth == 0:
            parts.append(s[start:i])
            i += 2
            start = i
            continue
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(depth - 1, 0)
        elif ch == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
        i += 1
    parts.append(s[start:])
    return parts


def plain(s: str) -> str:
    """LaTeX cell source → its text: escapes undone, commands dropped but their arguments kept."""
    out: list[str] = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s) and s[i + 1] in _ESCAPES:
            out.append(_ESCAPES[s[i + 1]])
            i += 2
        elif ch == "\\" and (m := _COMMAND.match(s, i)) is not None:
            out.append(" ")
            i = m.end()
        elif ch == "\\":
            out.append(" ")
            i += 2
        elif ch in "{}$":
            i += 1
        elif ch == "~":
            out.append(" ")
            i += 1
        else:
            out.append(ch)
            i += 1
    return " ".join("".join(out).split())


def _span_cell(cell: str) -> tuple[int, int, str]:
    """(columns, rows, source) of a cell: `\\multicolumn{n}{spec}{text}`, `\\multirow{n}{width}{text}`, or 1, 1."""
    s = cell.strip()
    for name in ("multicolumn", "multirow"):
        if s.startswith("\\" + name):
            count, i = _group(s, len(name) + 1)
            if name == "multirow" and (m := re.match(r"\s*\[[^\]]*\]", s[i:])):
                i += m.end()
            _, i = _group(s, i)
            body, _ = _group(s, i)
            n = int(count.strip()) if count.strip().isdigit() else 1
            n = min(max(n, 1), _MAX_SPAN)
            cols, rows, inner = _span_cell(body) if name == "multicolumn" else (1, 1, body)
            return (n, rows, inner) if name == "multicolumn" else (cols, n, inner)
    return 1, 1, s


def read_tabular(fragment: str) -> tuple[tuple[str, ...] | None, list[tuple[str, ...]], list[str]]:
    """A tabular fragment → (header or None, body rows, notes). Rows may be ragged; the caller pads them."""
    notes: list[str] = []
    begin = _BEGIN.search(fragment)
    body = fragment[begin.end() :] if begin else fragment
    _, after_spec = _group(body, 0)  # the column spec, e.g. {|l|c|r|}
    if body[:after_spec].strip().startswith("{"):
        body = body[after_spec:]
    end = _END.search(body)
    body = body[: end.start()] if end else body
    rows: list[list[str]] = []
    rule_after: list[int] = []  # indexes of rows with a full rule right below them
    pending: dict[int, tuple[int, str]] = {}  # column → (rows left, text) of a \multirow
    merged = 0
    for raw in _split(body, "\\\\"):
        raw = _ROW_SKIP.sub("", raw, count=1)
        if _FULL_RULE.search(raw) and rows:
            rule_after.append(len(rows) - 1)
        raw = _RULE.sub(" ", re.sub(r"\\(cline|cmidrule)\s*(\([^)]*\))?\s*\{[^}]*\}", " ", raw))
        if not raw.strip():
            continue
        row: list[str] = []
        for cell in _split(raw, "&"):
            cols, span_rows, source = _span_cell(cell)
            text = plain(source)
            col = len(row)
            if not text and col in pending:
                left, text = pending[col]
                if left > 1:
                    pending[col] = (left - 1, text)
                else:
                    del pending[col]
            if cols > 1 or span_rows > 1:
                merged += 1
            if span_rows > 1:
                for c in range(col, col + cols):
                    pending[c] = (span_rows - 1, text)
            row.extend([text] * cols)
        rows.append(row)
    if merged:
        notes.append(f"flattened {merged} merged cell(s): their text is repeated in every cell they cover")
    if not rows:
        return None, [], ["no cells in the table"]
    n_head = rule_after[0] + 1 if rule_after and rule_after[0] < len(rows) - 1 and rule_after[0] < 3 else 0
    if not n_head:
        return None, [tuple(r) for r in rows], notes
    width = max(len(r) for r in rows[:n_head])
    head = [r + [""] * (width - len(r)) for r in rows[:n_head]]
    if n_head > 1:
        notes.append(f"joined {n_head} header rows with ' / '")
    header = tuple(" / ".join(dict.fromkeys(h[c] for h in head if h[c])) for c in range(width))
    return header, [tuple(r) for r in rows[n_head:]], notes
