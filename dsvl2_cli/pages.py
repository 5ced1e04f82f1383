"""Render the pages of opened documents lazily, one at a time as the runner pulls them: PDF pages through
PyMuPDF at the requested dpi, capped so the longest side is at most `max_side` pixels; image frames
decoded once, shrunk right after decoding when large, turned upright (EXIF), converted to RGB. A page
that cannot be rendered becomes a `Page` with its error; nothing here raises for a bad page.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from PIL import Image

from dsvl2.inputs import Opened, check_size, open_image, open_pdf
from dsvl2.pipelines.base import Document, Page, PageSize

if TYPE_CHECKING:
    import pymupdf


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode → RGB: alpha composited on white, 16/32-bit and float scaled to 8 bits, CMYK/palette converted."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        lo, hi = (0, 65535) if image.mode.startswith("I;16") else image.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 1.0
        image = image.convert("F").point(lambda v: (v - lo) * scale).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _render_pdf_page(pdf: pymupdf.Document, number: int, *, dpi: float, max_side: int) -> tuple[Image.Image, PageSize]:
    page = pdf.load_page(number - 1)
    rect = page.rect
    longest = max(rect.width, rect.height)
    if longest <= 0:
        raise ValueError("the page has zero size")
    zoom = min(dpi / 72.0, max_side / longest)
    import pymupdf

    pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False, colorspace=pymupdf.csRGB)
    image = Image.frombytes("RGB", (pix.width, pix.height), pix.samples)
    size = PageSize(pix.width, pix.height, round(rect.width, 2), round(rect.height, 2), round(zoom * 72.0, 2))
    return image, size


# EXIF orientation -> the transpose that makes the image upright (what ImageOps.exif_transpose applies).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIDEWAYS = frozenset({5, 6, 7, 8})
# Modes Image.reduce averages correctly (palette indices, 1-bit and 16-bit data must be converted first).
_REDUCIBLE = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F"})


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a broken EXIF block costs the orientation, not the page
        return None


def _render_image_frame(image: Image.Image, number: int, *, max_side: int) -> tuple[Image.Image, PageSize]:
    """One frame as RGB, no larger than `max_side`; the size reported is the frame's own (upright) size.

    A frame larger than `max_side` is shrunk by an integer factor right after decoding, before any mode
    conversion or orientation, so a big image costs its decoded size once rather than once per copy.
    """
    image.seek(number - 1)
    check_size(image)  # every frame declares its own size: a later TIFF frame can be the bomb
    width, height = image.size
    if image.format == "JPEG":
        image.draft("RGB", (max_side, max_side))  # decode a large JPEG at reduced scale
    image.load()
    orientation = _orientation(image) if number == 1 else None
    frame = image if image.mode in _REDUCIBLE else to_rgb(image)
    factor = max(frame.size) // max_side
    if factor >= 2:
        frame = frame.reduce(factor)
    elif frame is image:
        frame = image.copy()  # independent of the file handle, which the next frame reuses
    if orientation in _UPRIGHT:
        frame = frame.transpose(_UPRIGHT[orientation])
        if orientation in _SIDEWAYS:
            width, height = height, width
    frame = to_rgb(frame)
    if max(frame.size) > max_side:
        frame.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return frame, PageSize(width, height)


def iter_pages(
    opened: Iterable[Opened],
    *,
    dpi: float,
    max_side: int,
    password: str | None,
    want: Callable[[Document, int], bool] = lambda doc, number: True,
) -> Iterator[Page]:
    """Pages in document order, each rendered only when pulled and only if `want` it (else image None).
    A document that failed to open yields one Page with number None and its error."""
    for item in opened:
        doc = item.doc
        if doc.error is not None:
            yield Page(doc, None, error=doc.error)
            continue
        handle: pymupdf.Document | Image.Image | None = None
        try:
            for number in item.pages:
                if not want(doc, number):
                    yield Page(doc, number)
                    continue
                start = time.perf_counter()
                try:
                    if handle is None:
                        handle = open_pdf(item.input, password) if doc.kind == "pdf" else open_image(item.input)
                    if not isinstance(handle, Image.Image):
                        image, size = _render_pdf_page(handle, number, dpi=dpi, max_side=max_side)
                    else:
                        image, size = _render_image_frame(handle, number, max_side=max_side)
                except Exception as exc:
                    yield Page(doc, number, error=f"cannot render page: {type(exc).__name__}: {exc}")
                    continue
                yield Page(doc, number, image, size, render_seconds=time.perf_counter() - start)
        finally:
            if handle is not None:
                handle.close()
