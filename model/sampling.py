"""Token selection and stop rules: small pure functions over rows of logits and tokens, and `SeenTokens`, the
per-row record of token ids the repetition penalty needs.

The repetition penalty comes first, as transformers orders its logits processors before its warpers; temperature
0 is then argmax. Otherwise the row's own seeded `torch.Generator` draws from the temperature-scaled,
top-p-filtered distribution, so a request samples the same tokens whatever else shares its batch. A batch is
sampled with one op per group of rows that share settings, and its ids reach the host in one transfer per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import torch

from dsvl2.model.kv_cache import to_device
from dsvl2.model.requests import Sampling


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' `RepetitionPenaltyLogitsProcessor` over a mask: where `seen` (N, V) is True, a logit is divided by
    `penalty` when positive and multiplied by it when negative. The processor gathers the logit of every id in the
    sequence, penalises it and scatters it back, so an id seen many times is penalised once, as here."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


class SeenTokens:
    """The token ids each cache row's sequence holds, as a (rows, V) bool mask on the device: what the repetition
    penalty looks up. Which ids count is the reference's choice: DeepSeek-VL2's `inference.py` and
    `deepseek_vl2/serve/inference.py` call `generate(inputs_embeds=..., input_ids=prompt ids, ...)`, and with both
    given transformers (4.38.2, `GenerationMixin._prepare_model_inputs`) keeps the prompt ids as the sequence the
    logits processors see, so the prompt counts whole (BOS, role tags and every `<image>` placeholder id) and then
    every generated token. One difference, for batch invariance: the reference's left padding of a batch puts the
    pad id in a padded row's sequence; here a row holds its own ids only, so it is penalised as it would be alone.

    Every update is a device op on indices sent without blocking (`to_device`): nothing is read back."""

    def __init__(self, rows: int, vocab: int, device: torch.device | str) -> None:
        self.mask = torch.zeros(rows, vocab, dtype=torch.bool, device=device)

    def start(self, row: int, prompt_ids: Sequence[int]) -> None:
        """`row` now holds a new sequence whose prompt has these ids."""
        self.mask[row] = False
        self.mask[row, to_device(sorted(set(prompt_ids)), self.mask.device)] = True

    def add(self, rows: Sequence[int], tokens: Sequence[int]) -> None:
        """Each of `rows` generated the token at the same place in `tokens`."""
        if rows:
            index = to_device([list(rows), list(tokens)], self.mask.device)
            self.mask[index[0], index[1]] = True

    def penalize(self, logits: torch.Tensor, rows: Sequence[int], penalties: Sequence[float]) -> torch.Tensor:
        """`logits` (N, V) with row n penalised by `penalties[n]` over the ids of cache row `rows[n]`; rows whose
        penalty is 1 are left as they are. One op per distinct penalty, like sampling's settings groups."""
        order = sorted((p, n) for n, p in enumerate(penalties) if p != 1.0)
        for penalty, group in groupby(order, key=lambda pn: pn[0]):
            members = [n for _, n in group]
            index = to_device([members, [rows[n] for n in members]], logits.device)
            logits[index[0]] = penalize_repeats(logits[index[0]], self.mask[index[1]], penalty)
        return logits


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches `top_p` (always at least one)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


ARGMAX_BLOCK = 1024  # values per block of `greedy_ids`' first pass


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) logits -> (N,) int64: exactly `logits.argmax(-1)` (the first maximal index; a NaN counts as maximal),
    found in two vectorised passes: the maximum of each block of ARGMAX_BLOCK values, then the first maximal index
    within the first block holding the row's maximum. torch's CPU argmax over a row is a scalar loop (~110 us for
    Tiny's 129,280 logits, ~14x its `amax`), paid once per row and decode step."""
    v = logits.shape[1]
    blocks = v // ARGMAX_BLOCK
    if blocks < 4:
        return logits.argmax(-1)
    best = logits[:, : blocks * ARGMAX_BLOCK].unflatten(1, (blocks, ARGMAX_BLOCK)).amax(-1)  # (N, blocks)
    if v > blocks * ARGMAX_BLOCK:
        best = torch.cat((best, logits[:, blocks * ARGMAX_BLOCK :].amax(-1, keepdim=True)), dim=1)
    start = best.argmax(-1) * ARGMAX_BLOCK  # (N,) the first block with the maximum (amax keeps a NaN)
    window = (start[:, None] + torch.arange(ARGMAX_BLOCK, device=logits.device)).clamp_(max=v - 1)
    # Past the end the window repeats the last logit, after its own position: the first maximal index is unchanged.
    return start + logits.gather(1, window).argmax(-1)


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
        for n, token in zip(greedy, greedy_ids(_rows(logits, greedy)).tolist(), strict=True):
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
    tail, end = recent[-n:], len(recent) - n  # earlier n-grams start at 0 .. end - 1
    if end <= 0:  # a window no longer than n holds no earlier n-gram
        return False
    # Only where the tail's first token recurs (list.index scans at C speed): comparing a slice at every start was
    # ~100 us a row and step for OCR's (48, 1024) guard, ~1% of an int4 decode step at batch 1.
    start = -1
    while True:
        try:
            start = recent.index(tail[0], start + 1, end)
        except ValueError:
            return False
        if recent[start : start + n] == tail:
            return True


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index where the earliest stop string starts in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1
