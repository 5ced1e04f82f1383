"""Re-read a record's answer with the current task parsers: the task (and its own options) rebuilt from the
record, `result` and `status` recomputed, `parser` and `schema_version` brought up to date. The record's
identity (source, page, prompt, model, settings), text, tokens, timings and attempts are kept as they are.

Pure: nothing here reads files or writes output (the `dsvl2 reparse` command does, in dsvl2_cli/reparse.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from dsvl2.pipelines.base import (
    PARSER_VERSION,
    SCHEMA_VERSION,
    Document,
    OptionError,
    Page,
    PageRecord,
    Parsed,
    Status,
)
from dsvl2.pipelines.task import Task
from dsvl2.pipelines.tasks import task_type

# Statuses that are facts of the generation, not of the parse: they stay, with their error, whatever the parse.
_GENERATION_STATUSES: frozenset[str] = frozenset({"truncated", "repetition"})
# Stands for a query while reading a task's default template; no prompt contains it.
_PROBE = "\x00query\x00"


class RecordError(ValueError):
    """A record whose task cannot be rebuilt: an unknown task, or a prompt no task options produce."""


def _query_candidates(kind: type[Task], record: PageRecord, names: set[str]) -> list[dict[str, Any]]:
    """Option values for a task with a `query` option (ground), whose template holds `{query}` where each query
    goes. The query is the one the record's result names (the run's own, whatever its template), else the one
    the task's default template yields for this prompt."""
    candidates = []
    carrier = "template" if "template" in names else "prompt"  # the option that takes a `{query}` template
    named = (record.result or {}).get("query")
    if isinstance(named, str) and named.strip() and named in record.prompt:
        candidates.append({"query": [named], carrier: record.prompt.replace(named, "{query}")})
    try:
        probe = kind.from_options(query=[_PROBE]).prompts
    except OptionError:
        probe = ()
    if len(probe) == 1 and probe[0].count(_PROBE) == 1:
        head, tail = probe[0].split(_PROBE)
        inner = record.prompt[len(head) : len(record.prompt) - len(tail)]
        fits = len(record.prompt) > len(head) + len(tail)
        if fits and record.prompt.startswith(head) and record.prompt.endswith(tail):
            candidates.append({"query": [inner]})
    return candidates


def task_for(record: PageRecord) -> Task:
    """The task that asks exactly `record.prompt`, built through the registry from the options the prompt
    implies; RecordError when no options of the task produce that prompt."""
    try:
        kind = task_type(record.task)
    except ValueError as exc:
        raise RecordError(str(exc)) from None
    names = {option.name for option in kind.options}
    candidates = _query_candidates(kind, record, names) if "query" in names else []
    candidates.append({"prompt": record.prompt})
    for values in candidates:
        try:
            task = kind.from_options(**{k: v for k, v in values.items() if k in names})
        except OptionError:
            continue
        if record.prompt in task.prompts:
            return task
    raise RecordError(f"no {record.task} options ask the prompt {record.prompt!r}")


def page_of(record: PageRecord) -> Page:
    """The page as a parser sees it: its document's source and hash, its number and size (no image)."""
    doc = Document(source=record.source, key=record.source, sha256=record.sha256)
    return Page(doc=doc, number=record.page, size=record.page_size)


def parse(task: Task, record: PageRecord) -> Parsed:
    """The task's parse of the record's text; a parser that raises costs this record, as in a run."""
    try:
        return task.parse(record.text or "", page=page_of(record), prompt=record.prompt)
    except Exception as exc:  # a parser bug must cost one record, not the reparse
        return Parsed({}, ok=False, error=f"parser crashed: {type(exc).__name__}: {exc}")


def reparse(record: PageRecord) -> PageRecord:
    """The record as the current parsers read its text. A record without an answer (`failed`, or no text)
    keeps every field; `truncated` and `repetition` keep their status and error, their result refreshed;
    otherwise the status is `ok` or `parse_error` with the parser's error. RecordError: see `task_for`."""
    if record.status == "failed" or record.text is None:
        return replace(record, schema_version=SCHEMA_VERSION)
    parsed = parse(task_for(record), record)
    status: Status
    if record.status in _GENERATION_STATUSES:
        status, error = record.status, record.error
    elif parsed.ok:
        status, error = "ok", None
    else:
        status, error = "parse_error", parsed.error
    return replace(
        record,
        result=parsed.result,
        status=status,
        error=error,
        parser=PARSER_VERSION,
        schema_version=SCHEMA_VERSION,
    )
