"""The bad-input corpus, generated on demand (no binary blobs in the repository): broken and odd PDFs,
images in every awkward mode and size, and filesystem traps, each with the outcome dsvl2 documents for it
(docs/robustness.md). `build(root)` writes the corpus under `root` and returns its `Case`s; good documents
sit among the bad ones so that a batch over the tree shows the good ones coming out whole.

Unreadable files: the tests run as root, where `chmod 000` blocks nothing, so the corpus uses things that
cannot be read whatever the user: a FIFO (opening it would block forever), dangling and looping symlinks.
A permission error itself is simulated by the tests with a monkeypatched `open` (see test_hostile.py).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pymupdf
from fakes import make_pdf
from PIL import Image

PASSWORD = "s3cret"
BOMB_SIDE = 30_000  # declared 30000 x 30000 = 900 MP, six times the 150 MP limit
NON_UTF8 = os.fsdecode(b"caf\xe9-menu.png")  # Latin-1 bytes in a file name
LONG = "long-" + "n" * 235 + ".png"  # 244 bytes: the output name must be shortened to fit 255


@dataclass(frozen=True, slots=True)
class Case:
    """One corpus file and what dsvl2 must make of it.

    `status` is the status of every record of the file, unless `page_statuses` gives one per page;
    `records` how many there are (a file that cannot be opened at all gives one record with page null:
    `page_level` False); `error` a substring of the error message of every record that is not ok;
    `warning` a substring of a stderr warning, when one is due.
    """

    path: str
    family: str
    what: str
    status: str
    records: int = 1
    error: str | None = None
    page_level: bool = True
    warning: str | None = None
    page_statuses: tuple[str, ...] = ()

    def statuses(self) -> tuple[str, ...]:
        return self.page_statuses or (self.status,) * self.records


def _png(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _gradient(size: tuple[int, int]) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, axis=0)
    return Image.fromarray(np.stack([x, x[::-1, ::-1], np.full_like(x, 90)], axis=-1))


def _pdf_bytes(pages: int = 3, **kw: object) -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f".corpus-{os.getpid()}.pdf"
    try:
        return make_pdf(path, pages, **kw).read_bytes()
    finally:
        path.unlink(missing_ok=True)


def png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid 8x8 PNG whose header claims `side` x `side` pixels (CRC fixed, so readers believe it)."""
    data = bytearray(_png(Image.new("1", (8, 8))))
    ihdr = struct.pack(">II", side, side) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def tiff_frame_bomb(side: int = 20_000) -> bytes:
    """A two-frame TIFF whose first frame is honest and whose second declares `side` x `side` pixels."""
    frames = [Image.new("RGB", (20, 10), "red"), Image.new("RGB", (20, 10), "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    data = bytearray(buffer.getvalue())
    order = "<" if data[:2] == b"II" else ">"
    offset, index = struct.unpack(order + "I", data[4:8])[0], 0
    while offset:
        (n,) = struct.unpack(order + "H", data[offset : offset + 2])
        for i in range(n):
            entry = offset + 2 + 12 * i
            tag, kind = struct.unpack(order + "HH", data[entry : entry + 4])
            if index == 1 and tag in (256, 257):  # ImageWidth, ImageLength of the second frame
                value = struct.pack(order + ("H" if kind == 3 else "I"), side)
                data[entry + 8 : entry + 8 + len(value)] = value
        offset, index = struct.unpack(order + "I", data[offset + 2 + 12 * n : offset + 6 + 12 * n])[0], index + 1
    return bytes(data)


def zero_page_pdf() -> bytes:
    """A well-formed PDF whose page tree is empty (MuPDF refuses to save one, so it is written by hand)."""
    objects = [b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[]/Count 0>>"]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def pdf_image_bomb(side: int = 40_000) -> bytes:
    """A one-page PDF with an embedded image that declares `side` x `side` pixels but holds a few rows."""
    doc = pymupdf.open()
    page = doc.new_page(width=300, height=400)
    xref = page.insert_image(pymupdf.Rect(10, 10, 290, 390), stream=_png(Image.new("L", (8, 8))))
    doc.update_stream(xref, zlib.compress(b"\0" * side * 50, 9), compress=False)
    for key, value in (("Width", str(side)), ("Height", str(side)), ("Filter", "/FlateDecode")):
        doc.xref_set_key(xref, key, value)
    doc.xref_set_key(xref, "DecodeParms", "null")
    data = doc.tobytes()
    doc.close()
    return data


def huge_page_pdf() -> bytes:
    doc = pymupdf.open()
    side = 10_000 / 25.4 * 72  # 10 m in points
    page = doc.new_page(width=side, height=side)
    page.insert_text((100, 200), "a 10 m x 10 m poster", fontsize=400)
    data = doc.tobytes()
    doc.close()
    return data


def blank_pdf() -> bytes:
    doc = pymupdf.open()
    doc.new_page(width=300, height=400)
    data = doc.tobytes()
    doc.close()
    return data


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _image(root: Path, rel: str, image: Image.Image, fmt: str, **save: object) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    _write(root, rel, buffer.getvalue())


def _pdfs(root: Path) -> list[Case]:
    good = _pdf_bytes(3, label="good")
    _write(root, "pdf/good.pdf", good)
    _write(root, "pdf/truncated-half.pdf", good[: len(good) // 2])
    _write(root, "pdf/truncated-head.pdf", good[: len(good) // 10])
    _write(root, "pdf/corrupted.pdf", good[:300] + bytes(range(256)) * 4 + good[300 + 1024 :])
    _write(root, "pdf/header-only.pdf", b"%PDF-1.7\n")
    _write(root, "pdf/zero-pages.pdf", zero_page_pdf())
    _write(root, "pdf/encrypted.pdf", _pdf_bytes(2, password=PASSWORD))
    _write(root, "pdf/huge-page.pdf", huge_page_pdf())
    _write(root, "pdf/blank-page.pdf", blank_pdf())
    _write(root, "pdf/image-bomb.pdf", pdf_image_bomb())
    _write(root, "pdf/text-named.pdf", b"Just some text that claims to be a PDF by its name.\n")
    repaired = "damaged PDF repaired"
    unreadable = "cannot open: damaged beyond repair"
    return [
        Case("pdf/good.pdf", "pdf", "a good 3-page PDF", "ok", 3),
        Case("pdf/truncated-half.pdf", "pdf", "first half of a PDF", "ok", 3, warning=repaired),
        Case("pdf/truncated-head.pdf", "pdf", "first 10% of a PDF", "failed", error=unreadable, page_level=False),
        Case("pdf/corrupted.pdf", "pdf", "1 KiB of a PDF overwritten", "ok", 3, warning=repaired),
        Case(
            "pdf/header-only.pdf", "pdf", "a PDF header and nothing else", "failed", error=unreadable, page_level=False
        ),
        Case(
            "pdf/zero-pages.pdf", "pdf", "a PDF with an empty page tree", "failed", error="no pages", page_level=False
        ),
        Case(
            "pdf/encrypted.pdf",
            "pdf",
            "AES-256 encrypted, no --password",
            "failed",
            error="needs --password",
            page_level=False,
        ),
        Case("pdf/huge-page.pdf", "pdf", "one 10 m x 10 m page", "ok"),
        Case("pdf/blank-page.pdf", "pdf", "a page with nothing on it", "ok"),
        Case("pdf/image-bomb.pdf", "pdf", "an embedded image declaring 40000x40000 pixels", "ok"),
        Case(
            "pdf/text-named.pdf",
            "pdf",
            "a text file named .pdf",
            "failed",
            error="not a PDF or an image",
            page_level=False,
        ),
    ]


def _images(root: Path) -> list[Case]:
    photo = _gradient((120, 80))
    _image(root, "image/good.png", photo, "PNG")
    png, jpg = _png(photo), io.BytesIO()
    photo.save(jpg, format="JPEG", quality=90)
    _write(root, "image/truncated.png", png[: len(png) // 2])
    _write(root, "image/truncated.jpg", jpg.getvalue()[: len(jpg.getvalue()) // 2])
    _write(root, "image/zero-byte.png", b"")
    _image(root, "image/palette.png", photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    _image(root, "image/palette-transparent.png", photo.convert("P"), "PNG", transparency=0)
    _image(root, "image/alpha.png", photo.convert("RGBA"), "PNG")
    _image(root, "image/gray-alpha.png", photo.convert("LA"), "PNG")
    _image(root, "image/cmyk.jpg", photo.convert("CMYK"), "JPEG")
    _image(root, "image/cmyk.tiff", photo.convert("CMYK"), "TIFF")
    sixteen = (np.arange(120 * 80, dtype=np.uint32).reshape(80, 120) * 6).astype(np.uint16)
    _image(root, "image/16-bit.png", Image.fromarray(sixteen), "PNG")
    _image(root, "image/grayscale.png", photo.convert("L"), "PNG")
    _image(root, "image/bilevel.png", photo.convert("1"), "PNG")
    _write(root, "image/bomb.png", png_bomb())
    _write(root, "image/tiff-frame-bomb.tiff", tiff_frame_bomb())
    _image(root, "image/1x1.png", Image.new("RGB", (1, 1), "black"), "PNG")
    _image(root, "image/20000x50.png", _gradient((20_000, 50)), "PNG")
    truncated = "cannot render page: OSError: image file is truncated"
    return [
        Case("image/good.png", "image", "a good PNG", "ok"),
        Case("image/truncated.png", "image", "first half of a PNG", "failed", error=truncated),
        Case("image/truncated.jpg", "image", "first half of a JPEG", "failed", error=truncated),
        Case(
            "image/zero-byte.png", "image", "an empty file", "failed", error="not a PDF or an image", page_level=False
        ),
        Case("image/palette.png", "image", "palette (P) PNG", "ok"),
        Case("image/palette-transparent.png", "image", "palette PNG with a transparent colour", "ok"),
        Case("image/alpha.png", "image", "RGBA PNG", "ok"),
        Case("image/gray-alpha.png", "image", "grey + alpha (LA) PNG", "ok"),
        Case("image/cmyk.jpg", "image", "CMYK JPEG", "ok"),
        Case("image/cmyk.tiff", "image", "CMYK TIFF", "ok"),
        Case("image/16-bit.png", "image", "16-bit greyscale PNG (I;16)", "ok"),
        Case("image/grayscale.png", "image", "8-bit greyscale PNG", "ok"),
        Case("image/bilevel.png", "image", "1-bit PNG", "ok"),
        Case(
            "image/bomb.png",
            "image",
            f"PNG declaring {BOMB_SIDE}x{BOMB_SIDE} pixels",
            "failed",
            error="over the limit",
            page_level=False,
        ),
        Case(
            "image/tiff-frame-bomb.tiff",
            "image",
            "2-frame TIFF whose 2nd frame declares 20000x20000",
            "failed",
            2,
            error="over the limit",
            page_statuses=("ok", "failed"),
        ),
        Case("image/1x1.png", "image", "a 1x1 image", "ok"),
        Case("image/20000x50.png", "image", "a 20000x50 strip", "ok"),
    ]


def _filesystem(root: Path) -> list[Case]:
    fs = root / "fs"
    fs.mkdir(parents=True, exist_ok=True)
    _image(root, "fs/good.png", _gradient((64, 48)), "PNG")
    (fs / "dangling.pdf").symlink_to("gone.pdf")
    (fs / "loop-a.pdf").symlink_to("loop-b.pdf")
    (fs / "loop-b.pdf").symlink_to("loop-a.pdf")
    (fs / "dir-loop").symlink_to(".")  # a directory symlink to itself: never followed
    os.mkfifo(fs / "fifo.pdf")  # opening it would wait for a writer forever
    _image(root, "fs/" + NON_UTF8, _gradient((40, 30)), "PNG")
    _image(root, "fs/" + LONG, _gradient((40, 30)), "PNG")
    return [
        Case("fs/good.png", "filesystem", "a good PNG", "ok"),
        Case(
            "fs/dangling.pdf",
            "filesystem",
            "a symlink to a missing file",
            "failed",
            error="broken symbolic link",
            page_level=False,
        ),
        Case(
            "fs/loop-a.pdf",
            "filesystem",
            "two symlinks pointing at each other",
            "failed",
            error="symbolic link loop",
            page_level=False,
        ),
        Case(
            "fs/loop-b.pdf",
            "filesystem",
            "(the other half of the loop)",
            "failed",
            error="symbolic link loop",
            page_level=False,
        ),
        Case(
            "fs/fifo.pdf",
            "filesystem",
            "a FIFO named .pdf (unreadable: blocks forever)",
            "failed",
            error="not a regular file",
            page_level=False,
        ),
        Case("fs/" + NON_UTF8, "filesystem", "a file name that is not UTF-8", "ok"),
        Case("fs/" + LONG, "filesystem", "a 244-byte file name", "ok"),
    ]


BUILDERS: tuple[Callable[[Path], list[Case]], ...] = (_pdfs, _images, _filesystem)


def build(root: Path) -> list[Case]:
    """Write the whole corpus under `root`; its cases in the order a directory walk meets them."""
    cases = [case for builder in BUILDERS for case in builder(root)]
    return sorted(cases, key=lambda c: c.path.split("/"))


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """(sha256, mtime_ns) of every regular file under `root`, read without following symlinks or opening
    FIFOs: proof that a run left its inputs untouched."""
    import hashlib

    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_symlink() or not path.is_file():
                continue
            out[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out
