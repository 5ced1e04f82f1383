"""Peer benchmark: our runtime against transformers' own implementation of the same weights, in one run.

    python bench/peer.py [--model DIR] [--threads 2] [--tiles 8] [--prompt 1000] [--context 1000]
                         [--steps 8] [--batches 1,8] [--peer-experts grouped_mm,eager] [--no-check]
                         [--json OUT]

The peer is transformers' `DeepseekOcr2TextModel` (DeepSeek-V2 MoE decoder with plain multi-head attention,
the language model of DeepSeek-OCR-2) and `SiglipVisionModel`, built at our checkpoint's dimensions and
loaded with OUR weights (strictly: every peer parameter is assigned, every mapped weight of ours is used).
Where the layouts agree the peer's parameters are views of ours (no copy); the routed experts are stacked
into transformers' 3-D `gate_up_proj` / `down_proj` tensors (a copy, ~4.8 GB at Tiny dimensions), and
the router weight is kept in float32 as transformers does (`_keep_in_fp32_modules_strict`). The peer has
no output head: both sides apply our `lm_head` weight with one `F.linear`.

Before timing, a numeric check in float32 on truncated copies (2 decoder layers: the dense one and a MoE
one, 2 SigLIP blocks, a 4,096-row slice of the vocabulary) compares logits of a prefill and two cached
decode steps, and the tower output; the timed bf16 run also reports how far the two models' logits are.

Figures, bf16, `--threads` threads, ours and the peer interleaved repeat by repeat:
  vision   one SigLIP tower call on `--tiles` 384x384 tiles (tower only: the peer has no projector),
           best of `--repeat` after one warm-up, seconds per tile;
  prefill  a `--prompt`-token prompt at batch 1 into an empty cache, plus the last token's logits,
           best of `--repeat` after one warm-up, tokens/s;
  decode   one token per row over a `--context`-token cache (each model prefills its own cache from the
           same embeddings), logits included; the same random tokens are fed to both models, median of
           `--steps` steps after two warm-up steps, ms per step.
Each section also records the process's CPU seconds per wall second ("cores used"): below `--threads`
means other work on the (shared) machine took cycles during the run.
The peer's language model runs with sdpa attention, a DynamicCache, and each experts implementation of
`--peer-experts` (transformers' default grouped_mm first, then eager, the per-expert loop); its figure is
the fastest of them. Ratio = peer time / our time (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

from dsvl2.model.weights import load_model  # noqa: E402

DEFAULT_MODEL = ROOT / "bench" / "out" / "deepseek-vl2-tiny-random"
CHECK_VOCAB = 4096


# -- building the peer ------------------------------------------------------------------------------------
@contextlib.contextmanager
def params_on_meta():
    """Create module parameters on the meta device (no memory, no random init) while buffers stay real:
    the rotary tables and SigLIP's position ids are non-persistent buffers the state dict never carries."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def text_config(lcfg):
    """Our LanguageConfig -> transformers' DeepseekOcr2TextConfig (MHA DeepSeek-V2 MoE)."""
    from transformers import DeepseekOcr2TextConfig

    if lcfg.use_mla:
        raise SystemExit("peer: DeepseekOcr2TextModel is MHA only; this checkpoint uses MLA")
    if lcfg.n_routed_experts is None:
        raise SystemExit("peer: the checkpoint has no MoE layers")
    if lcfg.scoring_func != "softmax" or lcfg.norm_topk_prob or lcfg.topk_method not in ("greedy",
                                                                                         "group_limited_greedy"):
        raise SystemExit("peer: transformers' router is softmax + greedy/group_limited_greedy without "
                         f"top-k normalisation; checkpoint has {lcfg.scoring_func}/{lcfg.topk_method}/"
                         f"norm_topk_prob={lcfg.norm_topk_prob}")
    if lcfg.rope_scaling is not None:
        raise SystemExit("peer: RoPE scaling is not mapped")
    layer_types = ["sparse" if lcfg.is_moe_layer(i) else "dense" for i in range(lcfg.num_hidden_layers)]
    return DeepseekOcr2TextConfig(
        vocab_size=lcfg.vocab_size, hidden_size=lcfg.hidden_size, intermediate_size=lcfg.intermediate_size,
        num_hidden_layers=lcfg.num_hidden_layers, num_attention_heads=lcfg.num_attention_heads,
        num_key_value_heads=lcfg.kv_heads, hidden_act=lcfg.hidden_act,
        max_position_embeddings=lcfg.max_position_embeddings, rms_norm_eps=lcfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": lcfg.rope_theta},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=lcfg.bos_token_id, eos_token_id=lcfg.eos_token_id, pad_token_id=None,
        n_routed_experts=lcfg.n_routed_experts, num_experts_per_tok=lcfg.num_experts_per_tok,
        n_shared_experts=lcfg.n_shared_experts or 0, moe_intermediate_size=lcfg.moe_intermediate_size,
        routed_scaling_factor=lcfg.routed_scaling_factor, topk_method=lcfg.topk_method,
        n_group=lcfg.n_group, topk_group=lcfg.topk_group, mlp_layer_types=layer_types,
    )


def vision_config(vcfg):
    """Our VisionConfig -> transformers' SiglipVisionConfig (no pooling head: DeepSeek-VL2 never runs it)."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=vcfg.width, intermediate_size=vcfg.mlp_hidden, num_hidden_layers=vcfg.layers,
        num_attention_heads=vcfg.heads, num_channels=3, image_size=vcfg.image_size, patch_size=vcfg.patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0, vision_use_head=False,
    )


def text_state(ours: dict[str, torch.Tensor], lcfg) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Our `language.*` state (keys model.*, lm_head.weight) -> the peer's state, and the keys of ours used."""
    out, used = {}, set()

    def take(src: str, dst: str) -> None:
        out[dst] = ours[src]
        used.add(src)

    take("model.embed_tokens.weight", "embed_tokens.weight")
    take("model.norm.weight", "norm.weight")
    for i in range(lcfg.num_hidden_layers):
        s, d = f"model.layers.{i}.", f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            take(f"{s}self_attn.{name}.weight", f"{d}self_attn.{name}.weight")
        for name in ("input_layernorm", "post_attention_layernorm"):
            take(f"{s}{name}.weight", f"{d}{name}.weight")
        if not lcfg.is_moe_layer(i):
            for name in ("gate_proj", "up_proj", "down_proj"):
                take(f"{s}mlp.{name}.weight", f"{d}mlp.{name}.weight")
            continue
        gate_up, down = [], []
        for j in range(lcfg.n_routed_experts):
            e = f"{s}mlp.experts.{j}."
            gate_up.append(torch.cat((ours[e + "gate_proj.weight"], ours[e + "up_proj.weight"])))  # (2I, E)
            down.append(ours[e + "down_proj.weight"])  # (E, I)
            used.update(e + n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
        out[d + "mlp.experts.gate_up_proj"] = torch.stack(gate_up)  # (X, 2I, E)
        out[d + "mlp.experts.down_proj"] = torch.stack(down)  # (X, E, I)
        del gate_up, down
        out[d + "mlp.gate.weight"] = ours[s + "mlp.gate.weight"].float()  # transformers keeps it in fp32
        used.add(s + "mlp.gate.weight")
        if lcfg.n_shared_experts:
            for name in ("gate_proj", "up_proj", "down_proj"):
                take(f"{s}mlp.shared_experts.{name}.weight", f"{d}mlp.shared_experts.{name}.weight")
    return out, used


def vision_state(ours: dict[str, torch.Tensor], vcfg) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Our timm-layout `vision.*` state -> SiglipVisionModel's state (fused qkv split into row views)."""
    out, used = {}, set()

    def take(src: str, dst: str) -> None:
        out[dst] = ours[src]
        used.add(src)

    C = vcfg.width
    for p in ("weight", "bias"):
        take(f"patch_embed.proj.{p}", f"embeddings.patch_embedding.{p}")
        take(f"norm.{p}", f"post_layernorm.{p}")
    out["embeddings.position_embedding.weight"] = ours["pos_embed"][0]  # (1, P, C) -> (P, C), a view
    used.add("pos_embed")
    for i in range(vcfg.layers):
        s, d = f"blocks.{i}.", f"encoder.layers.{i}."
        for p in ("weight", "bias"):
            take(f"{s}norm1.{p}", f"{d}layer_norm1.{p}")
            take(f"{s}norm2.{p}", f"{d}layer_norm2.{p}")
            take(f"{s}attn.proj.{p}", f"{d}self_attn.out_proj.{p}")
            take(f"{s}mlp.fc1.{p}", f"{d}mlp.fc1.{p}")
            take(f"{s}mlp.fc2.{p}", f"{d}mlp.fc2.{p}")
            qkv = ours[f"{s}attn.qkv.{p}"]  # rows ordered q | k | v, heads contiguous within each
            used.add(f"{s}attn.qkv.{p}")
            for k, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{d}self_attn.{name}.{p}"] = qkv[k * C : (k + 1) * C]
    return out, used


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], ours_keys: set[str], used: set[str],
                what: str) -> dict:
    """Assign `state` strictly and verify nothing is left on meta and every expected weight of ours was used."""
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    unused = sorted(ours_keys - used)
    if left or unused:
        raise SystemExit(f"peer {what}: parameters left unloaded {left}; weights of ours unused {unused}")
    module.eval().requires_grad_(False)
    return {"peer_tensors": len(state), "our_tensors_used": len(used),
            "peer_params": sum(p.numel() for p in module.parameters())}


def build_peer_text(lcfg, ours: dict[str, torch.Tensor], experts: str | None):
    from transformers import DeepseekOcr2TextModel

    cfg = text_config(lcfg)
    with params_on_meta():
        peer = DeepseekOcr2TextModel(cfg)
    if experts:
        peer.set_experts_implementation(experts)
    state, used = text_state(ours, lcfg)
    expected = {k for k in ours if k != "lm_head.weight"}  # the peer has no head: ours is applied to both
    info = load_strict(peer, state, expected, used, "text")
    info.update(attn=peer.config._attn_implementation, experts=peer.config._experts_implementation)
    return peer, info


def build_peer_vision(vcfg, ours: dict[str, torch.Tensor]):
    from transformers import SiglipVisionModel

    with params_on_meta():
        peer = SiglipVisionModel(vision_config(vcfg))
    state, used = vision_state(ours, vcfg)
    expected = {k for k in ours if not k.startswith("attn_pool.")}  # pooling head: never run by DeepSeek-VL2
    info = load_strict(peer, state, expected, used, "vision")
    info.update(attn=peer.config._attn_implementation, unmapped="attn_pool.* (map head, unused by both)")
    return peer, info


# -- running both sides ---------------------------------------------------------------------------------------
def peer_hidden(peer, embeds: torch.Tensor, cache) -> torch.Tensor:
    return peer(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state


def new_peer_cache(peer):
    from transformers import DynamicCache

    return DynamicCache(config=peer.config)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().flatten(), b.double().flatten()  # float64: a float32 cosine of 1e6 values is off by 1e-4
    diff = (a - b).abs().max().item()
    return {"max_abs_diff": diff, "max_abs": a.abs().max().item(), "rel": diff / max(a.abs().max().item(), 1e-30),
            "cosine": (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()}


@torch.inference_mode()
def numeric_check(model, vocab: int = CHECK_VOCAB, layers: int = 2, seed: int = 0) -> dict:
    """float32, truncated copies of both sides built from the same bf16 weights: logits of a 16-token prefill
    plus two cached decode steps at batch 2, and the tower output on 2 tiles."""
    g = torch.Generator().manual_seed(seed)
    lcfg = dataclasses.replace(model.cfg.language, num_hidden_layers=layers, vocab_size=vocab)
    full = model.language.state_dict()
    small_state = {}
    with torch.device("meta"):
        ours = type(model.language)(lcfg)
    for k in ours.state_dict():
        t = full[k]
        small_state[k] = (t[:vocab] if k in ("model.embed_tokens.weight", "lm_head.weight") else t).float().clone()
    ours.load_state_dict(small_state, strict=True, assign=True)
    ours.eval()
    peer, _ = build_peer_text(lcfg, small_state, None)
    head = small_state["lm_head.weight"]
    ids = torch.randint(0, vocab, (2, 18), generator=g)
    embeds = ours.embed(ids)
    cache, pcache = ours.new_cache(2, 18), new_peer_cache(peer)
    mine, theirs = [], []
    for lo, hi in ((0, 16), (16, 17), (17, 18)):
        mine.append(ours.logits(ours(embeds[:, lo:hi], cache)))
        cache.advance(hi - lo)
        theirs.append(F.linear(peer_hidden(peer, embeds[:, lo:hi], pcache), head).float())
    out = {"language": {"layers": layers, "vocab_rows": vocab, "experts": peer.config._experts_implementation,
                        "prefill_logits": compare(mine[0], theirs[0]),
                        "decode_logits": compare(torch.cat(mine[1:], 1), torch.cat(theirs[1:], 1)),
                        "argmax_agree": float((torch.cat(mine, 1).argmax(-1) == torch.cat(theirs, 1).argmax(-1))
                                              .float().mean())}}
    del ours, peer, small_state, full, cache, pcache

    vcfg = dataclasses.replace(model.cfg.vision, layers=layers)
    vfull = model.vision.state_dict()
    with torch.device("meta"):
        tower = type(model.vision)(vcfg)
    vstate = {k: vfull[k].float().clone() for k in tower.state_dict()}
    tower.load_state_dict(vstate, strict=True, assign=True)
    tower.eval()
    ptower, _ = build_peer_vision(vcfg, vstate)
    pixels = torch.randn(2, 3, vcfg.image_size, vcfg.image_size, generator=g)
    out["vision"] = {"blocks": layers, **compare(tower(pixels), ptower(pixel_values=pixels).last_hidden_state)}
    return out


class CpuShare:
    """Process CPU seconds per wall second over a block: near --threads when the cores were ours alone,
    lower when other work on the machine took them (the machine is shared)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        self.cores = (sum(os.times()[:2]) - self.cpu) / max(time.perf_counter() - self.wall, 1e-9)


def best_of(runs: dict, repeat: int) -> dict[str, float]:
    """name -> (setup, fn): best time of each fn after one warm-up each, the runs alternating repeat by
    repeat; setup (untimed) selects e.g. the peer's experts implementation."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeat + 1):
        for name, (setup, fn) in runs.items():
            setup()
            t = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def experts_setter(peer, impl: str):
    return lambda: peer.set_experts_implementation(impl)


def no_setup() -> None:
    pass


def summarise(entry: dict, key: str, impls: list[str]) -> None:
    """Peer figure = its best experts implementation; ratio = that peer time / our time."""
    best = min(impls, key=lambda i: entry[key][i])
    entry["peer_best_experts"] = best
    entry["peer"] = entry[key][best]
    entry["ratio"] = entry["peer"] / entry["ours"]
    entry["ratio_by_experts"] = {i: entry[key][i] / entry["ours"] for i in impls}


@torch.inference_mode()
def bench_vision(model, ptower, tiles: int, repeat: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    v = model.cfg.vision
    pixels = torch.randn(tiles, 3, v.image_size, v.image_size, generator=g).to(model.dtype)
    best = best_of({"ours": (no_setup, lambda: model.vision(pixels)),
                    "peer": (no_setup, lambda: ptower(pixel_values=pixels))}, repeat)
    agree = compare(model.vision(pixels[:1]), ptower(pixel_values=pixels[:1]).last_hidden_state)
    return {"tiles": tiles, "ours": best["ours"] / tiles, "peer": best["peer"] / tiles,
            "ratio": best["peer"] / best["ours"], "unit": "s/tile", "bf16_agreement": agree}


@torch.inference_mode()
def bench_prefill(model, peer, impls: list[str], tokens: int, repeat: int, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    lm = model.language
    head = lm.lm_head.weight
    x = lm.embed(torch.randint(3, model.cfg.language.vocab_size, (1, tokens), generator=g))
    got = {}

    def ours():
        got["ours"] = lm.logits(lm(x, lm.new_cache(1, tokens))[:, -1])

    def theirs():
        got["peer"] = F.linear(peer_hidden(peer, x, new_peer_cache(peer))[:, -1], head).float()

    runs = {"ours": (no_setup, ours)} | {f"peer:{i}": (experts_setter(peer, i), theirs) for i in impls}
    best = best_of(runs, repeat)
    agree = compare(got["ours"], got["peer"])
    agree["argmax_agree"] = bool((got["ours"].argmax(-1) == got["peer"].argmax(-1)).all())
    entry = {"tokens": tokens, "unit": "s", "ours": best["ours"],
             "peer_by_experts": {i: best[f"peer:{i}"] for i in impls}, "bf16_agreement": agree}
    summarise(entry, "peer_by_experts", impls)
    entry["ours_tokens_per_s"], entry["peer_tokens_per_s"] = tokens / entry["ours"], tokens / entry["peer"]
    return entry


@torch.inference_mode()
def bench_decode(model, peer, impls: list[str], batch: int, context: int, steps: int, warmup: int = 2,
                 seed: int = 3) -> dict:
    """Each side prefills its cache from the same context embeddings (the peer once, then one copy of its
    DynamicCache per experts implementation); then every step feeds the same random tokens to all."""
    g = torch.Generator().manual_seed(seed + batch)
    lm = model.language
    head = lm.lm_head.weight
    vocab = model.cfg.language.vocab_size
    ctx = lm.embed(torch.randint(3, vocab, (batch, context), generator=g))
    feed = torch.randint(3, vocab, (warmup + steps, batch, 1), generator=g)
    cache = lm.new_cache(batch, context + warmup + steps)
    lm(ctx, cache)
    cache.advance(context)
    peer.set_experts_implementation(impls[0])
    pcache = new_peer_cache(peer)
    peer_hidden(peer, ctx, pcache)
    pcaches = {i: copy.deepcopy(pcache) for i in impls[1:]} | {impls[0]: pcache}
    del ctx
    times: dict[str, list[float]] = {"ours": []} | {i: [] for i in impls}
    agree = {}
    for step in range(warmup + steps):
        x = lm.embed(feed[step])
        t = time.perf_counter()
        mine = lm.logits(lm(x, cache)[:, 0])
        cache.advance(1)
        if step >= warmup:
            times["ours"].append(time.perf_counter() - t)
        for impl in impls:
            peer.set_experts_implementation(impl)
            t = time.perf_counter()
            theirs = F.linear(peer_hidden(peer, x, pcaches[impl])[:, 0], head).float()
            if step >= warmup:
                times[impl].append(time.perf_counter() - t)
            if step == 0:
                agree[impl] = compare(mine, theirs)
                agree[impl]["argmax_agree"] = float((mine.argmax(-1) == theirs.argmax(-1)).float().mean())
    entry = {"batch": batch, "context": context, "steps": steps, "unit": "s/step",
             "ours": statistics.median(times["ours"]),
             "peer_by_experts": {i: statistics.median(times[i]) for i in impls},
             "all_steps_s": times, "bf16_agreement_first_step": agree}
    summarise(entry, "peer_by_experts", impls)
    entry["ours_tokens_per_s"], entry["peer_tokens_per_s"] = batch / entry["ours"], batch / entry["peer"]
    return entry


def print_table(results: dict) -> None:
    rows = []
    if "vision" in results:
        r = results["vision"]
        rows.append((f"vision tower, {r['tiles']} tiles (s/tile)", f"{r['ours']:.3f}", f"{r['peer']:.3f}",
                     "", r["ratio"], 1.0))
    if "prefill" in results:
        r = results["prefill"]
        rows.append((f"prefill {r['tokens']} tok, batch 1 (tok/s)", f"{r['ours_tokens_per_s']:.0f}",
                     f"{r['peer_tokens_per_s']:.0f}", r["peer_best_experts"], r["ratio"], 1.0))
    for r in results.get("decode", []):
        rows.append((f"decode batch {r['batch']}, ctx {r['context']} (ms/step)", f"{r['ours'] * 1e3:.0f}",
                     f"{r['peer'] * 1e3:.0f}", r["peer_best_experts"], r["ratio"], 1.5))
        rows.append((f"decode batch {r['batch']} (tok/s)", f"{r['ours_tokens_per_s']:.1f}",
                     f"{r['peer_tokens_per_s']:.1f}", r["peer_best_experts"], r["ratio"], 1.5))
    if not rows:
        return
    w = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{w}}  {'ours':>9}  {'peer':>9}  {'peer experts':>12}  {'ratio':>6}  target")
    for name, ours, peer, impl, ratio, target in rows:
        verdict = "ok" if ratio >= target else "MISS"
        print(f"{name:<{w}}  {ours:>9}  {peer:>9}  {impl:>12}  {ratio:>5.2f}x  >= {target:.1f}x {verdict}")
    print("ratio = peer time / our time (above 1: ours faster); peer = its fastest experts implementation")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", default="vision,prefill,decode")
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps (after 2 warm-up steps)")
    ap.add_argument("--repeat", type=int, default=2, help="timed repeats of vision and prefill (after a warm-up)")
    ap.add_argument("--peer-experts", default="grouped_mm,eager",
                    help="transformers experts implementations to time the peer with, its default (grouped_mm) "
                         "first; the table takes the fastest. batched_mm gathers a weight copy per (token, "
                         "expert) pair: 27 GB for a 1,000-token prefill, so it is not offered by default")
    ap.add_argument("--no-check", action="store_true", help="skip the float32 numeric check")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    impls = args.peer_experts.split(",")
    torch.set_num_threads(args.threads)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no checkpoint (run bench/engine_bench.py once to write it)")

    import transformers

    start = time.perf_counter()
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "transformers": transformers.__version__, "loadavg_start": os.getloadavg()},
                     "model": str(args.model), "dtype": "bfloat16"}
    t = time.perf_counter()
    model = load_model(args.model, dtype=torch.bfloat16)
    results["load_ours_s"] = time.perf_counter() - t
    print(f"ours loaded in {results['load_ours_s']:.1f} s; threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    if not args.no_check:
        t = time.perf_counter()
        check = results["check_fp32"] = numeric_check(model)
        lang, vis = check["language"], check["vision"]
        print(f"fp32 check ({lang['layers']} layers, {lang['vocab_rows']} vocab rows, "
              f"{time.perf_counter() - t:.1f} s): "
              f"prefill logits max|diff| {lang['prefill_logits']['max_abs_diff']:.2e} "
              f"(of max |logit| {lang['prefill_logits']['max_abs']:.2f}), decode logits max|diff| "
              f"{lang['decode_logits']['max_abs_diff']:.2e}, argmax agree {lang['argmax_agree']:.0%}; "
              f"vision ({vis['blocks']} blocks) max|diff| {vis['max_abs_diff']:.2e} (of {vis['max_abs']:.2f})",
              flush=True)

    t = time.perf_counter()
    with torch.inference_mode():
        peer, text_info = build_peer_text(model.cfg.language, model.language.state_dict(), impls[0])
        ptower, vision_info = build_peer_vision(model.cfg.vision, model.vision.state_dict())
    results["peer"] = {"text": text_info, "vision": vision_info, "build_s": time.perf_counter() - t}
    print(f"peer built in {results['peer']['build_s']:.1f} s: text {text_info['peer_tensors']} tensors from "
          f"{text_info['our_tensors_used']} of ours (attn {text_info['attn']}, experts {text_info['experts']}); "
          f"vision {vision_info['peer_tensors']} tensors from {vision_info['our_tensors_used']} (attn "
          f"{vision_info['attn']})", flush=True)

    if "vision" in sections:
        with CpuShare() as cpu:
            r = results["vision"] = bench_vision(model, ptower, args.tiles, args.repeat)
        r["cores_used"] = cpu.cores
        print(f"vision: ours {r['ours']:.3f} s/tile, peer {r['peer']:.3f} s/tile, "
              f"{r['ratio']:.2f}x (bf16 max|diff| {r['bf16_agreement']['max_abs_diff']:.2e}, cosine "
              f"{r['bf16_agreement']['cosine']:.5f}; {cpu.cores:.2f} cores used)", flush=True)
    del ptower
    if "prefill" in sections:
        with CpuShare() as cpu:
            r = results["prefill"] = bench_prefill(model, peer, impls, args.prompt, args.repeat)
        r["cores_used"] = cpu.cores
        a = r["bf16_agreement"]
        per = ", ".join(f"{i} {args.prompt / s:.0f}" for i, s in r["peer_by_experts"].items())
        print(f"prefill: ours {r['ours_tokens_per_s']:.0f} tok/s, peer {per} tok/s, "
              f"{r['ratio']:.2f}x (bf16 logits max|diff| {a['max_abs_diff']:.2e} of {a['max_abs']:.2f}, cosine "
              f"{a['cosine']:.5f}, argmax agree {a['argmax_agree']}; {cpu.cores:.2f} cores used)", flush=True)
    if "decode" in sections:
        results["decode"] = []
        for batch in (int(b) for b in args.batches.split(",")):
            with CpuShare() as cpu:
                r = bench_decode(model, peer, impls, batch, args.context, args.steps)
            r["cores_used"] = cpu.cores
            results["decode"].append(r)
            a = r["bf16_agreement_first_step"][impls[0]]
            per = ", ".join(f"{i} {s * 1e3:.0f}" for i, s in r["peer_by_experts"].items())
            print(f"decode batch {batch}: ours {r['ours'] * 1e3:.0f} ms/step, peer {per} ms/step, "
                  f"{r['ratio']:.2f}x (bf16 logits cosine {a['cosine']:.5f}, argmax agree {a['argmax_agree']:.0%}; "
                  f"{cpu.cores:.2f} cores used)", flush=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - start
    print_table(results)
    print(f"total {results['total_s']:.0f} s; load average start {results['machine']['loadavg_start'][0]:.2f}, "
          f"end {results['machine']['loadavg_end'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
