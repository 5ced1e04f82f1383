"""Model-output faults and resource limits through the CLI on a scripted runtime: answers that never end,
loop, come back empty, carry special tokens or broken grounding all end in a valid record; the repetition
guard reaches the runtime per task and its optional retry is recorded; `--page-timeout` stops a slow page
and the batch goes on; an out-of-memory batch is halved (automatic size) or stops the run with a clear
error (fixed size)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fakes import FakeRuntime, factory_for, identify_for, invoke, isolate, jsonl, make_image, make_pdf
from parity import checkpoint_dir
from test_writers import violations

from dsvl2 import backend
from dsvl2.pipelines.base import RETRY_TEMPERATURE, RETRY_TOP_P
from dsvl2.pipelines.schema import record_schema
from dsvl2.pipelines.tasks import TASKS

EXTRA = {"ground": ["--query", "the thing"], "ask": ["--prompt", "What is it?"]}
FAULTS = {
    # fault: (scripted text, finish reason, expected status per task (default, then overrides))
    "never-eos": ("| a | b |\n|---|---|\n| 1 | 2 |\n| 1 | 2 |", "length", {"*": "truncated"}),
    "repetition": ("la la la la la la", "repetition", {"*": "repetition"}),
    "empty": ("", "eos", {"*": "parse_error", "table": "ok"}),  # an empty answer is "no tables"
    "special-tokens": (
        "<｜begin▁of▁sentence｜><|User|>: <image>\nhi<|Assistant|><｜end▁of▁sentence｜><｜▁pad▁｜>",
        "eos",
        # chat-template junk is neither a table nor words saying there is none
        {"*": "ok", "table": "parse_error", "chart": "parse_error", "ground": "parse_error"},
    ),
    "malformed-grounding": (
        "<|ref|>x<|/ref|><|det|>[[1, 2, three, 4], [5, 6], [[[7]]], __import__('os')<|/det|><|det|>[[",
        "eos",
        {"*": "ok", "table": "parse_error", "chart": "parse_error", "ground": "parse_error"},
    ),
}


@pytest.mark.parametrize("task", ["ocr", "table", "chart", "ground", "ask"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_output_fault_ends_in_a_valid_record(fake, task, fault):
    text, reason, statuses = FAULTS[fault]
    make_image(Path("p.png"))
    fake.enqueue(text, finish_reason=reason)
    result = invoke(task, "p.png", "-f", "jsonl", *EXTRA.get(task, []))
    [record] = jsonl(result.stdout)
    expected = statuses.get(task, statuses["*"])
    assert record["status"] == expected, (record["status"], record["error"])
    assert record["text"] == text  # the raw answer is kept verbatim, whatever it holds
    assert violations(record, record_schema()) == []
    assert result.exit_code == (1 if expected in ("failed", "parse_error") else 0)
    if expected != "ok":
        assert record["error"]


def test_malformed_grounding_keeps_every_box_and_executes_nothing(fake):
    make_image(Path("p.png"))
    fake.enqueue(FAULTS["malformed-grounding"][0] + "<|det|>[[__import__('pathlib').Path('PWNED').touch()]]<|/det|>")
    record = jsonl(invoke("ground", "p.png", "--query", "x", "-f", "jsonl").stdout)[0]
    assert [b["status"] for b in record["result"]["boxes"]] == ["invalid"] * len(record["result"]["boxes"])
    assert len(record["result"]["boxes"]) >= 3 and not Path("PWNED").exists()


@pytest.mark.parametrize("task", list(TASKS))
def test_the_repetition_guard_reaches_the_runtime_per_task(fake, task):
    make_image(Path("p.png"))
    invoke(task, "p.png", "-f", "jsonl", *EXTRA.get(task, []))
    sampling = fake.requests[0].sampling
    assert (sampling.no_repeat_ngram, sampling.repeat_window) == TASKS[task].repetition_guard


def test_repetition_guard_option_sets_and_disables_it(fake):
    make_image(Path("p.png"))
    invoke("ocr", "p.png", "-f", "jsonl", "--repetition-guard", "500")
    invoke("ocr", "p.png", "-f", "jsonl", "--repetition-guard", "0")
    first, off = (r.sampling for r in fake.requests)
    assert (first.no_repeat_ngram, first.repeat_window) == (500, 2000)  # the window grows with n
    assert off.no_repeat_ngram == 0
    assert invoke("ocr", "p.png", "--repetition-guard", "-1").exit_code == 2


def test_a_looping_answer_is_retried_with_other_sampling_and_both_attempts_recorded(fake):
    make_pdf(Path("d.pdf"), 3)
    fake.enqueue("one").enqueue("loop loop loop", finish_reason="repetition").enqueue("three")
    fake.enqueue("two, for real")
    result = invoke("ocr", "d.pdf", "-f", "jsonl", "--retry-repetition", "--seed", "7")
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [(r["page"], r["status"], r["text"]) for r in records] == [
        (1, "ok", "one"),
        (2, "ok", "two, for real"),
        (3, "ok", "three"),
    ]
    first, retry = records[1]["attempts"]
    assert (first["finish_reason"], first["text"], first["sampling"]) == (
        "repetition",
        "loop loop loop",
        {"temperature": 0.0, "top_p": 1.0, "seed": 7},
    )
    assert retry["finish_reason"] == "eos"
    assert retry["sampling"] == {"temperature": RETRY_TEMPERATURE, "top_p": RETRY_TOP_P, "seed": 8}
    assert records[0]["attempts"] is None and records[0]["settings"]["retry_repetition"] is True
    assert fake.requests[3].sampling.temperature == RETRY_TEMPERATURE  # what the runtime was really asked
    assert all(violations(r, record_schema()) == [] for r in records)


def test_a_retry_that_loops_again_stays_repetition_and_without_the_option_nothing_is_retried(fake):
    make_image(Path("p.png"))
    fake.enqueue("a a a", finish_reason="repetition").enqueue("b b b", finish_reason="repetition")
    [record] = jsonl(invoke("ocr", "p.png", "-f", "jsonl", "--retry-repetition").stdout)
    assert record["status"] == "repetition" and record["text"] == "b b b" and len(record["attempts"]) == 2
    fake.enqueue("c c c", finish_reason="repetition")
    result = invoke("ocr", "p.png", "-f", "jsonl")
    [record] = jsonl(result.stdout)
    assert record["status"] == "repetition" and record["attempts"] is None and len(fake.requests) == 3
    assert result.exit_code == 0 and "repetition" in result.stderr  # a warning, not a failure


def test_page_timeout_cancels_a_slow_page_and_the_batch_goes_on(fake):
    make_pdf(Path("d.pdf"), 3)
    fake.enqueue("fast").enqueue("a very slow answer", seconds=30).enqueue("fast too")
    start = time.monotonic()
    result = invoke("ocr", "d.pdf", "-f", "jsonl", "-b", "1", "--page-timeout", "0.3")
    assert time.monotonic() - start < 10  # cancelled, not waited out
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["status"] for r in records] == ["ok", "failed", "ok"]
    assert records[1]["error"].startswith("page timeout: no complete answer within 0.3 s (--page-timeout)")
    assert records[1]["text"] == "a very slow answer"[: len("a very slow answer") // 2]  # the partial answer
    assert fake.cancelled == {fake.requests[1].id}
    assert invoke("ocr", "d.pdf", "--page-timeout", "0").exit_code == 2


def test_page_timeout_asks_the_runtime_to_cancel_and_a_full_answer_that_still_arrives_counts(fake):
    """The limit is enforced through `Runtime.cancel`; a runtime that cannot stop a request in time answers
    in full, and a complete answer is kept rather than thrown away."""

    class NoCancel(FakeRuntime):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[str] = []

        def cancel(self, request_id: str) -> None:
            self.asked.append(request_id)  # noted, not honoured

    slow = NoCancel()
    slow.enqueue("late", seconds=0.4).enqueue("fine")
    make_pdf(Path("d.pdf"), 2)
    backend.runtime_factory = factory_for(slow)
    backend.identify = identify_for(slow)
    records = jsonl(invoke("ocr", "d.pdf", "-f", "jsonl", "-b", "1", "--page-timeout", "0.2").stdout)
    assert [(r["status"], r["text"]) for r in records] == [("ok", "late"), ("ok", "fine")]
    assert slow.asked == [slow.requests[0].id]


def test_out_of_memory_with_an_automatic_batch_size_backs_off_and_continues(fake):
    fake.max_batch_size, fake.fits = 8, 2
    make_pdf(Path("d.pdf"), 9)
    result = invoke("ocr", "d.pdf", "-f", "jsonl", "-o", "run.jsonl")
    assert result.exit_code == 0, result.stderr
    assert [len(b) for b in fake.batches] == [8, 4, 2, 2, 2, 2, 1]
    assert "out of memory in a batch of 8; going on with batches of 4" in result.stderr
    assert [r["page"] for r in jsonl(Path("run.jsonl").read_text())] == list(range(1, 10))
    manifest = json.loads(Path("run.jsonl.manifest.json").read_text())
    assert manifest["runtime"]["batch_size"] == 8 and manifest["runtime"]["final_batch_size"] == 2


def test_a_page_that_does_not_fit_even_alone_fails_alone(fake):
    fake.max_batch_size, fake.fits = 2, 0
    make_image(Path("p.png"))
    result = invoke("ocr", "p.png", "-f", "jsonl")
    [record] = jsonl(result.stdout)
    assert result.exit_code == 1 and record["status"] == "failed"
    assert record["error"].startswith("out of memory even alone (RuntimeError: CUDA out of memory")


def test_out_of_memory_with_a_fixed_batch_size_stops_with_a_clear_error_and_keeps_finished_pages(fake):
    make_pdf(Path("d.pdf"), 6)
    fake.default = lambda r: "ok"
    fake.fits = 4
    original = fake.step

    def grow():  # the first step fits; later, larger pages do not
        fake.fits = 4 if len(fake.batches) == 0 else 1
        return original()

    fake.step = grow
    result = invoke("ocr", "d.pdf", "-b", "3", "-o", "run.jsonl")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: out of memory: a batch of 3 page(s) does not fit in memory (RuntimeError: CUDA out of memory"
        )
    )
    assert "--batch-size" in result.stderr
    assert [r["page"] for r in jsonl(Path("run.jsonl").read_text())] == [1, 2, 3]  # finished pages kept
    manifest = json.loads(Path("run.jsonl.manifest.json").read_text())
    assert manifest["error"].startswith("a batch of 3 page(s) does not fit") and not manifest["interrupted"]


def test_memory_error_counts_as_out_of_memory(fake):
    make_pdf(Path("d.pdf"), 2)
    fake.max_batch_size = 2
    fake.enqueue(error=MemoryError())  # bound to page 1, so it fails again alone
    result = invoke("ocr", "d.pdf", "-f", "jsonl")
    assert [len(b) for b in fake.batches] == [2, 1, 1] and result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["status"] for r in records] == ["failed", "ok"]
    assert records[0]["error"] == "out of memory even alone (MemoryError: )"


def test_page_timeout_stops_the_real_engine_through_its_cancel(monkeypatch, tmp_path):
    """The seam end to end: the watchdog calls model.engine.Engine.cancel on the tiny parity checkpoint."""
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    make_image(Path("p.png"), size=(40, 30))
    model = str(checkpoint_dir("tiny-mha"))
    args = ["--model", model, "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3000"]
    start = time.monotonic()
    result = invoke("ocr", "p.png", "-f", "jsonl", *args, "--repetition-guard", "0", "--page-timeout", "0.5")
    [record] = jsonl(result.stdout)
    assert record["status"] == "failed" and record["error"].startswith("page timeout: no complete answer within 0.5 s")
    assert result.exit_code == 1 and time.monotonic() - start < 60
