"""`--server` against a real `dsvl2 serve` subprocess with the tiny parity checkpoint: the records equal the
local runtime's (greedy), the record names the server, several URLs share the pages, a server killed
mid-run leaves error records, and `--resume` against a restarted server finishes every page exactly once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from parity import PARITY_DIR, checkpoint_dir
from servers import Server, free_port

CHECKPOINT = checkpoint_dir("tiny-mha")
IMAGES = ["receipt_narrow_180x420.png", "chart_strip_500x200.png", "tiny_50x40.png", "photo_square_256x256.png"]
SAME = ("source", "page", "task", "prompt", "text", "result", "status", "error", "tokens", "settings")


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pages")
    for name in IMAGES:
        shutil.copy(PARITY_DIR / "images" / name, folder / name)
    return folder


def dsvl2(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsvl2", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def by_page(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(Path(r["source"]).name, r["page"]): r for r in rows}


def test_records_equal_the_local_runtime(pages: Path, tmp_path: Path):
    server = Server(CHECKPOINT)
    other = server.url.replace("127.0.0.1", "localhost")  # a second URL (the same server, to save a model load)
    try:
        common = ("ocr", str(pages), "--max-new-tokens", "10", "-f", "jsonl", "-q")
        local = dsvl2(*common, "--model", str(CHECKPOINT), cwd=tmp_path)
        remote = dsvl2(*common, "--server", f"{server.url},{other}/v1", "--max-concurrent", "4", cwd=tmp_path)
        import dsvl2 as api

        from_python = by_page(list(api.ocr(str(pages), server=server.url, max_new_tokens=10)))
    finally:
        server.stop()
    assert local.returncode == remote.returncode == 0, remote.stderr
    mine, theirs = by_page(records(local.stdout)), by_page(records(remote.stdout))
    assert mine.keys() == theirs.keys() and len(mine) == len(IMAGES)
    for key, record in mine.items():
        assert {k: theirs[key][k] for k in SAME} == {k: record[k] for k in SAME}, key
        # the same checkpoint behind the server: the same fingerprint, so --resume treats them alike
        assert theirs[key]["model"]["fingerprint"] == record["model"]["fingerprint"]
        assert {k: from_python[key][k] for k in SAME} == {k: record[k] for k in SAME}, key  # server= in the API
    servers = {r["model"]["server"] for r in theirs.values()}
    assert servers == {server.url, other}, "round-robin should have used both URLs"


def test_a_killed_server_leaves_error_records_and_resume_finishes_each_page_once(pages: Path, tmp_path: Path):
    port = free_port()
    server = Server(CHECKPOINT, port=port)
    out = tmp_path / "out.jsonl"
    args = ("ocr", str(pages), "--server", server.url, "--max-new-tokens", "60", "--max-concurrent", "1",
            "--max-retries", "0", "--request-timeout", "30", "-o", str(out), "-q")
    client = subprocess.Popen([sys.executable, "-m", "dsvl2", *args], cwd=tmp_path, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out.exists() and records(out.read_text())):
            time.sleep(0.05)
        server.kill()  # mid-run: some pages answered, the rest meet a dead server
        _, stderr = client.communicate(timeout=120)
    finally:
        server.stop()
        if client.poll() is None:
            client.kill()
    first = records(out.read_text())
    assert client.returncode == 1, stderr
    statuses = [r["status"] for r in first]
    assert "failed" in statuses and statuses.count("failed") < len(IMAGES), statuses
    assert all("127.0.0.1" in r["error"] for r in first if r["status"] == "failed")
    done_before = {(Path(r["source"]).name, r["page"]) for r in first if r["status"] != "failed"}

    restarted = Server(CHECKPOINT, port=port)
    try:
        again = dsvl2(*args, "--resume", cwd=tmp_path)
        served = restarted.get("/health")[1]["engine"]
    finally:
        restarted.stop()
    assert again.returncode == 0, again.stderr
    final = records(out.read_text())
    keys = [(Path(r["source"]).name, r["page"]) for r in final]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == len(IMAGES), keys
    assert all(r["status"] != "failed" for r in final)
    # only the pages that had failed were asked again: the restarted engine answered that many requests
    redone = {(Path(r["source"]).name, r["page"]) for r in final} - done_before
    assert len(redone) == len(IMAGES) - len(done_before)
    assert served["completed"] == len(redone), served
    assert restarted.stderr().count('"POST /v1/chat/completions HTTP/1.1" 200') == len(redone)  # access log


def test_an_unreachable_server_is_one_line_and_exit_2(pages: Path, tmp_path: Path):
    result = dsvl2("ocr", str(pages), "--server", f"http://127.0.0.1:{free_port()}", "--max-retries", "0",
                   cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: server:") and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_a_quantised_server_answers_as_the_local_quantised_runtime(tmp_path: Path):
    """`dsvl2 serve --quantize int8` is the local `--quantize int8`: same answers, and the records say int8."""
    shutil.copy(PARITY_DIR / "images" / "tiny_50x40.png", tmp_path / "p.png")
    server = Server(CHECKPOINT, "--quantize", "int8")
    try:
        common = ("ocr", "p.png", "--max-new-tokens", "8", "-f", "jsonl", "-q")
        remote = dsvl2(*common, "--server", server.url, cwd=tmp_path)
    finally:
        server.stop()
    local = dsvl2(*common, "--model", str(CHECKPOINT), "--quantize", "int8", cwd=tmp_path)
    assert local.returncode == remote.returncode == 0, remote.stderr + local.stderr
    [mine], [theirs] = records(local.stdout), records(remote.stdout)
    assert theirs["settings"]["quantize"] == mine["settings"]["quantize"] == "int8"
    assert {k: theirs[k] for k in SAME} == {k: mine[k] for k in SAME}


def test_a_model_that_cannot_load_stops_the_server_with_one_line_and_exit_2(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "dsvl2", "serve", "--model", str(tmp_path / "nowhere"),
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "model not found" in errors[0], result.stderr
