"""`ground --annotate DIR`: the page image with each valid box and its label drawn on it, one PNG per record,
written atomically under DIR at the document's output key (never outside DIR)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from dsvl2.errors import OutputError
from dsvl2.pipelines.base import Document, Page, PageRecord
from dsvl2.pipelines.ground import GRID
from dsvl2.writers import atomic_write

_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324")


def draw_boxes(image: Image.Image, boxes: list[dict]) -> Image.Image:
    """A copy of `image` with the boxes (0–999 grid) outlined and labelled; invalid boxes are skipped."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    w, h = out.size
    line = max(2, round(max(w, h) / 400))
    for i, b in enumerate(x for x in boxes if x.get("box")):
        x1, y1, x2, y2 = b["box"]
        rect = (x1 / GRID * w, y1 / GRID * h, x2 / GRID * w, y2 / GRID * h)
        colour = _COLOURS[i % len(_COLOURS)]
        draw.rectangle(rect, outline=colour, width=line)
        label = b.get("label") or ""
        if label:
            left, top, right, bottom = draw.textbbox((rect[0], rect[1]), label)
            lift = bottom - top + 2
            draw.rectangle((left, top - lift, right + 4, bottom - lift), fill=colour)
            draw.text((rect[0] + 2, rect[1] - lift), label, fill="white")
    return out


def annotation_path(doc: Document, number: int, directory: Path, *, prompt_index: int | None) -> Path:
    """`<DIR>/<key>.p<page>[.q<k>].png`; OutputError if it would leave DIR (a symlink inside it)."""
    name = Path(doc.key).name + f".p{number}" + (f".q{prompt_index + 1}" if prompt_index is not None else "")
    path = (directory / doc.key).with_name(name + ".png")
    if not path.resolve().is_relative_to(directory.resolve()):
        raise OutputError(f"the annotation of {doc.source} escapes {directory} (through a symlink?)")
    return path


def annotate(page: Page, record: PageRecord, directory: Path, *, prompt_index: int | None) -> Path | None:
    """Draw a grounding record's boxes on its page; None when there is nothing to draw."""
    boxes = (record.result or {}).get("boxes") or []
    if page.image is None or page.number is None or not any(b.get("box") for b in boxes):
        return None
    path = annotation_path(page.doc, page.number, directory, prompt_index=prompt_index)
    buffer = io.BytesIO()
    draw_boxes(page.image, boxes).save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
    return path
