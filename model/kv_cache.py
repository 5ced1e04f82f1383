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
The lengths live on the host (Python ints moved by `advance` and `reset`), so the slots a forward reads and the
overflow check need no read from the device; positions go to the device once per forward.
The cache stores and hands out tensors; it never computes attention.

Memory: on a CPU the buffers are anonymous mappings of their own (allocator.zero_pages), so every slot reads as
zero until written and a page takes memory only once written: a row costs the slots it has used, not the cache's
capacity nor the longest row's length (a capacity sized for the longest answer the budget allows, 2,048 tokens for
OCR, is free until answers get that long). A row that is reset for a new sequence gives its pages back
(allocator.release), so over a long run of staggered pages the cache holds what the rows in flight use. Elsewhere
(a GPU's memory is taken whole) the buffers are allocated empty and zeroed lazily, slots [0, covered) of every row,
`covered` rising in blocks of ZERO_BLOCK slots just ahead of the furthest slot a forward reads (a masked slot must
still be finite: a zero probability times a NaN is NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsvl2.model import allocator, kernels

ZERO_BLOCK = 256  # slots zeroed at a time ahead of the reads (one write per layer every ZERO_BLOCK decode steps)


def to_device(values: Sequence, device: torch.device | str) -> torch.Tensor:
    """A long tensor of host ints (nested lists allowed) on `device`. To a GPU it goes through pinned memory without
    blocking, so the host does not wait for the device's queue to drain (a plain copy from pageable memory would)."""
    if torch.device(device).type != "cuda":
        return torch.tensor(values, dtype=torch.long, device=device)
    return torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)


def lazily_mapped(device: torch.device) -> bool:
    """Whether memory on `device` is taken only where it is written (a CPU's pages), so a cache's unused capacity
    costs nothing there."""
    return device.type == "cpu"


class KVCache:
    def __init__(self, shapes: list[tuple[int, ...]], *, batch: int, capacity: int, n_layers: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", zero_pages: bool | None = None):
        """`shapes` are the per-token shapes (*heads, feature) of the tensors one layer stores, e.g.
        [(H, D), (H, D)] for MHA or [(C,), (R,)] for MLA; each is stored as (B, *heads, S, feature). `zero_pages`
        (default: where memory is lazily mapped, a CPU, and the platform maps anonymous memory) puts the buffers in
        mappings that read as zeros (see the top); otherwise they are zeroed lazily."""
        self.capacity = capacity
        self.device = torch.device(device)
        if zero_pages is None:
            zero_pages = lazily_mapped(self.device) and allocator.has_zero_pages()
        self.zero_pages = zero_pages
        self._lengths = [0] * batch
        self._all = torch.arange(batch, device=self.device)
        # Slots [0, covered) of every row hold zeros or written tokens; past it, whatever the memory held.
        self.covered = capacity if self.zero_pages else 0
        self.layers = [tuple(self._buffer(batch, shape, capacity, dtype) for shape in shapes) for _ in range(n_layers)]

    def _buffer(self, batch: int, shape: tuple[int, ...], capacity: int, dtype: torch.dtype) -> torch.Tensor:
        """One layer's (B, *heads, S, feature) buffer for tokens of `shape`."""
        full = (batch, *shape[:-1], capacity, shape[-1])
        if not self.zero_pages:
            return torch.empty(full, dtype=dtype, device=self.device)
        return allocator.zero_pages(torch.Size(full).numel() * dtype.itemsize).view(dtype).view(full)

    @property
    def batch(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) tokens held by each row, a host tensor."""
        return torch.tensor(self._lengths, dtype=torch.long)

    def rows(self, rows: torch.Tensor | list[int]) -> CacheRows:
        """A view of some rows only, for a forward over a sub-batch (e.g. prefilling newly admitted rows)."""
        return CacheRows(self, rows.tolist() if isinstance(rows, torch.Tensor) else list(rows))

    def positions(self, t: int) -> torch.Tensor:
        """Positions (B, T) of the next `t` tokens of every row, on the cache's device."""
        return _positions(self._lengths, t, self.device)

    def write(self, layer: int, positions: torch.Tensor, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the new tokens' tensors (each (B, T, *heads, feature)) at `positions` (those of `positions(T)`);
        return the layer's tensors cut to the slots any query of this step can see: (B, *heads, S_used, feature)
        with S_used = the longest row's length + T."""
        return self._write(self._all, self._lengths, layer, positions, new, every_row=True)

    def _write(self, index: torch.Tensor, lengths: list[int], layer: int, positions: torch.Tensor,
               new: tuple[torch.Tensor, ...], *, every_row: bool) -> tuple[torch.Tensor, ...]:
        used = self._reserve(lengths, positions.shape[-1])
        stored = self.layers[layer]
        if kernels.store_fits(stored, new):  # bf16 on the CPU: one call, the same copies
            kernels.store_rows(stored, new, index, positions)
        else:
            for buf, x in zip(stored, new, strict=True):
                heads = (slice(None),) * (buf.dim() - 3)
                buf[(index[:, None], *heads, positions)] = x.to(buf.dtype)  # x: (B, T, *heads, feature)
        if every_row:
            return tuple(buf[..., :used, :] for buf in stored)  # views, no copy
        return tuple(buf[..., :used, :][index] for buf in stored)

    @property
    def every_row(self) -> torch.Tensor:
        """(B,) the index of every row, on the cache's device (what a write of every row stores at)."""
        return self._all

    def reserve(self, t: int) -> int:
        """Make ready the slots a forward of `t` new tokens in every row reads and return their count, S_used (the
        longest row's length + t); raises where that passes the capacity. `write` does this itself."""
        return self._reserve(self._lengths, t)

    def store(self, layer: int, positions: torch.Tensor, new: tuple[torch.Tensor, ...],
              used: int) -> tuple[torch.Tensor, ...]:
        """`write` of every row after `reserve` returned `used`, on the store kernel without its checks: for callers
        that settled once that it takes this cache (bf16 on the CPU: `store_fits`) and the new tensors (B, T, *heads,
        feature) with unit feature stride (decode_plan.py)."""
        stored = self.layers[layer]
        kernels.store_rows(stored, new, self.every_row, positions)
        return tuple(buf[..., :used, :] for buf in stored)

    def _reserve(self, lengths: list[int], t: int) -> int:
        # The largest position is max(lengths) + T - 1: known on the host, where `positions.max()` would wait for
        # the device once per layer.
        used = max(lengths, default=0) + t
        if used > self.capacity:
            raise RuntimeError(f"KV cache overflow: position {used - 1} >= capacity {self.capacity}")
        self._cover(used)
        return used

    def _cover(self, used: int) -> None:
        """Zero every row's slots from `covered` to at least `used` (a block ahead, within the capacity)."""
        if used <= self.covered:
            return
        upto = min(self.capacity, max(used, self.covered + ZERO_BLOCK))
        for layer in self.layers:
            for buf in layer:
                buf[..., self.covered : upto, :].zero_()
        self.covered = upto

    def advance(self, n: torch.Tensor | Sequence[int] | int) -> None:
        """Count `n` more real tokens in each row (one count per row, or one number for every row). Host ints keep
        the device out of it; a tensor is read back to the host first."""
        counts = _counts(n, self.batch)
        self._lengths = [m + k for m, k in zip(self._lengths, counts, strict=True)]

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Empty the given rows (all rows when None) so new sequences can take them; with zero pages, their memory
        goes back (whatever of it a row's neighbours do not share a page with)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        for row in range(self.batch) if rows is None else rows:
            if self.zero_pages and self._lengths[row]:
                for layer in self.layers:
                    for buf in layer:
                        allocator.release(buf[row])
            self._lengths[row] = 0

    def grown(self, capacity: int, batch: int | None = None) -> KVCache:
        """A cache of `capacity` slots per row and `batch` rows (at least this one's of each) holding this one's
        contents and lengths; new rows start empty. Only the covered slots are copied (new rows' zeroed)."""
        capacity, batch = max(capacity, self.capacity), max(batch or 0, self.batch)
        if capacity == self.capacity and batch == self.batch:
            return self
        bigger = KVCache.__new__(KVCache)
        bigger.capacity, bigger.device, bigger.zero_pages = capacity, self.device, self.zero_pages
        bigger.covered = capacity if self.zero_pages else self.covered
        bigger._lengths = self._lengths + [0] * (batch - self.batch)
        bigger._all = torch.arange(batch, device=self.device)
        bigger.layers = []
        for layer in self.layers:
            new = []
            for buf in layer:
                grown = bigger._buffer(batch, (*buf.shape[1:-2], buf.shape[-1]), capacity, buf.dtype)
                if self.zero_pages:  # each row's own tokens: the rest reads as zeros and takes no memory
                    for row, n in enumerate(self._lengths):
                        grown[row, ..., :n, :] = buf[row, ..., :n, :]
                else:
                    grown[: self.batch, ..., : self.covered, :] = buf[..., : self.covered, :]
                    grown[self.batch :, ..., : self.covered, :] = 0
                new.append(grown)
            bigger.layers.append(tuple(new))
        return bigger

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for layer in self.layers for buf in layer)


class CacheRows:
    """Some rows of a `KVCache`, used like a cache of that many rows. Reads copy the selected rows, so
    it suits prefill of a few rows; a decode step over all rows uses the cache itself (views, no copy)."""

    def __init__(self, cache: KVCache, rows: list[int]):
        self.cache, self.members = cache, rows
        self.index = to_device(rows, cache.device)

    def _own_lengths(self) -> list[int]:
        return [self.cache._lengths[r] for r in self.members]

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor(self._own_lengths(), dtype=torch.long)

    def positions(self, t: int) -> torch.Tensor:
        return _positions(self._own_lengths(), t, self.cache.device)

    def write(self, layer: int, positions: torch.Tensor, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.cache._write(self.index, self._own_lengths(), layer, positions, new, every_row=False)

    def advance(self, n: torch.Tensor | Sequence[int] | int) -> None:
        for row, k in zip(self.members, _counts(n, len(self.members)), strict=True):
            self.cache._lengths[row] += k


def _positions(lengths: list[int], t: int, device: torch.device) -> torch.Tensor:
    """(B, T) positions lengths[b] + 0..t-1: one copy of the B lengths to the device."""
    return to_device(lengths, device)[:, None] + torch.arange(t, device=device)


def _counts(n: torch.Tensor | Sequence[int] | int, size: int) -> list[int]:
    """`n` as `size` host ints: a number repeated, or one per row."""
    if isinstance(n, torch.Tensor):
        n = n.tolist()
    return [n] * size if isinstance(n, int) else list(n)
