"""Which implementation the quantised products run on this machine, per family of layers, scheme, activation
dtype and row count, and so which runtime layout their weights take: our kernels ("kernel": AVX2 tiles;
"kernel_avx512": AVX512 tiles for bf16 activations where the CPU has AVX512-BF16; "kernel_amx": those, and AMX's
tiles from 6 rows on a Xeon with AMX-BF16; "kernel_vnni" / "kernel_amx_vnni": those two with int4's few-row tiles on
AVX512-VNNI; all in the "r4" / "k16r4" layouts, where quant_kernels is available),
torch's packed int8/int4 CPU ops in the activation dtype ("packed", in the "plain" / torch's "cpu" layout), the
same ops in bf16 with the activations cast ("packed_bf16", float32 models only), or F.linear on the dequantised
weight ("dequant", any layout, every device).

Two families, decided apart because their products differ in shape and in how they run: "experts" (the routed
experts: a prefill chunk sends each ~T * top_k / n_experts tokens, and decode runs a layer's experts in one
quant_kernels.moe_held call or, on torch's ops, one expert after another) and "dense" (every other quantised linear:
attention, dense MLP, shared experts, lm_head: a prefill chunk sends them all T tokens). Decode is timed with
kernel_choice's `best_time` at every row count of the family's DECODE_ROWS (decode batches of 1 and 8), every
candidate in every layout the layers can take; the winner has the least slowdown against the fastest at each row
count, summed (one that rounds the activations, VNNI's, must win by ROUNDING_MARGIN), and fixes the layout. Both
families time what a decode step runs, with weights read from memory, not cache: "experts" (`time_routed`) the first
ROUTED_LAYERS MoE layers, each over the experts its own gate picks for random tokens, through the model's own code
(quant_experts.QuantExperts, else feedforward.dispatch), so the per-expert calls of torch's ops are in the timings;
"dense" (`time_dense`) one product after another over its layers in model order (the lm_head left out), up to
DENSE_STEP_BYTES of weight. Timed per product on one layer (which a cache holds), dense decode took torch's int8 op
on a Zen 5, 2x the bf16 model's time for those products in a decode step. The layers timed are repacked in place
into each layout timed and back (no copies: Base in int4 must stay under 20 GiB). Prefill (PREFILL_ROWS of the
family) takes the fastest candidate that reads the decode winner's layout, timed per product on one layer (in every
layout decode was timed in: a layer that cannot take the winner's layout runs the fastest decode and prefill timed
in its own). Then every layer of the family is repacked into that layout, one at a time (never two copies of the
model's weights). Off the CPU only "dequant" exists.

Decided once per process per (machine, family shape), and the timings are kept in a JSON file beside the
quantised kernels' build (`kernel_choice`'s timings format, file quant-choice-<machine key>.json, one entry per
family shape: {"<impl>@<layout>@<rows>": seconds}), so a later process on the same CPU and thread count reads them
instead of timing again; an entry that lacks a timing the decision needs is measured again. Not responsible for
the products themselves (quant.py) nor for the bf16 families (kernel_choice.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dsvl2.model import allocator, quant_kernels
from dsvl2.model.feedforward import MoE, dispatch
from dsvl2.model.kernel_choice import Timer, best_time, cache_file, read_timings, write_timings
from dsvl2.model.kernels import machine
from dsvl2.model.quant import FAMILIES, KERNEL_ISA, Family, Impl, Layout, QuantLinear, family_of
from dsvl2.model.quant_experts import QuantExperts

# Rows timed for decode, batches 1 and 8: per product for "dense"; for "experts" tokens per decode step, each
# routed by its layer's gate (a routed expert sees 1-2 of a batch of 8: 8 x top-6 of 64). Timing the experts per
# product instead (one expert, the same rows) took torch's op for Tiny's int4 experts on a Xeon with AMX where
# the kernel's one call per layer was 1.24x / 1.32x faster in the model: the per-expert calls were left out.
DECODE_ROWS: dict[Family, tuple[int, ...]] = {"experts": (1, 8), "dense": (1, 8)}
ROUTED_LAYERS = 4  # MoE layers a routed timing runs: more weights than a cache holds, as a decode step reads
DENSE_STEP_BYTES = 256 << 20  # quantised weight a dense decode timing reads at most (Tiny's all: 0.18 GB in int8)
PREFILL_ROWS: dict[Family, int] = {"experts": 64, "dense": 256}
# How much faster a candidate that rounds the activations (int4 on VNNI: x in 15-bit fixed point per block) must
# time than the exact ones to be taken: on a Zen 5, where VPDPBUSD issues at half VDPBF16PS's rate, the routed
# experts timed 1.3% faster on VNNI summed over 1 and 8 rows (noise) and ran 2% slower in the decode step, alternated
# in one process; on a Xeon with AMX VNNI wins by 1.3x and more (bench/RESULTS.md), where this margin changes nothing.
ROUNDING_MARGIN = 1.05
CACHE_PREFIX = "quant-choice-"
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

Timings = dict[str, float]  # "<impl>@<layout>@<rows>" -> seconds per product (the routed experts: per decode step)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a family's products run: `decode` for up to QuantLinear.DECODE_ROWS rows, `prefill` for more, and the
    layout their weights take; `others`: (layout, decode, prefill) for a layer that cannot take that layout (a shape
    torch's int4 layout does not cover): the timings' fastest in each other layout timed (prefill timed there too;
    timings kept from before that was, without it: the decode impl for both)."""

    decode: Impl
    prefill: Impl
    layout: Layout
    others: tuple[tuple[Layout, Impl, Impl], ...] = ()

    def impls_for(self, layout: Layout) -> tuple[Impl, Impl]:
        """(decode, prefill) for a layer in `layout`."""
        if layout == self.layout:
            return self.decode, self.prefill
        found = {lay: (decode, prefill) for lay, decode, prefill in self.others}
        return found.get(layout, (self.decode, self.prefill))


_decided: dict[tuple, Decision] = {}


def candidates(layer: QuantLinear, dtype: torch.dtype) -> list[Impl]:
    """The implementations that can run `layer`, in its current layout, with activations of `dtype` here."""
    probe = torch.empty(1, layer.in_features, dtype=dtype, device=layer.qweight.device)
    found: list[Impl] = [impl for impl in KERNEL_ISA if layer.kernel_fits(probe, impl)]
    if layer.packable(probe):
        found += ["packed", "packed_bf16"] if dtype is not torch.bfloat16 else ["packed"]
    return [*found, "dequant"]


def representatives(model: nn.Module) -> dict[Family, tuple[QuantLinear, tuple[nn.Module, ...]]]:
    """What each family is timed on: (prefill's layer, what decode's timing runs). "experts": the first routed
    expert's gate_proj and the first ROUTED_LAYERS MoE layers whose experts are all quantised; "dense": the layer
    with the most weights other than the lm_head (the same products, but ~100x an attention projection: timing its
    dequantised candidates and its copies in other layouts took a minute and 0.3 GiB on Tiny) and its family's
    layers other than the lm_head in model order, up to DENSE_STEP_BYTES of weight (the lm_head where it is the
    only one). Families without quantised layers are left out."""
    largest: dict[Family, tuple[tuple[bool, int], QuantLinear]] = {}
    routed: list[MoE] = []
    dense: list[QuantLinear] = []
    dense_bytes = 0
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            family, rank = family_of(name), (not name.endswith("lm_head"), m.in_features * m.out_features)
            if family not in largest or rank > largest[family][0]:
                largest[family] = (rank, m)
            if family == "dense" and rank[0] and dense_bytes < DENSE_STEP_BYTES:
                dense.append(m)
                dense_bytes += m.qweight.nbytes
        elif (isinstance(m, MoE) and len(routed) < ROUTED_LAYERS
              and all(isinstance(getattr(e, p), QuantLinear) for e in m.experts for p in PROJECTIONS)):
            routed.append(m)
    found: dict[Family, tuple[QuantLinear, tuple[nn.Module, ...]]] = {}
    if routed:
        found["experts"] = (routed[0].experts[0].gate_proj, tuple(routed))
    if "dense" in largest:
        found["dense"] = (largest["dense"][1], tuple(dense) or (largest["dense"][1],))
    return {f: found[f] for f in FAMILIES if f in found}


Step = list[tuple[list[nn.Module], torch.Tensor, torch.Tensor, torch.Tensor]]  # per layer: experts, x, ids, weights


def routed_step(layers: Sequence[MoE], dtype: torch.dtype, tokens: int) -> Step:
    """A decode step of `tokens` random tokens through `layers`' routed experts: per layer the experts its gate
    picks (as a list, `ids` indexing it), the tokens and the routing weights."""
    step = []
    for i, moe in enumerate(layers):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(tokens, moe.gate.weight.shape[1], generator=g).to(dtype)
        ids, weights = moe.gate.forward(x)  # not a forward of the model: the gate's hooks must not see it
        touched, local = ids.unique(return_inverse=True)
        step.append(([moe.experts[e] for e in touched.tolist()], x, local, weights))
    return step


@contextmanager
def laid_out(layers: Iterable[QuantLinear], layout: Layout):
    """The quantised `layers` repacked in place into `layout` (those that can take it), their own layouts restored
    after."""
    layers = list(layers)
    saved = [m.layout for m in layers]
    try:
        with allocator.while_loading():  # each weight its own mapping: the replaced ones leave no heap holes
            for m in layers:
                if layout in m.layouts():
                    m.relayout(layout)
        yield
    finally:
        with allocator.while_loading():
            for m, own in zip(layers, saved, strict=True):
                m.relayout(own)


def projections(experts: Iterable[nn.Module]) -> list[QuantLinear]:
    """The experts' quantised layers."""
    return [getattr(e, p) for e in experts for p in PROJECTIONS]


def time_routed(step: Step, impl: Impl, *, timer: Timer = best_time) -> float:
    """Seconds for `step`'s routed experts with every product's decode on `impl`, as the model runs them: the
    quantised MoE kernel's one call per layer (QuantExperts) where it takes them, else one expert after another
    (feedforward.dispatch). The experts' own `impls` are set for the timing and restored after."""
    layers = projections(e for experts, *_ in step for e in experts)
    saved = [m.impls for m in layers]
    runners = [QuantExperts() for _ in step]
    first, tokens = step[0][0][0].gate_proj, step[0][1].shape[0]

    def call(impl=impl, layer=first, rows=tokens):  # the defaults name what is timed, as time_impls' calls do
        for runner, (experts, x, ids, weights) in zip(runners, step, strict=True):
            if runner.run(experts, x, ids, weights) is None:
                dispatch(experts, x, ids, weights)

    try:
        for m in layers:
            m.impls = (impl, impl)
        with torch.inference_mode():
            return timer(call)
    finally:
        for m, impls in zip(layers, saved, strict=True):
            m.impls = impls


def time_dense(layers: Sequence[QuantLinear], dtype: torch.dtype, rows: int, impl: Impl, *,
               timer: Timer = best_time) -> float:
    """Seconds for one product of `rows` rows through each of `layers` in turn on `impl`, as a decode step runs
    them (each weight read once a call: together more than a cache holds)."""
    gen = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(rows, k, generator=gen).to(dtype).to(layers[0].qweight.device)
          for k in sorted({m.in_features for m in layers})}

    def call(impl=impl, layer=layers[0], rows=rows):  # the defaults name what is timed, as time_impls' calls do
        for m in layers:
            m.run(xs[m.in_features], impl)

    with torch.inference_mode():
        return timer(call)


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


def _rounding(impl: Impl) -> float:
    """ROUNDING_MARGIN for an impl that rounds the activations (VNNI's fixed point), else 1."""
    return ROUNDING_MARGIN if KERNEL_ISA.get(impl, 0) & quant_kernels.VNNI else 1.0


def _decode_choice(timings: Timings, decode_rows: tuple[int, ...], layout: Layout | None = None
                   ) -> tuple[Impl, Layout] | None:
    """The decode winner: among the (impl, layout) pairs timed at every row count of `decode_rows` (in `layout`
    only, where given), the least slowdown against the fastest at each row count, summed (a candidate that rounds
    the activations charged ROUNDING_MARGIN); None when no pair was timed at all of them."""
    per_rows = [_parsed(timings, rows) for rows in decode_rows]
    both = sorted(c for c in set.intersection(*(set(t) for t in per_rows)) if layout in (None, c[1]))
    if not both:
        return None
    best = [min(t[c] for c in both) for t in per_rows]
    return min(both, key=lambda c: _rounding(c[0]) * sum(t[c] / b for t, b in zip(per_rows, best, strict=True)))


def _layouts(timings: Timings) -> list[Layout]:
    """The layouts `timings` hold any timing in."""
    return sorted({name.split("@")[1] for name in timings})


def from_timings(timings: Timings, family: Family) -> Decision | None:
    """The decision the timings of `family` make (see the module docstring), or None where they lack one it needs."""
    if (decode := _decode_choice(timings, DECODE_ROWS[family])) is None:
        return None
    impl, layout = decode
    prefill_times = _parsed(timings, PREFILL_ROWS[family])

    def fastest_prefill(where: Layout) -> Impl | None:
        there = {i: t * _rounding(i) for (i, at), t in prefill_times.items() if at == where}
        return min(there, key=there.__getitem__) if there else None

    if (prefill := fastest_prefill(layout)) is None:
        return None
    others = tuple((lay, pick[0], fastest_prefill(lay) or pick[0]) for lay in _layouts(timings)
                   if lay != layout and (pick := _decode_choice(timings, DECODE_ROWS[family], lay)) is not None)
    return Decision(impl, prefill, layout, others)


def measure(layer: QuantLinear, dtype: torch.dtype, family: Family, step: tuple[nn.Module, ...], *,
            timer: Timer = best_time) -> Timings:
    """Decode timings of every candidate in every layout `layer` can take, at each of the family's DECODE_ROWS,
    timed on `step` as a decode step runs it (the experts: MoE layers, `time_routed`; dense: its layers one after
    another, `time_dense`), then prefill timings (its PREFILL_ROWS) of `layer` in every layout decode was timed in.
    "dequant" is timed for decode only where nothing else runs (it dequantises every weight per step, never faster
    than a product on the quantised weights, and took seconds to time). The model is left as it was: the layers
    timed are repacked in place and restored, `layer` is timed for prefill in other layouts on copies."""
    timings: Timings = {}
    if family == "experts":
        steps = {rows: routed_step(step, dtype, rows) for rows in DECODE_ROWS[family]}
        touched = projections({id(e): e for s in steps.values() for experts, *_ in s for e in experts}.values())
    else:
        touched = list(step)
    per_layout = {layout: candidates(layer if layout == layer.layout else layer.copy_as(layout), dtype)
                  for layout in layer.layouts()}
    runs = any(impl != "dequant" for impls in per_layout.values() for impl in impls)
    for layout, impls in per_layout.items():
        impls = [impl for impl in impls if impl != "dequant" or not runs]
        if not impls:
            continue
        with laid_out(touched, layout):
            for rows in DECODE_ROWS[family]:
                timings.update(
                    (_name(impl, layout, rows),
                     time_routed(steps[rows], impl, timer=timer) if family == "experts"
                     else time_dense(touched, dtype, rows, impl, timer=timer))
                    for impl in impls)
    for layout in _layouts(timings):
        variant = layer if layout == layer.layout else layer.copy_as(layout)
        prefill = time_impls(variant, dtype, PREFILL_ROWS[family], timer=timer)
        timings.update((_name(impl, layout, PREFILL_ROWS[family]), t) for impl, t in prefill.items())
    return timings


def shape_key(family: Family, layer: QuantLinear, step: tuple[nn.Module, ...], dtype: torch.dtype) -> str:
    """What a family's timings depend on besides the machine: scheme, group, shapes, dtype, layouts, rows, and
    what a decode step was timed over (the routed layers; the dense products and their weights)."""
    shapes = f"{layer.out_features}x{layer.in_features}"
    if family == "experts":
        moe = step[0]
        shapes = (" ".join(f"{getattr(moe.experts[0], p).out_features}x{getattr(moe.experts[0], p).in_features}"
                           for p in PROJECTIONS) + f" routed {len(step)} layers top{moe.gate.top_k} of "
                  f"{len(moe.experts)}")
    else:
        shapes += f" step {len(step)} products {sum(m.in_features * m.out_features for m in step)} weights"
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
    for family, (layer, step) in representatives(model).items():
        key = shape_key(family, layer, step, dtype)
        memo = (here, key, layer.layout, timer)
        if (found := _decided.get(memo)) is None:
            found = from_timings(known.get(key, {}), family)
            if found is None:
                with torch.inference_mode():
                    fresh[key] = measure(layer, dtype, family, step, timer=timer)
                found = from_timings(fresh[key], family)
            _decided[memo] = found
        decisions[family] = found
    if fresh and path is not None:
        write_timings(path, here, fresh)
    return decisions


def choose(model: nn.Module, dtype: torch.dtype, *, timer: Timer = best_time, cache: Path | None = None
           ) -> dict[Family, Decision]:
    """`decide`, then make every quantised layer of `model` run its family's decision: repacked, one layer at a
    time, into the layout the decision reads where the layer can take it, and its `impls` set (for a layer that
    cannot, the fastest timed in the layout it keeps: not the AVX2 kernel that a decision's impl falls back to)."""
    decisions = decide(model, dtype, timer=timer, cache=cache)
    with allocator.while_loading():  # as `laid_out`
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and (d := decisions.get(family_of(name))) is not None:
                if d.layout in m.layouts():
                    m.relayout(d.layout)
                m.impls = d.impls_for(m.layout)
    return decisions
