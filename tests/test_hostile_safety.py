"""Safety against hostile names and content: output paths never leave the output (names from inputs are
sanitised, symlinks inside -o DIR or --annotate DIR are refused, an output never overwrites an input), and
nothing in a document or in model output is executed (PDF actions, EPS handed to Ghostscript, code in
answers). Inputs left untouched is also checked over the whole corpus in test_hostile.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pymupdf
import pytest
from corpus import snapshot
from fakes import invoke, make_image, make_pdf

PWNED = "PWNED"


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_names_from_inputs_cannot_lead_outputs_out_of_the_directory(fake, tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    os.chdir(work)
    hostile = [
        "../../evil.png",  # climbs out of the working directory
        str(tmp_path / "abs.png"),  # absolute
        "..\\..\\win.png",  # backslashes are a name on POSIX, a path elsewhere
        "new\nline\r\x1b[31m.png",  # control characters and a terminal escape
        "-rf.png",
        " .png",
    ]
    for name in hostile:
        make_image(Path(name))
    hostile.append("broken\x1b]0;owned\x07\x1b[2J.pdf")  # unreadable: its name reaches stderr
    Path(hostile[-1]).write_text("not a PDF")
    before = tree(tmp_path)
    result = invoke("ocr", "-", "-o", "out/", input="\0".join(hostile) + "\0")
    assert result.exit_code == 1, result.stderr
    out = (work / "out").resolve()
    created = tree(tmp_path) - before
    assert created and all((tmp_path / p).resolve().is_relative_to(out) for p in created), sorted(created)
    names = {p.name for p in out.rglob("*.md")}
    assert "evil.png.ocr.md" in names and "abs.png.ocr.md" in names and "_.._win.png.ocr.md" in names
    assert not any(set(n) & set("\n\r\x1b/\\") for n in names)
    assert "broken" in result.stderr and "not a PDF" in result.stderr
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr  # no raw terminal escapes from a name


def test_a_symlink_inside_the_output_directory_cannot_redirect_outputs(fake, tmp_path):
    make_pdf(Path("in/sub/x.pdf"), 1)
    (tmp_path / "elsewhere").mkdir()
    Path("out").mkdir()
    Path("out/sub").symlink_to(tmp_path / "elsewhere")
    result = invoke("ocr", "in", "-o", "out/")
    assert result.exit_code == 2
    assert "escapes out" in result.stderr and "x.pdf" in result.stderr
    assert list((tmp_path / "elsewhere").iterdir()) == [] and fake.load_args is None  # refused before any work


def test_annotations_cannot_leave_their_directory(fake, tmp_path):
    make_image(Path("in/sub/p.png"))
    (tmp_path / "elsewhere").mkdir()
    Path("ann").mkdir()
    Path("ann/sub").symlink_to(tmp_path / "elsewhere")
    fake.default = "<|ref|>x<|/ref|><|det|>[[1, 1, 500, 500]]<|/det|>"
    result = invoke("ground", "in", "--query", "x", "--annotate", "ann")
    assert result.exit_code == 2 and "annotation" in result.stderr and "escapes" in result.stderr
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize(
    "args", [["-o", "doc.pdf"], ["-o", "run.jsonl", "--manifest", "doc.pdf"]], ids=["output", "manifest"]
)
def test_an_output_that_is_also_an_input_is_refused(fake, args):
    make_pdf(Path("doc.pdf"), 1)
    before = Path("doc.pdf").read_bytes()
    result = invoke("ocr", "doc.pdf", *args)
    assert result.exit_code == 2 and "doc.pdf is also an input" in result.stderr
    assert Path("doc.pdf").read_bytes() == before


def test_inputs_are_untouched_by_runs_and_resumed_runs(fake, tmp_path):
    make_pdf(Path("in/a.pdf"), 2)
    make_image(Path("in/b.png"))
    before = snapshot(tmp_path / "in")
    assert invoke("ocr", "in", "-o", "out/").exit_code == 0
    assert invoke("ocr", "in", "-o", "out/", "--resume").exit_code == 0
    assert invoke("ground", "in", "--query", "x", "--annotate", "ann", "-f", "jsonl").exit_code in (0, 1)
    assert snapshot(tmp_path / "in") == before


def test_pdf_actions_and_scripts_are_never_run(fake):
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((20, 40), "click me")
    catalog = doc.pdf_catalog()
    doc.xref_set_key(catalog, "OpenAction", f"<</S/Launch/F(/usr/bin/touch)/P({PWNED})>>")
    doc.xref_set_key(catalog, "AA", f"<</WC<</S/JavaScript/JS(app.launchURL('file:{PWNED}'))>>>>")
    doc.save("actions.pdf")
    result = invoke("ocr", "actions.pdf", "-f", "jsonl")
    assert result.exit_code == 0 and not Path(PWNED).exists()


def test_an_eps_file_is_never_handed_to_ghostscript(fake):
    Path("trap.png").write_text(f"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n({PWNED}) (w) file closefile\n")
    result = invoke("ocr", "trap.png", "-f", "jsonl")
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["status"] == "failed" and "supported format" in record["error"]
    assert not Path(PWNED).exists() and fake.requests == []


def test_code_and_shell_in_model_output_is_written_verbatim_never_run(fake):
    make_image(Path("p.png"))
    answer = f"$(touch {PWNED}) `touch {PWNED}` __import__('os').system('touch {PWNED}') {{{{7*7}}}}"
    fake.default = answer
    for task, fmt in (("ocr", "md"), ("ask", "text"), ("table", "csv"), ("chart", "json")):
        extra = ["--prompt", "q"] if task == "ask" else []
        result = invoke(task, "p.png", "-f", fmt, *extra)
        assert result.exit_code in (0, 1)
        if task in ("ocr", "ask"):
            assert answer in result.stdout
    assert not Path(PWNED).exists()
