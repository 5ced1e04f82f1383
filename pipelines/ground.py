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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dsvl2.pipelines.base import OptionError, Page, PageRecord, PageSize, Parsed
from dsvl2.pipelines.task import Task, TaskOption, cell, texts, unique

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


_BOX = {"type": ["array", "null"], "items": {"type": "number"}, "minItems": 4, "maxItems": 4}
_NOTES = {"type": "array", "items": {"type": "string"}}
BOX_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"type": "string"},
        "status": {"enum": ["ok", "repaired", "invalid"]},
        "box": {**_BOX, "description": "corners on the model's 0-999 grid"},
        "box_px": {**_BOX, "description": "corners in page pixels (page_size.width_px/height_px)"},
        "box_pt": {**_BOX, "description": "corners in PDF points, origin top-left; null for images"},
        "raw": {"type": "string"},
        "notes": _NOTES,
    },
    "required": ["label", "status", "box", "box_px", "box_pt", "raw", "notes"],
}


@dataclass(frozen=True, slots=True)
class GroundTask(Task):
    """Boxes for each query on each page. With a template lacking `{query}`, the template itself is the
    one prompt (e.g. "<|grounding|>Describe the image.") and every labelled box is reported."""

    queries: tuple[str, ...] = ()
    template: str = DEFAULT_TEMPLATE

    name: ClassVar[str] = "ground"
    summary: ClassVar[str] = (
        "Referring-expression grounding: boxes for each --query, on the model's 0–999 grid, in page pixels "
        "and (PDF pages) in points. Malformed boxes are repaired or flagged, never dropped.\n\n"
        f"Default prompt template: *{DEFAULT_TEMPLATE}*"
    )
    examples: ClassVar[tuple[str, ...]] = (
        "dsvl2 ground samples/report.pdf --query 'the bar chart' --annotate boxes/",
        "dsvl2 ground photo.jpg --query 'the red car' --query 'the traffic light' -f csv",
        "dsvl2 ground page.png --prompt '<|grounding|>Describe the image.'",
    )
    options: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("query", "What to find; repeatable, one record per page and query.", many=True),
        TaskOption(
            "prompt",
            "Prompt template; '{query}' is replaced by each query. Without '{query}' it is sent as is, no "
            "--query needed.",
        ),
    )
    max_new_tokens: ClassVar[int] = 512
    default_format: ClassVar[str] = "jsonl"
    repetition_guard: ClassVar[tuple[int, int]] = (24, 256)
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "query": {"type": ["string", "null"]},
            "caption": {"type": "string"},
            "boxes": {"type": "array", "items": BOX_SCHEMA},
            "notes": _NOTES,
        },
        "required": ["query", "caption", "boxes", "notes"],
    }
    csv_columns: ClassVar[tuple[str, ...]] = (
        "query", "label", "box_status",
        "x1", "y1", "x2", "y2", "px_x1", "px_y1", "px_x2", "px_y2", "pt_x1", "pt_y1", "pt_x2", "pt_y2",
        "error",
    )  # fmt: skip
    has_boxes: ClassVar[bool] = True

    @classmethod
    def from_options(cls, *, query: str | list[str] | None = None, prompt: str | None = None) -> GroundTask:
        template = DEFAULT_TEMPLATE if prompt is None else prompt
        queries = unique(texts(query))
        if not template.strip():
            raise OptionError("prompt", "must not be empty")
        if queries and "{query}" not in template:
            raise OptionError("query", "needs a prompt template containing {query}")
        if not queries and "{query}" in template:
            raise OptionError("query", "is required: give at least one (or a prompt without {query})")
        return cls(queries, template)

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

    @classmethod
    def markdown(cls, record: PageRecord) -> str:
        r = record.result or {}
        lines = [f"**{cell(r['query'])}**"] if r.get("query") else []
        for b in r.get("boxes", []):
            where = f"grid {b['box']} · px {b['box_px']}" + (f" · pt {b['box_pt']}" if b["box_pt"] else "")
            status = "" if b["status"] == "ok" else f" ({b['status']}: {'; '.join(b['notes'])})"
            lines.append(f"- {cell(b['label']) or '(no label)'}: {where if b['box'] else b['raw']}{status}")
        return "\n".join(lines) or "_no boxes_"

    @classmethod
    def csv_rows(cls, record: PageRecord) -> list[list[Any]]:
        """One row per box: its corners on the grid, in pixels and in points."""
        r, err = record.result or {}, record.error or ""
        rows = []
        for b in r.get("boxes", []):
            coords = [*(b["box"] or [""] * 4), *(b["box_px"] or [""] * 4), *(b["box_pt"] or [""] * 4)]
            rows.append([r.get("query") or "", b["label"], b["status"], *coords, "; ".join(b["notes"]) or err])
        return rows or [[r.get("query") or "", "", "", *[""] * 12, err]]

    @classmethod
    def columns(cls, result: Mapping[str, Any]) -> dict[str, Any]:
        boxes = result.get("boxes", [])
        return {"query": result.get("query"), "caption": result.get("caption"), "n_boxes": len(boxes), "boxes": boxes}
