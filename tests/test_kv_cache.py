"""The KV cache: growth keeps every row, lazily zeroed slots never show what the memory held, and on a CPU it
takes memory for the slots each row has used, not for its capacity nor the longest row's length, and a row reset for
a new sequence gives its memory back (the engine sizes it once there and never grows it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parity import checkpoint_names, parity_model, parity_processor, require
from test_invariants import page_requests

from dsvl2.model import engine as engine_module
from dsvl2.model.engine import Engine
from dsvl2.model.kv_cache import ZERO_BLOCK, KVCache
from dsvl2.model.requests import Request, Sampling

CHECKPOINTS = require(checkpoint_names(), "parity checkpoints")


def _filled_cache(lengths: list[int], capacity: int, zero_pages: bool):
    """A float32 cache of two layers whose rows hold `lengths` random tokens, written as the model writes them
    (every row the longest row's count: the shorter ones' last slots hold right-padding)."""
    cache = KVCache([(2, 3), (4,)], batch=len(lengths), capacity=capacity, n_layers=2, dtype=torch.float32,
                    zero_pages=zero_pages)
    t = max(lengths)
    for layer in range(2):
        cache.write(layer, cache.positions(t), torch.randn(len(lengths), t, 2, 3), torch.randn(len(lengths), t, 4))
    cache.advance(lengths)
    return cache


@pytest.mark.parametrize("zero_pages", [True, False], ids=["zero-pages", "zeroed-lazily"])
def test_grown_cache_keeps_every_row_and_adds_empty_ones(zero_pages: bool) -> None:
    """Catches a cache growth that loses or shifts contents: growing slots and rows keeps each row's tokens and
    length where they were, new rows start empty (zero wherever a forward may read), and the cache it came from is
    untouched. Zeroed lazily (a GPU's policy) the covered slots are copied whole; in zero pages (a CPU's) each
    row's own tokens, the rest reading as zeros."""
    cache = _filled_cache([3, 5], capacity=5, zero_pages=zero_pages)
    assert cache.covered == 5
    before = [tuple(buf.clone() for buf in layer) for layer in cache.layers]
    bigger = cache.grown(9, batch=4)
    assert (bigger.capacity, bigger.batch, bigger.covered) == (9, 4, 9 if zero_pages else 5)
    assert bigger.lengths.tolist() == [3, 5, 0, 0]
    for old, new in zip(before, bigger.layers, strict=True):
        for a, b in zip(old, new, strict=True):
            kept = [3, 5] if zero_pages else [5, 5]
            for row, n in enumerate(kept):
                assert torch.equal(b[row, ..., :n, :], a[row, ..., :n, :])
                assert not b[row, ..., n : bigger.covered, :].any()
            assert not b[2:, ..., : bigger.covered, :].any()
    assert all(torch.equal(a, b) for old, layer in zip(before, cache.layers, strict=True)
               for a, b in zip(old, layer, strict=True))
    assert cache.grown(5) is cache and cache.grown(4, batch=1) is cache
    assert cache.nbytes() == 2 * 5 * (2 * 3 + 4) * 4 * 2


def test_a_cache_shows_only_written_tokens_and_zeros_never_what_its_memory_held() -> None:
    """Catches a lazily zeroed cache letting stale memory into attention (a NaN there times a zero probability is
    NaN): in buffers that held NaN, every slot a write hands back is a written token or zero, the zeroing runs a
    block ahead of the reads (not once per step) and never past the capacity, and a grown cache zeroes its new rows
    over the covered slots. (A GPU's policy: on a CPU the buffers are zero pages, tested below.)"""
    capacity = ZERO_BLOCK + 40
    cache = KVCache([(2, 3), (4,)], batch=3, capacity=capacity, n_layers=1, dtype=torch.float32, zero_pages=False)
    for buf in cache.layers[0]:
        buf.fill_(float("nan"))
    lengths = [0, 0, 0]
    steps = [(5, [0, 1, 2], ZERO_BLOCK), (3, [1], ZERO_BLOCK), (ZERO_BLOCK, [0, 1, 2], capacity), (20, [2], capacity)]
    for t, rows, covered in steps:
        part = cache.rows(rows)
        k, v = torch.randn(len(rows), t, 2, 3), torch.randn(len(rows), t, 4)
        seen_k, seen_v = part.write(0, part.positions(t), k, v)
        used = max(lengths[r] for r in rows) + t
        assert seen_k.shape[-2] == used and torch.isfinite(seen_k).all() and torch.isfinite(seen_v).all()
        for i, r in enumerate(rows):
            assert torch.equal(seen_k[i, :, lengths[r] : lengths[r] + t], k[i].transpose(0, 1))
            assert torch.equal(seen_v[i, lengths[r] : lengths[r] + t], v[i])
        part.advance(t)
        for r in rows:
            lengths[r] += t
        assert cache.covered == covered
    bigger = cache.grown(capacity + 8, batch=5)
    assert torch.isfinite(bigger.layers[0][0][..., :capacity, :]).all() and not bigger.layers[0][1][3:, :capacity].any()


def test_a_cpu_cache_zeroes_lazily_where_the_platform_maps_no_anonymous_memory(monkeypatch) -> None:
    """Catches a CPU cache that assumes anonymous mappings (Windows has none): there it takes the lazy zeroing, its
    buffers plain tensors, and still shows only written tokens and zeros."""
    from dsvl2.model import allocator

    assert KVCache([(4,)], batch=1, capacity=4, n_layers=1, dtype=torch.float32).zero_pages == (
        allocator.has_zero_pages())
    monkeypatch.setattr(allocator, "has_zero_pages", lambda: False)
    cache = KVCache([(2, 3), (4,)], batch=2, capacity=ZERO_BLOCK + 8, n_layers=1, dtype=torch.float32)
    assert not cache.zero_pages and cache.covered == 0
    for buf in cache.layers[0]:
        buf.fill_(float("nan"))
    k, v = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 4)
    seen_k, seen_v = cache.write(0, cache.positions(3), k, v)
    assert cache.covered == ZERO_BLOCK and torch.isfinite(seen_k).all() and torch.equal(seen_v, v)


# Run in a fresh interpreter: in a process that has freed memory before, the buffers may land on pages that are
# resident already, and then neither a lazy cache nor a zero-filled one moves the resident size.
_MEMORY_PROBE = """
import resource, sys
from pathlib import Path
import torch
from dsvl2.model.kv_cache import ZERO_BLOCK, KVCache

def resident():
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

before = resident()
cache = KVCache([(4, 128), (4, 128)], batch=8, capacity=4096, n_layers=8, dtype=torch.bfloat16)
made = resident()
used = 3 * ZERO_BLOCK
for layer in range(8):
    new = torch.ones(8, used, 4, 128, dtype=torch.bfloat16)
    cache.write(layer, cache.positions(used), new, new)
print(cache.nbytes(), made - before, resident() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from Linux's /proc")
def test_a_cpu_cache_takes_memory_for_the_slots_used_not_its_capacity() -> None:
    """Catches a cache that touches its whole capacity (a zero fill, a copy) on a CPU: in a fresh process, a cache of
    512 MiB of capacity raises the resident memory by a small part of that until its slots are used, and by about
    what was used after."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, check=True).stdout
    nbytes, made, written = (int(v) for v in out.split())
    token_bytes = 2 * 4 * 128 * 2  # per layer: k and v, 4 heads of 128, bf16
    expected = 8 * 3 * ZERO_BLOCK * 8 * token_bytes  # 96 MiB
    assert nbytes == 8 * 4096 * 8 * token_bytes == 512 << 20
    assert made < 32 << 20, made
    assert 0.9 * expected < written < expected + (48 << 20), (written, expected)


_ROWS_PROBE = """
import resource
from pathlib import Path
import torch
from dsvl2.model.kv_cache import KVCache

def resident():
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

def fill(cache, lengths):
    for row, n in enumerate(lengths):
        part = cache.rows([row])
        for layer in range(8):
            new = torch.ones(1, n, 4, 128, dtype=torch.bfloat16)
            part.write(layer, part.positions(n), new, new)
        part.advance(n)

lengths = [768, 64, 64, 64, 64, 64, 64, 64]
shapes = dict(batch=8, capacity=4096, n_layers=8, dtype=torch.bfloat16)
fill(KVCache([(4, 128), (4, 128)], **shapes), lengths)  # the write path's first use (a library, the heap's growth)
cache = KVCache([(4, 128), (4, 128)], **shapes)
before = resident()
fill(cache, lengths)
written = resident() - before
cache.reset([0])
released = resident() - before
zeros = not any(buf[0].any() for layer in cache.layers for buf in layer)
kept = all(buf[1, :, :64].all() for layer in cache.layers for buf in layer)
print(written, released, int(zeros), int(kept))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from Linux's /proc")
def test_a_cpu_cache_row_costs_its_own_slots_and_gives_them_back_when_reset() -> None:
    """Catches a CPU cache that zeroes or touches every row up to the longest one's length (the memory of a batch
    of staggered pages is then rows x the longest), or that keeps a finished row's memory when the row starts
    anew: rows of 768 and 7 x 64 tokens raise the resident size by about their own slots (not 8 x 768), resetting
    the long row gives its slots back and it reads as zeros again, and the other rows keep their tokens."""
    out = subprocess.run([sys.executable, "-c", _ROWS_PROBE], capture_output=True, text=True, check=True).stdout
    written, released, zeros, kept = (int(v) for v in out.split())
    token_bytes = 8 * 2 * 4 * 128 * 2  # 8 layers of k and v, 4 heads of 128, bf16
    own = (768 + 7 * 64) * token_bytes  # 19 MiB; every row as long as the longest would be 96 MiB
    assert 0.9 * own < written < own + (8 << 20), (written, own)
    assert released < written - 0.9 * 768 * token_bytes, (released, written)
    assert zeros and kept


@pytest.mark.parametrize("ckpt", CHECKPOINTS[:1])
def test_the_engine_sizes_a_cpu_cache_once_and_never_grows_it(monkeypatch, ckpt: str) -> None:
    """Catches the CPU engine growing its cache by copies: staggered requests over more rows than the first
    admission get one cache of the model's whole context, never a grown one, and the tokens equal a run that had
    to grow (the GPU policy, forced)."""
    model = parity_model(ckpt)
    requests = page_requests(4)
    requests.append(Request("long", requests[0].conversation, Sampling(max_new_tokens=40)))  # admitted last
    made, grown = [], []
    real_new, real_grown = type(model.language).new_cache, KVCache.grown
    monkeypatch.setattr(type(model.language), "new_cache",
                        lambda self, b, c: made.append((b, c)) or real_new(self, b, c))
    monkeypatch.setattr(KVCache, "grown", lambda self, c, b=None: grown.append((c, b)) or real_grown(self, c, b))
    lazy = Engine(model, parity_processor(ckpt), max_batch_size=3).generate(requests)
    assert made == [(3, model.cfg.language.max_position_embeddings)] and not grown, (made, grown)
    monkeypatch.setattr(engine_module, "lazily_mapped", lambda device: False)  # as on a GPU: grown by doubling
    doubling = Engine(model, parity_processor(ckpt), max_batch_size=3).generate(requests)
    assert grown and [c.token_ids for c in doubling] == [c.token_ids for c in lazy]
