"""Which implementation the quantised products run on this machine, per family of layers, scheme, activation
dtype and row count, and so which runtime layout their weights take: our kernels ("kernel": AVX2 tiles;
"kernel_avx512": AVX512 tiles for bf16 activations where the CPU has AVX512-BF16; "kernel_amx": those, and AMX's
tiles from 6 rows on a Xeon with AMX-BF16; all in the "r4" / "k16r4" layouts, where quant_kernels is available),
torch's packed int8/int4 CPU ops in the activation dtype ("packed", in the "plain" / torch's "cpu" layout), the
same ops in bf16 with the activations cast ("packed_bf16", float32 models only), or F.linear on the dequantised
weight ("dequant", any layout, every device).

Two families, decided apart because their products differ in shape and in how they run: "experts" (the routed
experts: a prefill chunk sends each ~T * top_k / n_experts tokens, and decode runs an expert's three products in
one quant_kernels.moe call) and "dense" (every other quantised linear: attention, dense MLP, shared experts,
lm_head: a prefill chunk sends them all T tokens). Each family is timed on one of its own layers (`representatives`)
with kernel_choice's `best_time`: decode at every row count of its DECODE_ROWS (what its products see at decode
batches of 1 and 8; the winner has the least slowdown against the fastest at each, summed), in every layout the
layer can take; the decode winner fixes the layout; prefill (PREFILL_ROWS of the family) takes the fastest candidate
that reads that layout. Then every layer of the family is repacked into it, one at a time (never two copies of the
model's weights). Off the CPU only "dequant" exists.

Decided once per process per (machine, family shape), and the timings are kept in a JSON file beside the
quantised kernels' build (`kernel_choice`'s timings format, file quant-choice-<machine key>.json, one entry per
family shape: {"<impl>@<layout>@<rows>": seconds}), so a later process on the same CPU and thread count reads them
instead of timing again; an entry that lacks a timing the decision needs is measured again. Not responsible for
the products themselves (quant.py) nor for the bf16 families (kernel_choice.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsvl2.model import quant_kernels
from dsvl2.model.kernel_choice import Timer, best_time, cache_file, read_timings, write_timings
from dsvl2.model.kernels import machine
from dsvl2.model.quant import FAMILIES, KERNEL_ISA, Family, Impl, Layout, QuantLinear, family_of

# Rows per product timed for decode, batches 1 and 8. A routed expert sees 1-2 of a batch of 8 (8 x top-6 of 64),
# but timing it at 1 and 2 rows took torch's per-product op for Small's experts on a Xeon with AMX (123 / 155 us
# against the kernel's 150 / 139 per product): a per-product timing leaves out what that path costs in the model,
# the per-expert calls (~100 per layer and step at batch 8) and a prefill that dequantises every expert's weight at
# once (+1.2 GiB on 4 layers of Small; the whole Small in int8 was killed for memory at 21.6 GiB). 8 rows on one
# expert keeps the one-call kernel ahead wherever it is, as measured before; timing the experts' paths as the model
# runs them (every expert, several routings) is what should replace it.
DECODE_ROWS: dict[Family, tuple[int, ...]] = {"experts": (1, 8), "dense": (1, 8)}
PREFILL_ROWS: dict[Family, int] = {"experts": 64, "dense": 256}
CACHE_PREFIX = "quant-choice-"

Timings = dict[str, float]  # "<impl>@<layout>@<rows>" -> seconds per product


@dataclass(frozen=True, slots=True)
class Decision:
    """What a family's products run: `decode` for up to QuantLinear.DECODE_ROWS rows, `prefill` for more, and the
    layout their weights take."""

    decode: Impl
    prefill: Impl
    layout: Layout


_decided: dict[tuple, Decision] = {}


def candidates(layer: QuantLinear, dtype: torch.dtype) -> list[Impl]:
    """The implementations that can run `layer`, in its current layout, with activations of `dtype` here."""
    probe = torch.empty(1, layer.in_features, dtype=dtype, device=layer.qweight.device)
    found: list[Impl] = [impl for impl in KERNEL_ISA if layer.kernel_fits(probe, impl)]
    if layer.packable(probe):
        found += ["packed", "packed_bf16"] if dtype is not torch.bfloat16 else ["packed"]
    return [*found, "dequant"]


def representatives(model: nn.Module) -> dict[Family, tuple[QuantLinear, tuple[QuantLinear, ...] | None]]:
    """The layer each family is timed on: for "experts" the first routed expert's gate_proj (the bytes decode reads
    most) with that expert's (gate, up, down) layers; for "dense" the layer with the most weights other than the
    lm_head (the same products, but ~100x an attention projection: timing its dequantised candidates and its
    copies in other layouts took a minute and 0.3 GiB on Tiny), and None. Families without quantised layers are
    left out."""
    found: dict[Family, tuple[QuantLinear, tuple[QuantLinear, ...] | None]] = {}
    largest: dict[Family, tuple[tuple[bool, int], QuantLinear]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            family, rank = family_of(name), (not name.endswith("lm_head"), m.in_features * m.out_features)
            if family not in largest or rank > largest[family][0]:
                largest[family] = (rank, m)
        elif ("experts" not in found and f".{name}".endswith(".experts.0")
              and all(isinstance(getattr(m, p, None), QuantLinear) for p in ("gate_proj", "up_proj", "down_proj"))):
            found["experts"] = (m.gate_proj, (m.gate_proj, m.up_proj, m.down_proj))
    for family, (_, layer) in largest.items():
        found.setdefault(family, (layer, None))
    return {f: found[f] for f in FAMILIES if f in found}


def time_fused_expert(expert: tuple[QuantLinear, ...], layout: Layout, dtype: torch.dtype, rows: int,
                      impl: Impl = "kernel", *, timer: Timer = best_time) -> float | None:
    """Seconds per product of `rows` rows when an expert's three products run as decode runs them on the kernel
    `impl`: in one quant_kernels.moe call (QuantExperts) for the three, timed here on `expert` in `layout` (copies
    where it is in another) and divided by 3. None where that kernel does not take these layers."""
    layers = [m if m.layout == layout else m.copy_as(layout) for m in expert]
    gate, up, down = layers
    x = torch.randn(rows, gate.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    if not (gate.kernel_fits(x, impl) and down.layout == gate.layout and up.layout == gate.layout):
        return None
    ids, weights = torch.zeros(rows, 1, dtype=torch.long), torch.ones(rows, 1)
    lists = [([m.qweight], [m.scales]) for m in layers]
    bits, isa = gate.scheme.bits, KERNEL_ISA[impl]

    def call(impl=impl, layer=gate, rows=rows):  # the defaults name what is timed, as time_impls' calls do
        return quant_kernels.moe(x, ids, weights, *lists, bits, gate.group or 0, down.group or 0, isa)

    with torch.inference_mode():
        return timer(call) / 3


def time_impls(layer: QuantLinear, dtype: torch.dtype, rows: int, *, timer: Timer = best_time) -> dict[Impl, float]:
    """Seconds per product of `rows` rows for every candidate (each call's defaults name the impl, the layer and
    the rows it times)."""
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = x.to(layer.qweight.device)
    calls: dict[Impl, Callable[[], object]] = {impl: (lambda impl=impl, layer=layer, rows=rows: layer.run(x, impl))
                                               for impl in candidates(layer, dtype)}
    with torch.inference_mode():
        return {impl: timer(call) for impl, call in calls.items()}


def _name(impl: Impl, layout: Layout, rows: int) -> str:
    return f"{impl}@{layout}@{rows}"


def _parsed(timings: Timings, rows: int) -> dict[tuple[Impl, Layout], float]:
    """The timings of `rows` rows by (impl, layout)."""
    out = {}
    for name, seconds in timings.items():
        impl, layout, n = name.split("@")
        if n == str(rows):
            out[(impl, layout)] = seconds
    return out


def _decode_choice(timings: Timings, decode_rows: tuple[int, ...]) -> tuple[Impl, Layout] | None:
    """The decode winner: among the (impl, layout) pairs timed at every row count of `decode_rows`, the least
    slowdown against the fastest at each row count, summed; None when no pair was timed at all of them."""
    per_rows = [_parsed(timings, rows) for rows in decode_rows]
    both = sorted(set.intersection(*(set(t) for t in per_rows)))
    if not both:
        return None
    best = [min(t[c] for c in both) for t in per_rows]
    return min(both, key=lambda c: sum(t[c] / b for t, b in zip(per_rows, best, strict=True)))


def from_timings(timings: Timings, family: Family) -> Decision | None:
    """The decision the timings of `family` make (see the module docstring), or None where they lack one it needs."""
    prefill_rows = PREFILL_ROWS[family]
    if (decode := _decode_choice(timings, DECODE_ROWS[family])) is None:
        return None
    impl, layout = decode
    prefill = {i: s for (i, lay), s in _parsed(timings, prefill_rows).items() if lay == layout}
    if not prefill:
        return None
    return Decision(impl, min(prefill, key=prefill.__getitem__), layout)


def measure(layer: QuantLinear, dtype: torch.dtype, family: Family, *, timer: Timer = best_time,
            expert: tuple[QuantLinear, ...] | None = None) -> Timings:
    """Decode timings of every candidate in every layout `layer` can take, at each of the family's DECODE_ROWS,
    then prefill timings (its PREFILL_ROWS) in the layout the decode winner reads. Where `layer` is a routed
    expert's (`expert` its three layers), the kernel's decode time is that of the one-call MoE path decode takes
    with it (`time_fused_expert`): a product timed alone would not show the per-call costs that path saves.
    `layer` itself is not changed (others are timed on copies)."""
    variants = {layout: layer if layout == layer.layout else layer.copy_as(layout) for layout in layer.layouts()}
    timings: Timings = {}
    for layout, variant in variants.items():
        for rows in DECODE_ROWS[family]:
            times = time_impls(variant, dtype, rows, timer=timer)
            kernels_timed = [impl for impl in KERNEL_ISA if impl in times] if expert is not None else []
            for impl in kernels_timed:
                if (fused := time_fused_expert(expert, layout, dtype, rows, impl, timer=timer)) is not None:
                    times[impl] = fused
            timings.update((_name(impl, layout, rows), t) for impl, t in times.items())
    _, decode_layout = _decode_choice(timings, DECODE_ROWS[family])
    prefill = time_impls(variants[decode_layout], dtype, PREFILL_ROWS[family], timer=timer)
    timings.update((_name(impl, decode_layout, PREFILL_ROWS[family]), t) for impl, t in prefill.items())
    return timings


def shape_key(family: Family, layer: QuantLinear, expert: tuple[QuantLinear, ...] | None, dtype: torch.dtype) -> str:
    """What a family's timings depend on besides the machine: scheme, group, shapes, dtype, layouts, rows."""
    shapes = " ".join(f"{m.out_features}x{m.in_features}" for m in (expert or (layer,)))
    return (f"{family}|{layer.scheme.name} g{layer.group} {shapes}|{str(dtype).removeprefix('torch.')}|"
            f"{','.join(layer.layouts())}|{layer.qweight.device}|rows {','.join(map(str, DECODE_ROWS[family]))} "
            f"{PREFILL_ROWS[family]}")


def cache_directory() -> Path | None:
    """Where the timings are kept: the quantised kernels' build directory (None where they are not built)."""
    directory = quant_kernels.status().directory
    return Path(directory) if directory else None


def decide(model: nn.Module, dtype: torch.dtype, *, timer: Timer = best_time, cache: Path | None = None
           ) -> dict[Family, Decision]:
    """Each family's decision for the quantised layers of `model` with `dtype` activations: from this process's
    earlier decision for the same shapes, else the timings in `cache` (a directory; none when None), else new
    timings (then written there)."""
    here = machine()
    path = cache_file(cache, here, CACHE_PREFIX) if cache is not None else None
    known = (read_timings(path, here) or {}) if path is not None else {}
    fresh: dict[str, Timings] = {}
    decisions: dict[Family, Decision] = {}
    for family, (layer, expert) in representatives(model).items():
        key = shape_key(family, layer, expert, dtype)
        memo = (here, key, layer.layout, timer)
        if (found := _decided.get(memo)) is None:
            found = from_timings(known.get(key, {}), family)
            if found is None:
                with torch.inference_mode():
                    fresh[key] = measure(layer, dtype, family, timer=timer, expert=expert)
                found = from_timings(fresh[key], family)
            _decided[memo] = found
        decisions[family] = found
    if fresh and path is not None:
        write_timings(path, here, fresh)
    return decisions


def choose(model: nn.Module, dtype: torch.dtype, *, timer: Timer = best_time, cache: Path | None = None
           ) -> dict[Family, Decision]:
    """`decide`, then make every quantised layer of `model` run its family's decision: repacked, one layer at a
    time, into the layout the decision reads where the layer can take it, and its `impls` set."""
    decisions = decide(model, dtype, timer=timer, cache=cache)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and (d := decisions.get(family_of(name))) is not None:
            if d.layout in m.layouts():
                m.relayout(d.layout)
            m.impls = (d.decode, d.prefill)
    return decisions
