"""The Python API on the tiny parity checkpoint: every task gives the CLI's records (same path, same
options, same schema); one loaded runtime serves many calls; bad inputs are error records and bad options
raise OptionError naming the keyword; DataFrames flatten records per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import isolate, make_image, make_pdf
from parity import PARITY_DIR, checkpoint_dir
from PIL import Image
from typer.testing import CliRunner

import dsvl2
from dsvl2.app import app

CKPT = checkpoint_dir("tiny-mha")
FAST = {"max_new_tokens": 3, "dpi": 36, "max_side": 400}
TASK_OPTIONS = {
    "ocr": {},
    "table": {},
    "chart": {},
    "ground": {"query": ["the title", "the logo"]},
    "ask": {"prompt": ["What is this?", "Who wrote it?"]},
}
SAME = ("source", "page", "task", "prompt", "text", "result", "status", "error", "settings", "model", "tokens")


@pytest.fixture(scope="module")
def runtime():
    assert (PARITY_DIR / "checkpoints" / "tiny-mha").is_dir(), f"tiny-mha checkpoint not found under {PARITY_DIR}"
    return dsvl2.load(str(CKPT))


@pytest.fixture
def docs(monkeypatch, tmp_path) -> Path:
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    make_pdf(Path("docs/report.pdf"), 2)
    make_image(Path("docs/chart.png"), (120, 80), "navy")
    Path("docs/broken.pdf").write_bytes(b"%PDF-1.7 not really")
    return Path("docs")


def _cli_flags(options: dict) -> list[str]:
    flags = []
    for name, value in options.items():
        for v in value if isinstance(value, list) else [value]:
            flags += [f"--{name.replace('_', '-')}", str(v)]
    return flags


@pytest.mark.parametrize("task", list(TASK_OPTIONS))
def test_every_task_gives_the_clis_records(runtime, docs: Path, task: str) -> None:
    cli = CliRunner().invoke(
        app,
        [task, str(docs), "--model", str(CKPT), "-f", "jsonl", *_cli_flags(TASK_OPTIONS[task]), *_cli_flags(FAST)],
        catch_exceptions=False,
    )
    assert cli.exit_code in (0, 1), cli.stderr
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    got = list(getattr(dsvl2, task)(docs, runtime=runtime, **TASK_OPTIONS[task], **FAST))
    n_prompts = len(next(iter(TASK_OPTIONS[task].values()), [None]))
    assert len(got) == len(expected) == 4 * n_prompts  # 3 pages and a broken PDF
    for api_record, cli_record in zip(got, expected, strict=True):
        assert {k: api_record[k] for k in SAME} == {k: cli_record[k] for k in SAME}
    assert any(r["status"] == "failed" and r["source"].endswith("broken.pdf") for r in got)


def test_one_runtime_serves_many_calls_and_inputs_of_every_kind(runtime, docs: Path) -> None:
    page = Image.new("RGB", (90, 60), "white")
    first = list(dsvl2.ocr(page, runtime=runtime, **FAST))
    again = list(dsvl2.ocr([page, (docs / "chart.png").read_bytes()], runtime=runtime, **FAST))
    assert [r["source"] for r in again] == ["image-1", "bytes-2"]
    assert first[0]["text"] == again[0]["text"] and first[0]["sha256"] == again[0]["sha256"]
    from_path = list(dsvl2.ocr(docs / "chart.png", runtime=runtime, **FAST))
    assert from_path[0]["sha256"] == again[1]["sha256"] and from_path[0]["text"] == again[1]["text"]


def test_bad_inputs_are_error_records_never_exceptions(runtime, docs: Path) -> None:
    got = list(dsvl2.ocr([docs / "missing.pdf", b"not a document", docs / "broken.pdf"], runtime=runtime, **FAST))
    assert [r["status"] for r in got] == ["failed"] * 3
    assert got[0]["error"] == "no such file or directory"
    assert all(r["error"] for r in got)


@pytest.mark.parametrize(
    ("call", "option", "message"),
    [
        (lambda: dsvl2.ocr("x.pdf", top_p=2), "top_p", "top_p must be in (0, 1]"),
        (lambda: dsvl2.ocr("x.pdf", pages="3-1"), "pages", "pages is not valid"),
        (lambda: dsvl2.ocr("x.pdf", device="tpu"), "device", "device must be auto, cpu, cuda or cuda:N"),
        (lambda: dsvl2.ocr("x.pdf", output="out/"), "output", "output is a command-line option"),
        (lambda: dsvl2.ground("x.pdf", query="q", annotate="boxes/"), "annotate", "annotate is a command-line option"),
        (lambda: dsvl2.ocr("x.pdf", ray="local"), "ray", "ray is for the command line"),
        (lambda: dsvl2.ocr("x.pdf", server="ftp://host"), "server", "server must be http:// or https:// URLs"),
        (lambda: dsvl2.ground("x.pdf"), "query", "query is required"),
        (lambda: dsvl2.ask("x.pdf"), "prompt", "prompt is required"),
        (lambda: dsvl2.run("ocr", "x.pdf", colour="red"), "colour", "colour is not an option"),
    ],
)
def test_bad_options_raise_at_the_call_naming_the_keyword(call, option: str, message: str) -> None:
    with pytest.raises(dsvl2.OptionError) as caught:
        call()
    assert caught.value.option == option and str(caught.value).startswith(message)


def test_a_runtime_and_model_options_together_are_refused(runtime) -> None:
    with pytest.raises(dsvl2.OptionError, match="dtype comes from runtime="):
        dsvl2.ocr("x.pdf", runtime=runtime, dtype="bfloat16")


def test_dataframes_flatten_each_task(runtime, docs: Path) -> None:
    records = list(dsvl2.ask(docs / "chart.png", prompt=["a?", "b?"], runtime=runtime, **FAST))
    frame = dsvl2.to_dataframe(records)
    assert list(frame["prompt"]) == ["a?", "b?"] and list(frame["answer"]) == [r["result"]["answer"] for r in records]
    table = {"task": "table", "source": "s", "page": 1, "status": "ok", "result": {"tables": [
        {"index": 0, "format": "markdown", "header": ["a", "b"], "rows": [["1", "2"], ["3", "4"]], "n_columns": 2,
         "status": "ok", "raw": "", "notes": []}]}}  # fmt: skip
    row = dsvl2.to_dataframe([table]).iloc[0]
    assert row["n_tables"] == 1 and row["source"] == "s"
    full = records[0] | table | {"prompt": "p", "text": "t", "model": {}, "settings": {}, "sha256": None}
    [frame] = dsvl2.tables([full])
    assert list(frame.columns) == ["a", "b"] and frame.values.tolist() == [["1", "2"], ["3", "4"]]
    assert frame.attrs == {"source": "s", "page": 1, "index": 1}


def test_help_explains_the_api() -> None:
    assert "pages=" in dsvl2.ocr.__doc__ and "runtime" in dsvl2.ocr.__doc__
    assert set(dsvl2.TASKS) == {"ocr", "table", "chart", "ground", "ask"}
