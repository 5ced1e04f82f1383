"""The `ocr` task: page → Markdown text. The answer is the result; only an empty answer is a parse error."""

from __future__ import annotations

from dataclasses import dataclass

from dsvl2.pipelines.base import Page, Parsed

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
class OcrTask:
    """Page → Markdown (result: {"markdown": str})."""

    prompt: str = DEFAULT_PROMPT
    name: str = "ocr"

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,)

    def parse(self, text: str, *, page: Page, prompt: str) -> Parsed:
        return parse_markdown(text)
