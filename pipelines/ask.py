"""The `ask` task: free-form answers, one record per page and prompt. There is no default prompt; the
conversation is `"<image>\n" + prompt` exactly (see `model.requests.user_prompt`)."""

from __future__ import annotations

from dataclasses import dataclass

from dsvl2.pipelines.base import Page, Parsed


def parse_answer(text: str) -> Parsed:
    """{"answer": text stripped}; an empty answer is a parse error."""
    answer = text.strip()
    if not answer:
        return Parsed({"answer": ""}, ok=False, error="empty answer")
    return Parsed({"answer": answer})


@dataclass(frozen=True, slots=True)
class AskTask:
    """Each prompt asked of each page (result: {"answer": str})."""

    prompts: tuple[str, ...]
    name: str = "ask"

    def parse(self, text: str, *, page: Page, prompt: str) -> Parsed:
        return parse_answer(text)
