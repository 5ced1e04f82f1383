"""Where records go: a stream (stdout), one file for the whole run, or a directory with outputs per document.

Guarantees: every finished file appears by atomic rename (temp file in the same directory, fsync, replace);
JSONL is flushed per record; a directory output keeps each in-progress document's records in
`<name>.<task>.jsonl.partial` (appended per record) until the document is complete, so an interrupted or
killed run never leaves a half-written file that looks complete, and `--resume` reads both. A single Markdown,
CSV or text file from a run that did not finish is left as `<file>.partial`, the earlier `<file>` untouched.
No output path leaves the output directory (`planned` names every path before anything is written).
Records are known by their resume identity (pipelines.windows.identity: a record over several pages of a
document, `ask --per document`, by its pages too); each appears once in every output, the newest of its
identity.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import IO, Any, Protocol

from dsvl2 import render
from dsvl2.errors import OutputError
from dsvl2.pipelines.base import Document, PageRecord
from dsvl2.pipelines.windows import identity, latest


class Format(str, Enum):
    json = "json"
    jsonl = "jsonl"
    md = "md"
    csv = "csv"
    text = "text"


SUFFIX = {Format.json: "json", Format.jsonl: "jsonl", Format.md: "md", Format.csv: "csv", Format.text: "txt"}


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write `path` through a temp file that replaces it only when the block finishes without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write(path: Path, data: str | bytes) -> None:
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def to_json(record: PageRecord, indent: int | None = None) -> str:
    return json.dumps(record.to_dict(), ensure_ascii=False, indent=indent)


def read_records(path: Path) -> tuple[list[PageRecord], int]:
    """Records from a JSON array or JSONL file, and how many entries could not be read (a torn last line
    after a crash, or foreign content); a missing file has none."""
    try:
        content = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    if content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError:
            return [], 1
    else:
        items = []
        for line in content.splitlines():
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError:
                    items.append(None)
    records, bad = [], 0
    for item in items if isinstance(items, list) else []:
        try:
            records.append(PageRecord.from_dict(item))
        except (KeyError, TypeError, ValueError, AttributeError):
            bad += 1
    return records, bad


def _merge(old: Sequence[PageRecord], new: Sequence[PageRecord], prompts: Sequence[str]) -> list[PageRecord]:
    """Old records superseded by new ones (`latest`), in page then prompt order."""
    order = {p: i for i, p in enumerate(prompts)}
    return sorted(latest([*old, *new]), key=lambda r: (r.page or 0, order.get(r.prompt, len(order)), r.prompt))


class Sink(Protocol):
    """What the session writes through. `prepare` loads resume state and returns warnings."""

    outputs: list[Path]
    incomplete: list[str]

    def planned(self, docs: Sequence[Document]) -> list[Path]: ...
    def prepare(self, docs: Sequence[Document], *, resume: bool) -> list[str]: ...
    def is_done(self, key: str) -> bool: ...
    def write(self, record: PageRecord, doc: Document) -> None: ...
    def document_done(self, doc: Document) -> None: ...
    def close(self, *, complete: bool = True) -> None: ...


class StreamSink:
    """Records rendered to a text stream as they come: JSON array, JSONL, Markdown, tidy CSV or text.
    Nothing is written before the first record (or `close`), so a setup error leaves the stream empty."""

    def __init__(self, stream: IO[str], fmt: Format, task: str, *, headers: bool = True) -> None:
        self.stream, self.fmt, self.task, self.headers = stream, fmt, task, headers
        self.outputs: list[Path] = []
        self.incomplete: list[str] = []
        self.count = 0
        self.started = False
        self.csv = csv.writer(stream, lineterminator="\n") if fmt is Format.csv else None

    def planned(self, docs: Sequence[Document]) -> list[Path]:
        return []

    def prepare(self, docs: Sequence[Document], *, resume: bool) -> list[str]:
        return []

    def _start(self) -> None:
        self.started = True
        if self.fmt is Format.json:
            self.stream.write("[")
        elif self.csv is not None:
            self.csv.writerow(render.csv_columns(self.task))

    def is_done(self, key: str) -> bool:
        return False

    def write(self, record: PageRecord, doc: Document) -> None:
        if not self.started:
            self._start()
        if self.fmt is Format.json:
            self.stream.write(("," if self.count else "") + "\n" + to_json(record, indent=2))
        elif self.fmt is Format.jsonl:
            self.stream.write(to_json(record) + "\n")
        elif self.fmt is Format.md:
            self.stream.write(("\n" if self.count else "") + render.markdown(record))
        elif self.csv is not None:
            self.csv.writerows(render.csv_rows(record))
        else:
            self.stream.write(render.text(record, header=self.headers))
        self.count += 1
        self.stream.flush()

    def document_done(self, doc: Document) -> None:
        pass

    def close(self, *, complete: bool = True) -> None:
        if not self.started:
            self._start()
        if self.fmt is Format.json:
            self.stream.write("\n]\n" if self.count else "]\n")
        self.stream.flush()


class FileSink:
    """One file for the whole run. JSONL is appended and flushed per record (and `--resume` appends the
    missing pages); JSON is written when the run ends, finished or not (it can be resumed); Markdown, CSV
    and text are written to `<file>.partial` and renamed to `<file>` only when the run finished.
    The target is not touched before the first record, so a setup error leaves an earlier output intact."""

    def __init__(self, path: Path, fmt: Format, task: str, *, prompts: Sequence[str] = ()) -> None:
        self.path, self.fmt, self.task, self.prompts = path, fmt, task, prompts
        self.partial = path.with_name(path.name + ".partial")
        self.outputs: list[Path] = [path]
        self.incomplete: list[str] = []
        self.resume = False
        self.bad = 0
        self.done: set[str] = set()
        self.redo: set[str] = set()  # keys of old failed records that a new record will supersede
        self.superseded = False
        self.old: list[PageRecord] = []
        self.new: list[PageRecord] = []
        self.file: IO[str] | None = None
        self.inner: StreamSink | None = None
        self.tmp_cm: contextlib.AbstractContextManager[IO[Any]] | None = None

    def planned(self, docs: Sequence[Document]) -> list[Path]:
        return [self.path, self.partial]

    def prepare(self, docs: Sequence[Document], *, resume: bool) -> list[str]:
        self.resume = resume
        if resume:
            self.old, self.bad = read_records(self.path)
            self.done = {identity(r) for r in self.old if r.status != "failed"}
            self.redo = {identity(r) for r in self.old if r.status == "failed"}
        return [f"{self.path}: dropped {self.bad} unreadable record(s) before resuming"] if self.bad else []

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.fmt is Format.jsonl:
            if self.bad:  # a torn line from a killed run must not swallow the next record
                atomic_write(self.path, "".join(to_json(r) + "\n" for r in self.old))
            self.file = open(self.path, "a" if self.resume else "w", encoding="utf-8")  # noqa: SIM115 closed in close()
        elif self.fmt is not Format.json:
            self.tmp_cm = atomic_open(self.partial)
            self.inner = StreamSink(self.tmp_cm.__enter__(), self.fmt, self.task)

    def is_done(self, key: str) -> bool:
        return key in self.done

    def write(self, record: PageRecord, doc: Document) -> None:
        if self.file is None and self.inner is None:
            self._open()
        # A record over several pages may also supersede a failed one over fewer pages (see `latest`).
        replaces = identity(record) in self.redo or (record.pages is not None and bool(self.redo))
        self.superseded = self.superseded or replaces
        if self.file is not None:
            self.file.write(to_json(record) + "\n")
            self.file.flush()
        elif self.inner is not None:
            self.inner.write(record, doc)
        else:
            self.new.append(record)

    def document_done(self, doc: Document) -> None:
        pass

    def close(self, *, complete: bool = True) -> None:
        if self.file is None and self.inner is None and not (self.resume and self.path.exists()):
            self._open()  # a run without records still leaves its (empty) output
        if self.file is not None:
            self.file.close()
            if self.superseded:  # keep only the newest record per key
                records, _ = read_records(self.path)
                atomic_write(self.path, "".join(to_json(r) + "\n" for r in latest(records)))
        elif self.inner is not None and self.tmp_cm is not None:
            self.inner.close()
            self.tmp_cm.__exit__(None, None, None)
            if complete:
                os.replace(self.partial, self.path)
            else:
                self.outputs = [self.partial]
                self.incomplete.append(f"{self.path} (left as {self.partial.name})")
        elif self.fmt is Format.json and (self.new or not self.resume):
            merged = _merge(self.old, self.new, self.prompts) if self.old else self.new
            atomic_write(self.path, "[" + ",".join("\n" + to_json(r, 2) for r in merged) + "\n]\n")


class DirSink:
    """One set of outputs per document under `root`, at `<root>/<key>.<task>.<ext>`: always the records
    (`.jsonl`, the resume source), plus the `--format` rendering (`.json`, `.md`, `.txt`, or CSV: one wide
    file per table `…table.p<page>.t<n>.csv` / chart `…chart.p<page>.csv`, tidy `.csv` for other tasks)."""

    def __init__(self, root: Path, fmt: Format, task: str, *, prompts: Sequence[str] = ()) -> None:
        self.root, self.fmt, self.task, self.prompts = root, fmt, task, prompts
        self.outputs: list[Path] = []
        self.incomplete: list[str] = []
        self.resume = False
        self.existing: dict[str, list[PageRecord]] = {}
        self.new: dict[str, list[PageRecord]] = {}
        self.done: set[str] = set()

    def _path(self, doc: Document, suffix: str) -> Path:
        base = (self.root / doc.key).with_name(f"{Path(doc.key).name}.{self.task}{suffix}")
        if not base.resolve().is_relative_to(self.root.resolve()):
            raise OutputError(f"the output path for {doc.source} escapes {self.root} (through a symlink?)")
        return base

    def planned(self, docs: Sequence[Document]) -> list[Path]:
        suffixes = (".jsonl", ".jsonl.partial", f".{SUFFIX[self.fmt]}")
        return [self._path(doc, suffix) for doc in docs for suffix in suffixes]

    def prepare(self, docs: Sequence[Document], *, resume: bool) -> list[str]:
        self.resume = resume
        warnings = []
        if resume:
            for doc in docs:
                records, bad = read_records(self._path(doc, ".jsonl"))
                journal, bad_j = read_records(self._path(doc, ".jsonl.partial"))
                if bad + bad_j:
                    warnings.append(f"{doc.source}: ignored {bad + bad_j} unreadable record(s) in earlier output")
                merged = _merge(records, journal, self.prompts)
                self.existing[doc.key] = merged
                self.done.update(identity(r) for r in merged if r.status != "failed")
        return warnings

    def is_done(self, key: str) -> bool:
        return key in self.done

    def write(self, record: PageRecord, doc: Document) -> None:
        journal = self._path(doc, ".jsonl.partial")
        first = doc.key not in self.new
        self.new.setdefault(doc.key, []).append(record)
        if first:
            self.incomplete.append(doc.source)
            journal.parent.mkdir(parents=True, exist_ok=True)
        mode = "a" if (self.resume or not first) else "w"
        with open(journal, mode, encoding="utf-8") as f:
            if mode == "a" and f.tell() > 0 and not _ends_with_newline(journal):
                f.write("\n")  # a torn line from a killed run must not swallow this record
            f.write(to_json(record) + "\n")

    def document_done(self, doc: Document) -> None:
        journal = self._path(doc, ".jsonl.partial")
        new = self.new.pop(doc.key, [])
        if not new and not journal.exists():
            return
        records = _merge(self.existing.pop(doc.key, []), new, self.prompts)
        written = [self._path(doc, ".jsonl")]
        atomic_write(written[0], "".join(to_json(r) + "\n" for r in records))
        written += self._render(doc, records)
        journal.unlink(missing_ok=True)
        self.outputs.extend(written)
        if doc.source in self.incomplete:
            self.incomplete.remove(doc.source)

    def _render(self, doc: Document, records: list[PageRecord]) -> list[Path]:
        if self.fmt is Format.jsonl:
            return []
        if self.fmt is Format.csv and self.task in ("table", "chart"):
            return self._wide_csv(doc, records)
        path = self._path(doc, f".{SUFFIX[self.fmt]}")
        buffer = io.StringIO()
        sink = StreamSink(buffer, self.fmt, self.task, headers=True)
        sink.prepare([doc], resume=False)
        for r in records:
            sink.write(r, doc)
        sink.close()
        atomic_write(path, buffer.getvalue())
        return [path]

    def _wide_csv(self, doc: Document, records: list[PageRecord]) -> list[Path]:
        written = []
        for record in records:
            for suffix, frame, header in render.wide_frames(record):
                path = self._path(doc, f".{suffix}.csv")
                atomic_write(path, frame.to_csv(index=False, header=header, lineterminator="\n"))
                written.append(path)
        stale = re.compile(re.escape(f"{Path(doc.key).name}.{self.task}.") + r"p\d+(\.t\d+)?\.csv")
        folder = self._path(doc, ".jsonl").parent
        for old in folder.iterdir():
            if stale.fullmatch(old.name) and old not in written:
                old.unlink()
        return written

    def close(self, *, complete: bool = True) -> None:
        pass


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
