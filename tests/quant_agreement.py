"""Agreement of a variant model (bf16, int8, int4) with the float32 model on a parity case: the cosine between
their logits and how many greedy tokens match. Shared by tests/test_quant_agreement.py and bench/quant_bench.py.

Each model embeds the case itself (its own vision tower and projector), prefills the prompt and decodes greedily
on its KV cache. Logits are compared at the prompt's last 8 positions and at every decode step up to the first
token where the two disagree (past it the inputs differ, so the logits are no longer comparable).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from parity import Case
from test_parity import greedy_with_cache, right_padded

from dsvl2.model.vl2 import real_tiles


@dataclass(frozen=True, slots=True)
class Agreement:
    min_cos: float  # the lowest logits cosine over the compared positions of every row
    mean_cos: float
    matched: int  # greedy tokens equal to float32's before the first difference, summed over rows
    steps: int  # greedy steps run, summed over rows


@torch.inference_mode()
def run_case(model, case: Case, steps: int, eos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(last-8 prompt logits (B, 8, V), greedy ids (B, steps), step logits (B, steps, V)), float32 on the CPU."""
    inputs = case.inputs()
    crops = inputs["images_spatial_crop"]
    ids, image_mask, lens = right_padded(case)
    embeds = model.embed(ids, image_mask, real_tiles(case.pixels(), crops), crops)
    hidden = model.language(embeds)
    last8 = model.language.logits(torch.stack([hidden[b, n - 8 : n] for b, n in enumerate(lens)])).float()
    gen_ids, gen_logits = greedy_with_cache(model, embeds, lens, steps, eos)
    return last8, gen_ids, gen_logits.float()


def compare(ref: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...]) -> Agreement:
    """Agreement of `got` with `ref`, both `run_case` results."""
    cosines, matched, steps = [], 0, 0
    for b in range(ref[1].shape[0]):
        same = (got[1][b] == ref[1][b]).long().cumprod(0)
        n = int(same.sum())
        matched, steps = matched + n, steps + ref[1].shape[1]
        upto = min(n + 1, ref[1].shape[1])  # the step that chose the first different token is still comparable
        cosines.append(F.cosine_similarity(got[0][b], ref[0][b], dim=-1))
        cosines.append(F.cosine_similarity(got[2][b, :upto], ref[2][b, :upto], dim=-1))
    cos = torch.cat(cosines)
    return Agreement(float(cos.min()), float(cos.mean()), matched, steps)
