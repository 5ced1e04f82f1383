"""The `ocr` task: page → Markdown text. The answer is the page; only an empty answer is a parse error.

What is taken away, each time with a note in the result: a ```markdown fence around the whole page; a first line
that only announces the text ("Here is the text of the page:") and a last line that only offers more help ("Let me
know if…"), when the rest is not empty (nothing else that looks like a lead-in is touched: "Here's a breakdown of
each stage:" is page content); and grounding markup when a `<|grounding|>` prompt made the model annotate the page.
That markup is read by pipelines/boxes.py, the reader ground uses, and its boxes kept in `result["boxes"]`: a pair
inside a sentence leaves its label's words, a line of nothing but pairs (a layout label above a block) goes whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dsvl2.pipelines.base import Page, PageRecord, PageSize, Parsed
from dsvl2.pipelines.boxes import BOX_SCHEMA, NOTES_SCHEMA, read_markup, strip_markup
from dsvl2.pipelines.task import PROMPT_OPTION, Task, TaskOption, one_prompt

DEFAULT_PROMPT = (
    "Convert this page to Markdown. Keep the reading order, headings, lists and paragraphs; write tables "
    "as Markdown tables. Output only the page content."
)

_FENCE = "```"
_MARKUP = re.compile(r"<\|/?(?:ref|det)\|>")
_LEAD_IN = re.compile(
    r"(?:sure[,.!]?\s*)?(?:here is|here's|below is|this is)\s+(?:the\s+)?(?:full\s+|complete\s+|extracted\s+)?"
    r"(?:text|content|contents|transcription|markdown)\b[^\n]{0,80}:",
    re.IGNORECASE,
)
_CLOSING = re.compile(r"(?:let me know|i hope this helps|hope this helps|feel free to)\b[^\n]*", re.IGNORECASE)


def _unfence(body: str, notes: list[str]) -> str:
    lines = body.splitlines()
    if len(lines) >= 2 and lines[0].startswith(_FENCE) and lines[-1].strip() == _FENCE:
        notes.append("removed a ``` fence around the whole page")
        return "\n".join(lines[1:-1]).strip()
    return body


def _unwrap(body: str, notes: list[str]) -> str:
    """Drop a lead-in first line and a closing offer line, each only when the rest has text."""
    lines = body.splitlines()
    if len(lines) >= 2 and _LEAD_IN.fullmatch(lines[0].strip()) and "\n".join(lines[1:]).strip():
        notes.append(f"dropped the lead-in line {lines[0].strip()!r}")
        lines = lines[1:]
    if len(lines) >= 2 and _CLOSING.fullmatch(lines[-1].strip()) and "\n".join(lines[:-1]).strip():
        notes.append(f"dropped the closing line {lines[-1].strip()[:80]!r}")
        lines = lines[:-1]
    return "\n".join(lines).strip()


def parse_markdown(text: str, *, size: PageSize | None = None) -> Parsed:
    """{"markdown": the page's text, "boxes": grounding boxes it carried (BOX_SCHEMA), "notes": what was removed}."""
    notes: list[str] = []
    boxes: list[dict[str, Any]] = []
    body = text.strip()
    if _MARKUP.search(body):
        markup = read_markup(body, size=size)
        boxes, notes = markup.boxes, [*markup.notes]
        # Layout-label lines go, unless they are all there is: then their labels are the answer's only words.
        body = strip_markup(body, annotation_lines=True).strip() or strip_markup(body).strip()
        notes.append(f"removed grounding markup ({len(boxes)} box(es) kept in boxes)")
    body = _unfence(_unwrap(_unfence(body, notes), notes), notes)
    result = {"markdown": body, "boxes": boxes, "notes": notes}
    if not body:
        return Parsed(result, ok=False, error="empty answer")
    return Parsed(result)


@dataclass(frozen=True, slots=True)
class OcrTask(Task):
    """Page → Markdown (result: {"markdown": str, "boxes": [...], "notes": [...]})."""

    prompt: str = DEFAULT_PROMPT

    name: ClassVar[str] = "ocr"
    summary: ClassVar[str] = (
        f"Page → Markdown, per page and per document with page markers.\n\nDefault prompt: *{DEFAULT_PROMPT}*"
    )
    examples: ClassVar[tuple[str, ...]] = (
        "dsvl2 ocr samples/report.pdf",
        "dsvl2 ocr scans/ -o out/ --resume",
        "dsvl2 ocr samples/report.pdf --pages 2 --format jsonl | jq -r .result.markdown",
    )
    options: ClassVar[tuple[TaskOption, ...]] = (PROMPT_OPTION,)
    max_new_tokens: ClassVar[int] = 2048
    default_format: ClassVar[str] = "md"
    repetition_guard: ClassVar[tuple[int, int]] = (48, 1024)
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "markdown": {"type": "string"},
            "boxes": {
                "type": "array",
                "items": BOX_SCHEMA,
                "description": "boxes of a <|grounding|> answer, its markup removed from markdown (absent in older "
                "records)",
            },
            "notes": {**NOTES_SCHEMA, "description": "what was removed from the answer (absent in older records)"},
        },
        "required": ["markdown"],
    }
    csv_columns: ClassVar[tuple[str, ...]] = ("text", "error")

    @classmethod
    def from_options(cls, *, prompt: str | None = None) -> OcrTask:
        return cls(one_prompt(prompt, DEFAULT_PROMPT))

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,)

    def parse(self, text: str, *, page: Page, prompt: str) -> Parsed:
        return parse_markdown(text, size=page.size)

    @classmethod
    def markdown(cls, record: PageRecord) -> str:
        return (record.result or {}).get("markdown", "")

    @classmethod
    def answer(cls, record: PageRecord) -> str | None:
        return (record.result or {}).get("markdown")

    @classmethod
    def csv_rows(cls, record: PageRecord) -> list[list[Any]]:
        return [[(record.result or {}).get("markdown", ""), record.error or ""]]

    @classmethod
    def columns(cls, result: Mapping[str, Any]) -> dict[str, Any]:
        return {"markdown": result.get("markdown")}
