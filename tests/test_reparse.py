"""`dsvl2 reparse`: the CLI's own records come back identical (in every format, as the task command wrote
them), edited answers get the current parse and status, bad input is one `FILE:LINE:` error with exit 2
and no output, older schema versions are read, and exit codes follow the task commands'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import invoke, isolate, jsonl, make_image, make_pdf
from parity import PARITY_DIR, checkpoint_dir

from dsvl2.model.errors import InputError
from dsvl2.pipelines.base import PARSER_VERSION, SCHEMA_VERSION, Document, Page, PageSize
from dsvl2.pipelines.ground import GroundTask

TABLE = "| Item | Qty |\n|---|---|\n| Widget | 4 |\n| Gear | 1 |"
BOX = "<|ref|>thing<|/ref|><|det|>[[0, 0, 999, 499]]<|/det|>"
INVALID = "<|ref|>thing<|/ref|><|det|>[[1, 2, 3]]<|/det|>"  # a short box: no parser repairs it

# A run per task, with answers that cover ok, parse_error, truncated, repetition and failed records.
RUNS = {
    "ocr": (("# Title\n\nBody",), ("",), ("cut off", "length"), ("la la", "repetition"), (InputError("boom"),)),
    "table": ((TABLE,), ("no table here",), ("| A |\n|---|\n| 1", "length"), (InputError("boom"),)),
    "chart": (("Title: S\n| Fruit | 2024 |\n|---|---|\n| Apples | 42 |",), ("???",), (InputError("boom"),)),
    "ground": ((BOX,), (INVALID,), ("nothing",), (InputError("boom"),)),
    "ask": (("  Apples.  ",), ("",), (InputError("boom"),)),
}
ARGS = {"ground": ("--query", "thing"), "ask": ("--prompt", "Which fruit?")}


def _script(fake, answers) -> None:
    for answer in answers:
        if isinstance(answer[0], BaseException):
            fake.enqueue(error=answer[0])
        else:
            fake.enqueue(answer[0], finish_reason=answer[1] if len(answer) > 1 else "eos")


def _run(fake, task: str, *extra: str, pages: int | None = None) -> str:
    """`dsvl2 TASK doc.pdf` over scripted answers; returns the jsonl written to run.jsonl."""
    answers = RUNS[task]
    make_pdf(Path("doc.pdf"), pages or len(answers))
    _script(fake, answers)
    result = invoke(task, "doc.pdf", *ARGS.get(task, ()), *extra, "-o", "run.jsonl")
    assert result.exit_code in (0, 1), result.stderr
    return Path("run.jsonl").read_text(encoding="utf-8")


@pytest.mark.parametrize("task", list(RUNS))
def test_reparse_of_a_run_is_identical(fake, task):
    """Catches a reparse that rebuilds the task, page or status differently from the run that made them."""
    written = _run(fake, task)
    statuses = {r["status"] for r in jsonl(written)}
    assert len(statuses) >= 2, statuses  # the run covers more than the happy path
    result = invoke("reparse", "run.jsonl")
    assert result.stdout == written
    assert result.exit_code == (1 if statuses & {"failed", "parse_error"} else 0)


def test_ground_query_and_template_come_back_from_the_prompt(fake):
    """Catches a ground query lost on reparse: a custom template, several queries, and no query at all."""
    make_image(Path("p.png"), size=(200, 100))
    fake.default = BOX
    queries = ("--query", "car", "--query", "red light")
    invoke("ground", "p.png", *queries, "--prompt", "Find {query} here", "-o", "a.jsonl")
    invoke("ground", "p.png", "--prompt", "<|grounding|>Describe the image.", "-o", "b.jsonl")
    invoke("ground", "p.png", "--query", "the chart", "-o", "c.jsonl")
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        written = Path(name).read_text()
        assert invoke("reparse", name).stdout == written, name
    queries = [r["result"]["query"] for r in jsonl(Path("a.jsonl").read_text())]
    assert queries == ["car", "red light"]
    # Without the result's query (a hand-made record), the default template's prompt still gives it.
    [record] = jsonl(Path("c.jsonl").read_text())
    record["result"] = None
    [back] = jsonl(invoke("reparse", "-", input=json.dumps(record)).stdout)
    assert back["result"]["query"] == "the chart" and back["status"] == "ok"


def _parsed(record: dict) -> tuple[dict, bool, str | None]:
    """What the current ground parser says of a record's text, asked directly (not through reparse)."""
    task = GroundTask.from_options(query=[record["result"]["query"]])
    doc = Document(record["source"], record["source"], record["sha256"])
    page = Page(doc, record["page"], size=PageSize.from_dict(record["page_size"]))
    parsed = task.parse(record["text"], page=page, prompt=task.prompts[0])
    return parsed.result, parsed.ok, parsed.error


def test_edited_answers_get_the_new_parse_and_status(fake):
    """Catches a reparse that keeps the old result, or a status that ignores the generation's facts."""
    make_pdf(Path("d.pdf"), 5, size=(300, 400))
    fake.enqueue(BOX).enqueue(INVALID).enqueue(BOX, finish_reason="length").enqueue(BOX, finish_reason="repetition")
    fake.enqueue(error=InputError("model exploded"))
    invoke("ground", "d.pdf", "--query", "thing", "--dpi", "72", "-o", "run.jsonl")
    ok, bad, cut, loop, failed = jsonl(Path("run.jsonl").read_text())
    assert [r["status"] for r in (ok, bad, cut, loop, failed)] == ["ok", "parse_error", "truncated", "repetition",
                                                                  "failed"]
    ok["text"] = INVALID
    bad["text"] = "<|ref|>thing<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>"
    cut["text"] = loop["text"] = "<|ref|>thing<|/ref|><|det|>[[0, 0, 499"
    failed["parser"] = "1"
    Path("edited.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (ok, bad, cut, loop, failed)))
    result = invoke("reparse", "edited.jsonl", "-o", "new.jsonl")
    assert result.exit_code == 1
    new_ok, new_bad, new_cut, new_loop, new_failed = jsonl(Path("new.jsonl").read_text())
    result_of, ok_of, error_of = _parsed(ok)
    assert not ok_of and (new_ok["result"], new_ok["status"], new_ok["error"]) == (result_of, "parse_error", error_of)
    assert (new_bad["result"], new_bad["status"], new_bad["error"]) == (_parsed(bad)[0], "ok", None)
    assert new_bad["result"]["boxes"][0]["box_pt"] == [0.0, 0.0, 300.0, 400.0]  # the page size reached the parser
    for before, after in ((cut, new_cut), (loop, new_loop)):
        assert (after["status"], after["error"]) == (before["status"], before["error"])
        assert after["result"] == _parsed(before)[0] != before["result"]
    assert new_failed == failed  # no answer: passed through as it was
    for before, after in zip((ok, bad, cut, loop), (new_ok, new_bad, new_cut, new_loop), strict=True):
        changed = {k for k in after if after[k] != before[k]}
        assert changed == {"result", "status", "error"} if before is not cut and before is not loop else {"result"}
    assert "dsvl2 reparse: 1 failed, 1 ok, 1 parse_error, 1 repetition, 1 truncated; 4 changed" in result.stderr


def test_parser_version_and_schema_version_are_brought_up_to_date(fake):
    written = _run(fake, "ocr")
    old = [{**r, "parser": "1"} for r in jsonl(written)]
    result = invoke("reparse", "-", input="".join(json.dumps(r) + "\n" for r in old))
    got = jsonl(result.stdout)
    assert [r["parser"] for r in got] == [PARSER_VERSION] * 4 + ["1"]  # the failed record is passed through
    assert {r["schema_version"] for r in got} == {SCHEMA_VERSION}


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_older_schema_versions_are_read_and_written_as_current(fake, version):
    """Catches a reparse that refuses old records or changes their resume identity (settings, model)."""
    written = _run(fake, "table")
    old = []
    for r in jsonl(written):
        r = {k: v for k, v in r.items() if k not in ("parser", "pages")}
        r["settings"] = {k: v for k, v in r["settings"].items() if k != "repetition_penalty"}
        if version == "1.0":
            r["settings"] = {k: v for k, v in r["settings"].items() if k not in ("device", "dtype")}
            r["model"] = {"id": r["model"]["id"], "revision": r["model"]["revision"]}
        old.append({**r, "schema_version": version})
    Path("old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    result = invoke("reparse", "old.jsonl")
    assert result.exit_code == 1, result.stderr  # the run's failed record is still one
    got = jsonl(result.stdout)
    current = jsonl(written)
    for before, after, now in zip(old, got, current, strict=True):
        assert after["schema_version"] == SCHEMA_VERSION
        assert after["parser"] == (None if now["status"] == "failed" else PARSER_VERSION)  # failed: no parse
        assert (after["settings"], after["model"]) == (before["settings"], before["model"])
        assert (after["result"], after["status"], after["text"]) == (now["result"], now["status"], now["text"])


@pytest.mark.parametrize("fmt", ["json", "jsonl", "md", "csv", "text"])
def test_every_format_as_the_task_command_writes_it(fake, fmt):
    """Catches a reparse whose output in some format differs from the task command's own: on stdout, in one
    file, and per document under a directory (wide CSV per table included)."""
    make_pdf(Path("doc.pdf"), 2)
    fake.default = TABLE
    assert invoke("table", "doc.pdf", "-o", "ran/", "-f", fmt).exit_code == 0
    records = "ran/doc.pdf.table.jsonl"
    if fmt in ("json", "jsonl"):  # the same run's records (timings differ between runs)
        direct = Path(f"ran/doc.pdf.table.{fmt}").read_text(encoding="utf-8")
    else:
        direct = invoke("table", "doc.pdf", "-f", fmt).stdout
    assert invoke("reparse", records, "-f", fmt).stdout == direct
    assert invoke("reparse", records, "-o", f"again.{fmt}", "-f", fmt).exit_code == 0
    assert Path(f"again.{fmt}").read_text(encoding="utf-8") == direct
    assert invoke("reparse", records, "-o", "re/", "-f", fmt).exit_code == 0
    ran = {p.relative_to("ran").as_posix(): p.read_bytes() for p in Path("ran").rglob("*") if "manifest" not in p.name}
    again = {p.relative_to("re").as_posix(): p.read_bytes() for p in Path("re").rglob("*")}
    assert again == ran and (fmt != "csv" or "doc.pdf.table.p2.t1.csv" in again)


def test_json_array_input_and_several_files_of_several_tasks(fake):
    make_image(Path("p.png"))
    fake.default = TABLE
    invoke("table", "p.png", "-o", "t.json")
    fake.default = "Apples."
    invoke("ask", "p.png", "--prompt", "What?", "-o", "a.jsonl")
    result = invoke("reparse", "t.json", "a.jsonl", "-o", "out/")
    assert result.exit_code == 0, result.stderr
    assert jsonl(Path("out/p.png.table.jsonl").read_text()) == json.loads(Path("t.json").read_text())
    assert Path("out/p.png.ask.jsonl").read_text() == Path("a.jsonl").read_text()
    assert invoke("reparse", "t.json", "-f", "json").stdout == Path("t.json").read_text()
    mixed = invoke("reparse", "t.json", "a.jsonl", "-f", "csv")
    assert mixed.exit_code == 2 and "several tasks (table, ask)" in mixed.stderr and mixed.stdout == ""
    assert invoke("reparse", "-", input="[]").stdout == ""
    empty = invoke("reparse", "-", "-f", "json", input="\n")
    assert (empty.exit_code, json.loads(empty.stdout)) == (0, [])


def test_in_place_and_stdin(fake):
    written = _run(fake, "chart")
    Path("run.jsonl").write_text(written.replace("Apples", "Pears"))
    result = invoke("reparse", "run.jsonl", "-o", "run.jsonl")
    assert result.exit_code == 1  # the run's failed record is still one
    assert Path("run.jsonl").read_text() == written.replace("Apples", "Pears")  # categories follow the text
    assert jsonl(written)[0]["result"]["categories"] == ["Apples"]
    assert invoke("reparse", "-", input=written).stdout == written
    refused = invoke("reparse", "run.jsonl", "-o", "run.jsonl", "-f", "md")
    assert refused.exit_code == 2 and "is an input" in refused.stderr
    assert Path("run.jsonl").read_text() == written.replace("Apples", "Pears")


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ("{record}\nnot json\n", 2, "not JSON"),
        ("{record}\n\n[1, 2]\n", 3, "not a page record (a JSON list"),
        ("{record}\n{no_prompt}\n", 2, "not a page record (no 'prompt' field)"),
        ("{future}\n", 1, "schema version '9.0' is not one this dsvl2 reads"),
        ("{unknown_task}\n", 1, "unknown task 'summarise'"),
        ("[\n{record},\n{{}}\n]\n", 3, "no 'schema_version' field"),
        ("[\n{record}\n{record}]", 3, "not JSON"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_line(fake, content, line, reason):
    """Catches a bad line that is skipped silently, reported without its place, or half-written over."""
    record = jsonl(_run(fake, "ask"))[0]
    Path("bad.jsonl").write_text(
        content.format(
            record=json.dumps(record),
            future=json.dumps({**record, "schema_version": "9.0"}),
            unknown_task=json.dumps({**record, "task": "summarise"}),
            no_prompt=json.dumps({k: v for k, v in record.items() if k != "prompt"}),
        )
    )
    Path("out.jsonl").write_text("precious\n")
    result = invoke("reparse", "bad.jsonl", "-o", "out.jsonl")
    assert result.exit_code == 2
    [message] = result.stderr.strip().splitlines()
    assert message.startswith(f"error: bad.jsonl:{line}: ") and reason in message, message
    assert Path("out.jsonl").read_text() == "precious\n"


def test_usage_errors_exit_2(fake):
    assert invoke("reparse").exit_code == 2
    assert invoke("reparse", "-", "-", input="").exit_code == 2
    missing = invoke("reparse", "nowhere.jsonl")
    assert missing.exit_code == 2 and "nowhere.jsonl" in missing.stderr
    Path("bin.jsonl").write_bytes(b'{"a": 1}\n\xff\xfe\n')
    bad = invoke("reparse", "bin.jsonl")
    assert bad.exit_code == 2 and "bin.jsonl:2: not UTF-8" in bad.stderr


def test_a_parser_that_raises_costs_its_record(fake, monkeypatch):
    written = _run(fake, "ground")

    def explode(self, text, *, page, prompt):
        raise RuntimeError("bug")

    monkeypatch.setattr(GroundTask, "parse", explode)
    result = invoke("reparse", "run.jsonl")
    assert result.exit_code == 1
    got = jsonl(result.stdout)
    assert [r["status"] for r in got] == ["parse_error"] * 3 + ["failed"]
    assert got[0]["error"] == "parser crashed: RuntimeError: bug" and len(got) == len(jsonl(written))


def test_only_ok_records_exit_zero_and_quiet_is_silent(fake):
    make_image(Path("p.png"))
    fake.enqueue("text", finish_reason="length")
    invoke("ocr", "p.png", "-o", "run.jsonl")
    result = invoke("reparse", "run.jsonl", "-q")
    assert result.exit_code == 0 and result.stderr == ""
    loud = invoke("reparse", "run.jsonl", "-o", "x.jsonl")
    assert "truncated" in loud.stderr and "1 truncated; 0 changed" in loud.stderr


CKPT = checkpoint_dir("tiny-mha") if (PARITY_DIR / "checkpoints" / "tiny-mha").is_dir() else None


def test_reparse_of_a_real_checkpoint_run_is_identical(monkeypatch, tmp_path):
    """End to end: a ground run through the real runtime on the tiny parity checkpoint, then reparse."""
    assert CKPT is not None, f"tiny-mha checkpoint not found under {PARITY_DIR}"
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    make_pdf(Path("d.pdf"), 2)
    fast = ("--max-new-tokens", "4", "--dpi", "36", "--max-side", "400", "--model", str(CKPT))
    run = invoke("ground", "d.pdf", "--query", "the title", "--query", "page 2", *fast, "-o", "run.jsonl")
    assert run.exit_code in (0, 1), run.stderr
    written = Path("run.jsonl").read_text()
    assert len(jsonl(written)) == 4 and all(r["text"] is not None for r in jsonl(written))
    result = invoke("reparse", "run.jsonl")
    assert result.stdout == written and result.exit_code == run.exit_code

