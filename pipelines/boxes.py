"""DeepSeek-VL2's grounding markup, read once for every task: `<|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2], ...]`
`<|/det|>` on a 0-999 grid over the image (the reference demo scales `v / 999 * size`: DeepSeek-VL2
deepseek_vl2/serve/app_modules/utils.py, `parse_ref_bbox`). `read_markup` turns an answer into labelled box entries
and notes; it never evaluates model output and never raises. Contract: every number in a det payload ends up in a
box entry (valid or not, with its raw text) or is named in a note; nothing is dropped silently. What a record makes
of the entries is the task's business (ground.py, ocr.py).

Faults seen in real answers (cases in tests/data/real_answers/ground.json): digit loops (`[[2, 311, 99999, 98]]`),
short or odd groups (`[[470,]]`, `[533, 132, 457]`), nested junk (`[245,[234,543,542,244]]`), and a det payload left
open when the next label starts (`<|det|>[[220, <|ref|>B<|/ref|><|det|>[[...]]<|/det|>`). So a payload ends at
`<|/det|>`, the next `<|ref|>` or `<|det|>`, or the end of the answer; a value above 1000 is a loop, never clamped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from dsvl2.pipelines.base import PageSize

GRID = 999  # DeepSeek-VL2 boxes live on a 0..999 grid over the image's width and height
SLIP = 1000  # one past the grid: a rounding slip, clamped to 999; anything larger is a digit loop

DET_CLOSE = "<|/det|>"
_DET = re.compile(r"<\|det\|>(.*?)(<\|/det\|>|(?=<\|ref\|>|<\|det\|>)|\Z)", re.DOTALL)
_REF = re.compile(r"<\|ref\|>(.*?)<\|/ref\|>", re.DOTALL)
_GROUP = re.compile(r"\[([^\[\]]*)(\]|\Z)")  # an innermost [...] group, or one the answer left open at its end
_NUM = re.compile(r"^[-+]?\d+(?:\.\d+)?$")
_NUMBERS = re.compile(r"[-+]?\d+(?:\.\d+)?")
_ALLOWED = re.compile(r"^[\d\s.,\[\]+-]*$")
_BIG = 10**30  # stands for any longer digit run: only its being off the grid matters


_BOX = {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 4, "maxItems": 4}
NOTES_SCHEMA: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
BOX_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "description": "the <|ref|> before its det block, else the query"},
        "status": {"enum": ["ok", "repaired", "invalid"]},
        "box": {**_BOX, "description": "corners on the model's 0-999 grid; null when invalid"},
        "box_px": {**_BOX, "description": "corners in page pixels (page_size.width_px/height_px)"},
        "box_pt": {**_BOX, "description": "corners in PDF points, origin top-left; null for images"},
        "raw": {"type": "string", "description": "the group as the model wrote it"},
        "notes": NOTES_SCHEMA,
    },
    "required": ["label", "status", "box", "box_px", "box_pt", "raw", "notes"],
}


@dataclass(frozen=True, slots=True)
class Markup:
    """What an answer's grounding markup holds: box entries in answer order (dicts of BOX_SCHEMA), notes on
    fragments that are not boxes, the number of det blocks, and the labels that came without a box."""

    boxes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    det_blocks: int = 0

    @property
    def invalid(self) -> int:
        return sum(1 for b in self.boxes if b["status"] == "invalid")

    @property
    def found(self) -> bool:
        return any(b["status"] != "invalid" for b in self.boxes)


def shown(raw: str, limit: int = 16) -> str:
    """A number as a note quotes it: a runaway digit loop shortened to its head and its length."""
    return raw if len(raw) <= limit else f"{raw[:8]}… ({len(raw)} characters)"


def _value(raw: str) -> int | float:
    digits = raw.lstrip("+-").split(".")[0]
    if len(digits) > 30:
        return -_BIG if raw.startswith("-") else _BIG
    v = float(raw)
    if not math.isfinite(v):
        return _BIG
    return int(raw) if "." not in raw else (int(v) if v.is_integer() else v)


Checked = tuple[str, list[int | float] | None, list[str]]


def check_box(values: list[int | float], raws: list[str] | None = None) -> Checked:
    """(status, box or None, notes) for four numbers on the 0–999 grid. 1000 is clamped to 999 (a rounding
    slip, "repaired"); a negative value or one above 1000 (a digit loop such as 9999) makes the box invalid.
    Swapped corners are reordered ("repaired"); zero width or height is invalid."""
    raws = raws or [str(v) for v in values]
    notes: list[str] = []
    off = [shown(r) for v, r in zip(values, raws, strict=True) if v < 0 or v > SLIP]
    if off:
        return "invalid", None, [f"{', '.join(off)} outside the 0–{GRID} grid (a digit loop, not a coordinate)"]
    box = [min(v, GRID) for v in values]
    if box != values:
        notes.append(f"clamped {SLIP} to {GRID}")
    x1, y1, x2, y2 = box
    if x1 > x2:
        x1, x2 = x2, x1
        notes.append("swapped x1 and x2")
    if y1 > y2:
        y1, y2 = y2, y1
        notes.append("swapped y1 and y2")
    if x1 == x2 or y1 == y2:
        return "invalid", None, [*notes, "zero width or height"]
    return ("repaired" if notes else "ok"), [x1, y1, x2, y2], notes


def scale(box: list[int | float], width: float | None, height: float | None, digits: int) -> list[float] | None:
    """Grid corners → corners in a frame of `width` × `height` (`v / 999 * size`, as the reference draws)."""
    if not width or not height:
        return None
    x1, y1, x2, y2 = box
    return [round(x1 / GRID * width, digits), round(y1 / GRID * height, digits),
            round(x2 / GRID * width, digits), round(y2 / GRID * height, digits)]  # fmt: skip


def _group_entries(content: str, raw: str) -> list[tuple[str, list[str] | None, list[str]]]:
    """(raw, four numbers or None, notes) for one [...] group."""
    items = [x.strip() for x in content.split(",") if x.strip()]
    bad = [x for x in items if not _NUM.match(x)]
    if bad:
        return [(raw, None, [f"not a number: {shown(bad[0], 40)!r}"])]
    if len(items) == 4:
        return [(raw, items, [])]
    if len(items) > 4 and len(items) % 4 == 0:
        note = f"split a flat list of {len(items)} numbers into boxes of four"
        return [(f"[{', '.join(items[i : i + 4])}]", items[i : i + 4], [note]) for i in range(0, len(items), 4)]
    loops = [shown(x) for x in items if _value(x) > SLIP]
    extra = [f"{', '.join(loops)} outside the 0–{GRID} grid (a digit loop)"] if loops else []
    return [(raw, None, [f"expected 4 numbers, got {len(items)}", *extra])]


def read_payload(det: str) -> tuple[list[tuple[str, list[str] | None, list[str]]], list[str]]:
    """A det payload → (raw, numbers or None, notes) candidates and payload notes. Every number in the payload
    lands in a candidate: inside an innermost [...] group, or as a stray run outside one (an invalid candidate)."""
    notes: list[str] = []
    if not _ALLOWED.match(det):
        notes.append("ignored characters other than numbers, commas and brackets")
    groups = list(_GROUP.finditer(det))
    if not groups and _NUMBERS.search(det):
        return _group_entries(det.strip("[] \n"), det.strip()), [*notes, "box list without brackets"]
    out: list[tuple[str, list[str] | None, list[str]]] = []
    rest, last = [], 0
    for m in groups:
        rest.append(det[last : m.start()])
        last = m.end()
        content = m.group(1)
        if not m.group(2):
            notes.append(f"unclosed [ at the end of the box list: {shown(m.group(0).strip(), 40)!r}")
        if not content.replace(",", "").strip():
            notes.append("empty box list []")
            continue
        out.extend(_group_entries(content, m.group(0).strip()))
    rest.append(det[last:])
    for piece in rest:
        for run in re.split(r"[\[\]]", piece):
            numbers = _NUMBERS.findall(run)
            if numbers:
                out.append((", ".join(numbers), None, ["numbers outside a [x1, y1, x2, y2] group"]))
    return out, notes


def _label(segment: str) -> tuple[str | None, list[str]]:
    """The label of the det block that follows `segment`: its last complete `<|ref|>…<|/ref|>`; the earlier
    ones in the segment had no box (named in a note)."""
    refs = [" ".join(r.split()) for r in _REF.findall(segment)]
    notes = [f"no box for <|ref|>{r}<|/ref|>" for r in refs[:-1]]
    return (refs[-1] if refs else None), notes


def read_markup(text: str, *, size: PageSize | None = None, default_label: str | None = None) -> Markup:
    """Every det block of `text` → box entries labelled by the ref before them (else `default_label`, else "")."""
    boxes: list[dict[str, Any]] = []
    notes: list[str] = []
    prev_end, blocks = 0, 0
    w, h = (size.width_px, size.height_px) if size else (None, None)
    wpt, hpt = (size.width_pt, size.height_pt) if size else (None, None)
    for m in _DET.finditer(text):
        blocks += 1
        label, ref_notes = _label(text[prev_end : m.start()])
        notes.extend(ref_notes)
        prev_end = m.end()
        if m.group(2) != DET_CLOSE:
            ends = "the next label" if m.group(2) == "" and m.end() < len(text) else "the end of the answer"
            notes.append(f"unclosed <|det|>: read up to {ends}")
        candidates, payload_notes = read_payload(m.group(1))
        notes.extend(payload_notes)
        if not candidates:
            notes.append("empty <|det|> block")
        for raw, items, cand_notes in candidates:
            checked = check_box([_value(x) for x in items], items) if items is not None else None
            status, box, box_notes = checked or ("invalid", None, [])
            boxes.append({
                "label": label if label is not None else (default_label or ""),
                "status": status,
                "box": box,
                "box_px": scale(box, w, h, 1) if box else None,
                "box_pt": scale(box, wpt, hpt, 2) if box else None,
                "raw": raw,
                "notes": cand_notes + box_notes,
            })  # fmt: skip
    notes.extend(f"no box for <|ref|>{' '.join(r.split())}<|/ref|>" for r in _REF.findall(text[prev_end:]))
    return Markup(boxes, notes, blocks)


_PAIR = re.compile(r"<\|ref\|>(.*?)<\|/ref\|>\s*<\|det\|>.*?(?:<\|/det\|>|(?=<\|ref\|>|<\|det\|>)|\Z)", re.DOTALL)
_LONE_DET = re.compile(r"<\|det\|>.*?(?:<\|/det\|>|(?=<\|ref\|>|<\|det\|>)|\Z)", re.DOTALL)
_TOKENS = re.compile(r"<\|/?(?:ref|det|grounding)\|>|<｜end▁of▁sentence｜>")


def strip_markup(text: str, *, annotation_lines: bool = False) -> str:
    """The answer's text without grounding markup. A ref+det pair leaves its label's words, as in a `<|grounding|>`
    caption ("place it in the <|ref|>garbage<|/ref|><|det|>…" → "place it in the garbage"). With `annotation_lines`
    (OCR), a line holding nothing but pairs is a layout annotation above the text (DeepSeek-OCR's
    `<|ref|>title<|/ref|><|det|>…` line) and is removed whole. Other whitespace is left as the model wrote it."""

    def bare(line: str, *, labels: bool) -> str:
        def pair(m: re.Match[str]) -> str:  # a det block left open runs into the next label: keep them apart
            return (m.group(1) if labels else "") + ("" if m.group(0).endswith(DET_CLOSE) else " ")

        return _TOKENS.sub("", _LONE_DET.sub(" ", _PAIR.sub(pair, line)))

    lines = []
    for line in text.split("\n"):
        if annotation_lines and _PAIR.search(line) and not bare(line, labels=False).strip():
            continue
        lines.append(bare(line, labels=True))
    return "\n".join(lines)
