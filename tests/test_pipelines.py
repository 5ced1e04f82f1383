"""The runner on a scripted runtime, without the CLI: bounded read-ahead, event order, skips, failure
isolation, status mapping, and record identity."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from fakes import FakeRuntime
from PIL import Image

from dsvl2.model.requests import Completion
from dsvl2.pipelines import runner
from dsvl2.pipelines.base import (
    Document,
    Page,
    PageRecord,
    PageSize,
    Parsed,
    RecordContext,
    Settings,
    answered_record,
    page_key,
)
from dsvl2.pipelines.ocr import OcrTask

SETTINGS = Settings(model="m")
MODEL = {"id": "fake/dsvl2", "revision": "fake-rev", "fingerprint": None}  # what the runner names a FakeRuntime
IMAGE = Image.new("RGB", (8, 8))


def pages(n_docs: int, per_doc: int, counter: list[int] | None = None) -> Iterator[Page]:
    for d in range(n_docs):
        doc = Document(f"d{d}.pdf", f"d{d}.pdf", sha256=f"{d:064x}", kind="pdf", n_pages=per_doc)
        for p in range(1, per_doc + 1):
            if counter is not None:
                counter.append(1)
            yield Page(doc, p, IMAGE, PageSize(8, 8))


def run(fake, page_iter, **kw):
    events: list[runner.Event] = []
    stats = runner.run(
        runtime=fake,
        task=kw.pop("task", OcrTask()),
        pages=page_iter,
        settings=SETTINGS,
        on_event=events.append,
        batch_size=kw.pop("batch_size", 2),
        **kw,
    )
    return stats, events


def records(events):
    return [e.record for e in events if isinstance(e, runner.RecordDone)]


def test_read_ahead_is_bounded():
    """Catches 'render everything first': at the first generate call only a few pages may be rendered."""
    pulled: list[int] = []
    seen_at_first_call: list[int] = []
    fake = FakeRuntime(lambda r: seen_at_first_call.append(len(pulled)) or "x")
    run(fake, pages(1, 50, pulled), batch_size=2, read_ahead=2)
    assert len(pulled) == 50
    assert seen_at_first_call[0] <= 2 + 2 + 2, f"{seen_at_first_call[0]} pages pulled before the first batch"


def test_events_in_input_order_and_documents_done_after_their_records():
    fake = FakeRuntime(lambda r: r.id, reverse=True)
    stats, events = run(fake, pages(3, 3), batch_size=4)
    order = [
        (e.record.source, e.record.page) if isinstance(e, runner.RecordDone) else ("done", e.doc.source)
        for e in events
        if isinstance(e, runner.RecordDone | runner.DocumentDone)
    ]
    expected = []
    for d in range(3):
        expected += [(f"d{d}.pdf", p) for p in (1, 2, 3)] + [("done", f"d{d}.pdf")]
    assert order == expected
    assert stats.statuses == {"ok": 9} and stats.generated_tokens == 18 and stats.prompt_tokens == 900
    assert [len(b) for b in fake.batches] == [4, 4, 1]


def test_done_pages_are_skipped_and_their_documents_still_finish():
    done = {page_key(p, task="ocr", prompt=OcrTask().prompt, settings=SETTINGS, model=MODEL) for p in pages(1, 3)}
    fake = FakeRuntime()
    stats, events = run(fake, pages(2, 3), is_done=done.__contains__)
    assert stats.skipped == 3 and len(fake.requests) == 3
    assert [e.doc.source for e in events if isinstance(e, runner.DocumentDone)] == ["d0.pdf", "d1.pdf"]


def test_pages_that_could_not_render_fail_without_the_model():
    doc = Document("bad.pdf", "bad.pdf", error="cannot open: broken")
    good = next(pages(1, 1))
    fake = FakeRuntime()
    stats, events = run(fake, iter([Page(doc, None, error=doc.error), Page(good.doc, 2, error="cannot render"), good]))
    assert [(r.status, r.error) for r in records(events)] == [
        ("failed", "cannot open: broken"),
        ("failed", "cannot render"),
        ("ok", None),
    ]
    assert len(fake.requests) == 1 and stats.failed == 2


def test_a_failing_batch_is_retried_page_by_page():
    fake = FakeRuntime()
    fake.enqueue("a").enqueue(error=ValueError("bad image")).enqueue("c").enqueue("d")
    _stats, events = run(fake, pages(1, 4), batch_size=4)
    assert [r.status for r in records(events)] == ["ok", "failed", "ok", "ok"]
    assert records(events)[1].error == "ValueError: bad image"
    assert [len(b) for b in fake.batches] == [4, 1, 1, 1, 1]


def test_a_crashing_parser_costs_one_page():
    class Crashing(OcrTask):
        def parse(self, text, *, page, prompt):
            raise ZeroDivisionError("oops")

    _, events = run(FakeRuntime(), pages(1, 1), task=Crashing())
    [record] = records(events)
    assert record.status == "parse_error" and "parser crashed: ZeroDivisionError" in record.error


def test_missing_completions_become_failed_records():
    class Forgetful(FakeRuntime):
        def submit(self, request):
            if not self.requests:  # the first request is answered, the second silently dropped
                super().submit(request)
            else:
                self.requests.append(request)

    _, events = run(Forgetful(), pages(1, 2))
    assert [r.status for r in records(events)] == ["ok", "failed"]
    assert records(events)[1].error == "the runtime returned no answer"


def test_fail_fast_stops_pulling_pages():
    pulled: list[int] = []
    fake = FakeRuntime()
    fake.enqueue("ok").enqueue(error=RuntimeError("x"))
    stats, events = run(fake, pages(1, 40, pulled), batch_size=1, read_ahead=1, fail_fast=True)
    assert stats.stopped_early and [r.status for r in records(events)] == ["ok", "failed"]
    assert len(pulled) < 10


def test_errors_from_the_page_iterator_reach_the_caller():
    def broken():
        yield next(pages(1, 1))
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        run(FakeRuntime(), broken())


def test_prefetch_keeps_order_and_stops_when_closed():
    produced = itertools.count()
    stream = runner.prefetch((next(produced) for _ in range(1000)), depth=3)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert next(produced) < 20


@pytest.mark.parametrize(
    ("finish", "text", "status"),
    [
        ("eos", "text", "ok"),
        ("stop", "text", "ok"),
        ("length", "text", "truncated"),
        ("repetition", "a a a", "repetition"),
        ("cancelled", "x", "failed"),
        ("eos", "", "parse_error"),
        ("length", "", "truncated"),
    ],
)
def test_finish_reason_and_parse_map_to_status(finish, text, status):
    page = next(pages(1, 1))
    ctx = RecordContext("ocr", SETTINGS, {"id": "m", "revision": None})
    record = answered_record(ctx, page, "p", Completion("r0", (), text, finish, 5, 1), OcrTask())
    assert record.status == status
    assert (record.error is None) == (status == "ok")
    assert record.text == text and record.tokens == {"prompt": 5, "generated": 1}


def test_record_round_trip_and_key():
    page = next(pages(1, 1))
    ctx = RecordContext("ocr", SETTINGS, {"id": "m", "revision": None})
    record = answered_record(ctx, page, "p", Completion("r0", (), "hi", "eos", 5, 1), OcrTask())
    again = PageRecord.from_dict(record.to_dict())
    assert again == record and again.key == record.key
    assert record.key == page_key(page, task="ocr", prompt="p", settings=SETTINGS, model=record.model)
    other = Settings(model="m", seed=1)
    assert record.key != page_key(page, task="ocr", prompt="p", settings=other, model=record.model)
    with pytest.raises(ValueError):
        PageRecord.from_dict({**record.to_dict(), "status": "weird"})


def test_parsed_defaults():
    assert Parsed({}).ok and Parsed({}).error is None


def test_listener_errors_are_not_mistaken_for_model_errors():
    """Catches a closed stdout (or full disk) being recorded as failed pages while the run carries on."""
    seen = []

    def on_event(event):
        if isinstance(event, runner.RecordDone):
            seen.append(event.record.page)
            if len(seen) == 2:
                raise BrokenPipeError("reader went away")

    fake = FakeRuntime()
    with pytest.raises(BrokenPipeError):
        runner.run(runtime=fake, task=OcrTask(), pages=pages(1, 6), settings=SETTINGS, on_event=on_event, batch_size=4)
    assert seen == [1, 2] and len(fake.batches) == 1
