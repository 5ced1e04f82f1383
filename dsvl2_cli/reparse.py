"""`dsvl2 reparse`: read page records (JSONL, or the JSON array `--format json` writes; files or `-` for stdin),
re-read each answer with the current parsers (dsvl2.pipelines.reparse), and write the updated records through
the writers every command uses: stdout, one file written atomically, or per-document outputs under a
directory, in any `--format` (default jsonl).

Every input is read and every record reparsed before anything is written, so a bad line (`FILE:LINE:
reason`, exit 2) leaves the output untouched, and a file may be reparsed in place (`-o` naming it). Exit 1
when some record is `failed` or `parse_error` after the reparse, as after a run. Never loads a model.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, ClassVar

from dsvl2.errors import ExitCode, OutputError, UsageError
from dsvl2.inputs import safe_key
from dsvl2.pipelines.base import FAILURES, Document, PageRecord
from dsvl2.pipelines.reparse import RecordError, reparse
from dsvl2.progress import Reporter
from dsvl2.session import Destination, destination
from dsvl2.signals import shielded
from dsvl2.writers import DirSink, Format, StreamSink, atomic_write

STDIN = "-"
_STDIN_NAME = "<stdin>"


class RecordsError(ValueError):
    """An input that is not page records; the message is `FILE:LINE: reason`."""


@dataclass(frozen=True, slots=True)
class Located:
    """A record and where it was read (`FILE:LINE`), for messages."""

    where: str
    record: PageRecord


def _record(where: str, item: Any) -> PageRecord:
    """A page record from one decoded JSON value; RecordsError naming `where` and why not."""
    if not isinstance(item, dict):
        raise RecordsError(f"{where}: not a page record (a JSON {type(item).__name__}, not an object)")
    try:
        return PageRecord.from_dict(item)
    except KeyError as exc:
        raise RecordsError(f"{where}: not a page record (no {exc.args[0]!r} field)") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise RecordsError(f"{where}: not a page record ({exc})") from None


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_array(name: str, text: str) -> list[Located]:
    """The items of a JSON array, each located at the line where it starts."""
    decoder = json.JSONDecoder()
    items: list[tuple[str, Any]] = []
    pos = text.index("[") + 1
    try:
        while True:
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
            if text.startswith("]", pos) and not items:
                pos += 1
                break
            item, end = decoder.raw_decode(text, pos)
            items.append((f"{name}:{_line(text, pos)}", item))
            while end < len(text) and text[end] in " \t\r\n":
                end += 1
            if text.startswith("]", end):
                pos = end + 1
                break
            if not text.startswith(",", end):
                raise json.JSONDecodeError("expected ',' or ']'", text, end)
            pos = end + 1
    except json.JSONDecodeError as exc:
        raise RecordsError(f"{name}:{exc.lineno}: not JSON ({exc.msg})") from None
    if text[pos:].strip():
        raise RecordsError(f"{name}:{_line(text, pos)}: text after the JSON array")
    return [Located(where, _record(where, item)) for where, item in items]


def parse_records(name: str, data: bytes) -> list[Located]:
    """The records of one input: JSON Lines (blank lines skipped), or a JSON array when the text starts with
    `[`. RecordsError at the first line that is not a record of a schema version this dsvl2 reads."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecordsError(f"{name}:{line}: not UTF-8 text") from None
    if text.lstrip().startswith("["):
        return _json_array(name, text)
    located = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordsError(f"{where}: not JSON ({exc.msg})") from None
        located.append(Located(where, _record(where, item)))
    return located


def read_inputs(paths: Sequence[str]) -> list[Located]:
    """Every record of every input, in order; `-` reads stdin (once)."""
    if not paths:
        raise UsageError("no inputs: give records files (JSONL or JSON) or '-' for stdin")
    if list(paths).count(STDIN) > 1:
        raise UsageError("'-' may be given only once")
    located: list[Located] = []
    for path in paths:
        if path == STDIN:
            located += parse_records(_STDIN_NAME, sys.stdin.buffer.read())
        else:
            located += parse_records(path, Path(path).read_bytes())
    return located


def reparse_all(located: Sequence[Located]) -> list[Located]:
    """Each record reparsed; RecordsError at the first whose task cannot be rebuilt."""
    out = []
    for item in located:
        try:
            out.append(Located(item.where, reparse(item.record)))
        except RecordError as exc:
            raise RecordsError(f"{item.where}: {exc}") from None
    return out


class _Records:
    """What `session.destination` reads of a task: reparse writes records (jsonl) unless told otherwise."""

    default_format: ClassVar[str] = Format.jsonl.value


def _key_parts(source: str) -> list[str]:
    """Path components of a record's source for its output key: a relative path keeps its tree; an absolute
    or '..' path keeps only its name (as `dsvl2 TASK FILE -o DIR/` names a file argument)."""
    if source == STDIN:
        return ["stdin"]
    p = PurePosixPath(source.replace(os.sep, "/"))
    parts = [x for x in p.parts if x not in (".", "")]
    return [p.name or "_"] if p.is_absolute() or ".." in parts else parts


def documents(records: Sequence[PageRecord]) -> dict[str, Document]:
    """One output document per source, in first-seen order, with keys unique regardless of case."""
    docs: dict[str, Document] = {}
    taken: set[str] = set()
    for r in records:
        if r.source in docs:
            continue
        key = base = safe_key(_key_parts(r.source))
        n = 1
        while key.casefold() in taken:
            n += 1
            path = PurePosixPath(base)
            key = str(path.with_name(f"{path.stem}~{n}{path.suffix}"))
        taken.add(key.casefold())
        docs[r.source] = Document(r.source, key, r.sha256)
    return docs


def _render(records: Sequence[PageRecord], fmt: Format, stream: IO[str]) -> None:
    """All records through one StreamSink (a CSV has one task's columns, so one task per CSV)."""
    tasks = list(dict.fromkeys(r.task for r in records))
    if fmt is Format.csv and len(tasks) > 1:
        raise UsageError(f"records of several tasks ({', '.join(tasks)}) cannot share one CSV; use -o DIR/")
    if not tasks:  # no records: an empty JSON array, or nothing (a CSV header would name some task's columns)
        stream.write("[]\n" if fmt is Format.json else "")
        return
    docs = documents(records)
    sink = StreamSink(stream, fmt, tasks[0], headers=len(records) > 1)
    for r in records:
        sink.write(r, docs[r.source])
    sink.close()


def _write_dir(root: Path, fmt: Format, records: Sequence[PageRecord]) -> list[Path]:
    """Per-document outputs under `root`, one DirSink per task (its files are named for the task)."""
    docs = documents(records)
    written: list[Path] = []
    for task in dict.fromkeys(r.task for r in records):
        mine = [r for r in records if r.task == task]
        sink = DirSink(root, fmt, task, prompts=list(dict.fromkeys(r.prompt for r in mine)))
        task_docs = [docs[s] for s in dict.fromkeys(r.source for r in mine)]
        sink.planned(task_docs)  # refuses a path that leaves `root`
        sink.prepare(task_docs, resume=False)
        for doc in task_docs:
            for r in mine:
                if r.source == doc.source:
                    sink.write(r, doc)
            sink.document_done(doc)
        written += sink.outputs
    return written


def write(dest: Destination, records: Sequence[PageRecord], inputs: Sequence[str]) -> list[Path]:
    """Write `records` to the destination; the paths written (none for stdout)."""
    if dest.kind == "stdout" or dest.path is None:
        _render(records, dest.fmt, sys.stdout)
        return []
    if dest.kind == "dir":
        return _write_dir(dest.path, dest.fmt, records)
    real = os.path.realpath(dest.path)
    if dest.fmt not in (Format.json, Format.jsonl) and any(os.path.realpath(p) == real for p in inputs):
        raise OutputError(f"{dest.path} is an input; writing it as {dest.fmt.value} would lose its records")
    buffer = io.StringIO()
    _render(records, dest.fmt, buffer)
    atomic_write(dest.path, buffer.getvalue())
    return [dest.path]


def _report(reporter: Reporter, before: Sequence[Located], after: Sequence[Located]) -> None:
    """A warning for each record not ok, -v lines per record, and the summary line."""
    changed = 0
    counts: dict[str, int] = {}
    for old, new in zip(before, after, strict=True):
        r = new.record
        moved = (old.record.status, old.record.result) != (r.status, r.result)
        changed += moved
        counts[r.status] = counts.get(r.status, 0) + 1
        page = f" p.{r.page}" if r.page is not None else ""
        if r.status != "ok":
            reporter.warn(f"{new.where}: {r.source}{page}: {r.status}: {r.error}")
        reporter.info(f"{new.where}: {r.source}{page} [{r.status}]{' changed' if moved else ''}")
    tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no records"
    reporter.info(f"dsvl2 reparse: {tally}; {changed} changed", level=0)


def run_reparse(*, paths: Sequence[str], output: str | None, fmt: Format | None, quiet: bool, verbose: int) -> int:
    """Reparse the records of `paths` into `output` (None or '-': stdout); returns the exit code."""
    reporter = Reporter(total_pages=0, total_docs=0, quiet=quiet, verbose=verbose)
    try:
        dest = destination(output, fmt, _Records)  # type: ignore[arg-type]  # reads only default_format
        before = read_inputs(paths)
        after = reparse_all(before)
        records = [item.record for item in after]
        with shielded():
            written = write(dest, records, [p for p in paths if p != STDIN])
    except RecordsError as exc:
        reporter.error(str(exc))
        return int(ExitCode.SETUP)
    except BaseException as exc:
        return reporter.fail(exc)
    _report(reporter, before, after)
    for path in written:
        reporter.info(f"output: {path}", level=1)
    return int(ExitCode.PAGES_FAILED if any(r.status in FAILURES for r in records) else ExitCode.OK)
