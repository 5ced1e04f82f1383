"""The `ask` task: free-form answers, one record per page and prompt. There is no default prompt; the
conversation is `"<image>\n" + prompt` exactly (see `dsvl2.model.requests.user_prompt`). With
`per="document"` each prompt is asked once over up to `window` pages of a document together (an `<image>`
line per page, then the prompt), one record per window and prompt naming its `pages` (pipelines.windows)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dsvl2.pipelines.base import OptionError, Page, PageRecord, Parsed
from dsvl2.pipelines.task import Task, TaskOption, read_lines, texts, unique

PER = ("page", "document")
# Pages asked at once with per="document". Three or more pages are each one 384x384 view of 421 image tokens
# (the processor's rule), so 8 pages, a question and the default 512-token answer fit the model's 4096 positions.
DEFAULT_WINDOW = 8


def parse_answer(text: str) -> Parsed:
    """{"answer": text stripped}; an empty answer is a parse error."""
    answer = text.strip()
    if not answer:
        return Parsed({"answer": ""}, ok=False, error="empty answer")
    return Parsed({"answer": answer})


@dataclass(frozen=True, slots=True)
class AskTask(Task):
    """Each prompt asked of each page, or of each window of a document's pages (result: {"answer": str}).
    `window` None asks per page; otherwise how many pages of a document one conversation holds."""

    prompts: tuple[str, ...]  # type: ignore[misc]  # a field here, a property in the other tasks
    window: int | None = None

    name: ClassVar[str] = "ask"
    summary: ClassVar[str] = (
        "Free-form questions: every --prompt asked of every page, batched. With --per document, asked once "
        "over a document's pages together (one answer per --window of pages). With one answer to print it "
        "is printed alone; otherwise each answer follows a '==> source (page N): prompt <==' line."
    )
    examples: ClassVar[tuple[str, ...]] = (
        "dsvl2 ask samples/bar-chart.png --prompt 'Which fruit sold best?'",
        "dsvl2 ask invoices/ --prompts questions.txt -o answers.jsonl",
        "dsvl2 ask contract.pdf --per document --pages 1-4 --prompt 'Who are the parties?'",
    )
    options: ClassVar[tuple[TaskOption, ...]] = (
        TaskOption("prompt", "A question; repeatable.", many=True),
        TaskOption("prompts", "Questions, one per line.", lines_file=True, metavar="FILE"),
        TaskOption(
            "per",
            "page (default): one answer per page. document: one answer per document, its pages in one "
            "conversation; the record's `pages` lists the pages the answer saw.",
            metavar="page|document",
        ),
        TaskOption(
            "window",
            f"With --per document: pages in one conversation (default {DEFAULT_WINDOW}). A longer document is "
            "asked in consecutive windows of N pages, one answer each (--pages picks which pages).",
            metavar="N",
        ),
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
    def from_options(
        cls,
        *,
        prompt: str | list[str] | None = None,
        prompts: str | Path | None = None,
        per: str | None = None,
        window: int | str | None = None,
    ) -> AskTask:
        """`prompt` values then the lines of the `prompts` file, blanks and repeats dropped, order kept;
        `per` "page" (default) or "document"; `window` (per document only) a number of pages, 1 or more."""
        asked = unique((*texts(prompt), *(read_lines("prompts", prompts) if prompts is not None else ())))
        if not asked:
            raise OptionError("prompt", "is required: give at least one question (or a prompts file)")
        if per not in (None, *PER):
            raise OptionError("per", f"must be 'page' or 'document', not {per!r}")
        if per != "document":
            if window is not None:
                raise OptionError("window", "only applies when asking per document (--per document)")
            return cls(asked)
        return cls(asked, DEFAULT_WINDOW if window is None else _pages(window))

    @property
    def per(self) -> str:
        return "page" if self.window is None else "document"

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


def _pages(window: int | str) -> int:
    """A window size from the API (an int) or the command line (text); OptionError unless a whole number >= 1."""
    text = str(window).strip()
    if isinstance(window, bool) or not text.isdigit() or int(text) < 1:
        raise OptionError("window", f"must be a whole number of pages, 1 or more (got {window!r})")
    return int(text)
