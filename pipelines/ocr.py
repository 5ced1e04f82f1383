"""The `ocr` task: page → Markdown text. The answer is the result; only an empty answer is a parse error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dsvl2.pipelines.base import Page, PageRecord, Parsed
from dsvl2.pipelines.task import PROMPT_OPTION, Task, TaskOption, one_prompt

DEFAULT_PROMPT = (
    "Convert this page to Markdown. Keep the reading order, headings, lists and paragraphs; write tables "
    "as Markdown tables. Output only the page content."
)

_FENCE = "```"

def parse_markdown(text: str) -> Parsed:
    """{"markdown": text}, without a ```markdown fence the model may wrap the whole page in."""
    body = text.strip()
    lines = body.splitlines()
    if len(lines) >= 2 and lines[0].startswith(_FENCE) and lines[-1].strip() == _FENCE:
        body = "\n".join(lines[1:-1]).strip()
    if not body:
        return Parsed({"markdown": ""}, ok=False, error="empty answer")
    return Parsed({"markdown": body})


@dataclass(frozen=True, slots=True)
class OcrTask(Task):
    """Page → Markdown (result: {"markdown": str})."""

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
        "properties": {"markdown": {"type": "string"}},
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
        return parse_markdown(text)

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
