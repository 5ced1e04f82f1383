"""End to end: every command through the real runtime on a tiny parity checkpoint, over a generated
multi-page PDF and a directory tree with a name clash; and `dsvl2 ask` reproducing the reference's greedy
text for a parity case's conversation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import isolate, make_image, make_pdf
from parity import PARITY_DIR, checkpoint_dir, load_cases, require
from typer.testing import CliRunner

from dsvl2.app import app

CKPT = checkpoint_dir("tiny-mha") if (PARITY_DIR / "checkpoints" / "tiny-mha").is_dir() else None
FAST = ("--max-new-tokens", "3", "--dpi", "36", "--max-side", "400")


@pytest.fixture
def workdir(monkeypatch, tmp_path) -> Path:
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    make_pdf(Path("docs/report.pdf"), 3)
    make_pdf(Path("docs/a/x.pdf"), 1, label="alpha")
    make_pdf(Path("docs/b/x.pdf"), 1, label="beta")
    make_image(Path("docs/b/chart.png"), (120, 80), "navy")
    return tmp_path


def run(*args: str):
    assert CKPT is not None, f"tiny-mha checkpoint not found under {PARITY_DIR}"
    return CliRunner().invoke(app, [*args, "--model", str(CKPT), *FAST], catch_exceptions=False)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("command", "extra"),
    [("ocr", ()), ("table", ()), ("chart", ()), ("ground", ("--query", "the title")),
     ("ask", ("--prompt", "What is this?", "--prompt", "Who wrote it?"))],
)
def test_every_command_on_a_real_checkpoint(workdir: Path, command: str, extra: tuple[str, ...]) -> None:
    result = run(command, "docs", *extra, "--format", "jsonl", "-o", "out.jsonl")
    assert result.exit_code in (0, 1), result.stderr  # 1: random text may not parse as a table or chart
    got = records(workdir / "out.jsonl")
    prompts = 2 if command == "ask" else 1
    pages = {(r["source"], r["page"]) for r in got}
    assert len(got) == 6 * prompts and len(pages) == 6, [(r["source"], r["page"]) for r in got]
    assert {Path(s).as_posix() for s, _ in pages} == {"docs/report.pdf", "docs/a/x.pdf", "docs/b/x.pdf",
                                                        "docs/b/chart.png"}
    for r in got:
        assert r["task"] == command and r["model"]["id"] == str(CKPT)
        assert r["status"] != "failed", r["error"]
        assert r["tokens"]["generated"] >= 1 and r["tokens"]["prompt"] > 400  # image tokens went in


def test_directory_output_keeps_the_tree(workdir: Path) -> None:
    result = run("ocr", "docs", "-o", "out/")
    assert result.exit_code == 0, result.stderr
    written = sorted(p.relative_to(workdir / "out").as_posix() for p in (workdir / "out").rglob("*") if p.is_file())
    assert any(w.startswith("a/x") for w in written) and any(w.startswith("b/x") for w in written), written


def test_ask_reproduces_reference_greedy_text(monkeypatch, tmp_path) -> None:
    """`dsvl2 ask IMAGE --prompt TEXT` with temperature 0 prints the reference's greedy answer for a parity
    case whose conversation is exactly '<image>\\n' + TEXT."""
    isolate(monkeypatch, tmp_path)
    cases = [c for c in require(load_cases(), "parity cases")
             if c.batch_size == 1 and len(c.json["conversations"][0]) == 2]
    checked = 0
    for case in cases:
        user = case.json["conversations"][0][0]
        if len(user.get("images", [])) != 1 or not user["content"].startswith("<image>\n"):
            continue
        for ckpt in case.checkpoints():
            steps = case.outputs(ckpt)["generated_ids"].shape[1]
            result = CliRunner().invoke(app, [
                "ask", str(PARITY_DIR / "images" / user["images"][0]), "--prompt", user["content"][len("<image>\n"):],
                "--model", str(checkpoint_dir(ckpt)), "--temperature", "0", "--max-new-tokens", str(steps), "-q",
            ], catch_exceptions=False)
            assert result.exit_code == 0, result.stderr
            assert result.stdout == case.json["model_runs"][ckpt]["generated_text"][0] + "\n", (case.name, ckpt)
            checked += 1
    assert checked >= 3, "no single-image parity case to check"
