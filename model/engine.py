"""Generation engine: turns `Request`s into `Completion`s with continuous batching over one KV cache.

The engine knows nothing about documents, files or terminals. It admits requests into free cache rows as
others finish (up to `max_batch_size` rows, and while the cache for every running row's prompt plus token
budget fits `cache_budget`), encodes the images of each admission wave together (in fixed-size chunks of tiles),
prefills prompts in chunks interleaved with decode steps of the running rows (so a long page neither
stalls the others nor spikes memory), samples each row with its own settings and seed, and stops rows on
EOS, `max_new_tokens`, stop strings or the repetition guard. Results come back in request order and, as
each finishes, through `on_completion`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dsvl2.model.kv_cache import KVCache
from dsvl2.model.processor import Prepared, Processor
from dsvl2.model.requests import Completion, Request, Timings
from dsvl2.model.sampling import find_stop, make_generator, repeats_ngram, sample_token
from dsvl2.model.vl2 import DeepseekVL2


@dataclass
class _Sequence:
    """One request's state while it is queued or running."""

    index: int
    request: Request
    submitted: float
    prepared: Prepared | None = None  # processor output (pixels included), dropped once embedded
    n_prompt: int = 0  # prompt tokens, known from admission
    embeds: torch.Tensor | None = None  # (T, E) prompt embeddings, dropped once prefilled
    row: int = -1
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    admitted: float = 0.0
    prefill_seconds: float = 0.0
    decode_started: float = 0.0
    text: str = ""

    @property
    def decoding(self) -> bool:
        return self.n_prompt > 0 and self.prefilled == self.n_prompt


class Engine:
    """Batched generation over a loaded model. Not thread-safe except `cancel`, which may be called from
    another thread (or a callback) while `generate` runs."""

    def __init__(self, model: DeepseekVL2, processor: Processor, *, max_batch_size: int = 8,
                 prefill_chunk: int = 2048, vision_chunk: int = 8, cache_budget: int | None = None,
                 model_id: str = "", revision: str | None = None):
        """`cache_budget`: the most bytes the KV cache may take (None: as many rows as `max_batch_size` needs).
        A request is admitted only while the cache for every running row's prompt plus token budget fits it;
        a request alone always runs, whatever it needs."""
        if max_batch_size < 1 or prefill_chunk < 1 or vision_chunk < 1:
            raise ValueError("max_batch_size, prefill_chunk and vision_chunk must be >= 1")
        if cache_budget is not None and cache_budget < 1:
            raise ValueError("cache_budget must be a positive number of bytes")
        self.model, self.processor = model, processor
        self.max_batch_size, self.prefill_chunk, self.vision_chunk = max_batch_size, prefill_chunk, vision_chunk
        self.cache_budget = cache_budget
        self._token_bytes = model.language.cache_bytes_per_token()
        self.model_id, self.revision = model_id, revision
        self.eos_id = processor.tokenizer.eos_id
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def cancel(self, request_id: str) -> None:
        """Stop a request: dropped if still queued, stopped at the next step if running."""
        with self._lock:
            self._cancelled.add(request_id)

    def _is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], *,
                 on_completion: Callable[[Completion], None] | None = None) -> list[Completion]:
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within one generate() call")
        now = time.perf_counter()
        queue = deque(_Sequence(i, r, now) for i, r in enumerate(requests))
        results: list[Completion | None] = [None] * len(requests)
        rows: list[_Sequence | None] = [None] * min(self.max_batch_size, max(len(requests), 1))
        cache: KVCache | None = None

        def finish(seq: _Sequence, reason: str) -> None:
            done = time.perf_counter()
            completion = Completion(
                id=seq.request.id, token_ids=tuple(seq.tokens), text=seq.text or self._decode(seq.tokens),
                finish_reason=reason, n_prompt=seq.n_prompt, n_generated=len(seq.tokens),
                timings=Timings(queued=(seq.admitted or done) - seq.submitted, prefill=seq.prefill_seconds,
                                decode=done - seq.decode_started if seq.decode_started else 0.0),
            )
            results[seq.index] = completion
            if seq.row >= 0:
                rows[seq.row] = None
            if on_completion is not None:
                on_completion(completion)

        while queue or any(rows):
            admitted = self._admit(queue, rows, finish, cache)
            if admitted:
                cache = self._ensure_cache(cache, rows)
                cache.reset([s.row for s in admitted])
            for seq in [s for s in rows if s is not None and self._is_cancelled(s.request.id)]:
                finish(seq, "cancelled")
            if cache is None or not any(rows):
                continue
            self._prefill_step(cache, rows, finish)
            self._decode_step(cache, rows, finish)
        with self._lock:
            self._cancelled.difference_update(ids)
        return [c for c in results if c is not None]

    # -- admission --------------------------------------------------------------------------------------
    def _admit(self, queue: deque[_Sequence], rows: list[_Sequence | None], finish,
               cache: KVCache | None) -> list[_Sequence]:
        wave = []
        free = [i for i, s in enumerate(rows) if s is None]
        while queue and free:
            seq = queue.popleft()
            if self._is_cancelled(seq.request.id):
                finish(seq, "cancelled")
                continue
            if seq.prepared is None:
                seq.prepared = self.processor.prepare(seq.request.conversation)
                seq.n_prompt = int(seq.prepared.input_ids.shape[0])
            if not self._fits_budget(seq, free[0], rows, cache):
                queue.appendleft(seq)  # waits, prepared, for running rows to finish
                break
            seq.row, seq.admitted = free.pop(0), time.perf_counter()
            seq.generator = make_generator(seq.request.sampling)
            rows[seq.row] = seq
            wave.append(seq)
        if wave:
            self._embed(wave)
        return wave

    def _embed(self, wave: list[_Sequence]) -> None:
        """Prompt embeddings of a whole admission wave: all their tiles through the vision tower together."""
        start = time.perf_counter()
        items = [s.prepared for s in wave]
        T = max(p.input_ids.shape[0] for p in items)
        I = max(max(p.images_spatial_crop.shape[0] for p in items), 1)
        ids = torch.full((len(items), T), self.processor.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), T, dtype=torch.bool)
        crops = torch.zeros(len(items), I, 2, dtype=torch.long)
        for b, p in enumerate(items):
            n = p.input_ids.shape[0]
            ids[b, :n], mask[b, :n] = p.input_ids, p.images_seq_mask
            crops[b, : p.images_spatial_crop.shape[0]] = p.images_spatial_crop
        tiles = torch.cat([p.tiles for p in items])
        embeds = self.model.embed(ids, mask, tiles, crops, vision_chunk=self.vision_chunk)
        elapsed = (time.perf_counter() - start) / len(wave)
        for b, seq in enumerate(wave):  # own copies, so each row's memory goes when it is prefilled
            seq.embeds = embeds[b, : seq.n_prompt].clone()
            seq.prefill_seconds += elapsed
            seq.prepared = None  # the pixels are no longer needed

    @staticmethod
    def _need(seq: _Sequence) -> int:
        """Cache slots `seq` may fill: its prompt plus its token budget."""
        return seq.n_prompt + seq.request.sampling.max_new_tokens

    def _shape_for(self, placed: list[tuple[int, _Sequence]], cache: KVCache | None) -> tuple[int, int]:
        """(rows, slots) a cache needs to hold each (row, sequence) of `placed`, and never fewer than `cache` has."""
        batch = max(row for row, _ in placed) + 1
        capacity = max(self._need(seq) for _, seq in placed)
        if cache is None:
            return batch, capacity
        return max(batch, cache.batch), max(capacity, cache.capacity)

    def _fits_budget(self, seq: _Sequence, row: int, rows: list[_Sequence | None], cache: KVCache | None) -> bool:
        """Whether the cache for the running rows plus `seq` in `row` stays within `cache_budget`."""
        placed = [(s.row, s) for s in rows if s is not None]
        if self.cache_budget is None or not placed:
            return True
        batch, capacity = self._shape_for([*placed, (row, seq)], cache)
        return batch * capacity * self._token_bytes <= self.cache_budget

    def _ensure_cache(self, cache: KVCache | None, rows: list[_Sequence | None]) -> KVCache:
        """A cache with room for every running row's prompt plus its token budget (grown by copying when a new
        admission needs more slots or rows; rows keep their contents). Capacity grows by doubling and the rows
        to `len(rows)`, as far as `cache_budget` allows."""
        batch, need = self._shape_for([(s.row, s) for s in rows if s is not None], None)
        if cache is not None and cache.capacity >= need and cache.batch >= batch:
            return cache
        batch = max(batch, cache.batch if cache is not None else 0)
        capacity = max(need, 2 * cache.capacity if cache is not None else 0)
        capacity = min(capacity, max(need, self.model.cfg.language.max_position_embeddings))
        if self.cache_budget is None:
            batch = len(rows)
        else:
            capacity = max(need, min(capacity, self.cache_budget // (batch * self._token_bytes)))
            batch = max(batch, min(len(rows), self.cache_budget // (capacity * self._token_bytes)))
        if cache is None:
            return self.model.language.new_cache(batch, capacity)
        return cache.grown(capacity, batch)

    # -- steps ------------------------------------------------------------------------------------------
    def _prefill_step(self, cache: KVCache, rows: list[_Sequence | None], finish) -> None:
        """One chunk of prompt for as many prefilling rows (in request order) as fit a budget of `prefill_chunk`
        tokens, counting the right-padding to the longest chunk, and at least one row. A prompt of n tokens goes
        in ceil(n / prefill_chunk) equal chunks, so no chunk is a sliver that costs a whole weight read. The
        budget bounds the activations of a step whatever the batch size."""
        waiting = sorted((s for s in rows if s is not None and not s.decoding), key=lambda s: s.index)
        if not waiting:
            return
        pending, sizes = [], []
        for seq in waiting:
            size = self._chunk_size(seq)
            if pending and (len(pending) + 1) * max(*sizes, size) > self.prefill_chunk:
                break
            pending.append(seq)
            sizes.append(size)
        start = time.perf_counter()
        chunks = [s.embeds[s.prefilled : s.prefilled + n] for s, n in zip(pending, sizes, strict=True)]
        T = max(sizes)
        x = chunks[0].new_zeros(len(pending), T, chunks[0].shape[-1])
        for b, c in enumerate(chunks):
            x[b, : c.shape[0]] = c
        view = cache.rows([s.row for s in pending])
        hidden = self.model.language(x, view)
        counts = torch.tensor([c.shape[0] for c in chunks], device=cache.lengths.device)
        view.advance(counts)
        elapsed = (time.perf_counter() - start) / len(pending)
        for b, seq in enumerate(pending):
            seq.prefilled += chunks[b].shape[0]
            seq.prefill_seconds += elapsed
            if seq.decoding:  # prompt complete: its last hidden state gives the first token
                seq.embeds = None
                seq.decode_started = time.perf_counter()
                logits = self.model.language.logits(hidden[b, chunks[b].shape[0] - 1])
                self._accept(seq, logits, finish)

    def _chunk_size(self, seq: _Sequence) -> int:
        """This step's chunk of `seq`'s prompt: ceil(n / budget) equal parts of its n tokens, or what is left."""
        parts = -(-seq.n_prompt // self.prefill_chunk)
        return min(-(-seq.n_prompt // parts), seq.n_prompt - seq.prefilled)

    def _decode_step(self, cache: KVCache, rows: list[_Sequence | None], finish) -> None:
        """One token for every decoding row. The step runs over all cache rows (views, no copies); rows
        that are idle or still prefilling get a zero embedding whose cache write is never counted."""
        active = [s for s in rows if s is not None and s.decoding and s.tokens]
        if not active:
            return
        last = torch.zeros(cache.batch, dtype=torch.long, device=cache.lengths.device)
        live = torch.zeros(cache.batch, dtype=torch.long, device=cache.lengths.device)
        for seq in active:
            last[seq.row], live[seq.row] = seq.tokens[-1], 1
        x = self.model.language.embed(last[:, None]) * live[:, None, None].to(self.model.dtype)
        hidden = self.model.language(x, cache)
        cache.advance(live)
        logits = self.model.language.logits(hidden[:, 0])
        for seq in active:
            self._accept(seq, logits[seq.row], finish)

    def _accept(self, seq: _Sequence, logits: torch.Tensor, finish) -> None:
        """Sample the next token of `seq` and apply the stop rules."""
        sampling = seq.request.sampling
        if sampling.suppress_eos:
            logits = logits.clone()
            logits[self.eos_id] = float("-inf")
        token = sample_token(logits, sampling, seq.generator)
        if token == self.eos_id:
            finish(seq, "eos")
            return
        seq.tokens.append(token)
        if sampling.stop:
            text = self._decode(seq.tokens)
            cut = find_stop(text, sampling.stop)
            if cut >= 0:
                seq.text = text[:cut]
                finish(seq, "stop")
                return
        if sampling.no_repeat_ngram and repeats_ngram(seq.tokens, sampling.no_repeat_ngram, sampling.repeat_window):
            finish(seq, "repetition")
        elif len(seq.tokens) >= sampling.max_new_tokens:
            finish(seq, "length")
        elif self._is_cancelled(seq.request.id):
            finish(seq, "cancelled")

    def _decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens)
