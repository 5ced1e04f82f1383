"""Writers: atomic files, tolerant record reading, per-document outputs, renderings, and every record
matching the committed JSON Schema."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fakes import make_image, make_pdf
from typer.testing import CliRunner

from dsvl2 import render
from dsvl2.app import app
from dsvl2.pipelines.base import Document, PageRecord, PageSize, Settings
from dsvl2.pipelines.schema import record_schema
from dsvl2.writers import DirSink, Format, atomic_open, atomic_write, read_records

SCHEMA_FILE = Path(__file__).parent.parent / "schema" / "page-record.schema.json"


def record(page: int | None = 1, status: str = "ok", task: str = "ocr", result: dict | None = None) -> PageRecord:
    return PageRecord(
        source="a/x.pdf",
        sha256="0" * 64,
        page=page,
        page_size=PageSize(10, 20, 5.0, 10.0, 144.0),
        task=task,
        prompt="p",
        model={"id": "m", "revision": None},
        settings=Settings(model="m").to_dict(),
        text="t",
        result=result if result is not None else {"markdown": "t"},
        status=status,
    )


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write(target, "old")
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half of the new content")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


def test_read_records_tolerates_torn_and_foreign_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    good = json.dumps(record().to_dict())
    path.write_text(f'{good}\n{{"not": "a record"}}\n{good[:30]}')
    records, bad = read_records(path)
    assert len(records) == 1 and bad == 2
    path.write_text("[" + good + "]")
    assert read_records(path) == ([record()], 0)
    path.write_text("[" + good)
    assert read_records(path) == ([], 1)
    assert read_records(tmp_path / "missing.jsonl") == ([], 0)


def test_directory_sink_journal_then_atomic_outputs(tmp_path):
    sink = DirSink(tmp_path / "out", Format.md, "ocr", prompts=("p",))
    doc = Document("a/x.pdf", "a/x.pdf", "0" * 64, "pdf", 2)
    sink.prepare([doc], resume=False)
    sink.write(record(2), doc)
    journal = tmp_path / "out/a/x.pdf.ocr.jsonl.partial"
    assert [r.page for r in read_records(journal)[0]] == [2]
    assert sink.incomplete == ["a/x.pdf"] and not (tmp_path / "out/a/x.pdf.ocr.md").exists()
    sink.write(record(1), doc)
    sink.document_done(doc)
    assert not journal.exists() and sink.incomplete == []
    assert [r.page for r in read_records(tmp_path / "out/a/x.pdf.ocr.jsonl")[0]] == [1, 2]  # page order
    assert (tmp_path / "out/a/x.pdf.ocr.md").read_text().index("page 1") < (
        tmp_path / "out/a/x.pdf.ocr.md"
    ).read_text().index("page 2")


def test_directory_sink_refuses_paths_outside_the_root(tmp_path):
    sink = DirSink(tmp_path / "out", Format.jsonl, "ocr")
    evil = Document("x", "../../etc/x.pdf", "0" * 64)
    with pytest.raises(ValueError, match="escapes"):
        sink.write(record(), evil)


def test_stale_table_csvs_are_removed(tmp_path):
    table = {
        "tables": [
            {
                "index": i,
                "format": "markdown",
                "header": ["a"],
                "rows": [["1"]],
                "n_columns": 1,
                "status": "ok",
                "raw": "",
                "notes": [],
            }
            for i in range(2)
        ]
    }
    doc = Document("x.pdf", "x.pdf", "0" * 64, "pdf", 1)
    for n_tables in (2, 1):
        sink = DirSink(tmp_path, Format.csv, "table")
        sink.prepare([doc], resume=False)
        sink.write(record(task="table", result={"tables": table["tables"][:n_tables]}), doc)
        sink.document_done(doc)
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["x.pdf.table.p1.t1.csv"]


def test_markdown_and_csv_renderings_cover_failures():
    failed = PageRecord(
        "s",
        None,
        None,
        None,
        "table",
        "p",
        {"id": None, "revision": None},
        {},
        None,
        None,
        "failed",
        "cannot open: broken",
    )
    assert "> **failed:** cannot open: broken" in render.markdown(failed)
    assert render.csv_rows(failed) == [["s", None, "failed", "", "", "", "", "", "cannot open: broken"]]
    assert render.markdown_table(["a|b"], [["1", None]]) == "| a\\|b |  |\n|---|---|\n| 1 |  |"


# --- the record schema ---------------------------------------------------------------------------------------


def test_committed_schema_is_the_generated_one():
    assert json.loads(SCHEMA_FILE.read_text()) == record_schema(), "run: dsvl2 schema > schema/page-record.schema.json"


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "null": type(None),
    "boolean": bool,
}


def violations(value: Any, schema: dict, path: str = "$") -> list[str]:
    """The subset of JSON Schema 2020-12 the record schema uses; one message per violation."""
    out: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool)) for t in types
        )
        if not ok:
            return [f"{path}: {value!r} is not {types}"]
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{path}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{path}: {value} > {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            out.append(f"{path}: {value} <= {schema['exclusiveMinimum']}")
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        out += [f"{path}: missing {k}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for k, v in value.items():
            if k in props:
                out += violations(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}: unexpected {k}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            out.append(f"{path}: {len(value)} items")
        if "items" in schema:
            for i, item in enumerate(value):
                out += violations(item, schema["items"], f"{path}[{i}]")
    if "anyOf" in schema and all(violations(value, s, path) for s in schema["anyOf"]):
        out.append(f"{path}: matches none of anyOf")
    for sub in schema.get("allOf", []):
        if "if" in sub and not violations(value, sub["if"], path):
            out += violations(value, sub["then"], path)
        elif "if" not in sub:
            out += violations(value, sub, path)
    return out


def test_the_validator_catches_violations():
    schema = record_schema()
    good = record().to_dict()
    assert violations(good, schema) == []
    assert violations({**good, "page": 0}, schema)
    assert violations({**good, "status": "fine"}, schema)
    assert violations({**good, "extra": 1}, schema)
    assert violations({**good, "result": {"tables": "x"}}, schema)  # the result's shape follows the task
    assert violations({**good, "result": {"markdown": 3}}, schema)
    assert violations({**good, "task": "table", "result": {"tables": [{"index": 0}]}}, schema)


ANSWERS = {
    "ocr": "# Title\ntext",
    "table": "| a | b |\n|---|---|\n| 1 | 2 |\n<table><tr><td></td></tr></table><table></table>",
    "chart": "Title: T\n| x | y |\n|---|---|\n| a | 1 |\n| b | n/a |",
    "ground": "<|ref|>r<|/ref|><|det|>[[1,2,3,4],[5,6,7],[1200,0,0,5]]<|/det|>",
    "ask": "An answer.",
}


@pytest.mark.parametrize("task", list(ANSWERS))
def test_every_task_writes_records_that_match_the_schema(fake, task):
    make_pdf(Path("d.pdf"), 1)
    make_image(Path("p.png"))
    Path("broken.pdf").write_text("nope")
    fake.default = ANSWERS[task]
    extra = {"ground": ["--query", "r"], "ask": ["--prompt", "q"]}.get(task, [])
    result = CliRunner().invoke(
        app, [task, "d.pdf", "p.png", "broken.pdf", "-f", "jsonl", *extra], catch_exceptions=False
    )
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3 and records[2]["status"] == "failed"
    schema = record_schema()
    for r in records:
        assert violations(r, schema) == [], r


def test_a_several_page_record_is_named_by_its_pages():
    """`ask --per document` answers cover pages 1-3: every frame must say so, not "page 1"."""
    from dataclasses import replace

    from dsvl2.render import markdown, pages_label, text

    several = replace(record(), pages=[1, 2, 3])
    assert pages_label(several) == "pages 1-3" and pages_label(several, short=True) == "pp.1-3"
    assert pages_label(replace(record(), pages=[1, 3])) == "pages 1,3"
    assert pages_label(replace(record(), pages=[1])) == "page 1"  # a one-page window
    assert pages_label(record(page=None)) is None
    assert markdown(several).startswith("<!-- pages 1-3 · a/x.pdf -->")
    assert text(several, header=True).startswith("==> a/x.pdf (pages 1-3): p <==")
