"""How a record looks in each human-facing format: Markdown, plain text, tidy CSV rows, and the wide
per-table / per-chart CSV files of directory output. Pure functions of records; writers.py does the I/O.

Tidy CSV (one row per cell, value or box) is used for stdout and single files because it streams and
fits every task; a directory output also gets one wide CSV per table or chart, as the user would draw it.
"""

from __future__ import annotations

import json
from typing import Any

from dsvl2.pipelines.base import PageRecord

_COMMON = ["source", "page", "status"]
CSV_COLUMNS: dict[str, list[str]] = {
    "ocr": [*_COMMON, "text", "error"],
    "ask": [*_COMMON, "prompt", "answer", "error"],
    "table": [*_COMMON, "table", "row", "column", "header", "value", "error"],
    "chart": [*_COMMON, "title", "series", "category", "value", "error"],
    "ground": [
        *_COMMON,
        "query",
        "label",
        "box_status",
        "x1",
        "y1",
        "x2",
        "y2",
        "px_x1",
        "px_y1",
        "px_x2",
        "px_y2",
        "pt_x1",
        "pt_y1",
        "pt_x2",
        "pt_y2",
        "error",
    ],
}


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_table(header: list[str] | None, rows: list[list[Any]]) -> str:
    width = max([len(header or [])] + [len(r) for r in rows] + [1])
    head = [*(header or [""] * width)] + [""] * (width - len(header or [""] * width))
    lines = ["| " + " | ".join(_cell(h) for h in head) + " |", "|" + "---|" * width]
    lines += [
        "| " + " | ".join(_cell("" if v is None else v) for v in [*r, *[""] * (width - len(r))]) + " |" for r in rows
    ]
    return "\n".join(lines)


def _marker(record: PageRecord) -> str:
    where = f"page {record.page}" if record.page is not None else "document"
    source = record.source.replace("--", "- -")
    return f"<!-- {where} · {source} -->"


def _table_md(result: dict[str, Any]) -> str:
    parts = []
    for t in result.get("tables", []):
        title = f"**Table {t['index'] + 1}**"
        if t["status"] == "ok":
            parts.append(f"{title}\n\n{markdown_table(t['header'], t['rows'])}")
        else:
            parts.append(f"{title} (could not be parsed: {'; '.join(t['notes'])})\n\n```\n{t['raw']}\n```")
    return "\n\n".join(parts) or "_no tables_"


def _chart_md(result: dict[str, Any]) -> str:
    lines = []
    if result.get("title"):
        lines.append(f"**{_cell(result['title'])}**")
    axes = [f"{k} axis: {result[f'{k}_axis']}" for k in ("x", "y") if result.get(f"{k}_axis")]
    if axes:
        lines.append(" · ".join(axes))
    header = [result.get("x_axis") or "category", *[s["name"] for s in result.get("series", [])]]
    rows = [[c, *[s["values"][i] for s in result["series"]]] for i, c in enumerate(result.get("categories", []))]
    lines.append(markdown_table(header, rows))
    return "\n\n".join(lines)


def _ground_md(result: dict[str, Any]) -> str:
    lines = [f"**{_cell(result['query'])}**"] if result.get("query") else []
    for b in result.get("boxes", []):
        where = f"grid {b['box']} · px {b['box_px']}" + (f" · pt {b['box_pt']}" if b["box_pt"] else "")
        status = "" if b["status"] == "ok" else f" ({b['status']}: {'; '.join(b['notes'])})"
        lines.append(f"- {_cell(b['label']) or '(no label)'}: {where if b['box'] else b['raw']}{status}")
    return "\n".join(lines) or "_no boxes_"


def markdown(record: PageRecord) -> str:
    """One record as Markdown, led by an HTML comment naming its page and source."""
    parts = [_marker(record)]
    if record.task == "ask":
        parts.append(f"**Q:** {record.prompt}")
    r = record.result
    if record.status == "failed" or r is None:
        parts.append(f"> **failed:** {record.error}")
    else:
        if record.status != "ok":
            parts.append(f"> **{record.status}:** {record.error}")
        body = {
            "ocr": lambda: r.get("markdown", ""),
            "table": lambda: _table_md(r),
            "chart": lambda: _chart_md(r),
            "ground": lambda: _ground_md(r),
            "ask": lambda: f"**A:** {r.get('answer', '')}",
        }.get(record.task, lambda: record.text or "")()
        parts.append(body)
    return "\n\n".join(parts) + "\n"


def text(record: PageRecord, *, header: bool) -> str:
    """The answer alone (`ask`, `ocr`) or the raw model text; with `header`, a `==> source … <==` line first.
    A page without an answer prints nothing on its own (its error goes to stderr)."""
    r = record.result or {}
    body = r.get("answer") if record.task == "ask" else r.get("markdown") if record.task == "ocr" else None
    body = body if body is not None else (record.text or "")
    if not header:
        return body + "\n" if record.text is not None else ""
    where = f" (page {record.page})" if record.page is not None else ""
    return f"==> {record.source}{where}: {record.prompt} <==\n{body}\n\n"


def csv_rows(record: PageRecord) -> list[list[Any]]:
    """Tidy CSV rows for one record (at least one row, so failed pages show up)."""
    head = [record.source, record.page, record.status]
    err = record.error or ""
    r = record.result or {}
    rows: list[list[Any]] = []
    if record.task == "ocr":
        return [[*head, r.get("markdown", ""), err]]
    if record.task == "ask":
        return [[*head, record.prompt, r.get("answer", ""), err]]
    if record.task == "table":
        for t in r.get("tables", []):
            if t["status"] != "ok":
                rows.append([*head, t["index"] + 1, "", "", "", t["raw"], "; ".join(t["notes"])])
            for i, row in enumerate(t["rows"], start=1):
                for j, value in enumerate(row, start=1):
                    name = t["header"][j - 1] if t["header"] else ""
                    rows.append([*head, t["index"] + 1, i, j, name, value, err])
        return rows or [[*head, "", "", "", "", "", err]]
    if record.task == "chart":
        for s in r.get("series", []):
            for category, value in zip(r.get("categories", []), s["values"], strict=False):
                rows.append([*head, r.get("title") or "", s["name"], category, value, err])
        return rows or [[*head, r.get("title") or "", "", "", "", err]]
    if record.task == "ground":
        for b in r.get("boxes", []):
            coords = [*(b["box"] or [""] * 4), *(b["box_px"] or [""] * 4), *(b["box_pt"] or [""] * 4)]
            note = "; ".join(b["notes"]) or err
            rows.append([*head, r.get("query") or "", b["label"], b["status"], *coords, note])
        return rows or [[*head, r.get("query") or "", "", "", *[""] * 12, err]]
    return [[*head, json.dumps(r), err]]


def wide_frames(record: PageRecord) -> list[tuple[str, Any, bool]]:
    """(file suffix, pandas DataFrame, has header) for each table or chart of a record, as its own CSV."""
    import pandas as pd  # imported here: only directory CSV output needs it

    r = record.result or {}
    frames: list[tuple[str, Any, bool]] = []
    if record.task == "table":
        for t in r.get("tables", []):
            if t["status"] == "ok":
                frame = pd.DataFrame(t["rows"], columns=t["header"] or range(1, t["n_columns"] + 1))
                frames.append((f"p{record.page}.t{t['index'] + 1}", frame, t["header"] is not None))
    elif record.task == "chart" and r.get("series"):
        data = {r.get("x_axis") or "category": r["categories"]}
        for i, s in enumerate(r["series"]):
            data[s["name"] if s["name"] not in data else f"{s['name']} ({i + 1})"] = s["values"]
        frames.append((f"p{record.page}", pd.DataFrame(data), True))
    return frames
