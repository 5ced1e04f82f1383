"""Everything the user sees on stderr while a run goes: a rich progress bar (pages, documents, tokens/s,
ETA) when stderr is a terminal, warnings for pages that did not come out ok, per-page lines with `-v`, and
the end-of-run summary. `--quiet` leaves only errors. Listens to runner events; never writes data.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dsvl2.errors import describe, one_line
from dsvl2.pipelines.base import FAILURES, PageRecord
from dsvl2.pipelines.runner import BatchResized, BatchStarted, DocumentDone, Event, PageSkipped, RecordDone
from dsvl2.render import pages_label


@dataclass(slots=True)
class Tally:
    """Counts kept from events, so that an interrupted run still gets an honest summary."""

    statuses: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    documents_done: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, record: PageRecord) -> None:
        self.statuses[record.status] += 1
        if record.tokens:
            self.prompt_tokens += record.tokens["prompt"]
            self.generated_tokens += record.tokens["generated"]

    @property
    def done(self) -> int:
        return sum(self.statuses.values())

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s in FAILURES)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> dict[str, float | int]:
        minutes = max(self.seconds, 1e-9) / 60
        return {
            **{f"pages_{s}": n for s, n in sorted(self.statuses.items())},
            "pages_skipped": self.skipped,
            "documents_done": self.documents_done,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 3),
            "pages_per_minute": round(self.done / minutes, 2),
            "tokens_per_second": round(self.generated_tokens / (minutes * 60), 2),
        }


def _where(record: PageRecord) -> str:
    label = pages_label(record, short=True)
    return f"{record.source} {label}" if label else record.source


class Reporter:
    """Routes runner events to the progress bar, warnings and verbose lines on stderr."""

    def __init__(
        self, *, total_pages: int, total_docs: int, quiet: bool, verbose: int, console: Console | None = None
    ) -> None:
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet, self.verbose = quiet, verbose
        self.tally = Tally()
        self.total_docs = total_docs
        self.bar: Progress | None = None
        if not quiet and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[docs]}"),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task_id = self.bar.add_task("pages", total=total_pages, docs="", rate="")

    def __enter__(self) -> Reporter:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def warn(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]warning:[/] {escape(one_line(message))}")

    def info(self, message: str, level: int = 1) -> None:
        if not self.quiet and self.verbose >= level:
            self.console.print(escape(message))

    def notice(self, message: str) -> None:
        """A line on what the run is doing while no page moves (loading a model): shown on a terminal, as the
        progress bar is; elsewhere only with -v, so a log or a failing setup keeps its one error line."""
        self.info(message, level=0 if self.console.is_terminal else 1)

    def error(self, message: str) -> None:
        self.console.print(f"[red]error:[/] {escape(one_line(message))}")

    def fail(self, exc: BaseException) -> int:
        """Report an error the CLI knows (dsvl2.errors.describe) as its one line and return its exit code;
        anything else is a bug and raises on."""
        known = describe(exc)
        if known is None:
            raise exc
        self.error(known[0])
        return int(known[1])

    def __call__(self, event: Event) -> None:
        if isinstance(event, RecordDone):
            r = event.record
            self.tally.add(r)
            if r.status != "ok":
                self.warn(f"{_where(r)}: {r.status}: {r.error}")
            tokens = r.tokens["generated"] if r.tokens else 0
            self.info(f"{_where(r)} [{r.status}] {tokens} tokens")
        elif isinstance(event, PageSkipped):
            self.tally.skipped += 1
            self.info(f"{event.page.doc.source} p.{event.page.number}: done in an earlier run, skipped", 2)
        elif isinstance(event, DocumentDone):
            self.tally.documents_done += 1
            self.info(f"{event.doc.source}: done", 2)
        elif isinstance(event, BatchStarted):
            self.info(f"batch of {event.size} request(s)", 2)
        elif isinstance(event, BatchResized):
            self.warn(f"out of memory in a batch of {event.old}; going on with batches of {event.new} ({event.reason})")
        if self.bar is not None and not isinstance(event, BatchStarted | BatchResized):
            t = self.tally
            rate = t.generated_tokens / max(t.seconds, 1e-9)
            self.bar.update(
                self.task_id,
                completed=t.done + t.skipped,
                docs=f"{t.documents_done}/{self.total_docs} docs",
                rate=f"{rate:.1f} tok/s",
            )

    def print_summary(
        self, *, command: str, interrupted: bool, incomplete: int, where: str | None, load_seconds: float = 0.0
    ) -> None:
        """The run's last line: counts, then rates over the pages' own time; loading the model (and building
        its kernels) is shown apart, never counted in pages/min."""
        if self.quiet:
            return
        t = self.tally
        counts = ", ".join(f"{n} {s}" for s, n in sorted(t.statuses.items())) or "no pages processed"
        parts = [counts]
        if t.skipped:
            parts.append(f"{t.skipped} already done")
        s = t.summary()
        parts.append(f"{s['pages_per_minute']} pages/min, {s['tokens_per_second']} tokens/s, {t.seconds:.1f}s")
        if load_seconds:
            parts.append(f"model loaded in {load_seconds:.1f}s")
        line = f"dsvl2 {command}: " + "; ".join(parts)
        if interrupted:
            line += " — interrupted; rerun with --resume to continue"
        if incomplete:
            line += f" — {incomplete} document(s) incomplete (.partial kept)"
        self.console.print(escape(line))
        if where:
            self.console.print(escape(f"output: {where}"))
