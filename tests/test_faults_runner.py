"""The runner's limits and retries without the CLI: the page-time watchdog cancels through the runtime's
`cancel`, an out-of-memory batch is halved or stops the run, and a looping answer gets one retry whose
attempts the record keeps."""

from __future__ import annotations

import time

import pytest
from fakes import FakeRuntime
from test_pipelines import SETTINGS, pages, records, run

from dsvl2.model.requests import Completion
from dsvl2.pipelines import runner
from dsvl2.pipelines.base import Settings
from dsvl2.pipelines.limits import Deadlines, OutOfMemory, is_out_of_memory
from dsvl2.pipelines.ocr import OcrTask


def test_out_of_memory_is_recognised_by_type_and_by_the_allocators_words():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocation failure


def test_deadline_cancels_only_what_is_still_running_each_from_its_own_start():
    cancelled: list[str] = []
    deadlines = Deadlines(0.2, cancelled.append)
    deadlines.start("a")
    deadlines.start("b")
    assert not deadlines.late(Completion("a", (), "x", "eos", 1, 1))
    time.sleep(0.1)
    deadlines.start("c")  # handed to the runtime later: its limit runs from then
    time.sleep(0.15)
    assert cancelled == ["b"]
    time.sleep(0.15)
    deadlines.close()
    assert cancelled == ["b", "c"]
    assert deadlines.late(Completion("b", (), "", "cancelled", 1, 0))
    unlimited = Deadlines(None, cancelled.append)
    unlimited.start("d")
    assert not unlimited.late(Completion("d", (), "", "cancelled", 1, 0))


def test_page_timeout_fails_the_slow_page_only():
    fake = FakeRuntime()
    fake.enqueue("a").enqueue("slow", seconds=20).enqueue("c")
    start = time.monotonic()
    stats, events = run(fake, pages(1, 3), batch_size=3, page_timeout=0.2)
    assert time.monotonic() - start < 5
    assert [r.status for r in records(events)] == ["ok", "failed", "ok"]
    assert "page timeout" in records(events)[1].error and stats.failed == 1


def test_automatic_batch_halves_on_out_of_memory_and_reports_it():
    fake = FakeRuntime(fits=1)
    stats, events = run(fake, pages(1, 5), batch_size=4, adaptive_batch=True)
    assert [len(b) for b in fake.batches] == [4, 2, 1, 1, 1, 1, 1]
    assert [(e.old, e.new) for e in events if isinstance(e, runner.BatchResized)] == [(4, 2), (2, 1)]
    assert [r.page for r in records(events)] == [1, 2, 3, 4, 5] and stats.batch_size == 1


def test_fixed_batch_out_of_memory_raises_a_clear_error():
    with pytest.raises(OutOfMemory, match=r"a batch of 2 page\(s\) does not fit in memory"):
        run(FakeRuntime(fits=1), pages(1, 2), batch_size=2)


def test_retry_of_a_looping_answer_keeps_both_attempts():
    fake = FakeRuntime()
    fake.enqueue("x x x", finish_reason="repetition").enqueue("fine")
    settings = Settings(model="m", no_repeat_ngram=8, retry_repetition=True)
    events: list[runner.Event] = []
    runner.run(runtime=fake, task=OcrTask(), pages=pages(1, 1), settings=settings, on_event=events.append, batch_size=1)
    [record] = records(events)
    assert record.status == "ok" and [a["finish_reason"] for a in record.attempts] == ["repetition", "eos"]
    assert [r.sampling.temperature for r in fake.requests] == [0.0, 0.5]
    assert fake.requests[1].sampling.no_repeat_ngram == 8  # the retry keeps the guard
    assert SETTINGS.retry_repetition is False
