"""The values that cross the runtime's boundary: what callers submit and what they get back.

Plain frozen dataclasses with no behaviour beyond validation, so that pipelines and tests can build and
compare them without loading a model. The engine consumes `Request`s and produces `Completion`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from PIL import Image

USER = "<|User|>"
ASSISTANT = "<|Assistant|>"
IMAGE_TOKEN = "<image>"

# "error": a runtime that answers over a network (`--server`) could not get this answer; `Completion.error` says why.
FinishReason = Literal["eos", "length", "stop", "repetition", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class Message:
    """One conversation turn. `content` holds one `<image>` placeholder per image of the turn."""

    role: str
    content: str
    images: tuple[Image.Image, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in (USER, ASSISTANT):
            raise ValueError(f"role must be {USER!r} or {ASSISTANT!r}, got {self.role!r}")
        n = self.content.count(IMAGE_TOKEN)
        if n != len(self.images):
            raise ValueError(f"message has {n} {IMAGE_TOKEN} placeholders but {len(self.images)} images")


def user_prompt(text: str, images: tuple[Image.Image, ...] = ()) -> tuple[Message, ...]:
    """The single-question conversation: each image's placeholder on its own line, then the text."""
    content = "".join(f"{IMAGE_TOKEN}\n" for _ in images) + text
    return (Message(USER, content, tuple(images)), Message(ASSISTANT, ""))


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy (argmax); otherwise seeded temperature / top-p sampling.

    `repetition_penalty` != 1 divides (multiplies, when negative) the logit of every token id already in the
    sequence by it before any other filter, as transformers' `RepetitionPenaltyLogitsProcessor` (1 is off); the
    sequence is the prompt's ids, image placeholders included, then the answer so far (see `SeenTokens`).
    `max_new_tokens` is cut to what the model's context leaves after the prompt (`Completion.max_new_tokens`).
    `no_repeat_ngram` > 0 enables the repetition guard: generation stops with finish reason "repetition"
    when the last n-gram already occurred within the last `repeat_window` generated tokens.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    no_repeat_ngram: int = 0
    repeat_window: int = 256
    suppress_eos: bool = False
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram must be >= 0, got {self.no_repeat_ngram}")


@dataclass(frozen=True, slots=True)
class Request:
    """One generation job: a conversation (its last turn an empty assistant turn) and how to sample."""

    id: str
    conversation: tuple[Message, ...]
    sampling: Sampling = Sampling()

    @property
    def images(self) -> tuple[Image.Image, ...]:
        return tuple(im for m in self.conversation for im in m.images)


@dataclass(frozen=True, slots=True)
class Timings:
    """Wall-clock seconds spent on one request's stages (shared batch work is attributed to each member)."""

    queued: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0


@dataclass(frozen=True, slots=True)
class Completion:
    """The engine's answer to one `Request`. Finish reason "length" means the answer used its whole budget,
    `max_new_tokens`: the request's own, or less when the prompt left less of the model's `context` (positions;
    prompt plus answer never pass it). Both are None where the runtime does not say (or never admitted it)."""

    id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    n_prompt: int
    n_generated: int
    timings: Timings = field(default_factory=Timings)
    max_new_tokens: int | None = None
    context: int | None = None
    error: str | None = None  # why there is no answer (finish reason "error")
    origin: str | None = None  # who answered when not this process: a server's URL

    @property
    def cut_by_context(self) -> bool:
        """The answer stopped where prompt and answer fill the model's context."""
        return (self.finish_reason == "length" and self.context is not None
                and self.n_prompt + self.n_generated >= self.context)
