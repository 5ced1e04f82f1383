"""CliRunner over the task commands' own outputs, on a scripted fake runtime: tables as CSV per table and
JSONL records, charts as tidy and wide CSV, grounding boxes on the grid, in pixels and PDF points (and drawn), ask's
bare answers and its prompts from options and files. The options every command shares are in test_cli.py."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fakes import invoke, jsonl, make_image, make_pdf

from dsvl2.model.errors import InputError
from dsvl2.pipelines import table

TABLE = "| Item | Qty |\n|---|---|\n| Widget | 4 |\n| Gear | 1 |"


def test_table_directory_csv_per_table(fake):
    make_pdf(Path("in/inv.pdf"), 2)
    fake.enqueue(TABLE + "\n\n<table><tr><th>A</th><th>B</th></tr><tr><td colspan=2>x</td></tr></table>")
    fake.enqueue("NONE")
    result = invoke("table", "in", "-o", "out/")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in Path("out").glob("*.csv")) == ["inv.pdf.table.p1.t1.csv", "inv.pdf.table.p1.t2.csv"]
    assert Path("out/inv.pdf.table.p1.t1.csv").read_text() == "Item,Qty\nWidget,4\nGear,1\n"
    assert Path("out/inv.pdf.table.p1.t2.csv").read_text() == "A,B\nx,x\n"
    records = jsonl(Path("out/inv.pdf.table.jsonl").read_text())
    assert [len(r["result"]["tables"]) for r in records] == [2, 0]
    assert fake.prompts[0] == table.DEFAULT_PROMPT


def test_table_unparseable_keeps_raw_text(fake):
    make_image(Path("p.png"))
    fake.enqueue("<table><tr></tr></table>")
    result = invoke("table", "p.png", "-f", "jsonl")
    [record] = jsonl(result.stdout)
    assert record["status"] == "parse_error" and record["result"]["tables"][0]["raw"] == "<table><tr></tr></table>"
    assert result.exit_code == 1


def test_chart_tidy_csv_and_directory_wide_csv(fake):
    make_image(Path("c.png"))
    answer = "Title: Sales\nX axis: Fruit\n| Fruit | 2024 |\n|---|---|\n| Apples | 42 |\n| Pears | 7 |"
    fake.default = answer
    result = invoke("chart", "c.png")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["title"], r["series"], r["category"], r["value"]) for r in rows] == [
        ("Sales", "2024", "Apples", "42.0"),
        ("Sales", "2024", "Pears", "7.0"),
    ]
    invoke("chart", "c.png", "-o", "out/")
    assert Path("out/c.png.chart.p1.csv").read_text() == "Fruit,2024\nApples,42.0\nPears,7.0\n"


def test_ground_boxes_in_grid_pixels_points_and_annotations(fake):
    make_pdf(Path("d.pdf"), 1, size=(300, 400))
    make_image(Path("p.png"), size=(200, 100))
    fake.default = "<|ref|>thing<|/ref|><|det|>[[0, 0, 999, 499]]<|/det|>"
    result = invoke("ground", "d.pdf", "p.png", "--query", "thing", "--annotate", "ann", "--dpi", "72")
    assert result.exit_code == 0, result.stderr
    pdf, png = jsonl(result.stdout)
    assert fake.prompts == ["Locate <|ref|>thing<|/ref|> in the given image."] * 2  # the paper template
    assert pdf["result"]["boxes"][0]["box"] == [0, 0, 999, 499]
    assert pdf["result"]["boxes"][0]["box_pt"] == [0.0, 0.0, 300.0, 199.8]
    assert pdf["result"]["boxes"][0]["box_px"] == [0.0, 0.0, 300.0, 199.8]
    assert png["result"]["boxes"][0]["box_px"] == [0.0, 0.0, 200.0, 49.9]
    assert png["result"]["boxes"][0]["box_pt"] is None
    assert sorted(p.name for p in Path("ann").iterdir()) == ["d.pdf.p1.png", "p.png.p1.png"]


def test_ground_several_queries_and_malformed_boxes(fake):
    make_image(Path("p.png"))
    fake.enqueue("<|ref|>a<|/ref|><|det|>[[10, 10, 20, 20]]<|/det|>")
    fake.enqueue("<|ref|>b<|/ref|><|det|>[[1, 2, 3]]<|/det|>")
    result = invoke("ground", "p.png", "--query", "a", "--query", "b", "-f", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["query"], r["box_status"], r["x1"]) for r in rows] == [("a", "ok", "10"), ("b", "invalid", "")]
    assert result.exit_code == 1
    assert invoke("ground", "p.png").exit_code == 2  # no query and a template that needs one


def test_ask_prints_only_the_answer_for_one_page_and_prompt(fake):
    make_image(Path("p.png"))
    fake.enqueue("  Apples.  ")
    result = invoke("ask", "p.png", "--prompt", "Which fruit sold best?")
    assert result.exit_code == 0
    assert result.stdout == "Apples.\n"
    assert fake.prompts == ["Which fruit sold best?"]
    assert fake.requests[0].conversation[0].content == "<image>\nWhich fruit sold best?"


def test_ask_failure_prints_nothing_on_stdout(fake):
    make_image(Path("p.png"))
    fake.enqueue(error=InputError("unreadable"))
    result = invoke("ask", "p.png", "--prompt", "Q?")
    assert result.exit_code == 1 and result.stdout == "" and "unreadable" in result.stderr


def test_ask_many_prompts_from_file_and_option(fake):
    make_pdf(Path("d.pdf"), 2)
    Path("qs.txt").write_text("First?\n\nSecond?\n")
    fake.default = lambda r: "A:" + r.conversation[0].content.split("\n", 1)[1]
    result = invoke("ask", "d.pdf", "--prompt", "Zero?", "--prompts", "qs.txt", "--prompt", "Zero?")
    assert result.exit_code == 0
    assert result.stdout.count("==> d.pdf (page") == 6 and "A:Second?" in result.stdout
    assert fake.prompts == ["Zero?", "First?", "Second?"] * 2
    assert invoke("ask", "d.pdf").exit_code == 2
    assert invoke("ask", "d.pdf", "--prompts", "missing.txt").exit_code == 2
