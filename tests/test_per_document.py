"""`dsvl2 ask --per document`: a document's pages asked in one conversation, one record per window of pages and
prompt. End to end on the tiny parity checkpoint (the record's answer is the engine's answer to the same
three-image conversation built by hand); on the scripted runtime: `--per page` unchanged, windows of a long
document, resume, a page that does not render, the runner's limits on several-page requests, the API, and
each output format showing a record once."""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import pymupdf
import pytest
from fakes import FakeRuntime, invoke, isolate, jsonl, make_image, make_pdf
from parity import PARITY_DIR, checkpoint_dir, parity_model, parity_processor
from PIL import Image
from test_pipelines import pages, records, run
from typer.testing import CliRunner

import dsvl2
from dsvl2.app import app
from dsvl2.model.engine import Engine
from dsvl2.model.requests import ASSISTANT, USER, Message, Request
from dsvl2.pipelines import runner, windows
from dsvl2.pipelines.ask import AskTask
from dsvl2.pipelines.base import OptionError, PageRecord, Settings

QUESTION = "What is this?"
FAST = ("--max-new-tokens", "3", "--dpi", "36", "--max-side", "400")


def _rendered(path: Path, zoom: float) -> list[Image.Image]:
    """Every page of a PDF as RGB at `zoom`, rendered here with PyMuPDF (not through dsvl2)."""
    with pymupdf.open(path) as pdf:
        pixmaps = [page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False) for page in pdf]
        return [Image.frombytes("RGB", (p.width, p.height), p.samples) for p in pixmaps]


def _engine_answer(engine: Engine, request: Request):
    engine.submit(request)
    done = []
    while engine.has_work:
        done += engine.step()
    [completion] = done
    return completion


def test_one_record_over_three_pages_is_the_engines_answer_to_the_three_image_conversation(monkeypatch, tmp_path):
    isolate(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert (PARITY_DIR / "checkpoints" / "tiny-mha").is_dir(), f"tiny-mha checkpoint not found under {PARITY_DIR}"
    make_pdf(Path("doc.pdf"), 3)
    result = CliRunner().invoke(
        app,
        ["ask", "doc.pdf", "--per", "document", "--prompt", QUESTION, "--model", str(checkpoint_dir("tiny-mha")),
         *FAST, "-o", "out.jsonl"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    [record] = jsonl(Path("out.jsonl").read_text())
    assert (record["page"], record["pages"], record["prompt"]) == (1, [1, 2, 3], QUESTION)

    # The same conversation by hand: one user turn, an <image> line per page (300x400 pt at 36 dpi), the question.
    images = tuple(_rendered(Path("doc.pdf"), 0.5))
    conversation = (Message(USER, "<image>\n<image>\n<image>\n" + QUESTION, images), Message(ASSISTANT, ""))
    processor = parity_processor("tiny-mha")
    prepared = processor.prepare(conversation)
    assert prepared.images_spatial_crop.tolist() == [[1, 1]] * 3  # three images: each one 384x384 view, no tiles
    sampling = Settings(**record["settings"]).sampling()
    expected = _engine_answer(Engine(parity_model("tiny-mha"), processor), Request("by-hand", conversation, sampling))
    assert record["text"] == expected.text and expected.n_generated == 3
    assert record["tokens"] == {"prompt": expected.n_prompt, "generated": expected.n_generated}
    assert expected.n_prompt == len(prepared.input_ids)


def test_per_page_is_the_default_and_asks_one_image_per_request(fake):
    make_pdf(Path("doc.pdf"), 3)
    default = jsonl(invoke("ask", "doc.pdf", "--prompt", QUESTION, "-f", "jsonl").stdout)
    asked = list(fake.requests)
    explicit = jsonl(invoke("ask", "doc.pdf", "--prompt", QUESTION, "--per", "page", "-f", "jsonl").stdout)
    assert [r["page"] for r in default] == [1, 2, 3] and all(r["pages"] is None for r in default)
    assert [{**r, "timings": None} for r in default] == [{**r, "timings": None} for r in explicit]
    assert [(len(r.images), r.conversation[0].content) for r in asked] == [(1, f"<image>\n{QUESTION}")] * 3
    assert all(windows.identity(PageRecord.from_dict(r)) == PageRecord.from_dict(r).key for r in default)


def test_a_long_document_is_asked_in_windows_each_request_holding_its_pages(fake):
    make_pdf(Path("long.pdf"), 5)
    make_image(Path("photo.png"), (90, 60), "navy")
    result = invoke("ask", "long.pdf", "photo.png", "--per", "document", "--window", "2", "--prompt", "A?",
                    "--prompt", "B?", "-f", "jsonl")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    got = [(Path(r["source"]).name, r["pages"], r["page"], r["prompt"]) for r in jsonl(result.stdout)]
    assert got == [
        ("long.pdf", [1, 2], 1, "A?"), ("long.pdf", [1, 2], 1, "B?"),
        ("long.pdf", [3, 4], 3, "A?"), ("long.pdf", [3, 4], 3, "B?"),
        ("long.pdf", [5], 5, "A?"), ("long.pdf", [5], 5, "B?"),
        ("photo.png", [1], 1, "A?"), ("photo.png", [1], 1, "B?"),
    ]  # fmt: skip
    assert [len(r.images) for r in fake.requests] == [2, 2, 2, 2, 1, 1, 1, 1]
    assert fake.requests[0].conversation[0].content == "<image>\n<image>\nA?"
    page = [im.tobytes() for im in _rendered(Path("long.pdf"), 2.0)]  # the default 144 dpi
    assert [im.tobytes() for im in fake.requests[2].images] == page[2:4]  # the second window: pages 3 and 4


def test_options_are_checked_with_the_flag_or_keyword_named(fake):
    make_pdf(Path("doc.pdf"), 1)
    for args, flag in ((("--per", "sideways"), "--per"), (("--window", "3"), "--window"),
                       (("--per", "document", "--window", "0"), "--window")):  # fmt: skip
        result = invoke("ask", "doc.pdf", "--prompt", "q", *args)
        assert result.exit_code == 2 and flag in result.stderr, (args, result.stderr)
    assert not fake.requests
    with pytest.raises(OptionError, match="window"):
        dsvl2.ask("doc.pdf", prompt="q", per="document", window=0, runtime=fake)


def test_resume_does_not_ask_a_document_again(fake):
    make_pdf(Path("in/doc.pdf"), 3)
    first = invoke("ask", "in", "--per", "document", "--prompt", QUESTION, "-o", "out/")
    assert first.exit_code == 0 and len(fake.requests) == 1, first.stderr
    fake.load_args = None
    again = invoke("ask", "in", "--per", "document", "--prompt", QUESTION, "-o", "out/", "--resume")
    assert again.exit_code == 0 and len(fake.requests) == 1, again.stderr  # nothing asked,
    assert fake.load_args is None  # not even the model loaded: no page of the document needs it
    [record] = jsonl(Path("out/doc.pdf.ask.jsonl").read_text())
    assert record["pages"] == [1, 2, 3]
    # The same question per page, or over other windows, is another record: asked, kept beside the first.
    per_page = invoke("ask", "in", "--prompt", QUESTION, "-o", "out/", "--resume")
    assert per_page.exit_code == 0 and len(fake.requests) == 4
    saved = jsonl(Path("out/doc.pdf.ask.jsonl").read_text())
    assert sorted((r["page"], r["pages"] or []) for r in saved) == [(1, []), (1, [1, 2, 3]), (2, []), (3, [])]
    single = invoke("ask", "in", "--per", "document", "--prompt", QUESTION, "-o", "all.jsonl")
    assert single.exit_code == 0 and len(fake.requests) == 5
    invoke("ask", "in", "--per", "document", "--prompt", QUESTION, "-o", "all.jsonl", "--resume")
    assert len(fake.requests) == 5 and len(jsonl(Path("all.jsonl").read_text())) == 1


def _tiff_with_a_bad_frame(path: Path, frames: int = 3, bad: int = 2) -> Path:
    """A multi-frame TIFF whose frame `bad` (1-based) declares 20000x20000 pixels: that page cannot render."""
    buffer = io.BytesIO()
    colours = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue", "gray")[:frames]]
    colours[0].save(buffer, format="TIFF", save_all=True, append_images=colours[1:])
    data = bytearray(buffer.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    offset, index = struct.unpack(order + "I", data[4:8])[0], 1
    while offset:
        (n,) = struct.unpack(order + "H", data[offset : offset + 2])
        for entry in range(offset + 2, offset + 2 + 12 * n, 12):
            tag, kind = struct.unpack(order + "HH", data[entry : entry + 4])
            if index == bad and tag in (256, 257):  # ImageWidth, ImageLength
                value = struct.pack(order + ("H" if kind == 3 else "I"), 20_000)
                data[entry + 8 : entry + 8 + len(value)] = value
        offset = struct.unpack(order + "I", data[offset + 2 + 12 * n : offset + 6 + 12 * n])[0]
        index += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def test_a_page_that_does_not_render_is_left_out_and_named(fake):
    _tiff_with_a_bad_frame(Path("scan.tiff"))
    result = invoke("ask", "scan.tiff", "--per", "document", "--prompt", QUESTION, "-f", "jsonl")
    assert result.exit_code == 1  # a page is missing from the answer: the run reports a failure
    [record] = jsonl(result.stdout)
    assert (record["page"], record["pages"], record["status"]) == (1, [1, 3], "failed")
    assert record["error"].startswith("page 2 could not be rendered and was left out (page 2: cannot render")
    assert "over the limit" in record["error"] and "the answer over pages 1, 3 is kept" in record["error"]
    assert record["text"] == "fake answer" and record["result"] == {"answer": "fake answer"}
    [request] = fake.requests
    assert request.conversation[0].content == f"<image>\n<image>\n{QUESTION}"
    assert [im.getpixel((0, 0)) for im in request.images] == [(255, 0, 0), (0, 0, 255)]  # frames 1 and 3

    one_by_one = jsonl(invoke("ask", "scan.tiff", "--per", "document", "--window", "1", "--prompt", QUESTION,
                              "-f", "jsonl").stdout)  # fmt: skip
    assert [(r["pages"], r["status"], r["text"]) for r in one_by_one] == [
        ([1], "ok", "fake answer"),
        ([2], "failed", None),
        ([3], "ok", "fake answer"),
    ]  # a window with no page that rendered is a failed record, and the model is not asked
    assert one_by_one[1]["error"].startswith("no page could be rendered (page 2: cannot render page")
    assert len(fake.requests) == 3


def test_resume_redoes_a_document_with_a_missing_page_and_keeps_one_record(fake):
    _tiff_with_a_bad_frame(Path("in/scan.tiff"))
    assert invoke("ask", "in", "--per", "document", "--prompt", QUESTION, "-o", "out/").exit_code == 1
    assert invoke("ask", "in", "--per", "document", "--prompt", QUESTION, "-o", "out/", "--resume").exit_code == 1
    assert len(fake.requests) == 2  # failed, so asked again
    [record] = jsonl(Path("out/scan.tiff.ask.jsonl").read_text())
    assert record["pages"] == [1, 3]


def test_a_failed_record_over_some_pages_gives_way_to_a_later_one_over_all_of_them():
    ctx_record = {"source": "d.pdf", "sha256": "0" * 64, "page_size": None, "task": "ask", "prompt": "q",
                  "model": {"id": "m", "revision": None, "fingerprint": None}, "settings": {"model": "m"},
                  "text": "t", "result": {"answer": "t"}}  # fmt: skip
    partial = PageRecord(**ctx_record, page=1, pages=[1, 3], status="failed", error="page 2 could not be rendered")
    whole = PageRecord(**ctx_record, page=1, pages=[1, 2, 3], status="ok")
    other_prompt = PageRecord(**{**ctx_record, "prompt": "p"}, page=1, pages=[1, 3], status="failed")
    per_page = PageRecord(**ctx_record, page=1, status="ok")
    assert windows.latest([partial, other_prompt, per_page, whole]) == [other_prompt, per_page, whole]
    assert windows.latest([whole, partial]) == [whole, partial]  # only a later record supersedes
    assert len({windows.identity(r) for r in (partial, whole, per_page)}) == 3


SETTINGS = Settings(model="m")


def test_several_page_requests_keep_the_runners_limits_and_retries():
    """Out-of-memory halving, the page timeout, the repetition retry and fail-fast on windows of two pages."""
    task = AskTask(("q",), window=2)

    fake = FakeRuntime(fits=1)
    stats, events = run(fake, pages(3, 2), task=task, window=2, batch_size=3, adaptive_batch=True)
    assert [e.new for e in events if isinstance(e, runner.BatchResized)] == [1]
    assert [(r.source, r.pages, r.status) for r in records(events)] == [(f"d{d}.pdf", [1, 2], "ok") for d in range(3)]
    assert all(len(r.images) == 2 for r in fake.requests)

    fake = FakeRuntime().enqueue("a").enqueue("slow", seconds=20).enqueue("c")
    stats, events = run(fake, pages(3, 2), task=task, window=2, batch_size=3, page_timeout=0.2)
    assert [(r.pages, r.status) for r in records(events)] == [([1, 2], "ok"), ([1, 2], "failed"), ([1, 2], "ok")]
    assert "page timeout" in records(events)[1].error

    fake = FakeRuntime().enqueue("loop loop", finish_reason="repetition").enqueue("fine")
    retry = Settings(model="m", retry_repetition=True)
    events = []
    runner.run(runtime=fake, task=task, pages=pages(1, 2), settings=retry, on_event=events.append, batch_size=1,
               window=2)  # fmt: skip
    [record] = records(events)
    assert (record.text, record.pages, len(record.attempts or [])) == ("fine", [1, 2], 2)
    assert fake.requests[1].conversation == fake.requests[0].conversation  # the retry asks the same two pages

    fake = FakeRuntime().enqueue("")  # an empty answer does not parse: the first failure stops the run
    stats, events = run(fake, pages(3, 2), task=task, window=2, batch_size=1, fail_fast=True)
    assert stats.stopped_early and [(r.pages, r.status) for r in records(events)] == [([1, 2], "parse_error")]


def test_the_api_asks_per_document(fake):
    make_pdf(Path("doc.pdf"), 3)
    [record] = list(dsvl2.ask("doc.pdf", prompt=QUESTION, per="document", runtime=fake))
    assert (record["page"], record["pages"], record["result"]) == (1, [1, 2, 3], {"answer": "fake answer"})
    assert [len(r.images) for r in fake.requests] == [3]
    per_page = list(dsvl2.ask("doc.pdf", prompt=QUESTION, runtime=fake))
    assert [(r["page"], r["pages"]) for r in per_page] == [(1, None), (2, None), (3, None)]


@pytest.mark.parametrize("fmt", ["md", "json", "csv", "text"])
def test_every_output_shows_the_record_once(fake, fmt):
    make_pdf(Path("in/doc.pdf"), 3)
    result = invoke("ask", "in", "--per", "document", "--prompt", QUESTION, "-o", "out/", "-f", fmt)
    assert result.exit_code == 0, result.stderr
    suffix = {"md": "md", "json": "json", "csv": "csv", "text": "txt"}[fmt]
    rendered = Path(f"out/doc.pdf.ask.{suffix}").read_text()
    assert rendered.count("fake answer") == (2 if fmt == "json" else 1), rendered  # JSON: its text and result
    if fmt == "json":
        [record] = json.loads(rendered)
        assert record["pages"] == [1, 2, 3]
    elif fmt == "csv":
        [row] = list(csv.DictReader(io.StringIO(rendered)))
        assert (row["page"], row["answer"]) == ("1", "fake answer")
    elif fmt == "md":
        assert rendered.count("<!--") == 1 and f"**Q:** {QUESTION}" in rendered
