"""The bad-input corpus (tests/corpus.py) through the CLI on a scripted runtime, batched with good
documents: every file gets its documented outcome, nothing is skipped without a record, the good documents
come out whole, exit codes follow the contract, pages reach the model within the size cap, and a real
process over the whole corpus neither hangs (FIFO) nor grows past a memory bound (decompression bombs).
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import corpus
import pytest
from fakes import invoke, jsonl, make_image, make_pdf
from PIL import Image
from test_writers import violations

from dsvl2 import inputs
from dsvl2.pipelines.schema import record_schema

FAKE_CLI = [sys.executable, str(Path(__file__).parent / "fakes.py")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[corpus.Case]]:
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    return root, corpus.build(root)


class Hung(Exception):
    pass


@pytest.fixture(autouse=True)
def deadline():
    """A hang (e.g. opening a FIFO) fails the test instead of stalling the suite: SIGALRM interrupts the
    blocked call and the handler's exception ends it."""

    def expire(signum, frame):
        raise Hung("the test took more than 60 s: something blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def by_source(records: list[dict], root: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        out[os.path.relpath(r["source"], root)].append(r)
    return out


def display(path: str) -> str:
    return inputs.display(path)


def test_every_corpus_file_gets_its_documented_outcome(fake, built):
    """Catches a bad file that crashes or stops the batch, vanishes without a record, or gets the wrong
    outcome; and a good file that does not come out whole next to bad ones."""
    root, cases = built
    before = corpus.snapshot(root)
    result = invoke("ocr", str(root), "-f", "jsonl", "--max-side", "1024")
    assert result.exit_code == 1, result.stderr  # some files failed, the batch finished
    records = by_source(jsonl(result.stdout), root)
    assert sorted(records) == sorted(display(c.path) for c in cases), "a file without a record, or an extra one"
    schema = record_schema()
    for case in cases:
        got = records[display(case.path)]
        assert len(got) == case.records, (case.path, [r["page"] for r in got])
        assert tuple(r["status"] for r in got) == case.statuses(), (case.path, [r["error"] for r in got])
        for r in got:
            assert violations(r, schema) == [], case.path
            if case.error and r["status"] != "ok":
                assert case.error in r["error"], (case.path, r["error"])
            assert (r["page"] is not None) == case.page_level, case.path
        if case.page_level:
            assert [r["page"] for r in got] == list(range(1, case.records + 1)), case.path
        if case.warning:
            assert f"{display(case.path)}: {case.warning}" in result.stderr.replace(str(root) + "/", ""), case.path
    assert max(max(r.images[0].size) for r in fake.requests) <= 1024  # --max-side reaches the model
    assert corpus.snapshot(root) == before  # inputs never modified (content and mtime)


def test_corpus_to_a_directory_keeps_every_output_inside_with_short_utf8_names(fake, built):
    root, cases = built
    result = invoke("ocr", str(root), "-o", "out/")
    assert result.exit_code == 1
    out = Path("out").resolve()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(p.resolve().is_relative_to(out) for p in files)
    for p in files:
        assert len(os.fsencode(p.name)) <= 255 and os.fsencode(p.name).decode("utf-8")
    assert not [p for p in files if p.name.endswith((".partial", ".tmp"))]
    ok_cases = [c for c in cases if c.status == "ok"]
    keys = {json.loads(line)["source"] for p in out.rglob("*.jsonl") for line in p.read_text().splitlines()}
    assert {display(str(root / c.path)) for c in ok_cases} <= keys
    markdown = {p.name for p in out.rglob("*.md")}
    assert "caf_-menu.png.ocr.md" in markdown  # the non-UTF-8 byte became '_' in the output name
    assert any(name.startswith("long-") and "~" in name for name in markdown)  # shortened, hash-tagged


def test_encrypted_pdf_with_the_password_is_processed(fake, built):
    root, _ = built
    result = invoke("ocr", str(root / "pdf/encrypted.pdf"), "--password", corpus.PASSWORD, "-f", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert [(r["page"], r["status"]) for r in jsonl(result.stdout)] == [(1, "ok"), (2, "ok")]


def test_the_same_file_given_twice_is_processed_once_with_a_warning(fake, built, tmp_path):
    root, _ = built
    good = root / "pdf" / "good.pdf"
    (tmp_path / "alias.pdf").symlink_to(good)
    result = invoke("ocr", str(good), "alias.pdf", str(good.parent / ".." / "pdf" / "good.pdf"), "-f", "jsonl")
    assert result.exit_code == 0
    assert [r["page"] for r in jsonl(result.stdout)] == [1, 2, 3]
    assert result.stderr.count("given more than once; processed once") == 2


def test_an_unreadable_file_fails_alone(fake, monkeypatch, tmp_path):
    """The tests run as root, where chmod 000 blocks nothing: `open` is made to refuse one file instead,
    exactly as the kernel would (PermissionError, errno 13)."""
    make_image(Path("in/a.png"))
    make_pdf(Path("in/locked.pdf"), 2)
    make_image(Path("in/z.png"))

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("locked.pdf"):
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(inputs, "open", refusing_open, raising=False)
    result = invoke("ocr", "in", "-f", "jsonl")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [(Path(r["source"]).name, r["status"]) for r in records] == [
        ("a.png", "ok"),
        ("locked.pdf", "failed"),
        ("z.png", "ok"),
    ]
    assert "Permission denied" in records[1]["error"]


def test_a_directory_without_documents_says_so(fake):
    Path("notes").mkdir()
    Path("notes/readme.txt").write_text("no documents here")
    result = invoke("ocr", "notes", "-f", "jsonl")
    assert result.exit_code == 0 and result.stdout == ""
    assert "notes: no PDF or image files in this directory" in result.stderr
    result = invoke("ocr", "notes", "--glob", "*.tiff", "-f", "jsonl")
    assert "notes: no files matching *.tiff in this directory" in result.stderr


@pytest.mark.parametrize(
    ("paths", "code"),
    [
        (["pdf/good.pdf", "image/1x1.png", "image/16-bit.png"], 0),
        (["pdf/good.pdf", "pdf/zero-pages.pdf", "image/good.png"], 1),
        (["image/truncated.png"], 1),
        ([], 2),
    ],
)
def test_exit_codes_follow_the_contract(fake, built, paths, code):
    root, _ = built
    result = invoke("ocr", *[str(root / p) for p in paths], "-f", "jsonl")
    assert result.exit_code == code, result.stderr


def test_a_real_process_over_the_corpus_finishes_within_a_memory_bound(built, tmp_path):
    """Catches a FIFO that blocks the run (timeout), and a decompression bomb or a poster-sized page that
    is decoded at full size (the bomb alone would need 900 MB)."""
    root, cases = built
    env = {**os.environ, "HOME": str(tmp_path), "DSVL2_FAKE_RSS": str(tmp_path / "rss")}
    done = subprocess.run(
        [*FAKE_CLI, "ocr", str(root), "-f", "jsonl", "-q"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert len(done.stdout.splitlines()) == sum(c.records for c in cases)
    peak_mib = int((tmp_path / "rss").read_text()) / 1024
    assert peak_mib < 400, f"peak resident memory {peak_mib:.0f} MiB"


def test_a_large_image_is_decoded_once_not_once_per_conversion(tmp_path):
    """Catches full-size copies of a big image (copy, alpha composite, RGB conversion: 4-5 times its decoded
    size before this was shrunk right after decoding). 6000x6000 RGBA decodes to 144 MB."""
    image = tmp_path / "big.png"
    Image.new("RGBA", (6000, 6000), (10, 20, 30, 128)).save(image)
    env = {**os.environ, "HOME": str(tmp_path), "DSVL2_FAKE_RSS": str(tmp_path / "rss")}
    done = subprocess.run(
        [*FAKE_CLI, "ocr", str(image), "-f", "jsonl", "-q"], env=env, stdin=subprocess.DEVNULL, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["page_size"]["width_px"] == 6000
    peak_mib = int((tmp_path / "rss").read_text()) / 1024
    assert peak_mib < 550, f"peak resident memory {peak_mib:.0f} MiB"
