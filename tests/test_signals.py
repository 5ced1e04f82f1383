"""Interruption and crash safety with real processes (`python tests/fakes.py`, a CLI on a slow scripted
runtime): SIGINT and SIGTERM leave every finished output whole and parseable and `--resume` finishes the
job without redoing a page; SIGKILL loses at most the pages in flight and the next `--resume` recovers.
The shield that holds a signal while an output is written is tested in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fakes import FakeRuntime, isolate, make_image, make_pdf, use_fake
from typer.testing import CliRunner

from dsvl2 import signals
from dsvl2.app import app
from dsvl2.errors import Interrupted

FAKE_CLI = [sys.executable, str(Path(__file__).parent / "fakes.py")]
TOTAL = 11  # pages in the corpus below
BATCH = 2


def make_inputs(root: Path) -> None:
    make_pdf(root / "in" / "a.pdf", 6)
    make_image(root / "in" / "b.png")
    make_pdf(root / "in" / "c" / "d.pdf", 4)


def read_records(out: Path) -> tuple[list[dict], int]:
    """Every record under `out` (a JSONL file, or a directory of .jsonl and .jsonl.partial files), and how
    many lines could not be parsed."""
    files = [out] if out.is_file() else [*out.rglob("*.jsonl"), *out.rglob("*.jsonl.partial")]
    records, torn = [], 0
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    return records, torn


def pages_of(records: list[dict]) -> Counter[tuple[str, int]]:
    return Counter((Path(r["source"]).name, r["page"]) for r in records)


def start(root: Path, output: str, log: Path, *extra: str, delay: str = "0.1") -> subprocess.Popen:
    env = {**os.environ, "HOME": str(root), "DSVL2_FAKE_DELAY": delay, "DSVL2_FAKE_LOG": str(log)}
    return subprocess.Popen(
        [*FAKE_CLI, "ocr", "in", "-o", output, "-b", str(BATCH), *extra],
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_records(out: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and len(read_records(out)[0]) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"fewer than {n} records after 30 s (exit code {proc.poll()})")


def requests(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def resume(root: Path, output: str) -> tuple[subprocess.CompletedProcess, int]:
    log = root / "resume.log"
    proc = start(root, output, log, "--resume", delay="0")
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), requests(log)


@pytest.mark.parametrize(
    ("sig", "output"), [(signal.SIGINT, "out/"), (signal.SIGTERM, "run.jsonl")], ids=["SIGINT-dir", "SIGTERM-file"]
)
def test_sigint_and_sigterm_keep_finished_pages_and_resume_redoes_none(tmp_path, sig, output):
    make_inputs(tmp_path)
    out = tmp_path / output.rstrip("/")
    proc = start(tmp_path, output, tmp_path / "first.log")
    wait_for_records(out, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted; rerun with --resume" in err and "Traceback" not in err
    done, torn = read_records(out)
    assert torn == 0  # a signal never cuts a record
    assert 3 <= len(done) < TOTAL and max(pages_of(done).values()) == 1
    manifest = json.loads(next(tmp_path.glob("**/*manifest.json")).read_text())
    assert manifest["interrupted"] is True

    again, asked = resume(tmp_path, output)
    assert again.returncode == 0, again.stderr
    assert asked == TOTAL - len(done)  # nothing finished is redone
    final, torn = read_records(out)
    assert torn == 0 and len(pages_of(final)) == TOTAL and max(pages_of(final).values()) == 1
    assert f"{len(done)} already done" in again.stderr
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize("output", ["out/", "run.jsonl"], ids=["dir", "file"])
def test_sigkill_loses_at_most_the_pages_in_flight_and_resume_recovers(tmp_path, output):
    make_inputs(tmp_path)
    out = tmp_path / output.rstrip("/")
    log = tmp_path / "first.log"
    proc = start(tmp_path, output, log)
    wait_for_records(out, 4, proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done, torn = read_records(out)
    assert torn <= 1  # at most the line being written when the process died
    in_flight = requests(log) - len(done)
    assert 0 <= in_flight <= BATCH, f"{in_flight} pages asked of the model but not on disk"

    again, asked = resume(tmp_path, output)
    assert again.returncode == 0, again.stderr
    assert asked == TOTAL - len(done)  # only the lost pages and those never reached
    final, torn = read_records(out)
    assert torn == 0 and len(pages_of(final)) == TOTAL and max(pages_of(final).values()) == 1


def test_an_unfinished_markdown_file_is_left_as_partial_and_the_earlier_file_untouched(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    fake = FakeRuntime()
    use_fake(monkeypatch, fake)
    make_pdf(Path("d.pdf"), 3)
    Path("out.md").write_text("earlier, complete\n")
    fake.enqueue("page one").enqueue(error=KeyboardInterrupt())
    result = CliRunner().invoke(app, ["ocr", "d.pdf", "-o", "out.md", "-b", "1"], catch_exceptions=False)
    assert result.exit_code == 130
    assert Path("out.md").read_text() == "earlier, complete\n"
    partial = Path("out.md.partial").read_text()
    assert "<!-- page 1 · d.pdf -->" in partial and "page one" in partial and "page 2" not in partial
    use_fake(monkeypatch, FakeRuntime())
    result = CliRunner().invoke(app, ["ocr", "d.pdf", "-o", "out.md"], catch_exceptions=False)
    assert result.exit_code == 0 and Path("out.md").read_text().count("<!-- page") == 3
    assert not Path("out.md.partial").exists()
    Path("broken.pdf").write_text("not a PDF")  # a --fail-fast stop is unfinished too
    result = CliRunner().invoke(app, ["ocr", "broken.pdf", "d.pdf", "-o", "out.md", "--fail-fast"])
    assert result.exit_code == 1 and Path("out.md").read_text().count("<!-- page") == 3
    assert "broken.pdf" in Path("out.md.partial").read_text()


@pytest.fixture
def installed():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signals.install()
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_shield_holds_a_signal_until_the_outermost_write_ends(installed, sig):
    """Catches an interrupt that lands in the middle of writing a record or renaming a finished file."""
    steps = []
    with pytest.raises(Interrupted, match=sig.name), signals.shielded():
        with signals.shielded():
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the handler has run by now, and held the signal
            steps.append("inner write finished")
        steps.append("outer write finished")
    assert steps == ["inner write finished", "outer write finished"]
    with pytest.raises(Interrupted):  # outside a shield the signal stops the run at once
        os.kill(os.getpid(), sig)
        time.sleep(1)
