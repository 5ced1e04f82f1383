"""The engine's continuous-batching API (`submit` / `step` / `has_work`) on the tiny parity checkpoints (float32),
and the host reads the decode path must not make. Each docstring names the bug class its test catches."""

from __future__ import annotations

import pytest
import torch
from parity import checkpoint_names, parity_model, parity_processor, require
from test_invariants import page_requests

from dsvl2.model.config import LanguageConfig
from dsvl2.model.engine import Engine
from dsvl2.model.language import LanguageModel, MoE
from dsvl2.model.requests import Completion, Request, Sampling, user_prompt
from dsvl2.model.sampling import sample_tokens, top_p_filter

CHECKPOINTS = require(checkpoint_names(), "parity checkpoints")


def text_request(rid: str, words: int, new_tokens: int) -> Request:
    """A text-only request of about `words` prompt tokens that generates exactly `new_tokens` (EOS suppressed)."""
    prompt = " ".join(f"word{i % 13}" for i in range(words))
    return Request(rid, user_prompt(prompt), Sampling(max_new_tokens=new_tokens, suppress_eos=True))


def run_schedule(engine: Engine, schedule: dict[int, list[Request]]) -> tuple[dict[str, Completion], dict[str, int]]:
    """Step `engine` from idle, submitting schedule[k] right before step k, until nothing is left: the completions by
    id and the step each came back in."""
    done: dict[str, Completion] = {}
    finished_at: dict[str, int] = {}
    step = 0
    while step <= max(schedule) or engine.has_work:
        for request in schedule.get(step, []):
            engine.submit(request)
        for completion in engine.step():
            assert completion.id not in done, f"{completion.id} returned twice"
            done[completion.id], finished_at[completion.id] = completion, step
        step += 1
    assert engine.step() == [] and not engine.has_work
    return done, finished_at


def assert_each_equals_alone(ckpt: str, requests: list[Request], done: dict[str, Completion]) -> None:
    alone = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=1)
    assert sorted(done) == sorted(r.id for r in requests)
    for request in requests:
        want = alone.generate([request])[0]
        got = done[request.id]
        assert got.token_ids == want.token_ids, f"{ckpt} {request.id}: {got.token_ids} vs alone {want.token_ids}"
        assert (got.finish_reason, got.n_prompt) == (want.finish_reason, want.n_prompt), f"{ckpt} {request.id}"


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_staggered_submissions_equal_each_request_alone(ckpt: str) -> None:
    """Catches state leaking between requests that join a running batch: rows taken mid-run start clean, a cache
    grown while others decode keeps their contents, prefill chunks of a newcomer interleave with the others' decode
    steps without touching them. Greedy tokens of every request equal its tokens alone."""
    image = page_requests(1, sampling=Sampling(max_new_tokens=6))[0]
    schedule = {
        0: [text_request("long", 40, 16)],
        1: [image],
        3: [text_request("a", 5, 3), text_request("b", 70, 9)],
        4: [text_request("c", 12, 1)],
        11: [text_request("d", 25, 7)],
    }
    engine = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=3, prefill_chunk=64)
    done, _ = run_schedule(engine, schedule)
    assert_each_equals_alone(ckpt, [r for rs in schedule.values() for r in rs], done)


def test_later_request_is_admitted_while_a_long_one_runs() -> None:
    """Catches head-of-line blocking: a short request submitted while a long one decodes is admitted into a free
    row and comes back before the long one finishes (with one row it has to wait: the contrast shows the check
    means something)."""
    ckpt = CHECKPOINTS[0]
    long, short = text_request("long", 30, 40), text_request("short", 8, 3)
    schedule = {0: [long], 4: [short]}
    done, finished_at = run_schedule(Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=2), schedule)
    assert finished_at["short"] < finished_at["long"], finished_at
    assert finished_at["short"] <= 4 + 3, f"short request waited: {finished_at}"
    assert done["long"].n_generated == 40 and done["short"].n_generated == 3
    _, serial = run_schedule(Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=1), schedule)
    assert serial["short"] > serial["long"], serial


def test_each_request_stops_at_its_own_max_new_tokens() -> None:
    """Catches a budget shared across a batch: requests running together, each with its own `max_new_tokens`,
    finish with exactly that many tokens and finish reason "length"."""
    ckpt = CHECKPOINTS[0]
    budgets = {"n1": 1, "n5": 5, "n9": 9, "n17": 17}
    requests = [text_request(rid, 10 + 6 * i, n) for i, (rid, n) in enumerate(budgets.items())]
    done, finished_at = run_schedule(Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=4),
                                     {0: requests[:2], 2: requests[2:]})
    for rid, n in budgets.items():
        assert (done[rid].n_generated, done[rid].finish_reason) == (n, "length"), (rid, done[rid])
    assert finished_at["n1"] < finished_at["n5"] < finished_at["n17"], finished_at


def test_ids_must_be_unique_in_flight() -> None:
    """Catches two requests answered under one id: an id already queued or running is refused by `submit` and by
    `generate` (which then submits nothing), and is free again once its request has come back."""
    ckpt = CHECKPOINTS[0]
    engine = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=2)
    assert not engine.has_work and engine.step() == []
    engine.submit(text_request("x", 6, 2))
    assert engine.has_work
    with pytest.raises(ValueError, match="already in flight"):
        engine.submit(text_request("x", 9, 2))
    with pytest.raises(ValueError, match="already in flight"):
        engine.generate([text_request("y", 6, 2), text_request("x", 6, 2)])
    with pytest.raises(ValueError, match="unique"):
        engine.generate([text_request("z", 6, 2), text_request("z", 6, 2)])
    done = {}
    while engine.has_work:
        done.update((c.id, c) for c in engine.step())
    assert list(done) == ["x"] and done["x"].n_generated == 2
    assert engine.generate([text_request("x", 9, 3)])[0].n_generated == 3


def test_cancel_and_completions_of_other_requests_during_generate() -> None:
    """Catches lost or misrouted completions: a request cancelled between steps comes back "cancelled" with a
    prefix of its tokens alone; one submitted outside `generate` that finishes during it is held for the next
    `step`, and `generate` returns only its own."""
    ckpt = CHECKPOINTS[0]
    engine = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=3)
    alone = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=1)
    victim = text_request("victim", 12, 30)
    engine.submit(victim)
    engine.step()
    engine.step()
    engine.cancel("victim")
    (cancelled,) = engine.step()
    assert cancelled.finish_reason == "cancelled" and 0 < cancelled.n_generated < 30
    assert cancelled.token_ids == alone.generate([victim])[0].token_ids[: cancelled.n_generated]

    outside, inside = text_request("outside", 7, 2), text_request("inside", 15, 8)
    engine.submit(outside)
    seen: list[str] = []
    assert [c.id for c in engine.generate([inside], on_completion=lambda c: seen.append(c.id))] == ["inside"]
    assert seen == ["inside"] and engine.has_work
    (held,) = engine.step()
    assert held.id == "outside" and held.token_ids == alone.generate([outside])[0].token_ids
    assert not engine.has_work


def test_a_failed_step_drops_the_work_and_leaves_the_engine_usable(monkeypatch) -> None:
    """Catches an engine wedged by an exception mid-step (out of memory, a bad input): the step raises, nothing is
    left in flight, and the same ids can run again afterwards."""
    ckpt = CHECKPOINTS[0]
    processor = parity_processor(ckpt)
    real = processor.prepare

    def prepare(conversation):
        if "boom" in conversation[0].content:
            raise RuntimeError("boom")
        return real(conversation)

    monkeypatch.setattr(processor, "prepare", prepare)
    engine = Engine(parity_model(ckpt), processor, max_batch_size=2)
    good = text_request("good", 6, 4)
    engine.submit(good)
    engine.submit(Request("bad", user_prompt("boom"), Sampling(max_new_tokens=2)))
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    assert not engine.has_work and engine.step() == []
    again = engine.generate([good])[0]
    assert again.n_generated == 4
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate([Request("bad", user_prompt("boom"), Sampling(max_new_tokens=2))])
    assert not engine.has_work


# -- host reads ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mla", [True, False], ids=["mla", "mha"])
@torch.inference_mode()
def test_cached_forward_reads_nothing_back_from_the_device(mla: bool) -> None:
    """Catches host synchronisations on the decode path (on a GPU each one waits for the device's queue to drain,
    per layer per step): a prefill of some rows and a decode step over all rows run on the meta device, where
    reading any value back (int(), .tolist(), .item()) raises. A dense layer and a MoE layer, in bf16: the routed
    experts take torch's grouped product there, as on a GPU (the meta device checks it as CUDA does)."""
    cfg = LanguageConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=50, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4,
                         qk_rope_head_dim=4, v_head_dim=4, use_mla=mla, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=8, n_shared_experts=1, first_k_dense_replace=1,
                         topk_method="greedy")
    with torch.device("meta"):
        lm = LanguageModel(cfg).to(torch.bfloat16)
    assert isinstance(lm.model.layers[1].mlp, MoE)
    cache = lm.new_cache(3, 24)
    rows = cache.rows([0, 2])
    lm(torch.zeros(2, 7, 16, device="meta", dtype=torch.bfloat16), rows)
    rows.advance([7, 4])
    for _ in range(3):
        hidden = lm(torch.zeros(3, 1, 16, device="meta", dtype=torch.bfloat16), cache)
        cache.advance([1, 0, 1])
    assert hidden.shape == (3, 1, 16) and cache.lengths.tolist() == [10, 0, 7]
    with pytest.raises(RuntimeError, match="overflow"):
        lm(torch.zeros(3, 15, 16, device="meta"), cache)


def test_batched_sampling_draws_what_each_row_draws_alone() -> None:
    """Catches batched sampling that changes a row's tokens: greedy rows equal their own argmax, and each seeded row
    draws, from its own generator, the token it would draw sampled alone (rows of two settings groups mixed with
    greedy ones, a generator left where one draw leaves it)."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(7, 300, generator=g) * 4
    settings = [Sampling(), Sampling(temperature=0.7, top_p=0.9, seed=1), Sampling(temperature=1.0, seed=2),
                Sampling(temperature=0.7, top_p=0.9, seed=3), Sampling(), Sampling(temperature=1.0, seed=4),
                Sampling(temperature=0.7, top_p=0.9, seed=5)]

    def generators():
        return [None if s.temperature == 0 else torch.Generator().manual_seed(s.seed) for s in settings]

    batched, gens = generators(), generators()
    got = sample_tokens(logits.clone(), settings, batched)
    for n, s in enumerate(settings):
        if s.temperature == 0:
            want = int(logits[n].argmax())
        else:
            probs = top_p_filter(logits[n] / s.temperature, s.top_p).softmax(dim=-1)
            want = int(torch.multinomial(probs, 1, generator=gens[n]))
            assert batched[n].get_state().equal(gens[n].get_state()), f"row {n}: generator state"
        assert got[n] == want, f"row {n}: {got[n]} vs {want}"


def test_greedy_ids_are_torchs_argmax() -> None:
    """The two-pass greedy pick (block maxima, then the first block holding the maximum) returns torch's argmax
    exactly: the first maximal index, ties within and across blocks, a NaN (maximal), rows of -inf, a last partial
    block, vocabularies too small for blocks, and rows that are a strided view."""
    from dsvl2.model.sampling import ARGMAX_BLOCK, greedy_ids

    g = torch.Generator().manual_seed(0)
    for v in (129280, 5 * ARGMAX_BLOCK + 7, 4 * ARGMAX_BLOCK, 4 * ARGMAX_BLOCK - 1, 100):
        x = torch.randn(4, v, generator=g)
        top = float(x.max()) + 1
        x[0, [v // 3, v // 2, v - 1]] = top  # a tie across blocks: the first wins
        x[1] = float("-inf")
        x[2, [7, v - 2]] = float("nan")
        x[3, -1] = top  # the maximum in the last, partial block
        ties = torch.randint(0, 3, (3, v), generator=g).float()  # many ties in every block
        for logits in (x, ties, x[:, : v - 1]):
            assert torch.equal(greedy_ids(logits), logits.argmax(-1)), (v, logits.shape)


def test_stop_strings_found_from_the_answers_tail_as_from_its_whole_text(monkeypatch):
    """Catches a stop check that misses a stop or cuts elsewhere than the whole text's check would: a stop string
    first completed late in an 80-token answer ends it at the same token with the same text as decoding the whole
    answer at every step; and every step but the confirming one decodes a few tokens, not the whole answer (decoding
    it all every step cost O(n^2) over a long answer)."""
    ckpt = CHECKPOINTS[0]
    engine = Engine(parity_model(ckpt), parity_processor(ckpt), max_batch_size=2)
    conv = page_requests(1)[0].conversation
    free = engine.generate([Request("free", conv, Sampling(max_new_tokens=80, suppress_eos=True))])[0]
    text = free.text
    start = next((i for i in range(len(text) * 3 // 4, len(text) - 3) if text.find(text[i:i + 3]) == i), None)
    assert start is not None, "no 3-character string first seen late in the answer"
    stop = text[start:start + 3]
    request = Request("s", conv, Sampling(max_new_tokens=80, stop=(stop,), suppress_eos=True))
    decoded: list[int] = []
    real_decode = Engine._decode
    monkeypatch.setattr(Engine, "_decode", lambda self, ids: decoded.append(len(ids)) or real_decode(self, ids))
    from_tail = engine.generate([request])[0]
    assert from_tail.finish_reason == "stop" and from_tail.text == text[:start]
    window = 4 * (len(stop) + 4)
    assert max(decoded[:-1]) <= window < from_tail.n_generated, decoded
    monkeypatch.setattr(Engine, "_stop_in_tail", lambda self, tokens, stops: True)  # the whole text at every step
    whole = engine.generate([request])[0]
    assert (whole.text, whole.token_ids, whole.finish_reason) == (from_tail.text, from_tail.token_ids, "stop")
