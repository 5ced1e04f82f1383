"""Invariants of the runtime on tiny random checkpoints (float32): each fast or batched path equals the
plain one it replaces. One helper per invariant; each docstring names the bug class it catches, and each
failure message names the worst position."""

from __future__ import annotations

import pytest
import torch
from parity import checkpoint_names, load_cases, parity_model, parity_processor, require

from dsvl2.model.engine import Engine
from dsvl2.model.language import MLAttention, MoE, MoEGate
from dsvl2.model.requests import Request, Sampling, user_prompt
from dsvl2.model.vl2 import DeepseekVL2

CHECKPOINTS = require(checkpoint_names(), "parity checkpoints")
TOL = 1e-4


def worst(a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple[int, ...]]:
    diff = (a.float() - b.float()).abs()
    return float(diff.max()), tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = TOL) -> None:
    err, at = worst(a, b)
    assert err <= tol, f"{what}: max |diff| {err:.3g} at {at}"


def token_embeds(model: DeepseekVL2, n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.cfg.language.vocab_size, (batch, n), generator=g)
    return model.language.embed(ids)


# -- cache -----------------------------------------------------------------------------------------------
def incremental_logits(model: DeepseekVL2, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of every position of `x` computed chunk by chunk through the KV cache."""
    lm = model.language
    kv = lm.new_cache(x.shape[0], x.shape[1])
    out, start = [], 0
    for n in chunks:
        out.append(lm.logits(lm(x[:, start : start + n], kv)))
        kv.advance(n)
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
@torch.inference_mode()
def test_cached_decode_equals_full_forward(ckpt: str) -> None:
    """Catches cache bugs: wrong write slot, stale slots visible, positions off by one, RoPE on cached keys."""
    model = parity_model(ckpt)
    x = token_embeds(model, 40, batch=2)
    full = model.language.logits(model.language(x))
    assert_same(incremental_logits(model, x, [25] + [1] * 15), full, f"{ckpt} prefill 25 + 15 decode steps")


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
@torch.inference_mode()
def test_chunked_prefill_equals_whole_prefill(ckpt: str) -> None:
    """Catches masks that let a chunk see later chunks or hide earlier ones, and cache length accounting."""
    model = parity_model(ckpt)
    x = token_embeds(model, 61, seed=1)
    whole = incremental_logits(model, x, [61])
    assert_same(incremental_logits(model, x, [7, 20, 1, 33]), whole, f"{ckpt} chunks 7/20/1/33")


@pytest.mark.parametrize("ckpt", [c for c in CHECKPOINTS if parity_model(c).cfg.language.use_mla])
@torch.inference_mode()
def test_absorbed_mla_equals_expanded(ckpt: str) -> None:
    """Catches wrong weight folding in absorbed MLA decode (W_uk into the query, W_uv into the output)."""
    model = parity_model(ckpt)
    attns = [layer.self_attn for layer in model.language.model.layers]
    assert all(isinstance(a, MLAttention) for a in attns)
    x = token_embeds(model, 30, seed=2, batch=2)
    results = {}
    try:
        for absorb in (True, False):
            for a in attns:
                a.absorb = absorb
            results[absorb] = incremental_logits(model, x, [10] + [1] * 20)
    finally:
        for a in attns:
            a.absorb = None
    assert_same(results[True], results[False], f"{ckpt} absorbed vs expanded")


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
@torch.inference_mode()
def test_rows_of_different_lengths_are_independent(ckpt: str) -> None:
    """Catches cross-row leaks: a row's logits must not depend on the other rows' lengths or contents."""
    model = parity_model(ckpt)
    lm = model.language
    a, b = token_embeds(model, 12, seed=3), token_embeds(model, 30, seed=4)
    alone = lm.logits(lm(a))
    batch = torch.zeros(2, 30, a.shape[-1])
    batch[0, :12], batch[1] = a[0], b[0]
    kv = lm.new_cache(2, 40)
    together = lm.logits(lm(batch, kv))
    assert_same(together[0, :12], alone[0], f"{ckpt} short row beside a long row")


# -- MoE -------------------------------------------------------------------------------------------------
def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop: each token through its K experts, weighted, plus the shared experts."""
    ids, weights = moe.gate(x)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float32)
        for k in range(ids.shape[1]):
            acc += weights[n, k] * moe.experts[int(ids[n, k])](x[n : n + 1])[0].float()
        out[n] = acc.to(x.dtype)
    if hasattr(moe, "shared_experts"):
        out = out + moe.shared_experts(x)
    return out


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
@torch.inference_mode()
def test_grouped_moe_equals_per_token_loop(ckpt: str) -> None:
    """Catches dispatch bugs: tokens scattered back to the wrong rows, weights misaligned with experts."""
    model = parity_model(ckpt)
    moe = next(layer.mlp for layer in model.language.model.layers if isinstance(layer.mlp, MoE))
    x = torch.randn(37, model.cfg.language.hidden_size, generator=torch.Generator().manual_seed(5))
    assert_same(moe(x[None])[0], naive_moe(moe, x), f"{ckpt} grouped vs per-token MoE")


def reference_gate(gate: MoEGate, x: torch.Tensor) -> tuple[list[set[int]], list[dict[int, float]]]:
    """Hand-written routing, one token at a time, from the reference's rules (fixture README)."""
    logits = x.float() @ gate.weight.float().T
    chosen, weights = [], []
    for row in logits:
        scores = row.softmax(-1) if gate.scoring == "softmax" else row.sigmoid()
        X = scores.shape[0]
        choice = scores + gate.e_score_correction_bias.float() if gate.method == "noaux_tc" else scores
        allowed = set(range(X))
        if gate.method != "greedy":
            size = X // gate.n_group
            groups = [choice[g * size : (g + 1) * size].tolist() for g in range(gate.n_group)]
            if gate.method == "group_limited_greedy":
                group_score = [max(v) for v in groups]
            else:
                group_score = [sum(sorted(v)[-2:]) for v in groups]
            keep = sorted(range(gate.n_group), key=lambda g: -group_score[g])[: gate.topk_group]
            allowed = {g * size + i for g in keep for i in range(size)}
        masked = [float(choice[e]) if e in allowed else 0.0 for e in range(X)]
        top = sorted(range(X), key=lambda e: -masked[e])[: gate.top_k]
        w = {e: float(scores[e]) if gate.method == "noaux_tc" else masked[e] for e in top}
        if gate.top_k > 1 and gate.norm_topk_prob:
            total = sum(w.values()) + 1e-20
            w = {e: v / total for e, v in w.items()}
        chosen.append(set(top))
        weights.append({e: v * gate.scaling for e, v in w.items()})
    return chosen, weights


GATE_VARIANTS = [
    ("greedy", "softmax", False, 1, 1),
    ("greedy", "sigmoid", True, 1, 1),
    ("group_limited_greedy", "softmax", False, 4, 2),
    ("group_limited_greedy", "sigmoid", True, 2, 1),
    ("noaux_tc", "sigmoid", True, 4, 2),
    ("noaux_tc", "softmax", False, 2, 1),
]


@pytest.mark.parametrize(("method", "scoring", "norm", "groups", "topk_group"), GATE_VARIANTS)
@torch.inference_mode()
def test_gate_matches_hand_written_reference(method, scoring, norm, groups, topk_group) -> None:
    """Catches routing bugs per method: group scores, masking value, biased selection vs unbiased weights,
    normalisation and scaling."""
    from dsvl2.model.config import LanguageConfig

    cfg = LanguageConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=8, topk_method=method,
                         scoring_func=scoring, norm_topk_prob=norm, n_group=groups, topk_group=topk_group,
                         routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4,
                         qk_rope_head_dim=4, v_head_dim=4)
    g = torch.Generator().manual_seed(6)
    gate = MoEGate(cfg)
    gate.weight.data = torch.randn(8, 16, generator=g)
    if method == "noaux_tc":
        # Non-negative, so no allowed expert scores below the 0.0 given to dropped groups (the reference's
        # tie among masked zeros is broken by topk's internal order, which no hand reference can mirror).
        gate.e_score_correction_bias.data = torch.rand(8, generator=g) * 0.1
    x = torch.randn(64, 16, generator=g)
    ids, weights = gate(x)
    want_ids, want_weights = reference_gate(gate, x)
    for n in range(x.shape[0]):
        got = dict(zip(ids[n].tolist(), weights[n].tolist(), strict=True))
        assert set(got) == want_ids[n], f"token {n}: experts {sorted(got)} vs {sorted(want_ids[n])}"
        for e, w in want_weights[n].items():
            assert abs(got[e] - w) < 1e-6, f"token {n} expert {e}: weight {got[e]} vs {w}"


# -- engine ----------------------------------------------------------------------------------------------
def page_requests(n: int, *, sampling: Sampling | None = None) -> list[Request]:
    """Requests over the parity images with varied prompts and lengths."""
    cases = load_cases()
    convs = [conv for case in cases for conv in case.conversations()]
    out = []
    for i in range(n):
        conv = convs[i % len(convs)]
        s = sampling or Sampling(max_new_tokens=4 + 3 * (i % 4))
        out.append(Request(f"r{i}", conv, s))
    return out


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_mixed_batch_equals_each_request_alone(ckpt: str) -> None:
    """Catches batching bugs (padding, per-row lengths, rows finishing early): greedy tokens of a mixed
    batch under continuous batching equal each request run alone."""
    engine = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=3, prefill_chunk=200)
    requests = page_requests(5)
    batched = engine.generate(requests)
    alone = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=1)
    for req, got in zip(requests, batched, strict=True):
        want = alone.generate([req])[0]
        assert got.token_ids == want.token_ids, f"{ckpt} {req.id}: {got.token_ids} vs {want.token_ids}"


def test_staggered_arrivals_equal_static_batch() -> None:
    """Catches admission bugs: rows reused after a finish must start clean (lengths reset, no stale keys)."""
    ckpt = CHECKPOINTS[0]
    requests = page_requests(7)
    static = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=7).generate(requests)
    rolling = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=2, prefill_chunk=97).generate(requests)
    assert [c.token_ids for c in rolling] == [c.token_ids for c in static]
    assert [c.id for c in rolling] == [r.id for r in requests], "results must come back in request order"


@pytest.mark.parametrize("rows_in_budget", [2, 0.5])
def test_cache_budget_bounds_the_cache_and_keeps_the_tokens(monkeypatch, rows_in_budget: float) -> None:
    """Catches admission past the memory budget: with a cache budget of about two requests' worth (or less than
    one), every cache the engine allocates fits the budget (a request alone excepted), fewer rows run at once than
    the batch size allows, and the tokens equal an unbounded run's."""
    ckpt = CHECKPOINTS[0]
    model = parity_model(ckpt)
    requests = page_requests(6)
    free = Engine(model, parity_processor(ckpt), max_batch_size=4).generate(requests)
    token_bytes = model.language.cache_bytes_per_token()
    assert token_bytes == model.language.new_cache(1, 1).nbytes()
    need = max(c.n_prompt + r.sampling.max_new_tokens for c, r in zip(free, requests, strict=True))
    budget = int(rows_in_budget * need * token_bytes)
    caches = []
    real = Engine._ensure_cache

    def spy(self, cache, rows):
        cache = real(self, cache, rows)
        caches.append((cache.nbytes(), sum(s is not None for s in rows)))
        return cache

    monkeypatch.setattr(Engine, "_ensure_cache", spy)
    bounded = Engine(model, parity_processor(ckpt), max_batch_size=4, cache_budget=budget).generate(requests)
    assert [c.token_ids for c in bounded] == [c.token_ids for c in free]
    assert all(nbytes <= budget or running == 1 for nbytes, running in caches), (budget, caches)
    assert max(running for _, running in caches) == (2 if rows_in_budget == 2 else 1)
    with pytest.raises(ValueError, match="cache_budget"):
        Engine(model, parity_processor(ckpt), cache_budget=0)


def test_prefill_steps_stay_within_the_token_budget(monkeypatch) -> None:
    """Catches unbounded prefill activations: every prefill forward holds at most `prefill_chunk` tokens including
    padding (or one row's chunk), a prompt is split into equal chunks (no slivers), and the tokens still equal an
    unchunked run's."""
    ckpt = CHECKPOINTS[0]
    model = parity_model(ckpt)
    requests = page_requests(4)
    whole = Engine(model, parity_processor(ckpt), max_batch_size=4).generate(requests)
    shapes: list[tuple[int, int]] = []
    real = type(model.language).forward

    def spy(self, embeds, cache=None):
        if embeds.shape[1] > 1:
            shapes.append(tuple(embeds.shape[:2]))
        return real(self, embeds, cache)

    monkeypatch.setattr(type(model.language), "forward", spy)
    budget = 150
    chunked = Engine(model, parity_processor(ckpt), max_batch_size=4, prefill_chunk=budget).generate(requests)
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]
    assert all(b * t <= budget or b == 1 for b, t in shapes), shapes
    expected = []  # each prompt of n tokens in ceil(n / budget) near-equal chunks
    for n in (c.n_prompt for c in chunked):
        parts = -(-n // budget)
        size = -(-n // parts)
        expected += [size] * (parts - 1) + [n - size * (parts - 1)]
    assert max(expected) > min(expected) and len(expected) > len(requests)
    assert sorted(t for _, t in shapes) == sorted(expected)


def test_sampling_is_reproducible_whatever_the_batch() -> None:
    """Catches shared random state: a seeded request samples the same tokens alone or among others."""
    ckpt = CHECKPOINTS[0]
    s = Sampling(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=11)
    target = Request("target", page_requests(1)[0].conversation, s)
    others = page_requests(4, sampling=Sampling(max_new_tokens=6, temperature=1.0, seed=3))
    engine = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=5)
    alone = engine.generate([target])[0]
    mixed = engine.generate([*others[:2], target, *others[2:]])[2]
    assert mixed.token_ids == alone.token_ids
    greedy = engine.generate([Request("g", target.conversation, Sampling(max_new_tokens=10))])[0]
    assert alone.token_ids != greedy.token_ids, "temperature 0.7 should not reproduce greedy here"


def test_stop_rules_and_callbacks() -> None:
    """Catches stop-rule bugs: max tokens, stop strings (text cut before the stop), repetition guard,
    suppressed EOS, cancellation of queued requests, and the completion callback order."""
    ckpt = CHECKPOINTS[0]
    engine = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=2)
    conv = page_requests(1)[0].conversation
    free = engine.generate([Request("free", conv, Sampling(max_new_tokens=30, suppress_eos=True))])[0]
    assert free.finish_reason == "length" and free.n_generated == 30
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    stopped = engine.generate([Request("s", conv, Sampling(max_new_tokens=30, stop=(stop,), suppress_eos=True))])[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text and free.text.startswith(stopped.text)

    seen = []
    reqs = [Request(f"c{i}", conv, Sampling(max_new_tokens=3 + i)) for i in range(4)]
    engine.cancel("c3")
    done = engine.generate(reqs, on_completion=lambda c: seen.append(c.id))
    assert [c.id for c in done] == ["c0", "c1", "c2", "c3"] and done[3].finish_reason == "cancelled"
    assert sorted(seen) == ["c0", "c1", "c2", "c3"]


def test_repetition_guard_fires_on_a_loop() -> None:
    """Catches a silent guard: a model looping on a short cycle is stopped with finish reason repetition."""
    from dsvl2.model.sampling import repeats_ngram

    assert repeats_ngram([1, 2, 3, 4, 1, 2, 3, 4], n=4, window=100)
    assert not repeats_ngram([1, 2, 3, 4, 5, 6, 7, 8], n=4, window=100)
    assert not repeats_ngram([1, 2, 3, 4, 9, 9, 1, 2, 3, 4], n=4, window=5)
    ckpt = CHECKPOINTS[0]
    engine = Engine(parity_model(ckpt), parity_processor(ckpt))
    conv = user_prompt("Write a short poem about the sea.")
    loose = engine.generate([Request("x", conv, Sampling(max_new_tokens=200, suppress_eos=True))])[0]
    guarded = engine.generate([Request("y", conv, Sampling(max_new_tokens=200, suppress_eos=True,
                                                             no_repeat_ngram=1, repeat_window=200))])[0]
    # 200 greedy tokens of a random model over ~1.5k ids repeat some token (checked, not assumed); with
    # n = 1 the guard must stop right at the first token that already occurred.
    tokens = list(loose.token_ids)
    first = next((k for k in range(1, len(tokens) + 1) if repeats_ngram(tokens[:k], 1, 200)), None)
    assert first is not None, "fixture assumption: the unguarded run repeats a token"
    assert guarded.finish_reason == "repetition" and guarded.n_generated == first
    assert guarded.token_ids == loose.token_ids[:first]


def test_repetition_guard_equals_its_definition() -> None:
    """Catches a fast n-gram search that answers otherwise than the definition (the last n tokens equal to an
    earlier n-gram starting within the window): random sequences over a few ids, so that heads recur with and
    without a whole match, every n and window including none and ones shorter than n."""
    import random

    from dsvl2.model.sampling import repeats_ngram

    def naive(tokens: list[int], n: int, window: int) -> bool:
        if n <= 0 or len(tokens) < n + 1:
            return False
        recent = tokens[-window:] if window > 0 else tokens
        return any(recent[i:i + n] == recent[-n:] for i in range(len(recent) - n))

    rng = random.Random(5)
    hits = 0
    for _ in range(3000):
        tokens = [rng.randrange(rng.choice((2, 4, 9))) for _ in range(rng.randrange(0, 40))]
        n, window = rng.randrange(0, 7), rng.choice((0, 1, 3, 6, 10, 25, 100))
        assert repeats_ngram(tokens, n, window) == naive(tokens, n, window), (tokens, n, window)
        hits += naive(tokens, n, window)
    assert 300 < hits < 2700  # both answers are well exercised


def test_a_bf16_gate_routes_with_its_current_weight() -> None:
    """The gate keeps its bf16 weight converted to float32 between calls: catches routing that uses a stale
    conversion after the weight is changed in place or replaced (routing must equal the float32 product of the
    weight as it is now)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(n_routed_experts=16, num_experts_per_tok=2, hidden_size=32, topk_method="greedy",
                          scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=True,
                          routed_scaling_factor=1.0)
    gate = MoEGate(cfg)
    gate.weight.data = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def expected() -> torch.Tensor:
        scores = torch.nn.functional.linear(x.float(), gate.weight.float()).softmax(-1)
        return scores.topk(2, -1).indices.sort(-1).values

    for change in ("none", "in place", "replaced"):
        if change == "in place":
            with torch.no_grad():
                gate.weight.mul_(-1)
        elif change == "replaced":
            gate.weight = torch.nn.Parameter(torch.randn(16, 32).to(torch.bfloat16), requires_grad=False)
        with torch.inference_mode():
            ids, _ = gate(x)
        assert torch.equal(ids.sort(-1).values, expected()), change
