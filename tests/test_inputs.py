"""Input expansion, sniffing, page selection and lazy rendering (dsvl2.inputs)."""

from __future__ import annotations

import functools
import io
import operator
import os
import struct
import zlib
from pathlib import Path

import pytest
from fakes import make_image, make_pdf
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dsvl2.inputs import (
    MAX_PIXELS,
    expand_inputs,
    open_document,
    parse_pages,
    parse_shard,
    read_path_list,
    safe_key,
)
from dsvl2.pages import iter_pages


def opened(path: Path, **kw):
    files, _ = expand_inputs([str(path)])
    return open_document(files[0], password=kw.pop("password", None), pages=kw.pop("pages", None))


def render(o, **kw):
    return list(iter_pages([o], dpi=kw.pop("dpi", 72), max_side=kw.pop("max_side", 4096), password=None, **kw))


@pytest.mark.parametrize(
    ("spec", "n", "pages"),
    [
        ("1", 5, (1,)),
        ("1-3,7", 9, (1, 2, 3, 7)),
        ("4-", 6, (4, 5, 6)),
        ("2-3,1-2", 5, (2, 3, 1)),
        ("3-9", 4, (3, 4)),
        ("8", 4, ()),
        (" 1 , 3 ", 4, (1, 3)),
    ],
)
def test_page_ranges_are_one_based(spec, n, pages):
    assert parse_pages(spec).select(n) == pages


@pytest.mark.parametrize("spec", ["0", "3-1", "a", "1-2-3", "", "-2", "1,,2"])
def test_bad_page_ranges_raise_value_error(spec):
    with pytest.raises(ValueError):
        parse_pages(spec)


@given(st.text(max_size=20))
def test_page_range_parsing_never_raises_anything_but_value_error(spec):
    try:
        selection = parse_pages(spec)
    except ValueError:
        return
    assert all(p >= 1 for p in selection.select(50))


def test_shards():
    shard = parse_shard("2/3")
    assert (shard.index, shard.count) == (2, 3)
    keys = [f"doc{i}.pdf" for i in range(30)]
    parts = [[k for k in keys if parse_shard(f"{i}/3").takes(k)] for i in (1, 2, 3)]
    assert sorted(functools.reduce(operator.iadd, parts, [])) == sorted(keys) and all(parts)
    for bad in ("0/3", "4/3", "1", "a/b"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_safe_key_sanitises_names():
    assert safe_key(["a", "b.pdf"]) == "a/b.pdf"
    assert safe_key(["..", "x:y?.pdf"]) == "_/x_y_.pdf"
    assert safe_key(["bad\x00name\n.pdf"]) == "bad_name_.pdf"
    assert safe_key([os.fsdecode(b"caf\xe9.pdf")]) == "caf_.pdf"  # not UTF-8
    long = safe_key(["x" * 300 + ".pdf"])
    assert len(long.encode()) <= 180 and "~" in long


def test_expand_directories_sorted_hidden_skipped_duplicates_and_missing(tmp_path):
    make_pdf(tmp_path / "d" / "b.pdf")
    make_image(tmp_path / "d" / "a" / "z.png")
    make_image(tmp_path / "d" / ".git" / "x.png")
    make_image(tmp_path / "d" / ".hidden.png")
    (tmp_path / "d" / "readme.txt").write_text("x")
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")  # a symlinked directory is not followed
    files, warnings = expand_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "b.pdf"), str(tmp_path / "nope")])
    assert [f.key for f in files] == ["a/z.png", "b.pdf", "nope"]
    assert files[2].error == "no such file or directory"
    assert warnings == [f"{tmp_path / 'd' / 'b.pdf'}: given more than once; processed once"]


def test_relative_argument_keeps_its_tree_absolute_keeps_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_pdf(Path("a/x.pdf"))
    make_pdf(Path("b/x.pdf"))
    files, _ = expand_inputs(["a/x.pdf", "./b/x.pdf"])
    assert [f.key for f in files] == ["a/x.pdf", "b/x.pdf"]
    files, _ = expand_inputs([str(tmp_path / "a/x.pdf"), str(tmp_path / "b/x.pdf"), "../" + tmp_path.name + "/a/x.pdf"])
    assert [f.key for f in files[:2]] == ["x.pdf", "x~2.pdf"]


def test_read_path_list():
    assert read_path_list(b"a.pdf\nb c.png\n\n") == ["a.pdf", "b c.png"]
    assert read_path_list(b"a\nb.pdf\0c.pdf\0") == ["a\nb.pdf", "c.pdf"]


def test_sniffing_not_extension(tmp_path):
    pdf_named_png = tmp_path / "really-a-pdf.png"
    make_pdf(pdf_named_png, 2)
    assert opened(pdf_named_png).doc.kind == "pdf"
    text = tmp_path / "fake.pdf"
    text.write_text("hello")
    assert "not a PDF or an image" in opened(text).doc.error
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    assert opened(empty).doc.error is not None


def test_pdf_pages_render_at_dpi_with_a_cap(tmp_path):
    o = opened(make_pdf(tmp_path / "d.pdf", 2, size=(300, 600)))
    assert (o.doc.kind, o.doc.n_pages, len(o.doc.sha256)) == ("pdf", 2, 64)
    page = render(o, dpi=144)[0]
    assert page.image.size == (600, 1200)
    assert (page.size.width_pt, page.size.height_pt, page.size.dpi) == (300, 600, 144)
    capped = render(o, dpi=144, max_side=300)[0]
    assert capped.image.size == (150, 300) and capped.size.dpi == 36


def test_huge_pdf_page_is_capped(tmp_path):
    o = opened(make_pdf(tmp_path / "poster.pdf", 1, size=(14000, 14000)))
    [page] = render(o, dpi=300, max_side=512)
    assert max(page.image.size) <= 512


def test_rendering_is_lazy_and_respects_want(tmp_path):
    o = opened(make_pdf(tmp_path / "d.pdf", 3))
    stream = iter_pages([o], dpi=72, max_side=2048, password=None, want=lambda doc, n: n != 2)
    first = next(stream)
    assert first.number == 1 and first.image is not None
    second, third = list(stream)
    assert second.image is None and second.error is None and third.image is not None


def test_page_selection_applies(tmp_path):
    o = opened(make_pdf(tmp_path / "d.pdf", 5), pages=parse_pages("2,4-"))
    assert [p.number for p in render(o)] == [2, 4, 5]


def test_encrypted_pdf(tmp_path):
    path = make_pdf(tmp_path / "s.pdf", 1, password="pw")
    assert opened(path).doc.error == "cannot open: encrypted PDF: needs --password"
    assert opened(path, password="no").doc.error == "cannot open: encrypted PDF: wrong --password"
    o = opened(path, password="pw")
    assert o.doc.error is None
    assert next(iter(iter_pages([o], dpi=72, max_side=2048, password="pw"))).image is not None


def test_pdf_with_no_pages_and_unreadable_document_yield_one_error_page(tmp_path):
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"%PDF-1.4\n%%EOF")
    o = opened(bad)
    assert o.doc.error is not None
    [page] = render(o)
    assert page.number is None and page.error == o.doc.error


def test_tiff_multi_page_and_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 10), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp_path / "t.tiff", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "g.gif", save_all=True, append_images=frames[1:])
    tiff = opened(tmp_path / "t.tiff")
    assert tiff.doc.n_pages == 3
    assert [p.image.getpixel((0, 0)) for p in render(tiff)] == [(255, 0, 0), (0, 128, 0), (0, 0, 255)]
    gif = opened(tmp_path / "g.gif")
    assert gif.doc.n_pages == 1 and render(gif)[0].image.getpixel((0, 0))[0] > 200


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F"])
def test_image_modes_become_rgb(tmp_path, mode):
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16", "I", "F") else "x.png")
    Image.new(mode, (30, 20)).save(path)
    [page] = render(opened(path))
    assert page.image.mode == "RGB" and page.size.width_px == 30 and page.size.width_pt is None


def test_large_image_is_scaled_for_the_model_but_reports_its_own_size(tmp_path):
    [page] = render(opened(make_image(tmp_path / "big.jpg", size=(3000, 1000))), max_side=1000)
    assert max(page.image.size) <= 1000 and (page.size.width_px, page.size.height_px) == (3000, 1000)


def test_declared_decompression_bomb_is_refused_without_decoding(tmp_path):
    side = int(MAX_PIXELS**0.5) + 100
    png = io.BytesIO()
    Image.new("1", (8, 8)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    ihdr = struct.pack(">II", side, side) + bytes(data[24:29])  # claim a huge size in the header
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    o = opened(path)
    assert o.doc.error is not None and "pixels" in o.doc.error


def test_stdin_data_document():
    data = Image.new("RGB", (5, 5)).tobytes()
    files, _ = expand_inputs([], stdin_data=data)
    assert [(f.source, f.key) for f in files] == [("-", "stdin")]
    assert open_document(files[0], password=None, pages=None).doc.error is not None  # raw pixels: not an image


def test_unreadable_directory_becomes_an_error_input(tmp_path, monkeypatch):
    make_image(tmp_path / "d" / "ok.png")
    real_walk = os.walk

    def walk(top, onerror=None, followlinks=False):
        yield from real_walk(top, onerror=onerror, followlinks=followlinks)
        onerror(PermissionError(13, "Permission denied", str(tmp_path / "d" / "locked")))

    monkeypatch.setattr("dsvl2.inputs.os.walk", walk)
    files, _ = expand_inputs([str(tmp_path / "d")])
    assert [(f.key, f.error) for f in files] == [
        ("ok.png", None),
        ("locked", "unreadable directory: Permission denied"),
    ]
