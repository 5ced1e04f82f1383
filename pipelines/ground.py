"""The `ground` task: referring-expression grounding. Its prompt template, and a strict parser for
`<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]<|/det|>` answers.

Model output is never evaluated: the box list is read with regular expressions over digits, commas and
brackets only. Every box found is reported, none dropped silently: values outside 0–999 are clamped and
swapped corners reordered (status "repaired", with a note); boxes that cannot be repaired (wrong count of
numbers, not numbers, zero width or height) are kept with status "invalid" and their raw text. Boxes are
given on the model's 0–999 grid (relative to the image), in page pixels, and in PDF points for PDF pages
(origin at the top-left of the page as displayed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dsvl2.pipelines.base import Page, PageSize, Parsed

DEFAULT_TEMPLATE = "<|ref|>{query}<|/ref|>."
GRID = 999  # DeepSeek-VL2 boxes live on a 0..999 grid over the image's width and height

_DET = re.compile(r"<\|det\|>(.*?)(<\|/det\|>|$)", re.DOTALL)
_REF_END = re.compile(r"(.*?)<\|/ref\|>\s*$", re.DOTALL)
_TOKENS = re.compile(r"<\|/?(?:ref|det|grounding)\|>")
_GROUP = re.compile(r"\[([^\[\]]*)\]")
_NUM = re.compile(r"^[-+]?\d+(?:\.\d+)?$")
_ALLOWED = re.compile(r"^[\d\s.,\[\]+-]*$")


def prompt_for(query: str, template: str = DEFAULT_TEMPLATE) -> str:
    return template.replace("{query}", query)


def _number(s: str) -> int | float:
    v = float(s)
    return int(v) if v.is_integer() else v


def _scale(box: list[float], width: float | None, height: float | None, digits: int) -> list[float] | None:
    if not width or not height:
        return None
    x1, y1, x2, y2 = box
    return [
        round(x1 / GRID * width, digits),
        round(y1 / GRID * height, digits),
        round(x2 / GRID * width, digits),
        round(y2 / GRID * height, digits),
    ]


def check_box(values: list[int | float]) -> tuple[str, list[int | float] | None, list[str]]:
    """(status, repaired box or None, notes) for four numbers on the 0–999 grid."""
    notes: list[str] = []
    clamped = [min(max(v, 0), GRID) for v in values]
    if clamped != values:
        notes.append(f"clamped values outside 0–{GRID}")
    x1, y1, x2, y2 = clamped
    if x1 > x2:
        x1, x2 = x2, x1
        notes.append("swapped x1 and x2")
    if y1 > y2:
        y1, y2 = y2, y1
        notes.append("swapped y1 and y2")
    if x1 == x2 or y1 == y2:
        return "invalid", None, [*notes, "zero width or height"]
    return ("repaired" if notes else "ok"), [x1, y1, x2, y2], notes


def _boxes_in(det: str) -> tuple[list[tuple[str, list[str] | None, list[str]]], list[str]]:
    """Split a det payload into (raw group, numbers or None, notes) candidates, plus payload-level notes."""
    notes: list[str] = []
    if not _ALLOWED.match(det):
        notes.append("ignored characters other than numbers, commas and brackets")
    out: list[tuple[str, list[str] | None, list[str]]] = []
    groups = _GROUP.findall(det)
    if not groups and det.strip():
        groups = [det.strip("[] \n")]  # unbracketed numbers, e.g. a list whose brackets were cut
        notes.append("box list without brackets")
    for g in groups:
        items = [x.strip() for x in g.split(",") if x.strip()]
        if not items:
            notes.append("empty box list []")
            continue
        bad = [x for x in items if not _NUM.match(x)]
        if bad:
            out.append((f"[{g}]", None, [f"not a number: {bad[0][:40]!r}"]))
        elif len(items) == 4:
            out.append((f"[{g}]", items, []))
        elif len(items) % 4 == 0:
            for i in range(0, len(items), 4):
                note = f"split a flat list of {len(items)} numbers into boxes of four"
                out.append((f"[{', '.join(items[i : i + 4])}]", items[i : i + 4], [note]))
        else:
            out.append((f"[{g}]", None, [f"expected 4 numbers, got {len(items)}"]))
    return out, notes


def _label_before(segment: str) -> str | None:
    """The `<|ref|>label<|/ref|>` that immediately precedes a det block, if any."""
    start = segment.rfind("<|ref|>")
    m = _REF_END.match(segment[start + len("<|ref|>") :]) if start >= 0 else None
    return " ".join(m.group(1).split()) if m else None


def parse_grounding(text: str, *, size: PageSize | None = None, query: str | None = None) -> Parsed:
    """Answer → {"query", "caption", "boxes": [{"label", "status", "box", "box_px", "box_pt", "raw", "notes"}],
    "notes"}; ok when at least one box was found and none is invalid."""
    boxes: list[dict[str, Any]] = []
    notes: list[str] = []
    prev_end = 0
    for m in _DET.finditer(text):
        label = _label_before(text[prev_end : m.start()]) or query or ""
        prev_end = m.end()
        if not m.group(2):
            notes.append("unclosed <|det|>: read up to the end of the answer")
        candidates, payload_notes = _boxes_in(m.group(1))
        notes.extend(payload_notes)
        for raw, items, cand_notes in candidates:
            status, box, box_notes = ("invalid", None, []) if items is None else check_box([_number(x) for x in items])
            w, h = (size.width_px, size.height_px) if size else (None, None)
            wpt, hpt = (size.width_pt, size.height_pt) if size else (None, None)
            boxes.append(
                {
                    "label": label,
                    "status": status,
                    "box": box,
                    "box_px": _scale(box, w, h, 1) if box else None,
                    "box_pt": _scale(box, wpt, hpt, 2) if box else None,
                    "raw": raw,
                    "notes": cand_notes + box_notes,
                }
            )
    caption = " ".join(_TOKENS.sub(" ", _DET.sub(" ", text)).split())
    result = {"query": query, "caption": caption, "boxes": boxes, "notes": notes}
    invalid = sum(1 for b in boxes if b["status"] == "invalid")
    if not boxes:
        return Parsed(result, ok=False, error="no boxes in the answer")
    if invalid:
        return Parsed(result, ok=False, error=f"{invalid} of {len(boxes)} box(es) invalid")
    return Parsed(result)


@dataclass(frozen=True, slots=True)
class GroundTask:
    """Boxes for each `--query` on each page. With a template lacking `{query}`, the template itself is the
    one prompt (e.g. "<|grounding|>Describe the image.") and every labelled box is reported."""

    queries: tuple[str, ...] = ()
    template: str = DEFAULT_TEMPLATE
    name: str = "ground"

    @property
    def prompts(self) -> tuple[str, ...]:
        if "{query}" not in self.template:
            return (self.template,)
        return tuple(prompt_for(q, self.template) for q in self.queries)

    def query_of(self, prompt: str) -> str | None:
        for q in self.queries:
            if prompt_for(q, self.template) == prompt:
                return q
        return None

    def parse(self, text: str, *, page: Page, prompt: str) -> Parsed:
        return parse_grounding(text, size=page.size, query=self.query_of(prompt))
