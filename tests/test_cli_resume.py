"""Resume, interruption and shards through the CLI: nothing finished is lost, nothing done is redone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import FakeRuntime, invoke, isolate, make_image, make_pdf, use_fake


@pytest.fixture
def runtime(monkeypatch, tmp_path):
    """Returns a function that installs a fresh FakeRuntime (one per simulated process)."""
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)

    def install(**kwargs) -> FakeRuntime:
        fake = FakeRuntime(lambda r: f"text of {r.id}", **kwargs)
        use_fake(monkeypatch, fake)
        return fake

    return install


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def make_corpus() -> None:
    make_pdf(Path("in/a.pdf"), 3)
    make_pdf(Path("in/sub/b.pdf"), 2)


def test_directory_resume_after_interrupt(runtime):
    make_corpus()
    fake = runtime()
    fake.enqueue("p1").enqueue("p2").enqueue(error=KeyboardInterrupt())
    result = invoke("ocr", "in", "-o", "out/", "-b", "1")
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "--resume" in result.stderr
    journal = Path("out/a.pdf.ocr.jsonl.partial")
    assert [r["page"] for r in jsonl(journal)] == [1, 2]  # finished pages are on disk
    assert not Path("out/a.pdf.ocr.md").exists()  # an incomplete document never looks complete
    manifest = json.loads(Path("out/ocr.manifest.json").read_text())
    assert manifest["interrupted"] and manifest["incomplete"] == [str(Path("in/a.pdf"))]

    fake = runtime()
    result = invoke("ocr", "in", "-o", "out/", "-b", "1", "--resume")
    assert result.exit_code == 0, result.stderr
    assert len(fake.requests) == 3  # a.pdf page 3 and both pages of b.pdf
    assert [(r["page"], r["text"]) for r in jsonl(Path("out/a.pdf.ocr.jsonl"))] == [
        (1, "p1"),
        (2, "p2"),
        (3, "text of r0"),
    ]
    assert not list(Path("out").rglob("*.partial"))
    assert Path("out/a.pdf.ocr.md").read_text().count("<!-- page") == 3
    assert len(jsonl(Path("out/sub/b.pdf.ocr.jsonl"))) == 2

    fake = runtime()
    result = invoke("ocr", "in", "-o", "out/", "--resume")
    assert result.exit_code == 0 and fake.load_args is None  # all done: the model is not even loaded
    assert "5 already done" in result.stderr


def test_directory_resume_redoes_failed_pages_only(runtime):
    make_corpus()
    fake = runtime()
    fake.enqueue("ok").enqueue(error=RuntimeError("boom"))
    assert invoke("ocr", "in", "-o", "out/", "-b", "1").exit_code == 1
    assert [r["status"] for r in jsonl(Path("out/a.pdf.ocr.jsonl"))] == ["ok", "failed", "ok"]
    fake = runtime()
    assert invoke("ocr", "in", "-o", "out/", "--resume").exit_code == 0
    assert len(fake.requests) == 1
    assert [r["status"] for r in jsonl(Path("out/a.pdf.ocr.jsonl"))] == ["ok", "ok", "ok"]


def test_without_resume_everything_is_redone(runtime):
    make_corpus()
    runtime()
    invoke("ocr", "in", "-o", "out/")
    fake = runtime()
    invoke("ocr", "in", "-o", "out/")
    assert len(fake.requests) == 5


def test_changed_settings_are_not_resumed(runtime):
    make_corpus()
    runtime()
    invoke("ocr", "in", "-o", "out/")
    fake = runtime()
    invoke("ocr", "in", "-o", "out/", "--resume", "--max-new-tokens", "99")
    assert len(fake.requests) == 5


def test_single_jsonl_resume_after_interrupt_and_torn_line(runtime):
    make_corpus()
    fake = runtime()
    fake.enqueue("p1").enqueue("p2").enqueue(error=KeyboardInterrupt())
    assert invoke("ocr", "in", "-o", "run.jsonl", "-b", "1").exit_code == 130
    assert [r["page"] for r in jsonl(Path("run.jsonl"))] == [1, 2]
    with open("run.jsonl", "a") as f:
        f.write('{"schema_version": "1.0", "sour')  # a record torn by a hard kill
    fake = runtime()
    result = invoke("ocr", "in", "-o", "run.jsonl", "--resume")
    assert result.exit_code == 0, result.stderr
    assert "unreadable" in result.stderr
    records = jsonl(Path("run.jsonl"))
    assert [(Path(r["source"]).name, r["page"]) for r in records] == [
        ("a.pdf", 1),
        ("a.pdf", 2),
        ("a.pdf", 3),
        ("b.pdf", 1),
        ("b.pdf", 2),
    ]
    assert len(fake.requests) == 3


def test_single_jsonl_resume_replaces_failed_records(runtime):
    make_corpus()
    fake = runtime()
    fake.enqueue("ok").enqueue(error=RuntimeError("boom"))
    invoke("ocr", "in", "-o", "run.jsonl", "-b", "1")
    runtime()
    assert invoke("ocr", "in", "-o", "run.jsonl", "--resume").exit_code == 0
    records = jsonl(Path("run.jsonl"))
    assert len(records) == 5 and all(r["status"] == "ok" for r in records)


def test_single_json_resume_merges(runtime):
    make_corpus()
    runtime()
    invoke("ocr", "in", "--pages", "1", "-o", "run.json")
    fake = runtime()
    assert invoke("ocr", "in", "-o", "run.json", "--resume").exit_code == 0
    assert len(fake.requests) == 3
    records = json.loads(Path("run.json").read_text())
    assert sorted((Path(r["source"]).name, r["page"]) for r in records) == [
        ("a.pdf", 1),
        ("a.pdf", 2),
        ("a.pdf", 3),
        ("b.pdf", 1),
        ("b.pdf", 2),
    ]


def test_resume_needs_a_records_output(runtime):
    make_corpus()
    runtime()
    assert invoke("ocr", "in", "-o", "run.md", "--resume").exit_code == 2


def test_shards_partition_documents_deterministically(runtime):
    for i in range(8):
        make_image(Path(f"in/d{i}.png"))
    seen = []
    for shard in ("1/3", "2/3", "3/3"):
        runtime()
        assert invoke("ocr", "in", "--shard", shard, "-o", "out/").exit_code == 0
        seen.append(
            sorted(
                r["source"]
                for r in json.loads(Path(f"out/ocr.shard-{shard[0]}-of-3.manifest.json").read_text())["inputs"]
            )
        )
    flat = [s for part in seen for s in part]
    assert sorted(flat) == sorted(str(Path(f"in/d{i}.png")) for i in range(8))  # every document exactly once
    assert all(seen)  # 8 documents over 3 shards: none empty for this corpus
    runtime()
    invoke("ocr", "in", "--shard", "2/3", "-o", "again/")
    again = json.loads(Path("again/ocr.shard-2-of-3.manifest.json").read_text())
    assert sorted(r["source"] for r in again["inputs"]) == seen[1]


FAKE_CLI = [sys.executable, str(Path(__file__).parent / "fakes.py")]


def test_sigterm_in_a_real_process_keeps_finished_pages_and_resume_completes(tmp_path):
    make_pdf(tmp_path / "in" / "many.pdf", 12)
    env = {**os.environ, "DSVL2_FAKE_DELAY": "0.1", "HOME": str(tmp_path)}
    args = [*FAKE_CLI, "ocr", "in", "-o", "out/", "-b", "1"]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    journal = tmp_path / "out" / "many.pdf.ocr.jsonl.partial"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("\n") < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    done = jsonl(journal)
    assert 2 <= len(done) < 12 and [r["page"] for r in done] == list(range(1, len(done) + 1))

    env["DSVL2_FAKE_DELAY"] = "0"
    again = subprocess.run(
        [*args, "--resume"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    assert [r["page"] for r in jsonl(tmp_path / "out" / "many.pdf.ocr.jsonl")] == list(range(1, 13))
    assert f"{len(done)} already done" in again.stderr and not journal.exists()


def test_closed_stdout_pipe_stops_quietly(tmp_path):
    make_pdf(tmp_path / "many.pdf", 30)
    env = {**os.environ, "HOME": str(tmp_path), "DSVL2_FAKE_DELAY": "0.05"}  # still running when the reader quits
    proc = subprocess.Popen(
        [*FAKE_CLI, "ocr", "many.pdf", "-f", "jsonl", "-b", "1"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=30)
    assert json.loads(first)["page"] == 1
    assert proc.returncode == 130 and "Traceback" not in err and "output was closed" in err
