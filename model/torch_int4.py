"""torch's int4 CPU weight layout (`_convert_weight_to_int4pack_for_cpu`, read by `_weight_int4pack_mm_for_cpu`):
packing, its inverse, and whether that inverse is known for the torch build and CPU at hand.

The op lays the weight out for the vector width its build runs on this CPU (`torch.backends.cpu.get_cpu_capability`),
so the same values pack differently on an AVX2 and on an AVX512 machine (seen with torch 2.13):
  AVX2    blocks of 32 rows; per 4 columns k, 64 bytes ordered (k % 4, row % 16), rows 0-15 of the block in the
          low nibbles and 16-31 in the high ones.
  AVX512  blocks of 64 rows; per column k, 32 bytes, byte d holding row d (low nibble) and row 32 + d (high); a last
          block of fewer rows: per column, byte j holding rows 2j (low) and 2j + 1 (high).
Each nibble is the unsigned value q + 8. `known()` packs a probe and checks that `unpack` inverts it (once per
process): where it does not (another torch release, another capability), quant.py leaves this layout out rather
than read weights wrongly. Shape legend: N rows (output features), K columns (input features).
"""

from __future__ import annotations

import functools

import torch

ROWS_MULTIPLE = 32  # N must be a multiple of this (every capability's block or last block holds whole 32s)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int4 values (N, K) in [-8, 7] -> torch's CPU layout ((N, K/2) uint8)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8), 1)


def unpack(p: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `pack` on this CPU: int8 (N, K) in [-8, 7]."""
    n = p.shape[0]
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        u = _unpack_avx512(p.reshape(-1), n, k)
    else:
        b = p.reshape(n // 32, k // 4, 4, 16)  # (block, k // 4, k % 4, row % 16)
        u = torch.stack((b & 15, b >> 4), dim=1).permute(0, 1, 4, 2, 3).reshape(n, k)  # (block, half, row, k)
    return u.to(torch.int8) - 8


def _unpack_avx512(flat: torch.Tensor, n: int, k: int) -> torch.Tensor:
    full = n // 64 * 64
    b = flat[: full * k // 2].view(full // 64, k, 32)  # (block, k, byte d)
    body = torch.stack((b & 15, b >> 4), dim=2).permute(0, 2, 3, 1).reshape(full, k)  # (block, half, d, k)
    if full == n:
        return body
    t = flat[full * k // 2:].view(k, (n - full) // 2)  # (k, byte j): rows 2j, 2j + 1
    tail = torch.stack((t & 15, t >> 4), dim=-1).reshape(k, n - full).t()
    return torch.cat((body, tail))


@functools.cache
def known() -> bool:
    """Whether `unpack` inverts `pack` here (a probe of whole and partial blocks, checked once)."""
    q = torch.randint(-8, 8, (96, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    try:
        return torch.equal(unpack(pack(q), 64), q)
    except (RuntimeError, ValueError):
        return False
