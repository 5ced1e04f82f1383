"""Key/value cache for the language model: preallocated, batched, one length per row.

Every row is filled from slot 0, so a token's slot is its position, and rows never need to be aligned:

    row 0:  [ t0 t1 t2 t3 t4 | . . . . . . ]    lengths[0] = 5
    row 1:  [ t0 t1 | . . . . . . . . . . . ]    lengths[1] = 2
    row 2:  [ t0 t1 t2 t3 t4 t5 t6 t7 | . . ]    lengths[2] = 8
              slot = position ->                  capacity S

A forward over T new tokens writes them at slots lengths[b] .. lengths[b] + T - 1 (right-padded rows may
write junk past their real tokens; it is overwritten later and always masked, because a query at position
p only sees slots <= p). `advance(n)` then moves each row's length by its own count of real tokens.

Per layer the cache holds, slots next to the feature axis so that each head's keys are one contiguous
(S, D) block for the decode matmuls:
    MHA: k (B, H_kv, S, D) and v (B, H_kv, S, D)
    MLA: the normalised latent c (B, S, C) and the rotated shared rope key pe (B, S, R): DeepSeek-V2's
         compressed cache (section 2.1.2 of the paper); keys and values are re-derived from it.
Tensors go in and out token-major as (B, T, *heads, feature) for writes and come back as
(B, *heads, S_used, feature).
The cache stores and hands out tensors; it never computes attention.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, shapes: list[tuple[int, ...]], *, batch: int, capacity: int, n_layers: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        """`shapes` are the per-token shapes (*heads, feature) of the tensors one layer stores, e.g.
        [(H, D), (H, D)] for MHA or [(C,), (R,)] for MLA; each is stored as (B, *heads, S, feature)."""
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.layers = [
            tuple(torch.zeros(batch, *shape[:-1], capacity, shape[-1], dtype=dtype, device=device) for shape in shapes)
            for _ in range(n_layers)
        ]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def rows(self, rows: torch.Tensor | list[int]) -> CacheRows:
        """A view of some rows only, for a forward over a sub-batch (e.g. prefilling newly admitted rows)."""
        return CacheRows(self, torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device))

    def positions(self, t: int) -> torch.Tensor:
        """Positions (B, T) of the next `t` tokens of every row."""
        return self.lengths[:, None] + torch.arange(t, device=self.lengths.device)

    def write(self, layer: int, positions: torch.Tensor, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the new tokens' tensors (each (B, T, *heads, feature)) at their positions; return the
        layer's tensors cut to the slots any query of this step can see: (B, *heads, S_used, feature) with
        S_used = max position + 1."""
        return self._write(None, layer, positions, new)

    def _write(self, rows: torch.Tensor | None, layer: int, positions: torch.Tensor,
               new: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        used = int(positions.max()) + 1
        if used > self.capacity:
            raise RuntimeError(f"KV cache overflow: position {used - 1} >= capacity {self.capacity}")
        index = torch.arange(self.batch, device=positions.device) if rows is None else rows
        stored = self.layers[layer]
        for buf, x in zip(stored, new, strict=True):
            heads = (slice(None),) * (buf.dim() - 3)
            buf[(index[:, None], *heads, positions)] = x.to(buf.dtype)  # x: (B, T, *heads, feature)
        if rows is None:
            return tuple(buf[..., :used, :] for buf in stored)  # views, no copy
        return tuple(buf[..., :used, :][rows] for buf in stored)

    def advance(self, n: torch.Tensor | int) -> None:
        """Count `n` more real tokens in each row (a (B,) tensor, or one number for every row)."""
        self.lengths += n

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Empty the given rows (all rows when None) so new sequences can take them."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)] = 0

    def grown(self, capacity: int, batch: int | None = None) -> KVCache:
        """A cache of `capacity` slots per row and `batch` rows (at least this one's of each) holding this one's
        contents and lengths; new rows start empty."""
        capacity, batch = max(capacity, self.capacity), max(batch or 0, self.batch)
        if capacity == self.capacity and batch == self.batch:
            return self
        bigger = KVCache.__new__(KVCache)
        bigger.capacity = capacity
        bigger.lengths = torch.zeros(batch, dtype=self.lengths.dtype, device=self.lengths.device)
        bigger.lengths[: self.batch] = self.lengths
        bigger.layers = []
        for layer in self.layers:
            new = []
            for buf in layer:
                grown = buf.new_zeros(batch, *buf.shape[1:-2], capacity, buf.shape[-1])
                grown[: self.batch, ..., : self.capacity, :] = buf
                new.append(grown)
            bigger.layers.append(tuple(new))
        return bigger

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for layer in self.layers for buf in layer)


class CacheRows:
    """Some rows of a `KVCache`, used like a cache of that many rows. Reads copy the selected rows, so
    it suits prefill of a few rows; a decode step over all rows uses the cache itself (views, no copy)."""

    def __init__(self, cache: KVCache, rows: torch.Tensor):
        self.cache, self.index = cache, rows

    @property
    def lengths(self) -> torch.Tensor:
        return self.cache.lengths[self.index]

    def positions(self, t: int) -> torch.Tensor:
        return self.lengths[:, None] + torch.arange(t, device=self.index.device)

    def write(self, layer: int, positions: torch.Tensor, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.cache._write(self.index, layer, positions, new)

    def advance(self, n: torch.Tensor | int) -> None:
        self.cache.lengths[self.index] += n
