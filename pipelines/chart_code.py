"""A chart answer given as Python/matplotlib code (DeepSeek-VL2 was trained to redraw plots as code) → the data
it plots, read from literal lists only (pipelines/chart.py uses it).

The code is parsed with `ast.parse` and never run: names bound to literal lists, tuples or dicts are
collected, then the plotting calls (`plot`, `bar`, `barh`, `scatter`, `step`, `stem`, `pie` on any object)
are read where their data arguments are such names or literals; `title` / `xlabel` / `ylabel` (and the
`set_` forms) give the title and axes, `xticks` / `set_xticklabels` the categories of positional x data.
Truncated code is read up to its last complete statement. Never raises.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_PLOTS = frozenset({"plot", "bar", "barh", "scatter", "step", "stem", "pie"})
_TEXTS = {"title": "title", "set_title": "title", "suptitle": "title", "xlabel": "x_axis", "set_xlabel": "x_axis",
          "ylabel": "y_axis", "set_ylabel": "y_axis"}
_MAX_TRIM = 200  # lines dropped from the end of truncated code before giving up


@dataclass(slots=True)
class CodeChart:
    """What the code plots: categories (x values as text) and series (name, values aligned to categories)."""

    meta: dict[str, str] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    series: list[tuple[str, list[float | None]]] = field(default_factory=list)
    code_lines: set[int] = field(default_factory=set)  # answer lines (0-based) that were code
    notes: list[str] = field(default_factory=list)


def _literal(node: ast.AST) -> Any:
    """The value of a literal node (numbers, strings, lists, tuples, dicts of them); None when not literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)) and not isinstance(
        node.value, bool
    ):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _literal(node.operand)
        if isinstance(inner, (int, float)):
            return -inner if isinstance(node.op, ast.USub) else inner
        return None
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e) for e in node.elts]
        return None if any(i is None for i in items) else items
    if isinstance(node, ast.Dict):
        keys = [_literal(k) if k is not None else None for k in node.keys]
        values = [_literal(v) for v in node.values]
        if any(k is None for k in keys) or any(v is None for v in values):
            return None
        return dict(zip(keys, values, strict=True))
    return None


def _parse(code: str) -> ast.Module | None:
    lines = code.splitlines()
    for cut in range(min(len(lines), _MAX_TRIM) + 1):
        try:
            return ast.parse("\n".join(lines[: len(lines) - cut]))
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            continue
    return None


def _code(text: str) -> tuple[str, set[int]] | None:
    """The Python code in an answer (fenced, or the whole answer when it imports matplotlib) and its lines."""
    m = _FENCE.search(text)
    if m:
        first = text.count("\n", 0, m.start(1))
        body = m.group(1)
        return body, set(range(first - 1, first + body.count("\n") + 1))
    if re.search(r"^\s*(import matplotlib|from matplotlib)", text, re.MULTILINE):
        return text, set(range(text.count("\n") + 1))
    return None


def _numbers(value: Any) -> list[float | None] | None:
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, (int, float)) for v in value):
        return None
    return [float(v) for v in value]


def _label(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def read_code_chart(text: str) -> CodeChart | None:
    """The data of a matplotlib answer; None when the answer holds no readable code with a plotting call."""
    found = _code(text)
    if found is None:
        return None
    code, lines = found
    tree = _parse(code)
    if tree is None:
        return None
    names: dict[str, Any] = {}
    chart = CodeChart(code_lines=lines)
    ticks: list[str] | None = None
    plotted: list[tuple[str, list[str] | None, list[float | None]]] = []
    skipped = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = _literal(node.value)
            if value is not None:
                names[node.targets[0].id] = value
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        attr = node.func.attr

        def arg(n: ast.AST) -> Any:
            return names.get(n.id) if isinstance(n, ast.Name) else _literal(n)

        kwargs = {k.arg: arg(k.value) for k in node.keywords if k.arg}
        if attr in _TEXTS and node.args and isinstance(arg(node.args[0]), str):
            chart.meta.setdefault(_TEXTS[attr], arg(node.args[0]))
        elif attr in ("xticks", "set_xticks") and len(node.args) >= 2 and isinstance(arg(node.args[1]), list):
            ticks = [_label(v) for v in arg(node.args[1])]
        elif attr == "set_xticklabels" and node.args and isinstance(arg(node.args[0]), list):
            ticks = [_label(v) for v in arg(node.args[0])]
        elif attr in _PLOTS:
            args = [arg(a) for a in node.args[:2]]
            name = kwargs.get("label") if isinstance(kwargs.get("label"), str) else f"series {len(plotted) + 1}"
            if attr == "pie":
                values, xs = _numbers(args[0] if args else kwargs.get("x")), kwargs.get("labels")
            elif len(args) >= 2 and _numbers(args[1]) is not None:
                values, xs = _numbers(args[1]), args[0]
            elif len(node.args) >= 2:
                values, xs = None, None  # y is not literal: nothing to read
            else:
                values, xs = _numbers(args[0] if args else None), None
            if values is None:
                skipped += 1
                continue
            xs_text = [_label(v) for v in xs] if isinstance(xs, list) and len(xs) == len(values) else None
            plotted.append((name, xs_text, values))
    if not plotted:
        return None
    if skipped:
        chart.notes.append(f"{skipped} plotting call(s) with data that is not a literal list were not read")
    aligned: list[tuple[str, dict[str, float | None]]] = []
    for name, xs, values in plotted:
        if xs is None or (ticks and len(ticks) == len(values) and all(x.lstrip("-").isdigit() for x in xs)):
            xs = ticks if ticks and len(ticks) == len(values) else [str(i + 1) for i in range(len(values))]
        chart.categories.extend(x for x in dict.fromkeys(xs) if x not in chart.categories)
        aligned.append((name, dict(zip(xs, values, strict=True))))
    chart.series = [(name, [by_x.get(c) for c in chart.categories]) for name, by_x in aligned]
    return chart
