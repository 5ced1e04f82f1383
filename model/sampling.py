"""Token selection and stop rules: small pure functions over rows of logits and tokens.

Temperature 0 is argmax. Otherwise the row's own seeded `torch.Generator` draws from the temperature-scaled,
top-p-filtered distribution, so a request samples the same tokens whatever else shares its batch. A batch is
sampled with one op per group of rows that share settings, and its ids reach the host in one transfer per group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsvl2.model.kv_cache import to_device
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


def sample_tokens(logits: torch.Tensor, samplings: Sequence[Sampling],
                  generators: Sequence[torch.Generator | None]) -> list[int]:
    """(N, V) float32 logits, row n sampled by `samplings[n]` with `generators[n]` -> the N next token ids.

    Greedy rows take one argmax together. Rows that sample with the same temperature and top-p are scaled,
    filtered and normalised together; each then draws from its own generator on the host (the generators are
    CPU ones), so a row draws the same numbers whatever shares its batch and whatever device computed the logits.
    The host waits for the device once: every group's probabilities are queued before the first transfer, which
    waits for them all; the transfers after it find their data ready."""
    greedy = [n for n, s in enumerate(samplings) if s.temperature == 0]
    groups: dict[tuple[float, float], list[int]] = {}
    for n, s in enumerate(samplings):
        if s.temperature != 0:
            groups.setdefault((s.temperature, s.top_p), []).append(n)
    probs = {key: top_p_filter(_rows(logits, members) / key[0], key[1]).softmax(dim=-1)
             for key, members in groups.items()}  # queued on the device, all groups before any transfer
    tokens = [0] * len(samplings)
    if greedy:
        for n, token in zip(greedy, _rows(logits, greedy).argmax(dim=-1).tolist(), strict=True):
            tokens[n] = token
    for key, members in groups.items():
        host = probs[key].cpu()
        for j, n in enumerate(members):
            tokens[n] = int(torch.multinomial(host[j], 1, generator=generators[n]))
    return tokens


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The given rows of `x` (all of them without a copy)."""
    if rows == list(range(x.shape[0])):
        return x
    return x[to_device(rows, x.device)]


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
