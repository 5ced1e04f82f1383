"""How a record looks in each human-facing format: Markdown, plain text, tidy CSV rows, and the wide
per-table / per-chart frames of directory output. The frame around a record (page marker, status line, the
source / page / status columns) is here; the body comes from the record's task module. Pure functions of
records; writers.py does the I/O.

Tidy CSV (one row per cell, value or box) is used for stdout and single files because it streams and
fits every task; a directory output also gets one wide CSV per table or chart, as the user would draw it.
"""

from __future__ import annotations

import json
from typing import Any

from dsvl2.pipelines.base import PageRecord
from dsvl2.pipelines.task import Task, markdown_table
from dsvl2.pipelines.tasks import TASKS

__all__ = ["csv_columns", "csv_rows", "markdown", "markdown_table", "text", "wide_frames"]

_COMMON = ["source", "page", "status"]


def _task(record: PageRecord) -> type[Task] | None:
    return TASKS.get(record.task)


def csv_columns(task: str) -> list[str]:
    return [*_COMMON, *TASKS[task].csv_columns]


def pages_label(record: PageRecord, *, short: bool = False) -> str | None:
    """"page 3", "pages 1-3" (several pages in one answer: `ask --per document`), or None for a document that
    could not be opened; `short` gives "p.3" / "pp.1-3"."""
    pages = record.pages if record.pages and len(record.pages) > 1 else None
    if pages is None and record.page is None:
        return None
    if pages is None:
        return f"p.{record.page}" if short else f"page {record.page}"
    span = f"{pages[0]}-{pages[-1]}" if list(pages) == list(range(pages[0], pages[-1] + 1)) else ",".join(
        str(p) for p in pages)
    return f"pp.{span}" if short else f"pages {span}"


def _marker(record: PageRecord) -> str:
    where = pages_label(record) or "document"
    source = record.source.replace("--", "- -")
    return f"<!-- {where} · {source} -->"


def markdown(record: PageRecord) -> str:
    """One record as Markdown, led by an HTML comment naming its page and source."""
    task = _task(record)
    parts = [_marker(record)]
    if task is not None and task.prompt_in_markdown:
        parts.append(f"**Q:** {record.prompt}")
    if record.status == "failed" or record.result is None:
        parts.append(f"> **failed:** {record.error}")
    else:
        if record.status != "ok":
            parts.append(f"> **{record.status}:** {record.error}")
        parts.append(task.markdown(record) if task else record.text or "")
    return "\n\n".join(parts) + "\n"


def text(record: PageRecord, *, header: bool) -> str:
    """The answer alone (what the task calls its answer, else the raw model text); with `header`, a
    `==> source … <==` line first. A page without an answer prints nothing on its own (its error goes to
    stderr)."""
    task = _task(record)
    body = task.answer(record) if task and record.result is not None else None
    body = body if body is not None else (record.text or "")
    if not header:
        return body + "\n" if record.text is not None else ""
    label = pages_label(record)
    where = f" ({label})" if label else ""
    return f"==> {record.source}{where}: {record.prompt} <==\n{body}\n\n"


def csv_rows(record: PageRecord) -> list[list[Any]]:
    """Tidy CSV rows for one record (at least one row, so failed pages show up)."""
    head = [record.source, record.page, record.status]
    task = _task(record)
    if task is None:
        return [[*head, json.dumps(record.result), record.error or ""]]
    return [[*head, *row] for row in task.csv_rows(record)]


def wide_frames(record: PageRecord) -> list[tuple[str, Any, bool]]:
    """(file suffix, pandas DataFrame, has header) for each table or chart of a record, as its own CSV."""
    task = _task(record)
    return task.frames(record) if task and record.result is not None else []
