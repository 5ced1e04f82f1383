"""The `ground` task: referring-expression grounding. Its prompt templates, and what an answer's boxes mean for the
record (the markup itself is read by pipelines/boxes.py, shared with ocr).

Templates (`--template`): `paper`, "Locate <|ref|>{query}<|/ref|> in the given image." (the DeepSeek-VL2 paper's
grounding prompt, arXiv 2412.10302 §3); `readme`, "<|ref|>{query}<|/ref|>." (the repository README's example);
`find-all`, "Find all the <|ref|>{query}<|/ref|>" (the Gradio demo's example, web_demo.py), or any text holding
`{query}`. The default is `paper`: it is the form the paper states for its grounding data, while every public
report of digit loops and low RefCOCO scores (deepseek-ai/DeepSeek-VL2 issues #33, #49, #123) used the README form.
`find-all` suits several instances ("all the chairs"). `--prompt` sends a whole prompt as is, e.g.
"<|grounding|>Describe the image." for a caption with boxes inline (labels come from its refs).

Statuses: boxes found and all valid → ok (`found: true`). No det block and nothing box-like → ok with `found: false`:
the model was trained with negative samples (the paper), so "not there" is an honest answer; its words stay in
`caption` (no public answer shows how DeepSeek-VL2 words a negative, so none is pattern-matched). Everything else is
a parse_error: an invalid box (a digit loop above 1000, a short group, stray numbers; never clamped into an ok box),
box numbers without det markup, an empty answer, or one that runs on into the chat template (`<|User|>`).
Every box is given on the 0–999 grid, in page pixels, and in PDF points for PDF pages (origin top-left).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dsvl2.pipelines.base import OptionError, Page, PageRecord, PageSize, Parsed
from dsvl2.pipelines.boxes import BOX_SCHEMA, GRID, NOTES_SCHEMA, check_box, read_markup, strip_markup
from dsvl2.pipelines.task import Task, TaskOption, cell, texts, unique

__all__ = ["DEFAULT_TEMPLATE", "GRID", "TEMPLATES", "GroundTask", "check_box", "parse_grounding", "prompt_for"]

TEMPLATES: dict[str, str] = {
    "paper": "Locate <|ref|>{query}<|/ref|> in the given image.",
    "readme": "<|ref|>{query}<|/ref|>.",
    "find-all": "Find all the <|ref|>{query}<|/ref|>",
}
DEFAULT_TEMPLATE = TEMPLATES["paper"]

# Tokens of the chat template: an answer holding one ran on past its own turn (DeepSeek-VL2 issues #10, #83).
_CHAT = re.compile(r"<\|User\|>|<\|Assistant\|>|<｜begin▁of▁sentence｜>|<image>|<｜▁pad▁｜>")
_BARE_BOX = re.compile(r"\[\s*\[?\s*[-+]?\d+\s*,")  # "[533, 132, 457]": box numbers given without <|det|>


def prompt_for(query: str, template: str = DEFAULT_TEMPLATE) -> str:
    return template.replace("{query}", query)


def parse_grounding(text: str, *, size: PageSize | None = None, query: str | None = None) -> Parsed:
    """Answer → {"query", "found", "caption", "boxes": [{"label", "status", "box", "box_px", "box_pt", "raw",
    "notes"}], "notes"}. See the module docstring for when it is ok, not found, or a parse error."""
    markup = read_markup(text, size=size, default_label=query)
    caption = " ".join(strip_markup(text).split())
    result = {"query": query, "found": markup.found, "caption": caption, "boxes": markup.boxes, "notes": markup.notes}
    if not text.strip():
        return Parsed(result, ok=False, error="empty answer")
    if chat := _CHAT.search(text):
        return Parsed(result, ok=False, error=f"the answer runs on into the chat template ({chat.group(0)})")
    if markup.invalid:
        return Parsed(result, ok=False, error=f"{markup.invalid} of {len(markup.boxes)} box(es) invalid")
    if not markup.det_blocks and (bare := _BARE_BOX.search(text)):
        result["notes"] = [*markup.notes, f"box numbers without <|det|> markup: {text[bare.start() :][:40]!r}"]
        return Parsed(result, ok=False, error="box numbers without <|det|> markup")
    return Parsed(result)


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
        "An answer without boxes is a result (found: false), not an error.\n\n"
        f"Default template (--template paper): *{DEFAULT_TEMPLATE}*"
    )
    examples: ClassVar[tuple[str, ...]] = (
        "dsvl2 ground samples/report.pdf --query 'the bar chart' --annotate boxes/",
        "dsvl2 ground photo.jpg --query 'the red car' --query 'the traffic light' -f csv",
        "dsvl2 ground scans/ --query 'chairs' --template find-all",
        "dsvl2 ground page.png --prompt '<|grounding|>Describe the image.'",
    )
    options: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("query", "What to find; repeatable, one record per page and query.", many=True),
        TaskOption(
            "template",
            f"How each --query is asked: {', '.join(TEMPLATES)} (default: paper, shown above), or your own text "
            "containing '{query}'.",
            metavar="NAME|TEXT",
        ),
        TaskOption(
            "prompt",
            "A whole prompt sent as is, no --query (e.g. '<|grounding|>Describe the image.' for a caption with "
            "boxes inline). A prompt containing '{query}' is taken as a template.",
        ),
    )
    max_new_tokens: ClassVar[int] = 512
    default_format: ClassVar[str] = "jsonl"
    repetition_guard: ClassVar[tuple[int, int]] = (24, 256)
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "query": {"type": ["string", "null"]},
            "found": {
                "type": "boolean",
                "description": "at least one valid box; false with status ok is the model's 'not there' "
                "(absent in older records)",
            },
            "caption": {"type": "string", "description": "the answer's words without grounding markup"},
            "boxes": {"type": "array", "items": BOX_SCHEMA},
            "notes": NOTES_SCHEMA,
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
    def from_options(
        cls, *, query: str | list[str] | None = None, template: str | None = None, prompt: str | None = None
    ) -> GroundTask:
        queries = unique(texts(query))
        if template is not None and prompt is not None:
            raise OptionError("template", "and --prompt exclude each other: a template asks each --query, a prompt "
                              "is sent as is")  # fmt: skip
        if prompt is not None:
            if not prompt.strip():
                raise OptionError("prompt", "must not be empty")
            chosen = prompt
        elif template is not None:
            chosen = TEMPLATES.get(template.strip(), template)
            if "{query}" not in chosen:
                raise OptionError("template", f"must be one of {', '.join(TEMPLATES)} or a text containing {{query}}")
        else:
            chosen = DEFAULT_TEMPLATE
        if queries and "{query}" not in chosen:
            raise OptionError("query", "needs a template containing {query}, not a whole --prompt")
        if not queries and "{query}" in chosen:
            raise OptionError("query", "is required: give at least one (or a --prompt without {query})")
        return cls(queries, chosen)

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
        if r.get("caption") and not r.get("query"):
            lines.append(r["caption"])  # a whole prompt (a <|grounding|> caption): its words, then its boxes
        for b in r.get("boxes", []):
            where = f"grid {b['box']} · px {b['box_px']}" + (f" · pt {b['box_pt']}" if b["box_pt"] else "")
            status = "" if b["status"] == "ok" else f" ({b['status']}: {'; '.join(b['notes'])})"
            lines.append(f"- {cell(b['label']) or '(no label)'}: {where if b['box'] else b['raw']}{status}")
        if not r.get("boxes"):
            lines.append("_not found_" + (f" ({cell(r['caption'])})" if r.get("query") and r.get("caption") else ""))
        return "\n".join(lines)

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
        return {"query": result.get("query"), "found": result.get("found"), "caption": result.get("caption"),
                "n_boxes": len(boxes), "boxes": boxes}  # fmt: skip
