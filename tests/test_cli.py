"""CliRunner over every command and option family, on a scripted fake runtime: formats, outputs, exit codes,
inputs (directories, stdin, pages, passwords), batching and failure isolation. Each task's own outputs (tables,
charts, boxes, answers) are in test_cli_tasks.py; resume, shards and interruption in test_cli_resume.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from fakes import invoke, jsonl, make_image, make_pdf

from dsvl2 import backend
from dsvl2.model.errors import InputError, ModelNotFoundError
from dsvl2.pipelines import ocr
from dsvl2.pipelines.ask import AskTask
from dsvl2.pipelines.ocr import OcrTask
from dsvl2.pipelines.table import TableTask

TABLE = "| Item | Qty |\n|---|---|\n| Widget | 4 |\n| Gear | 1 |"


def test_help_for_every_command_has_examples(fake):
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("ocr", "table", "chart", "ground", "ask", "schema", "models"):
        assert command in result.stdout
    for command in ("ocr", "table", "chart", "ground", "ask"):
        help_text = invoke(command, "--help").stdout
        assert "Examples" in help_text and f"dsvl2 {command}" in help_text
        for option in ("--pages", "--resume", "--shard", "--model", "--max-new-tokens", "--format", "--output"):
            assert option in help_text, (command, option)


def test_ocr_markdown_per_page_with_markers_and_default_prompt(fake):
    make_pdf(Path("doc.pdf"), 3)
    fake.enqueue("# One").enqueue("Two").enqueue("Three")
    result = invoke("ocr", "doc.pdf")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert [out.index(f"<!-- page {i} · doc.pdf -->") for i in (1, 2, 3)] == sorted(
        out.index(f"<!-- page {i} · doc.pdf -->") for i in (1, 2, 3)
    )
    assert "# One" in out and "Three" in out
    assert fake.prompts == [ocr.DEFAULT_PROMPT] * 3
    assert all(r.conversation[0].content.startswith("<image>\n") for r in fake.requests)
    assert all(len(r.images) == 1 for r in fake.requests)
    assert "3 ok" in result.stderr  # summary on stderr, data on stdout


@pytest.mark.parametrize("fmt", ["json", "jsonl", "md", "csv", "text"])
def test_every_format_to_stdout(fake, fmt):
    make_pdf(Path("doc.pdf"), 2)
    fake.default = TABLE
    result = invoke("table", "doc.pdf", "--format", fmt)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    if fmt == "json":
        records = json.loads(out)
        assert [r["page"] for r in records] == [1, 2]
        assert records[0]["result"]["tables"][0]["rows"] == [["Widget", "4"], ["Gear", "1"]]
    elif fmt == "jsonl":
        assert [r["page"] for r in jsonl(out)] == [1, 2]
    elif fmt == "md":
        assert out.count("| Widget | 4 |") == 2 and "**Table 1**" in out
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert {(r["page"], r["header"], r["value"]) for r in rows} >= {("1", "Item", "Widget"), ("2", "Qty", "1")}
    else:
        assert out.count("==> doc.pdf (page") == 2 and out.count("| Gear | 1 |") == 2


def test_output_file_format_from_suffix_and_manifest(fake, tmp_path):
    make_pdf(Path("doc.pdf"), 2)
    result = invoke("ocr", "doc.pdf", "-o", "run.jsonl")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    records = jsonl(Path("run.jsonl").read_text())
    assert [(r["page"], r["status"], r["task"]) for r in records] == [(1, "ok", "ocr"), (2, "ok", "ocr")]
    assert records[0]["model"] == {"id": "deepseek-ai/deepseek-vl2-tiny", "revision": "fake-rev", "fingerprint": None}
    manifest = json.loads(Path("run.jsonl.manifest.json").read_text())
    assert manifest["inputs"][0]["sha256"] == records[0]["sha256"]
    assert manifest["summary"]["pages_ok"] == 2 and manifest["outputs"] == ["run.jsonl"]
    assert manifest["model"]["id"] == "deepseek-ai/deepseek-vl2-tiny" and not manifest["interrupted"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_output_dash_is_stdout(fake):
    make_image(Path("p.png"))
    result = invoke("ocr", "p.png", "-o", "-", "-f", "jsonl")
    assert [r["source"] for r in jsonl(result.stdout)] == ["p.png"]


def test_directory_tree_kept_and_name_clashes_do_not_collide(fake, tmp_path):
    make_pdf(Path("in/a/x.pdf"), 1, label="A")
    make_pdf(Path("in/b/x.pdf"), 2, label="B")
    make_image(Path("in/b/x.png"))
    make_image(Path("in/.hidden/skip.png"))
    Path("in/notes.txt").write_text("not a document")
    result = invoke("ocr", "in", "-o", "out/")
    assert result.exit_code == 0, result.stderr
    names = sorted(str(p.relative_to("out")) for p in Path("out").rglob("*") if p.is_file())
    assert names == [
        "a/x.pdf.ocr.jsonl",
        "a/x.pdf.ocr.md",
        "b/x.pdf.ocr.jsonl",
        "b/x.pdf.ocr.md",
        "b/x.png.ocr.jsonl",
        "b/x.png.ocr.md",
        "ocr.manifest.json",
    ]
    assert len(jsonl(Path("out/b/x.pdf.ocr.jsonl").read_text())) == 2
    # the same file name given twice from different places gets a distinct output name
    make_pdf(tmp_path / "elsewhere" / "a" / "x.pdf", 1)
    result = invoke("ocr", str(tmp_path / "in/a/x.pdf"), str(tmp_path / "elsewhere/a/x.pdf"), "-o", "flat/")
    assert sorted(p.name for p in Path("flat").glob("*.md")) == ["x.pdf.ocr.md", "x~2.pdf.ocr.md"]


def test_glob_filters_directory_files(fake):
    make_pdf(Path("in/r.pdf"), 1)
    make_image(Path("in/sub/p.png"))
    result = invoke("ocr", "in", "--glob", "*.png", "-f", "jsonl")
    assert [r["source"] for r in jsonl(result.stdout)] == [str(Path("in/sub/p.png"))]


def test_stdin_paths_and_stdin_data(fake):
    make_pdf(Path("a.pdf"), 1)
    make_image(Path("b.png"))
    result = invoke("ocr", "-", "-f", "jsonl", input="a.pdf\nb.png\n\n")
    assert [r["source"] for r in jsonl(result.stdout)] == ["a.pdf", "b.png"]
    result = invoke("ocr", "-", "-f", "jsonl", input="a.pdf\0b.png\0")
    assert [r["source"] for r in jsonl(result.stdout)] == ["a.pdf", "b.png"]
    result = invoke("ocr", "--stdin-data", "-f", "jsonl", input=Path("a.pdf").read_bytes())
    records = jsonl(result.stdout)
    assert [(r["source"], r["page"], r["status"]) for r in records] == [("-", 1, "ok")]
    assert invoke("ocr", "-", "--stdin-data", input=b"").exit_code == 2


def test_page_ranges(fake):
    make_pdf(Path("d.pdf"), 5)
    result = invoke("ocr", "d.pdf", "--pages", "2-3,5", "-f", "jsonl")
    assert [r["page"] for r in jsonl(result.stdout)] == [2, 3, 5]
    result = invoke("ocr", "d.pdf", "--pages", "4-", "-f", "jsonl")
    assert [r["page"] for r in jsonl(result.stdout)] == [4, 5]
    result = invoke("ocr", "d.pdf", "--pages", "0")
    assert result.exit_code == 2 and "pages start at 1" in result.stderr
    result = invoke("ocr", "d.pdf", "--pages", "9", "-f", "jsonl")
    assert result.exit_code == 0 and result.stdout == "" and "selects none" in result.stderr


def test_encrypted_pdf_needs_password(fake):
    make_pdf(Path("secret.pdf"), 2, password="s3cret")
    result = invoke("ocr", "secret.pdf", "-f", "jsonl")
    assert result.exit_code == 1
    [record] = jsonl(result.stdout)
    assert record["status"] == "failed" and "needs --password" in record["error"] and record["page"] is None
    result = invoke("ocr", "secret.pdf", "--password", "wrong", "-f", "jsonl")
    assert "wrong --password" in jsonl(result.stdout)[0]["error"]
    result = invoke("ocr", "secret.pdf", "--password", "s3cret", "-f", "jsonl")
    assert result.exit_code == 0 and [r["page"] for r in jsonl(result.stdout)] == [1, 2]


def test_bad_file_in_the_middle_fails_alone(fake):
    make_pdf(Path("a.pdf"), 1)
    Path("b.pdf").write_text("this is text, not a PDF")
    make_image(Path("c.png"))
    result = invoke("ocr", "a.pdf", "b.pdf", "missing.pdf", "c.png", "-f", "jsonl")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [(r["source"], r["status"]) for r in records] == [
        ("a.pdf", "ok"),
        ("b.pdf", "failed"),
        ("missing.pdf", "failed"),
        ("c.png", "ok"),
    ]
    assert "not a PDF or an image" in records[1]["error"] and "no such file" in records[2]["error"]
    assert "b.pdf" in result.stderr and "2 failed" in result.stderr


def test_model_error_isolated_to_its_page(fake):
    make_pdf(Path("d.pdf"), 3)
    fake.enqueue("one").enqueue(error=InputError("image too small")).enqueue("three")
    result = invoke("ocr", "d.pdf", "-f", "jsonl", "-b", "3")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["status"] for r in records] == ["ok", "failed", "ok"]
    assert records[1]["error"] == "InputError: image too small"
    assert [len(b) for b in fake.batches] == [3, 1, 1, 1]  # the batch failed, then one at a time


def test_fail_fast_stops_at_first_failure(fake):
    make_pdf(Path("a.pdf"), 1)
    Path("b.pdf").write_bytes(b"%PDF-1.7 truncated")
    make_pdf(Path("c.pdf"), 1)
    result = invoke("ocr", "a.pdf", "b.pdf", "c.pdf", "--fail-fast", "-b", "1", "-f", "jsonl")
    assert result.exit_code == 1
    assert [r["source"] for r in jsonl(result.stdout)] == ["a.pdf", "b.pdf"]
    assert len(fake.requests) == 1


def test_finish_reasons_map_to_statuses(fake):
    make_pdf(Path("d.pdf"), 3)
    fake.enqueue("cut", finish_reason="length").enqueue("la la la", finish_reason="repetition").enqueue("")
    result = invoke("ocr", "d.pdf", "-f", "jsonl", "--max-new-tokens", "7")
    records = jsonl(result.stdout)
    assert [r["status"] for r in records] == ["truncated", "repetition", "parse_error"]
    assert "max_new_tokens (7)" in records[0]["error"]
    assert result.exit_code == 1  # the empty answer is a parse error; truncated/repetition only warn


def test_truncated_alone_exits_zero_with_warning(fake):
    make_image(Path("p.png"))
    fake.enqueue("partial", finish_reason="length")
    result = invoke("ocr", "p.png")
    assert result.exit_code == 0 and "truncated" in result.stderr


def test_setup_and_usage_errors_exit_2_with_one_line(fake, monkeypatch):
    make_image(Path("p.png"))
    assert invoke("ocr").exit_code == 2
    result = invoke("ocr", "p.png", "--resume")
    assert result.exit_code == 2 and "--resume needs" in result.stderr
    assert invoke("ocr", "p.png", "--format", "yaml").exit_code == 2
    assert invoke("ocr", "p.png", "--shard", "3/2").exit_code == 2
    assert invoke("ocr", "p.png", "--temperature", "-1").exit_code == 2

    def missing(*args, **kwargs):
        raise ModelNotFoundError("no such model: nobody/nothing")

    monkeypatch.setattr(backend, "identify", missing)  # a model is resolved (and found missing) before loading
    monkeypatch.setattr(backend, "runtime_factory", missing)
    result = invoke("ocr", "p.png", "--model", "nobody/nothing", "-f", "json")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: model not found: no such model: nobody/nothing"]
    Path("earlier.jsonl").write_text("precious\n")
    assert invoke("ocr", "p.png", "-o", "earlier.jsonl").exit_code == 2
    assert Path("earlier.jsonl").read_text() == "precious\n"  # a setup error touches no output


def test_model_options_reach_the_runtime_and_sampling(fake):
    make_image(Path("p.png"))
    result = invoke(
        "ask",
        "p.png",
        "--prompt",
        "q",
        "--model",
        "some/model",
        "--revision",
        "abc",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "33",
        "--temperature",
        "0.5",
        "--top-p",
        "0.9",
        "--seed",
        "7",
        "-b",
        "3",
        "-f",
        "jsonl",
    )
    assert result.exit_code == 0, result.stderr
    assert fake.load_args == {
        "model": "some/model",
        "revision": "abc",
        "device": "cpu",
        "dtype": "float32",
        "batch_size": 3,
    }
    s = fake.requests[0].sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed) == (33, 0.5, 0.9, 7)
    [record] = jsonl(result.stdout)
    assert record["settings"] == {
        "model": "some/model",
        "revision": "abc",
        "max_new_tokens": 33,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "dpi": 144.0,
        "max_side": 2048,
        "no_repeat_ngram": 24,
        "repeat_window": 512,
        "retry_repetition": False,
        "repetition_penalty": 1.0,
        "quantize": "none",
        "device": "cpu",
        "dtype": "float32",
    }
    assert (s.no_repeat_ngram, s.repeat_window) == (24, 512)  # ask's repetition guard reaches the sampling


def test_batches_and_output_order_do_not_depend_on_completion_order(fake):
    make_pdf(Path("a.pdf"), 3)
    make_image(Path("b.png"))
    make_pdf(Path("c.pdf"), 1)
    fake.reverse = True
    fake.default = lambda request: f"answer {request.id}"
    result = invoke("ocr", "a.pdf", "b.png", "c.pdf", "-b", "2", "-f", "jsonl")
    assert [len(b) for b in fake.batches] == [2, 2, 1]  # pages of different documents share a batch
    records = jsonl(result.stdout)
    assert [(r["source"], r["page"]) for r in records] == [
        ("a.pdf", 1),
        ("a.pdf", 2),
        ("a.pdf", 3),
        ("b.png", 1),
        ("c.pdf", 1),
    ]
    assert [r["text"] for r in records] == [f"answer r{i}" for i in range(5)]


def test_quiet_and_verbose(fake):
    make_pdf(Path("d.pdf"), 2)
    quiet = invoke("ocr", "d.pdf", "-q")
    assert quiet.stderr == "" and quiet.exit_code == 0
    loud = invoke("ocr", "d.pdf", "-vv")
    assert "d.pdf p.1 [ok]" in loud.stderr and "batch of 2" in loud.stderr


def test_models_download_and_list(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(backend, "download_model", lambda repo, revision=None: tmp_path / repo / str(revision))
    result = invoke("models", "download", "org/m", "--revision", "v1")
    assert result.exit_code == 0 and result.stdout.strip() == str(tmp_path / "org/m/v1")
    monkeypatch.setattr(backend, "list_cached_models", lambda: [("org/m", "a" * 40, 3 * 1024 * 1024)])
    result = invoke("models", "list")
    assert "org/m" in result.stdout and "3.0 MB" in result.stdout
    assert json.loads(invoke("models", "list", "--json").stdout) == [
        {"repo_id": "org/m", "revision": "a" * 40, "size_bytes": 3 * 1024 * 1024}
    ]

    def offline(repo, revision=None):
        raise ModelNotFoundError("cannot reach the hub")

    monkeypatch.setattr(backend, "download_model", offline)
    result = invoke("models", "download")
    assert result.exit_code == 2 and "cannot reach the hub" in result.stderr


def test_schema_command_matches_the_committed_file(fake):
    committed = json.loads((Path(__file__).parent.parent / "schema" / "page-record.schema.json").read_text())
    assert json.loads(invoke("schema").stdout) == committed


def test_progress_bar_on_a_terminal_and_summary(fake):
    from rich.console import Console

    from dsvl2.pipelines.base import Document, Page, PageRecord
    from dsvl2.pipelines.runner import DocumentDone, RecordDone
    from dsvl2.progress import Reporter

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None, highlight=False)
    doc = Document("d.pdf", "d.pdf", "0" * 64, "pdf", 2)
    ok = PageRecord("d.pdf", "0" * 64, 1, None, "ocr", "p", {}, {}, "t", {}, "ok", tokens={"prompt": 1, "generated": 9})
    bad = PageRecord("d.pdf", "0" * 64, 2, None, "ocr", "p", {}, {}, None, None, "failed", "boom")
    with Reporter(total_pages=2, total_docs=1, quiet=False, verbose=0, console=console) as reporter:
        assert reporter.bar is not None
        reporter(RecordDone(ok, Page(doc, 1)))
        reporter(RecordDone(bad, Page(doc, 2)))
        reporter(DocumentDone(doc))
    reporter.print_summary(command="ocr", interrupted=False, incomplete=0, where="out/")
    text = out.getvalue()
    assert "d.pdf p.2: failed: boom" in text and "1 failed, 1 ok" in text and "output: out/" in text
    assert reporter.tally.summary()["generated_tokens"] == 9 and reporter.tally.documents_done == 1
    quiet = Reporter(total_pages=2, total_docs=1, quiet=True, verbose=0, console=console)
    assert quiet.bar is None


def test_output_destination_rules(fake, tmp_path):
    from dsvl2.session import destination
    from dsvl2.writers import Format

    Path("existing-dir").mkdir()
    Path("existing-file").write_text("")
    cases = {
        None: ("stdout", Format.md),
        "-": ("stdout", Format.md),
        "run.jsonl": ("file", Format.jsonl),
        "run.CSV": ("file", Format.csv),
        "notes.txt": ("file", Format.text),
        "out/": ("dir", Format.md),
        "existing-dir": ("dir", Format.md),
        "results": ("dir", Format.md),
        "existing-file": ("file", Format.md),
        "run.weird": ("file", Format.md),
    }
    for output, (kind, fmt) in cases.items():
        dest = destination(output, None, OcrTask)
        assert (dest.kind, dest.fmt) == (kind, fmt), output
    assert destination("run.jsonl", Format.json, OcrTask).fmt is Format.json  # --format wins over the suffix
    assert destination(None, None, AskTask).fmt is Format.text and destination(None, None, TableTask).fmt is Format.csv


def test_loading_and_the_kernels_are_reported_apart_from_the_pages(fake):
    """-v says the model is loading; a failed kernel build is one warning line; the manifest keeps the load
    time and the kernels' state; the summary shows the load time apart from pages/min."""
    from dsvl2.model.kernel_build import KernelStatus
    from dsvl2.model.kernel_choice import FAMILIES, Paths

    make_image(Path("p.png"))
    fake.load_seconds = 12.5
    fake.kernels = KernelStatus("failed", reason="g++: error: unrecognized option", build_seconds=3.0)
    fake.paths = Paths.uniform("torch", "the kernels failed to build")
    result = invoke("ocr", "p.png", "-o", "out/", "-v")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("loading deepseek-ai/deepseek-vl2-tiny on cpu in float32") for line in lines)
    assert "warning: CPU kernels unavailable, using torch ops: g++: error: unrecognized option" in lines
    assert any("model loaded in 12.5s" in line and "pages/min" in line for line in lines)
    manifest = json.loads(Path("out/ocr.manifest.json").read_text())
    assert manifest["runtime"]["load_seconds"] == 12.5
    assert manifest["runtime"]["kernels"] == {
        "state": "failed", "reason": "g++: error: unrecognized option", "build_seconds": 3.0, "load_seconds": 0.0,
        "paths": {f: {"use": "torch", "reason": "the kernels failed to build"} for f in FAMILIES},
    }  # fmt: skip
    assert any(line.startswith("kernel paths: vision_gemm torch (the kernels failed to build)") for line in lines)
