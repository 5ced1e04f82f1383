"""What one request covers: a `Window` of pages. `--per page` (every task's default) makes one window per
page, answered and recorded exactly as a page always was (`pages` None). `ask --per document` puts up to N
consecutive selected pages of one document into one conversation (one user turn: an `<image>` line per page,
then the question; the processor tiles at most two images and pads each of three or more to one 384x384
view, the reference's rule) and makes one record per window and prompt, `pages` naming every page its answer
saw and `page` the first. A document longer than N pages is asked in consecutive windows of N pages, one
record each, so every selected page is seen by some answer.

Pages of a window that did not render are left out of the conversation; the record names them and is
`failed` with the answer over the other pages kept (as a page timeout keeps its partial answer), so the exit
code, `--fail-fast` and `--resume` see it. A window with no rendered page is a failed record with no answer.

The resume identity of a several-page record is its document, task, prompt, settings and model plus its
pages (`document_key`); one-page records keep `PageRecord.key`. Pure: no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from dsvl2.model.requests import Completion, Message, user_prompt
from dsvl2.pipelines.base import (
    Page,
    PageRecord,
    RecordContext,
    Settings,
    answered_record,
    failed_record,
    page_key,
    record_key,
)
from dsvl2.pipelines.task import Task


@dataclass(frozen=True, slots=True)
class Window:
    """Pages answered by one request, in page order, all of one document. `several`: the records name their
    pages (`ask --per document`, even for a window of one page); otherwise the window is exactly one page."""

    pages: tuple[Page, ...]
    several: bool = False

    @property
    def first(self) -> Page:
        return self.pages[0]

    @property
    def numbers(self) -> list[int]:
        return [p.number for p in self.pages if p.number is not None]

    @property
    def rendered(self) -> tuple[Page, ...]:
        return tuple(p for p in self.pages if p.image is not None)


def windows(pages: Iterable[Page], size: int | None) -> Iterator[Window]:
    """The windows of a page stream: each page its own (`size` None), else consecutive pages of one document,
    `size` at most, a window yielded as soon as it is full or its document ends. A document that could not
    be opened (its one page numbered None) stays one window of its own, recorded as before. Closing this
    generator closes `pages` (the renderer's open files)."""
    source = iter(pages)
    try:
        if size is None:
            for page in source:
                yield Window((page,))
            return
        group: list[Page] = []
        for page in source:
            if group and page.doc.key != group[0].doc.key:
                yield Window(tuple(group), several=True)
                group = []
            if page.number is None:
                yield Window((page,))
                continue
            group.append(page)
            if len(group) == size:
                yield Window(tuple(group), several=True)
                group = []
        if group:
            yield Window(tuple(group), several=True)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def plan(numbers: Sequence[int], size: int | None) -> list[tuple[int, ...]]:
    """The page numbers of each window `windows` makes of a document whose selected pages are `numbers`."""
    step = size or 1
    return [tuple(numbers[i : i + step]) for i in range(0, len(numbers), step)]


def conversation(window: Window, prompt: str) -> tuple[Message, ...]:
    """One user turn: an `<image>` line per rendered page of the window, then the prompt."""
    return user_prompt(prompt, tuple(p.image for p in window.rendered if p.image is not None))


# -- resume identity -----------------------------------------------------------------------------------------
def document_key(
    *, sha256: str | None, pages: Sequence[int], task: str, prompt: str, settings: Mapping[str, Any],
    model: Mapping[str, Any],
) -> str:  # fmt: skip
    """The resume identity of a record over several pages (see `record_key`)."""
    return record_key(sha256=sha256, page=None, task=task, prompt=prompt, settings=settings, model=model, pages=pages)


def identity(record: PageRecord) -> str:
    """A record's resume identity (`record.key`, which names the pages of a several-page record)."""
    return record.key


def window_key(window: Window, *, task: str, prompt: str, settings: Settings, model: Mapping[str, Any]) -> str:
    """The identity the record of `window` has when every page of it rendered (what `--resume` looks up)."""
    if not window.several:
        return page_key(window.first, task=task, prompt=prompt, settings=settings, model=model)
    return document_key(sha256=window.first.doc.sha256, pages=window.numbers, task=task, prompt=prompt,
                        settings=settings.to_dict(), model=model)  # fmt: skip


def latest(records: Iterable[PageRecord]) -> list[PageRecord]:
    """Each identity's last record, in order of first appearance; a failed several-page record also gives way
    to a later record of the same document, task, prompt, settings and model that saw all its pages (a page
    that did not render before did on the rerun)."""
    last: dict[str, tuple[int, PageRecord]] = {}
    for n, record in enumerate(records):
        last[identity(record)] = (n, record)
    seen: dict[str, list[tuple[int, frozenset[int]]]] = defaultdict(list)
    for n, record in last.values():
        if record.pages is not None:
            seen[_family(record)].append((n, frozenset(record.pages)))

    def stale(n: int, record: PageRecord) -> bool:
        if record.pages is None or record.status != "failed":
            return False
        return any(m > n and pages >= set(record.pages) for m, pages in seen[_family(record)])

    return [record for n, record in last.values() if not stale(n, record)]


def _family(record: PageRecord) -> str:
    return record_key(sha256=record.sha256, page=None, task=record.task, prompt=record.prompt,
                      settings=record.settings, model=record.model)  # fmt: skip


# -- records ------------------------------------------------------------------------------------------------
def _named(numbers: Sequence[int]) -> str:
    return ("page " if len(numbers) == 1 else "pages ") + ", ".join(map(str, numbers))


def _render_seconds(window: Window) -> float:
    return round(sum(p.render_seconds for p in window.pages), 4)


def failed(ctx: RecordContext, window: Window, prompt: str, error: str) -> PageRecord:
    """A window that produced no answer; a several-page one names the pages it was for."""
    record = failed_record(ctx, window.first, prompt, error)
    if not window.several:
        return record
    timings = {"render": _render_seconds(window)} if window.rendered else None
    return replace(record, pages=window.numbers, timings=timings)


def unrendered(ctx: RecordContext, window: Window, prompt: str) -> PageRecord:
    """A window none of whose pages rendered: failed, each page's reason in the error."""
    if not window.several:
        return failed_record(ctx, window.first, prompt, window.first.error or "page was not rendered")
    reasons = "; ".join(f"page {p.number}: {p.error or 'not rendered'}" for p in window.pages)
    return failed(ctx, window, prompt, f"no page could be rendered ({reasons})")


def answered(
    ctx: RecordContext,
    window: Window,
    prompt: str,
    completion: Completion,
    task: Task,
    *,
    attempts: list[dict[str, Any]] | None = None,
) -> PageRecord:
    """The record of an answer over the window's rendered pages (see the module docstring for a window with
    pages left out)."""
    seen = window.rendered
    record = answered_record(ctx, seen[0], prompt, completion, task, attempts=attempts)
    if not window.several:
        return record
    pages = [p.number for p in seen if p.number is not None]
    record = replace(record, pages=pages, timings={**(record.timings or {}), "render": _render_seconds(window)})
    left_out = [p for p in window.pages if p.image is None]
    if not left_out:
        return record
    reasons = "; ".join(f"page {p.number}: {p.error or 'not rendered'}" for p in left_out)
    error = (
        f"{_named([p.number for p in left_out if p.number is not None])} could not be rendered and "
        f"{'was' if len(left_out) == 1 else 'were'} left out ({reasons}); the answer over {_named(pages)} is kept"
    )
    return replace(record, status="failed", error=error + (f"; {record.error}" if record.error else ""))
