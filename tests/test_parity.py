"""Model parity with the official reference implementation, on every case and checkpoint of the fixture set.

Fed with the stored processor outputs (pixels included, so processor and model are checked apart), the
runtime must reproduce the reference's vision, projector and embedding outputs (<= 1e-4), prompt logits
and per-step generation logits (<= 2e-4), MoE routing decisions, and greedy token ids exactly; then the
engine, fed with the conversations themselves, must produce the same ids and text. Tolerances and the
routing rule are those of the fixture README. The processor is checked first, exactly: token ids, masks,
crops, positions and pixels of every case, the tiling table and the tokenizer cases. The model runs on
DSVL2_TEST_DEVICE (default cpu; e.g. cuda, in float32 without TF32) and is compared on the host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from parity import (
    PARITY_DIR,
    TEST_DEVICE,
    Case,
    checkpoint_dir,
    checkpoint_names,
    load_cases,
    parity_model,
    parity_processor,
    read_json,
    record,
    require,
)
from safetensors.torch import load_file

from dsvl2.model.engine import Engine
from dsvl2.model.processor import MAX_TILED_IMAGES, Processor, ProcessorConfig, pad_geometry, plan_image
from dsvl2.model.requests import IMAGE_TOKEN, Request, Sampling
from dsvl2.model.tokenizer import BOS, EOS, PAD, Tokenizer
from dsvl2.model.vl2 import DeepseekVL2, real_tiles

# ---------------------------------------------------------------------------------------------------
# Processor and tokenizer: exact

BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "images_seq_mask",
    "images_spatial_crop",
    "position_ids",
    "seq_lens",
)


def _processor_dirs() -> list[Path]:
    """One checkpoint directory per distinct processor setup (config + tokenizer file): checkpoints that
    share both would produce identical inputs, so testing each once keeps the run short."""
    distinct: dict[tuple[ProcessorConfig, bytes], Path] = {}
    for name in checkpoint_names():
        d = checkpoint_dir(name)
        distinct.setdefault((ProcessorConfig.from_dir(d), (d / "tokenizer.json").read_bytes()), d)
    return list(distinct.values())


CASES = load_cases()
PROCESSOR_DIRS = _processor_dirs()
# An empty fixture set must fail, not skip: parametrize over a None placeholder that `require` rejects.
CASE_PARAMS = [(c, d) for c in CASES for d in PROCESSOR_DIRS] or [(None, None)]


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)  # compare float32 bit patterns (tells -0.0 from 0.0, NaN payloads, ...)


# ---------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize(
    ("case", "directory"),
    CASE_PARAMS,
    ids=[f"{c.name}-{d.name}" if c else "no-cases" for c, d in CASE_PARAMS],
)
def test_cases_match_reference_processor(case: Case | None, directory: Path | None) -> None:
    """Every case: prepare each conversation, collate, and compare every processor output exactly."""
    require(CASES, "parity cases")
    require(PROCESSOR_DIRS, "checkpoint directories")
    assert case is not None and directory is not None
    proc = Processor.from_dir(directory)
    items = [proc.prepare(conversation) for conversation in case.conversations()]
    batch = proc.collate(items)
    want = case.inputs()
    for key in BATCH_KEYS:
        got, ref = getattr(batch, key), want[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, f"{case.name}.{key}: {got.shape} vs {ref.shape}"
        if not torch.equal(got, ref):
            row, col = (got != ref).nonzero()[0].tolist()[:2]
            pytest.fail(f"{case.name}.{key} differs first at [{row}, {col}]: {got[row]} vs {ref[row]}")
    ref_counts = want["num_image_tokens"].tolist()  # (B, I_max), 0 where a row has fewer images
    for row, item in enumerate(items):
        counts = list(item.num_image_tokens)
        assert counts + [0] * (len(ref_counts[row]) - len(counts)) == ref_counts[row], f"{case.name} row {row}"
    pixels = case.pixels()
    assert batch.images.shape == pixels.shape, f"{case.name}: images {batch.images.shape} vs {pixels.shape}"
    if not torch.equal(_bits(batch.images), _bits(pixels)):
        diff = (batch.images - pixels).abs()
        worst = np.unravel_index(int(diff.argmax()), diff.shape)
        pytest.fail(f"{case.name}: pixels differ, max |diff| {diff.max():.3g} at (b, tile, c, y, x) = {worst}")
    record("processor cases")


def test_tiling_table(processor: Processor) -> None:
    """processor_tiling_table.json: best resolution, tile and token counts (also with 3+ images), and the
    resize / paste geometry of both views, for every listed image size."""
    table = read_json("processor_tiling_table.json")
    cfg = processor.config
    assert [tuple(c) for c in table["candidate_resolutions"]] == list(cfg.candidate_resolutions)
    assert tuple(table["pad_color"]) == cfg.pad_color
    rows = require(table["rows"], "tiling table rows")
    side = (cfg.image_size, cfg.image_size)
    for row in rows:
        size = tuple(row["image_size"])
        plan = plan_image(size, num_images=1, cfg=cfg)
        got = {
            "best_resolution": list(plan.resolution),
            "num_width_tiles": plan.num_width_tiles,
            "num_height_tiles": plan.num_height_tiles,
            "num_tiles_incl_global": plan.num_tiles,
            "num_image_tokens": plan.num_tokens,
            "num_image_tokens_if_3_or_more_images": plan_image(size, num_images=3, cfg=cfg).num_tokens,
            "global_view": _geometry(size, side),
            "local_view": _geometry(size, plan.resolution),
        }
        assert got == {k: row[k] for k in got}, f"image size {size}"
        assert plan_image(size, num_images=MAX_TILED_IMAGES, cfg=cfg) == plan
    record("tiling table rows", len(rows))


def _geometry(size: tuple[int, int], target: tuple[int, int]) -> dict[str, list[int]]:
    resized, offset = pad_geometry(size, target)
    return {"resized": list(resized), "paste_offset": list(offset)}


def test_tokenizer_cases(tokenizer: Tokenizer) -> None:
    """tokenizer_cases.json: encode (no special tokens) and bos + encode match; decode round-trips with
    bos/eos/pad removed."""
    data = read_json("tokenizer_cases.json")
    assert len(tokenizer) == data["len_tokenizer"]
    cases = require(data["cases"], "tokenizer cases")
    for case in cases:
        ids = tokenizer.encode(case["text"])
        assert ids == case["ids"], f"encode({case['text']!r})"
        assert [tokenizer.bos_id, *ids] == case["ids_with_special"], f"bos + encode({case['text']!r})"
        expected = case["text"]
        for dropped in (BOS, EOS, PAD):
            expected = expected.replace(dropped, "")
        assert tokenizer.decode(ids) == expected, f"decode(encode({case['text']!r}))"
    record("tokenizer cases", len(cases))


def test_special_token_ids(tokenizer: Tokenizer) -> None:
    special = read_json("generation_info.json")["tokenizer"]["special_ids"]
    assert {tok: tokenizer.token_id(tok) for tok in special} == special
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        special[BOS],
        special[EOS],
        special[PAD],
    )
    assert tokenizer.image_id == special[IMAGE_TOKEN]



# ---------------------------------------------------------------------------------------------------
# Model

FEATURE_TOL = 1e-4  # vision_first_tile, projector_first_tile, inputs_embeds
LOGIT_TOL = 2e-4  # logits_last, logits_last8, generated logits, lm_only logits
SELF_TOL = 1e-4  # cached vs uncached decoding
FLIP_MARGIN = 1e-5  # routing decisions closer than this may flip under float32 noise (README)
FLIPPED_LOGIT_TOL = 1e-3  # downstream effect of such a flip, per the README

CHECKPOINTS = checkpoint_names()
PAIRS = [(c, k) for c in CASES for k in c.checkpoints()] or [(None, None)]


def model_for(name: str) -> DeepseekVL2:
    if TEST_DEVICE.type == "cuda":  # float32 means float32: no TF32 in the products or the patch convolution
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return parity_model(name, torch.float32, TEST_DEVICE)


def processor_for(name: str) -> Processor:
    return parity_processor(name)


def assert_close(got: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
    got, ref = got.cpu(), ref.cpu()  # either may be the model's, on DSVL2_TEST_DEVICE
    diff = (got.float() - ref.float()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if not worst <= tol:  # also catches NaN
        at = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        pytest.fail(f"{what}: max |diff| {worst:.3g} > {tol:g} at {at} (got {float(got.flatten()[diff.argmax()])}, "
                    f"reference {float(ref.flatten()[diff.argmax()])})")


def right_padded(case: Case) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The stored left-padded batch re-laid right-padded (our layout: every row starts at position 0)."""
    inputs = case.inputs()
    ids, mask, lens = inputs["input_ids"], inputs["images_seq_mask"], inputs["seq_lens"].tolist()
    T = ids.shape[1]
    out_ids = torch.zeros_like(ids)
    out_mask = torch.zeros_like(mask)
    for b, n in enumerate(lens):
        out_ids[b, :n], out_mask[b, :n] = ids[b, T - n :], mask[b, T - n :]
    return out_ids, out_mask, lens


class RoutingRecorder:
    """Forward hooks on every MoE gate that keep the (expert ids, weights) of the last forward."""

    def __init__(self, model: DeepseekVL2):
        self.gates = [layer.mlp.gate for layer in model.language.model.layers if hasattr(layer.mlp, "gate")]
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [g.register_forward_hook(self._keep) for g in self.gates]

    def _keep(self, _module, _inputs, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.calls.append((out[0].cpu(), out[1].cpu()))  # compared with the reference on the host

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def check_routing(case: Case, ckpt: str, rec: RoutingRecorder, lens: list[int], ref: dict) -> int:
    """Compare routed expert sets and weights token by token; returns the number of decisions that flipped
    (allowed only where the stored margin is below FLIP_MARGIN). Fails on any other difference."""
    ids_ref, w_ref, margin = ref["routing_expert_ids"].long(), ref["routing_weights"], ref["routing_margin"]
    assert len(rec.calls) == ids_ref.shape[0], f"{case.name}/{ckpt}: {len(rec.calls)} MoE layers vs {ids_ref.shape[0]}"
    B, n = len(lens), lens[0]
    assert B == 1, "routing is stored for single-sample cases"
    flips = 0
    for layer, (ids, w) in enumerate(rec.calls):
        ids, w = ids.view(B, -1, ids.shape[-1])[0, :n], w.view(B, -1, w.shape[-1])[0, :n]
        ids, order = ids.sort(dim=-1)
        w = w.gather(-1, order)
        differ = (ids != ids_ref[layer, 0]).any(-1)
        for t in differ.nonzero().flatten().tolist():
            m = float(margin[layer, 0, t])
            assert m < FLIP_MARGIN, (f"{case.name}/{ckpt}: layer {layer} token {t} routed to {ids[t].tolist()}, "
                                     f"reference {ids_ref[layer, 0, t].tolist()} (margin {m:.2g})")
            flips += 1
        same = ~differ
        assert_close(w[same], w_ref[layer, 0][same], FEATURE_TOL, f"{case.name}/{ckpt} routing_weights layer {layer}")
    return flips


def greedy_with_cache(model: DeepseekVL2, embeds: torch.Tensor, lens: list[int], steps: int, eos: int):
    """Reference-style greedy decode on the KV cache: prompt prefill, then one token per step (finished rows
    keep feeding eos). Returns ids (B, steps) and step logits (B, steps, V)."""
    lm = model.language
    B = embeds.shape[0]
    kv = lm.new_cache(B, embeds.shape[1] + steps)
    hidden = lm(embeds, kv)
    kv.advance(torch.tensor(lens))
    logits = lm.logits(hidden[torch.arange(B, device=hidden.device), torch.tensor(lens, device=hidden.device) - 1])
    all_ids, all_logits = [], []
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    for _ in range(steps):
        nxt = torch.where(done, torch.full((B,), eos, device=logits.device), logits.argmax(-1))
        all_ids.append(nxt)
        all_logits.append(logits)
        done |= nxt == eos
        hidden = lm(lm.embed(nxt[:, None]), kv)
        kv.advance(1)
        logits = lm.logits(hidden[:, 0])
    return torch.stack(all_ids, 1), torch.stack(all_logits, 1)


def steps_until_eos(ids: torch.Tensor, eos: int) -> int:
    """Number of steps up to and including the first eos (what the reference's padding leaves comparable)."""
    hits = (ids == eos).nonzero()
    return int(hits[0]) + 1 if len(hits) else ids.shape[0]


@pytest.mark.parametrize(("case", "ckpt"), PAIRS, ids=[f"{c.name}-{k}" if c else "no-cases" for c, k in PAIRS])
@torch.inference_mode()
def test_model_matches_reference(case: Case | None, ckpt: str | None) -> None:
    require(CASES, "parity cases")
    require(CHECKPOINTS, "parity checkpoints")
    assert case is not None and ckpt is not None
    model, ref = model_for(ckpt), case.outputs(ckpt)
    eos = processor_for(ckpt).tokenizer.eos_id
    inputs = case.inputs()
    crops = inputs["images_spatial_crop"]
    ids, image_mask, lens = right_padded(case)
    B = len(lens)

    # Vision tower and projector, first tile of the batch.
    features: dict[str, torch.Tensor] = {}
    hooks = [model.vision.register_forward_hook(lambda _m, _i, o: features.setdefault("vision", o)),
             model.projector.register_forward_hook(lambda _m, _i, o: features.setdefault("projector", o))]
    try:
        embeds = model.embed(ids, image_mask, real_tiles(case.pixels(), crops), crops)
    finally:
        for h in hooks:
            h.remove()
    for key, name in (("vision_first_tile", "vision"), ("projector_first_tile", "projector")):
        if key in ref:
            assert_close(features[name][0], ref[key], FEATURE_TOL, f"{case.name}/{ckpt} {key}")
    if "inputs_embeds" in ref:
        assert_close(embeds[:, : lens[0]], ref["inputs_embeds"], FEATURE_TOL, f"{case.name}/{ckpt} inputs_embeds")

    # Prompt forward (no cache) with routing.
    recorder = RoutingRecorder(model)
    try:
        hidden = model.language(embeds)
    finally:
        recorder.close()
    flips = check_routing(case, ckpt, recorder, lens, ref) if "routing_expert_ids" in ref else 0
    logit_tol = FLIPPED_LOGIT_TOL if flips else LOGIT_TOL
    last8 = torch.stack([hidden[b, n - 8 : n] for b, n in enumerate(lens)])
    logits8 = model.language.logits(last8)
    assert_close(logits8[:, -1], ref["logits_last"], logit_tol, f"{case.name}/{ckpt} logits_last")
    assert_close(logits8, ref["logits_last8"], logit_tol, f"{case.name}/{ckpt} logits_last8")

    # Greedy generation with the KV cache, logits per step.
    steps = ref["generated_ids"].shape[1]
    gen_ids, gen_logits = greedy_with_cache(model, embeds, lens, steps, eos)
    for b in range(B):
        n = steps_until_eos(ref["generated_ids"][b], eos)
        assert gen_ids[b, :n].tolist() == ref["generated_ids"][b, :n].tolist(), f"{case.name}/{ckpt} row {b} ids"
        top = gen_logits[b, :n].gather(-1, gen_ids[b, :n, None])[:, 0]
        assert_close(top, ref["generated_top_logit"][b, :n], logit_tol, f"{case.name}/{ckpt} row {b} top logit")
        top5 = gen_logits[b, :n].topk(5, dim=-1).values
        assert_close(top5, ref["generated_top5_logits"][b, :n], logit_tol, f"{case.name}/{ckpt} row {b} top-5")

        # Cached decoding equals a full recompute of prompt + generated tokens (one forward covers all steps).
        full = torch.cat((embeds[b : b + 1, : lens[b]], model.language.embed(gen_ids[b : b + 1, : n - 1])), 1)
        recomputed = model.language.logits(model.language(full)[0, lens[b] - 1 :])
        assert_close(gen_logits[b, :n], recomputed, SELF_TOL, f"{case.name}/{ckpt} row {b} cached vs uncached")
    record("model case x checkpoint")


@pytest.mark.parametrize(("case", "ckpt"), PAIRS, ids=[f"{c.name}-{k}" if c else "no-cases" for c, k in PAIRS])
def test_engine_reproduces_reference_generation(case: Case | None, ckpt: str | None) -> None:
    """From the conversations themselves through processor + engine (continuous batching, chunked prefill,
    two rows): the reference's greedy ids and decoded text."""
    require(CASES, "parity cases")
    assert case is not None and ckpt is not None
    ref, runs = case.outputs(ckpt), case.json["model_runs"][ckpt]
    proc = processor_for(ckpt)
    steps = ref["generated_ids"].shape[1]
    requests = [Request(f"row{b}", conv, Sampling(max_new_tokens=steps)) for b, conv in enumerate(case.conversations())]
    engine = Engine(model_for(ckpt), proc, max_batch_size=2, prefill_chunk=256)
    for b, done in enumerate(engine.generate(requests)):
        want = ref["generated_ids"][b]
        n = steps_until_eos(want, proc.tokenizer.eos_id)
        got = list(done.token_ids) + ([proc.tokenizer.eos_id] if done.finish_reason == "eos" else [])
        assert got == want[:n].tolist(), f"{case.name}/{ckpt} row {b}: {got} vs {want[:n].tolist()}"
        assert done.finish_reason == ("eos" if n < steps or want[-1] == proc.tokenizer.eos_id else "length")
        if "generated_text" in runs:
            assert done.text == runs["generated_text"][b], f"{case.name}/{ckpt} row {b} text"
    record("engine case x checkpoint")


LM_ONLY = sorted((PARITY_DIR / "lm_only").glob("*.safetensors"))


@pytest.mark.parametrize("file", LM_ONLY or [None], ids=[f.stem for f in LM_ONLY] or ["no-lm-only"])
@torch.inference_mode()
def test_language_model_alone(file) -> None:
    """lm_only: logits without cache, incremental logits with the cache, greedy continuations both ways."""
    require(LM_ONLY, "lm_only outputs")
    ref = load_file(file)
    lm = model_for(file.stem).language
    ids = ref["input_ids"].to(TEST_DEVICE)
    assert_close(lm.logits(lm(lm.embed(ids))), ref["logits_nocache"], LOGIT_TOL, f"lm_only/{file.stem} nocache")

    positions = ref["logits_cached_positions"][0].tolist()
    prefill = positions[0] + 1
    kv = lm.new_cache(1, ids.shape[1])
    cached = [lm.logits(lm(lm.embed(ids[:, :prefill]), kv)[:, -1])]
    kv.advance(prefill)
    for p in positions[1:]:
        cached.append(lm.logits(lm(lm.embed(ids[:, p : p + 1]), kv)[:, -1]))
        kv.advance(1)
    assert_close(torch.stack(cached, 1), ref["logits_cached"], LOGIT_TOL, f"lm_only/{file.stem} cached")

    steps = ref["generated_ids_cache"].shape[1]
    eos = int(load_model_eos(file.stem))
    gen, logits = greedy_with_cache(model_for(file.stem), lm.embed(ids), [ids.shape[1]], steps, eos)
    n = steps_until_eos(ref["generated_ids_cache"][0], eos)
    for kind in ("cache", "nocache"):
        assert gen[0, :n].tolist() == ref[f"generated_ids_{kind}"][0, :n].tolist(), f"lm_only/{file.stem} {kind}"
        top = logits[0, :n].gather(-1, gen[0, :n, None])[:, 0]
        assert_close(top, ref[f"generated_top_logit_{kind}"][0, :n], LOGIT_TOL, f"lm_only/{file.stem} {kind} logit")
    record("lm_only checkpoints")


def load_model_eos(name: str) -> int:
    return model_for(name).cfg.language.eos_token_id
