"""The `ask` task: free-form answers, one record per page and prompt. There is no default prompt; the
conversation is `"<image>\n" + prompt` exactly (see `dsvl2.model.requests.user_prompt`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dsvl2.pipelines.base import OptionError, Page, PageRecord, Parsed
from dsvl2.pipelines.task import Task, TaskOption, read_lines, texts, unique


def parse_answer(text: str) -> Parsed:
    """{"answer": text stripped}; an empty answer is a parse error."""
    answer = text.strip()
    if not answer:
        return Parsed({"answer": ""}, ok=False, error="empty answer")
    return Parsed({"answer": answer})


@dataclass(frozen=True, slots=True)
class AskTask(Task):
    """Each prompt asked of each page (result: {"answer": str})."""

    prompts: tuple[str, ...]  # type: ignore[misc]  # a field here, a property in the other tasks

    name: ClassVar[str] = "ask"
    summary: ClassVar[str] = (
        "Free-form questions: every --prompt asked of every page, batched. With one page and one prompt the "
        "answer alone is printed; otherwise each answer follows a '==> source (page N): prompt <==' line."
    )
    examples: ClassVar[tuple[str, ...]] = (
        "dsvl2 ask samples/bar-chart.png --prompt 'Which fruit sold best?'",
        "dsvl2 ask invoices/ --prompts questions.txt -o answers.jsonl",
    )
    options: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("prompt", "A question; repeatable.", many=True),
        TaskOption("prompts", "Questions, one per line.", lines_file=True, metavar="FILE"),
    )
    max_new_tokens: ClassVar[int] = 512
    default_format: ClassVar[str] = "text"
    repetition_guard: ClassVar[tuple[int, int]] = (24, 512)
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    csv_columns: ClassVar[tuple[str, ...]] = ("prompt", "answer", "error")
    prompt_in_markdown: ClassVar[bool] = True

    @classmethod
    def from_options(cls, *, prompt: str | list[str] | None = None, prompts: str | Path | None = None) -> AskTask:
        """`prompt` values then the lines of the `prompts` file, blanks and repeats dropped, order kept."""
        asked = unique((*texts(prompt), *(read_lines("prompts", prompts) if prompts is not None else ())))
        if not asked:
            raise OptionError("prompt", "is required: give at least one question (or a prompts file)")
        return cls(asked)

    def parse(self, text: str, *, page: Page, prompt: str) -> Parsed:
        return parse_answer(text)

    @classmethod
    def markdown(cls, record: PageRecord) -> str:
        return f"**A:** {(record.result or {}).get('answer', '')}"

    @classmethod
    def answer(cls, record: PageRecord) -> str | None:
        return (record.result or {}).get("answer")

    @classmethod
    def csv_rows(cls, record: PageRecord) -> list[list[Any]]:
        return [[record.prompt, (record.result or {}).get("answer", ""), record.error or ""]]

    @classmethod
    def columns(cls, result: Mapping[str, Any]) -> dict[str, Any]:
        return {"answer": result.get("answer")}
