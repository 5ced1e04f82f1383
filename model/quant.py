"""Weight-only quantisation of the language model: the schemes, the quantise / dequantise arithmetic, the
`QuantLinear` module that replaces `nn.Linear`, and which linears are quantised.

  int8  per output channel, symmetric: q = round(w / s) in [-127, 127], s = max|w_row| / 127, s (N,) bf16.
  int4  groups of G along K, symmetric: q = round(w / s) in [-8, 7], s = max|w_group| / 7, s (N, K/G) bf16;
        G is the scheme's group size (128) or, where it does not divide K, the largest of 64, 32, 16 that does
        (Tiny's dense down_proj has K = 6848 = 64 x 107); a K none of them divides is one group per row.
Scales are rounded to bf16 before q is computed, so q * s is exactly the weight the kernels multiply by.
Activations are never quantised to 8 or 4 bits: products run in the activation dtype (bf16 or float32) with the
implementation quant_choice.py picks per machine ("kernel": our AVX2 kernels, quant_kernels.py, float32 sums, output
in that dtype; "kernel_avx512": their AVX512 tiles, bf16 activations on an AVX512-BF16 CPU; "kernel_amx": the same
tiles for a few rows and AMX's tiles for more, on a Xeon with AMX-BF16; "kernel_vnni" / "kernel_amx_vnni": those two
with int4's few-row tiles on AVX512-VNNI, which multiply x as 15-bit fixed point per block of up to 128 k (exact for
values within 2^-6 of the block's largest, others rounded by at most 2^-14 of it: quant_kernels.fixed_point);
"packed": torch's int8/int4 CPU ops in that dtype; "packed_bf16": the same ops in bf16, the input cast down and the
output back up; "dequant": F.linear on the dequantised weight, the always-correct fallback on every device).
Not responsible for reading or writing checkpoints (quant_checkpoint.py).

Runtime layouts of qweight: int8 "plain" (N, K) (stored; torch's op and "dequant" read it) or "r4" (the kernel's,
quant_kernels.r4_pack); int4 "nibbles" (the stored layout, only "dequant" reads it), "cpu" (torch's op layout, which
depends on the CPU: torch_int4.py) or "k16r4" (the kernel's, quant_kernels.k16r4_pack). "dequant" reads every layout.

Quantised: every `nn.Linear` of `language` (attention projections, dense MLP, routed and shared experts, lm_head)
except MLA's `kv_b_proj`, whose weight the absorbed decode attention reads per head as a dense tensor. The MoE
gate (routing), embeddings, norms, the vision tower and the projector stay in floating point.
Shape legend: N output features, K input features, G group size, M rows (tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsvl2.model import quant_kernels, torch_int4
from dsvl2.model.errors import ConfigError

Impl = Literal["kernel", "kernel_avx512", "kernel_amx", "kernel_vnni", "kernel_amx_vnni", "packed", "packed_bf16",
               "dequant"]
Layout = Literal["plain", "r4", "nibbles", "cpu", "k16r4"]
# Quantised linears by how their products run (quant_choice.py decides each apart): the routed experts ("experts":
# a few rows each per prefill chunk, decode in one MoE call) and every other one ("dense").
Family = Literal["experts", "dense"]
FAMILIES: tuple[Family, ...] = ("experts", "dense")
SCHEMES = ("int8", "int4")
INT4_GROUP_SIZE = 128
PACKED_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 CPU op takes
UNQUANTISED = ("kv_b_proj",)  # linear names kept in floating point (see the module docstring)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # activation and scale dtypes quant_kernels takes
KERNEL_ISA: dict[Impl, int] = {"kernel": quant_kernels.AVX2, "kernel_avx512": quant_kernels.AVX512,
                                "kernel_amx": quant_kernels.AMX,
                                "kernel_vnni": quant_kernels.AVX512 | quant_kernels.VNNI,
                                "kernel_amx_vnni": quant_kernels.AMX | quant_kernels.VNNI}
KERNEL_LAYOUT: dict[int, Layout] = {8: "r4", 4: "k16r4"}  # the layout the kernels read, by bits


@dataclass(frozen=True, slots=True)
class Scheme:
    """A quantisation scheme: 8 bits per output channel, or 4 bits in groups of `group_size` along K."""

    bits: int
    group_size: int | None = None

    @classmethod
    def named(cls, name: str) -> Scheme:
        if name == "int8":
            return cls(8)
        if name == "int4":
            return cls(4, INT4_GROUP_SIZE)
        raise ConfigError(f"unsupported quantisation {name!r}: use int8 or int4")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def group_for(self, k: int) -> int | None:
        """The group size used for a weight with K = `k` input features (None: per channel)."""
        if self.group_size is None:
            return None
        return next((g for g in (self.group_size, 64, 32, 16) if g <= self.group_size and k % g == 0), k)

    def shapes(self, n: int, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(qweight, scales) shapes of an (N, K) weight as stored: int8 (N, K) and (N,); int4 (N, ceil(K/2))
        bytes and (N, K/G)."""
        if self.bits == 8:
            return (n, k), (n,)
        return (n, (k + 1) // 2), (n, k // self.group_for(k))


def quantize(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> q int8 (N, K) (int4 values in [-8, 7]) and bf16 scales ((N,) or (N, K/G))."""
    w = w.float()
    n, k = w.shape
    # max |w| as max(max w, -min w): the same value without an |w| copy; the quotient is rounded and clamped in
    # place (`w` itself may be the caller's float32 tensor: never written).
    if scheme.bits == 8:
        s = (torch.maximum(w.amax(dim=1), w.amin(dim=1).neg()) / 127).clamp_min(1e-12).to(torch.bfloat16)
        q = (w / s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return q, s
    g = scheme.group_for(k)
    groups = w.view(n, k // g, g)
    peak = torch.maximum(groups.amax(dim=2), groups.amin(dim=2).neg())
    s = (peak / 7).clamp_min(1e-12).to(torch.bfloat16)  # (N, K/G)
    q = (groups / s.float()[..., None]).round_().clamp_(-8, 7).to(torch.int8).view(n, k)
    return q, s


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (N, K) int8 and scales (N,) or (N, K/G) -> the (N, K) weight in `dtype` (the reference of every product)."""
    n, k = q.shape
    if s.ndim == 1:
        return (q.to(dtype) * s.to(dtype)[:, None]).view(n, k)
    return (q.to(dtype).view(n, s.shape[1], -1) * s.to(dtype)[..., None]).view(n, k)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [-8, 7] -> (N, ceil(K/2)) uint8, the stored layout: byte j holds k = 2j in its low
    nibble and k = 2j + 1 in its high nibble, each as q + 8."""
    u = (q + 8).view(torch.uint8)  # [-8, 7] + 8 stays in int8's range
    if u.shape[1] % 2:
        u = F.pad(u, (0, 1), value=8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(b: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `pack_nibbles`: (N, ceil(K/2)) uint8 -> int8 (N, K) in [-8, 7]."""
    u = torch.stack((b & 15, b >> 4), dim=-1).view(b.shape[0], -1)[:, :k]
    return u.to(torch.int8) - 8


def cpu_int4_fits(n: int, k: int, group: int | None) -> bool:
    """Whether torch's int4 CPU op takes this weight and its layout can be read back here (torch_int4.py)."""
    return n % torch_int4.ROWS_MULTIPLE == 0 and k % 2 == 0 and group in PACKED_GROUPS and torch_int4.known()


cpu_int4_pack, cpu_int4_unpack = torch_int4.pack, torch_int4.unpack


class QuantLinear(nn.Module):
    """A bias-free linear with a quantised weight. `qweight` and `scales` are the checkpoint's tensors (scales in
    the model's dtype); on the CPU the weight is kept in a runtime layout (`layout`, see the module docstring): the
    kernel's ("r4", "k16r4") where quant_kernels is available, else torch's where the op covers it ("plain",
    "cpu"), else the stored "nibbles"; quant_choice.py may move it to another with `relayout`.
    `impls` = (decode, prefill):
    what products with up to DECODE_ROWS rows and longer ones run (quant_choice.py sets them; "dequant" until
    then). An impl that does not apply to a product (layout, dtype, device) runs the kernel where that applies,
    else "dequant"."""

    DECODE_ROWS = 32

    def __init__(self, in_features: int, out_features: int, scheme: Scheme):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group = scheme.group_for(in_features)
        q_shape, s_shape = scheme.shapes(out_features, in_features)
        self.register_buffer("qweight", torch.empty(q_shape, dtype=torch.int8 if scheme.bits == 8 else torch.uint8))
        self.register_buffer("scales", torch.empty(s_shape))
        self.layout: Layout = "plain" if scheme.bits == 8 else "nibbles"
        self.impls: tuple[Impl, Impl] = ("dequant", "dequant")
        self._scales_as: dict[torch.dtype, torch.Tensor] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Takes qweight in the runtime layout `use_stored` gave it (the loader checked the stored shape), whose
        shape may differ from the stored one the buffer was declared with."""
        q = state_dict.get(f"{prefix}qweight")
        if q is not None:
            self._buffers["qweight"] = torch.empty_like(q, device="meta")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme.name}, group={self.group}, {self.layout}"

    def layouts(self, device: torch.device | None = None) -> list[Layout]:
        """The runtime layouts this weight can take on `device` (default: where qweight is), preferred first."""
        device = self.qweight.device if device is None else torch.device(device)
        kernel: list[Layout] = [KERNEL_LAYOUT[self.scheme.bits]]
        if device.type != "cpu" or not quant_kernels.available():
            kernel = []
        if self.scheme.bits == 8:
            return [*kernel, "plain"]
        if device.type == "cpu" and cpu_int4_fits(self.out_features, self.in_features, self.group):
            kernel.append("cpu")
        return [*kernel, "nibbles"]

    def use_stored(self, qweight: torch.Tensor) -> torch.Tensor:
        """The runtime form of a stored qweight, in the preferred layout of `layouts` (sets `layout`)."""
        self.layout = self.layouts(qweight.device)[0]
        if self.layout in ("plain", "nibbles"):
            return qweight
        if self.layout == "k16r4":  # nibbles to nibbles: one pass, no int8 values between (quant_pack.cpp)
            return quant_kernels.k16r4_from_nibbles(qweight, self.in_features)
        q = qweight if self.scheme.bits == 8 else unpack_nibbles(qweight, self.in_features)
        return pack_layout(q, self.layout)

    def use_values(self, q: torch.Tensor) -> torch.Tensor:
        """The runtime form of freshly quantised values q (N, K) int8, in the preferred layout of `layouts` (sets
        `layout`): packed once, where going through the stored layout would pack, unpack and pack again."""
        self.layout = self.layouts(q.device)[0]
        return pack_layout(q, self.layout)

    def relayout(self, layout: Layout) -> None:
        """Repack qweight into `layout` (one of `layouts()`), in place; the old form is freed."""
        if layout != self.layout:
            q = self.int_weight()
            self.qweight, self.layout = pack_layout(q, layout), layout

    def copy_as(self, layout: Layout) -> QuantLinear:
        """A new layer with this one's scales and its weight in `layout` (for timing a layout before choosing it)."""
        with torch.device("meta"):
            other = QuantLinear(self.in_features, self.out_features, self.scheme)
        other.qweight, other.scales, other.layout = self.qweight, self.scales, self.layout
        other.relayout(layout)
        return other

    def int_weight(self) -> torch.Tensor:
        """q (N, K) int8, whatever the layout."""
        if self.layout == "cpu":
            return cpu_int4_unpack(self.qweight, self.in_features)
        if self.layout == "k16r4":
            return quant_kernels.k16r4_unpack(self.qweight, self.out_features, self.in_features)
        if self.layout == "r4":
            return quant_kernels.r4_unpack(self.qweight, self.out_features, self.in_features)
        if self.layout == "nibbles":
            return unpack_nibbles(self.qweight, self.in_features)
        return self.qweight

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantised (N, K) weight in `dtype`."""
        return dequantize(self.int_weight(), self.scales, dtype)

    def packable(self, x: torch.Tensor) -> bool:
        """Whether torch's packed CPU ops cover x with this weight."""
        return (x.is_cpu and self.qweight.is_cpu and x.dtype in (torch.float32, torch.bfloat16)
                and x.numel() > 0 and self.layout in ("plain", "cpu"))

    def kernel_fits(self, x: torch.Tensor, impl: Impl = "kernel") -> bool:
        """Whether our compiled kernel `impl` (one of KERNEL_ISA's: "kernel", "kernel_avx512", "kernel_amx" or their
        VNNI variants) covers x with this weight
        (and is available and switched on). Asked on every product: the cheap checks come first."""
        if (x.dtype not in KERNEL_DTYPES or not x.is_cpu or x.numel() == 0
                or self.layout != KERNEL_LAYOUT[self.scheme.bits]):
            return False
        if impl != "kernel" and (x.dtype is not torch.bfloat16 or not quant_kernels.avx512_supported()):
            return False
        isa = KERNEL_ISA[impl]
        if isa & quant_kernels.AMX and not quant_kernels.amx_supported():
            return False
        if isa & quant_kernels.VNNI and (self.scheme.bits != 4 or not quant_kernels.vnni_supported()):
            return False
        q, s = self._buffers["qweight"], self._buffers["scales"]
        return (q.is_cpu and s.dtype in KERNEL_DTYPES
                and not (x.requires_grad and torch.is_grad_enabled())  # the ops have no backward
                and quant_kernels.available())

    def kernel(self, x2: torch.Tensor, impl: Impl = "kernel", float_out: bool = False) -> torch.Tensor:
        """(M, K) -> (M, N) by quant_kernels (`impl` names the tiles), in x2's dtype (`float_out`: as float32)."""
        if self.scheme.bits == 8:
            return quant_kernels.int8_linear(x2, self.qweight, self.scales, KERNEL_ISA[impl], float_out)
        return quant_kernels.int4_linear(x2, self.qweight, self.scales, self.group, KERNEL_ISA[impl], float_out)

    def _op_scales(self, dtype: torch.dtype) -> torch.Tensor:
        """Scales as the packed op takes them: int8 (N,) in `dtype`; int4 (K/G, N, 2) scales and zero points."""
        found = self._scales_as.get(dtype)
        if found is None or found.device != self.scales.device:
            s = self.scales.to(dtype)
            if self.scheme.bits == 4:
                s = torch.stack((s.t(), torch.zeros_like(s.t())), dim=-1).contiguous()  # (K/G, N, 2)
            found = self._scales_as[dtype] = s
        return found

    def packed(self, x2: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) by torch's op in x2's dtype (any strides: the int4 op takes only contiguous rows)."""
        x2 = x2.contiguous()
        if self.scheme.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self._op_scales(x2.dtype))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group, self._op_scales(x2.dtype))

    def run(self, x: torch.Tensor, impl: Impl, float_out: bool = False) -> torch.Tensor:
        """x (..., K) -> (..., N) by `impl` (where it does not apply: the kernel where that does, else "dequant"),
        in x's dtype; with `float_out` as float32 holding those values (`.float()` of the result, which the kernel
        writes without that conversion's passes over the output: the logits)."""
        packed = impl in ("packed", "packed_bf16") and self.packable(x)
        kernel = None if packed else self._fitting_kernel(x, impl)
        if kernel is not None:
            y = self.kernel(x.reshape(-1, self.in_features), kernel, float_out)
            return y.view(*x.shape[:-1], self.out_features)
        y = self._run_torch(x, impl, packed)
        return y.float() if float_out else y

    def kernel_for(self, x: torch.Tensor, impl: Impl) -> Impl | None:
        """The kernel impl `run` takes for x under `impl`: `impl` where it is a kernel that covers x, else the
        generic "kernel" where that does; None where torch runs the product ("dequant", or torch's packed op where
        it covers x)."""
        packed = impl in ("packed", "packed_bf16") and self.packable(x)
        return None if packed else self._fitting_kernel(x, impl)

    def _fitting_kernel(self, x: torch.Tensor, impl: Impl) -> Impl | None:
        """`kernel_for` where torch's packed op does not run x."""
        if impl == "dequant":
            return None
        kernel: Impl = impl if impl in KERNEL_ISA else "kernel"
        if self.kernel_fits(x, kernel):  # asked once per product where it holds (~8 us a question)
            return kernel
        return "kernel" if kernel != "kernel" and self.kernel_fits(x, "kernel") else None

    def _run_torch(self, x: torch.Tensor, impl: Impl, packed: bool) -> torch.Tensor:
        """`run` where our kernel does not: torch's packed op, else the dequantised weight."""
        if packed:
            x2 = x.reshape(-1, self.in_features)
            if impl == "packed_bf16" and x.dtype is not torch.bfloat16:
                y = self.packed(x2.to(torch.bfloat16)).to(x.dtype)
            else:
                y = self.packed(x2)
            return y.view(*x.shape[:-1], self.out_features)
        if self.scheme.bits == 8:  # per-channel scales commute with the product: scale the (M, N) output
            return F.linear(x, self.int_weight().to(x.dtype)) * self.scales.to(x.dtype)
        return F.linear(x, self.weight_as(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, self._impl(x))

    def floats(self, x: torch.Tensor) -> torch.Tensor:
        """`self(x).float()`, written as float32 by the kernel where it runs (the lm_head's logits)."""
        return self.run(x, self._impl(x), float_out=True)

    def _impl(self, x: torch.Tensor) -> Impl:
        return self.impls[0] if x.numel() // self.in_features <= self.DECODE_ROWS else self.impls[1]


def pack_layout(q: torch.Tensor, layout: Layout) -> torch.Tensor:
    """q (N, K) int8 values -> qweight in the runtime `layout`."""
    if layout == "plain":
        return q
    if layout == "cpu":
        return cpu_int4_pack(q)
    if layout == "k16r4":
        return quant_kernels.k16r4_pack(q)
    if layout == "r4":
        return quant_kernels.r4_pack(q)
    return pack_nibbles(q)


def quantizable(name: str, module: nn.Module) -> bool:
    """Whether the module called `name` (relative to `language`) is quantised."""
    return type(module) is nn.Linear and name.rpartition(".")[2] not in UNQUANTISED


def replace_linears(model: nn.Module, scheme: Scheme, prefix: str = "language") -> dict[str, QuantLinear]:
    """Replace every quantisable linear under `model.<prefix>` by a `QuantLinear` of the same features (on the
    meta device: nothing is allocated); returns full module path -> new module."""
    root = model.get_submodule(prefix)
    replaced = {}
    for name, module in list(root.named_modules()):
        if quantizable(name, module):
            parent_name, _, attr = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            with torch.device("meta"):
                new = QuantLinear(module.in_features, module.out_features, scheme)
            setattr(parent, attr, new)
            replaced[f"{prefix}.{name}"] = new
    return replaced


def family_of(name: str) -> Family:
    """The family of the quantised linear at module path `name`."""
    return "experts" if ".experts." in f".{name}" else "dense"


def quant_layers(model: nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def quant_paths(model: nn.Module) -> dict | None:
    """What `model`'s quantised products run, for -v and the run manifest: the scheme and, per family of layers
    (quant_choice's "experts" / "dense"), the decode and prefill implementations and the weights' layout that most
    of its weights run, with "others" listing any other combination and its count of layers (layers the family's
    layout does not fit keep theirs: quant_choice's `Decision.others`); None when nothing is quantised."""
    weights: dict[str, dict[tuple[str, str, str], list[int]]] = {}
    scheme = None
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            scheme = scheme or m.scheme.name
            seen = weights.setdefault(family_of(name), {}).setdefault((*m.impls, m.layout), [0, 0])
            seen[0] += m.in_features * m.out_features
            seen[1] += 1
    if scheme is None:
        return None
    families: dict[str, dict] = {}
    for family, combos in weights.items():
        ranked = sorted(combos.items(), key=lambda kv: -kv[1][0])
        (decode, prefill, layout), _ = ranked[0]
        families[family] = {"decode": decode, "prefill": prefill, "layout": layout}
        if len(ranked) > 1:
            families[family]["others"] = [{"decode": d, "prefill": p, "layout": lay, "layers": n}
                                          for (d, p, lay), (_, n) in ranked[1:]]
    return {"scheme": scheme, "families": families}


def describe_paths(paths: dict) -> str:
    """`quant_paths`' report as the one line -v prints."""
    def combo(p: dict) -> str:
        return f"decode {p['decode']}, prefill {p['prefill']}, {p['layout']} layout"

    return f"{paths['scheme']} products: " + "; ".join(
        f"{family} {combo(p)}" + "".join(f" ({o['layers']} layer{'s' * (o['layers'] != 1)}: {combo(o)})"
                                         for o in p.get("others", ()))
        for family, p in paths["families"].items())
