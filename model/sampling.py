"""Token selection and stop rules: small pure functions over one row's logits and tokens.

Temperature 0 is argmax. Otherwise the row's own seeded `torch.Generator` draws from the temperature-scaled,
top-p-filtered distribution, so a request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import torch

from dsvl2.model.requests import Sampling


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches `top_p` (always at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """(V,) float32 logits of one row -> the next token id."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    filtered = top_p_filter(logits / sampling.temperature, sampling.top_p)
    probs = filtered.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.temperature == 0:
        return None
    return torch.Generator(device="cpu").manual_seed(sampling.seed)


def repeats_ngram(tokens: list[int], n: int, window: int) -> bool:
    """True when the last `n` tokens already occur as an n-gram earlier within the last `window` tokens:
    the signature of a generation loop (document models repeat lines or table rows forever)."""
    if n <= 0 or len(tokens) < n + 1:
        return False
    recent = tokens[-window:] if window > 0 else tokens
    tail = recent[-n:]
    return any(recent[i : i + n] == tail for i in range(len(recent) - n))


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index where the earliest stop string starts in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1
