"""The KV cache: growth keeps every row, lazily zeroed slots never show what the memory held, and on a CPU it
takes memory for the slots used, not for its capacity (the engine sizes it once there and never grows it)."""

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


def _filled_cache(lengths: list[int], capacity: int):
    """A float32 cache of two layers whose rows hold `lengths` random tokens, written as the model writes them."""
    cache = KVCache([(2, 3), (4,)], batch=len(lengths), capacity=capacity, n_layers=2, dtype=torch.float32)
    t = max(lengths)
    for layer in range(2):
        cache.write(layer, cache.positions(t), torch.randn(len(lengths), t, 2, 3), torch.randn(len(lengths), t, 4))
    cache.advance(lengths)
    return cache


def test_grown_cache_keeps_every_row_and_adds_empty_ones() -> None:
    """Catches a cache growth that loses or shifts contents: growing slots and rows keeps each row's tensors and
    length where they were, new rows start empty (zero wherever a forward may read), and the cache it came from is
    untouched."""
    cache = _filled_cache([3, 5], capacity=5)
    assert cache.covered == 5
    before = [tuple(buf.clone() for buf in layer) for layer in cache.layers]
    bigger = cache.grown(9, batch=4)
    assert (bigger.capacity, bigger.batch, bigger.covered) == (9, 4, 5) and bigger.lengths.tolist() == [3, 5, 0, 0]
    for old, new in zip(before, bigger.layers, strict=True):
        for a, b in zip(old, new, strict=True):
            assert torch.equal(b[:2, ..., :5, :], a)
            assert not b[2:, ..., :5, :].any()
    assert all(torch.equal(a, b) for old, layer in zip(before, cache.layers, strict=True)
               for a, b in zip(old, layer, strict=True))
    assert cache.grown(5) is cache and cache.grown(4, batch=1) is cache
    assert cache.nbytes() == 2 * 5 * (2 * 3 + 4) * 4 * 2


def test_a_cache_shows_only_written_tokens_and_zeros_never_what_its_memory_held() -> None:
    """Catches a lazily zeroed cache letting stale memory into attention (a NaN there times a zero probability is
    NaN): in buffers that held NaN, every slot a write hands back is a written token or zero, the zeroing runs a
    block ahead of the reads (not once per step) and never past the capacity, and a grown cache zeroes its new rows
    over the covered slots."""
    capacity = ZERO_BLOCK + 40
    cache = KVCache([(2, 3), (4,)], batch=3, capacity=capacity, n_layers=1, dtype=torch.float32)
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
