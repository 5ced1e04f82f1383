"""MLA's absorbed decode attention (model/language.py `MLAttention._absorbed`) at Small's (or Base's) widths, three
ways in one run: with the compiled latent-attention kernel (bf16 on AVX512-BF16 CPUs), with torch's products (heads
folded into the query rows), and with the cache broadcast over the heads (the form before 2026-12-02, kept as the
comparison): ms per layer per decode step, and the largest difference of each from the torch form.

    python bench/mla_decode.py [--batch 3] [--cached 1150] [--dtype float32|bfloat16] [--config small|base]
                               [--caches N]

--caches N cycles through N caches (N layers' worth), so that each call reads its cache from memory, as a decode step
does, rather than from the CPU's caches.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch

from dsvl2.model import kernels
from dsvl2.model.attention import causal_mask
from dsvl2.model.config import ModelConfig
from dsvl2.model.kernel_choice import Paths
from dsvl2.model.language import MLAttention

ROOT = Path(__file__).resolve().parents[1]


def broadcast_form(layer: MLAttention, q_nope, q_pe, c, k_pe, mask) -> torch.Tensor:
    """The absorbed attention with the cache broadcast over the heads (c[:, None]): torch copies it per head."""
    w = layer.kv_b_proj.weight.view(layer.heads, layer.dn + layer.dv, layer.rank)
    w_uk, w_uv = w[:, : layer.dn], w[:, layer.dn :]
    q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)
    scores = (q_lat @ c[:, None].transpose(-1, -2) + q_pe @ k_pe[:, None].transpose(-1, -2)).float()
    scores = (scores * layer.scale).masked_fill(~mask, float("-inf"))
    return torch.einsum("bhtc,hvc->bhtv", scores.softmax(dim=-1).to(c.dtype) @ c[:, None], w_uv)


def ms_per_call(fn, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--cached", type=int, default=1150, help="tokens in each row's cache")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--config", default="small", choices=("small", "base"), help="whose widths (heads, latent)")
    ap.add_argument("--caches", type=int, default=1, help="distinct caches the calls cycle through")
    args = ap.parse_args()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    flags = [f for ln in lscpu.splitlines() if ln.startswith("Flags") for f in ln.split()[1:]
             if f.startswith(("avx", "amx"))]
    print(f"cpu: {model}; flags {' '.join(flags)}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    name = {"small": "deepseek-vl2-small", "base": "deepseek-vl2"}[args.config]
    cfg = ModelConfig.from_dir(ROOT / "tests" / "data" / "configs" / name).language
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = MLAttention(cfg).to(dtype).requires_grad_(False)
    B, H, S, capacity = args.batch, layer.heads, args.cached + 1, args.cached + 512
    g = torch.Generator().manual_seed(1)
    caches = [(torch.randn(B, capacity, layer.rank, generator=g).to(dtype),  # caches with room to spare, as the
               torch.randn(B, capacity, layer.dr, generator=g).to(dtype))  # engine's: the layer reads a cut view
              for _ in range(max(args.caches, 1))]
    views = [(cc[:, :S], kk[:, :S]) for cc, kk in caches]
    c, k_pe = views[0]
    q_nope = torch.randn(B, H, 1, layer.dn, generator=g).to(dtype)
    q_pe = torch.randn(B, H, 1, layer.dr, generator=g).to(dtype)
    positions = torch.full((B, 1), S - 1)
    mask = causal_mask(positions, torch.arange(S).expand(B, -1))
    forms = {"torch": Paths.uniform("torch", "bench")}
    if kernels.available() and dtype is torch.bfloat16:
        forms["kernel"] = Paths.uniform("kernel", "bench")
    else:
        print(f"no kernel form: {kernels.status().describe() if dtype is torch.bfloat16 else 'float32'}")
    ms, out = {}, {}
    with torch.inference_mode():
        for name, paths in forms.items():
            layer.paths = paths
            ms[name] = ms_per_call(lambda: [layer._absorbed(q_nope, q_pe, cv, kv, lambda: mask, positions)
                                            for cv, kv in views]) / len(views)
            out[name] = layer._absorbed(q_nope, q_pe, c, k_pe, lambda: mask, positions).float()
        ms["broadcast"] = ms_per_call(lambda: broadcast_form(layer, q_nope, q_pe, c, k_pe, mask), repeats=2)
        out["broadcast"] = broadcast_form(layer, q_nope, q_pe, c, k_pe, mask).float()
    print(f"{args.config.capitalize()} widths: {H} heads, latent {layer.rank}, rope {layer.dr}; batch {B}, {S} cached "
          f"tokens, {args.dtype}, {len(views)} cache(s) cycled")
    layers = cfg.num_hidden_layers
    for name, t in ms.items():
        diff = float((out[name] - out["torch"]).abs().max())
        print(f"  {name:9s} {t:6.2f} ms per layer ({ms['torch'] / t:4.2f}x torch), x {layers} layers: "
              f"{t * layers:5.0f} ms per decode step; max difference from torch {diff:.2e}")


if __name__ == "__main__":
    main()
