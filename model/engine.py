"""Generation engine: turns `Request`s into `Completion`s with continuous batching over one KV cache.

The engine knows nothing about documents, files or terminals. It admits requests into free cache rows as
others finish (up to `max_batch_size` rows, and while the cache for every running row's prompt plus token
budget fits `cache_budget`), encodes the images of each admission wave together (in fixed-size chunks of tiles),
prefills prompts in chunks interleaved with decode steps of the running rows (so a long page neither
stalls the others nor spikes memory), samples each row with its own settings and seed (repetition penalty
included), and stops rows on EOS, `max_new_tokens`, stop strings or the repetition guard. Prompt plus answer
never pass the model's context (`max_position_embeddings`): a request's budget is cut to what its prompt
leaves, and a prompt that leaves nothing fails its step with `PromptTooLong`. Requests arrive through `submit`
at any time and each `step` (one scheduling iteration) returns those that finished in it; `generate` submits a
list and steps until it is done, returning results in request order and, as each finishes, through `on_completion`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dsvl2.model.errors import InputError
from dsvl2.model.kv_cache import KVCache, lazily_mapped, to_device
from dsvl2.model.processor import Prepared, Processor
from dsvl2.model.requests import Completion, Request, Timings
from dsvl2.model.sampling import SeenTokens, find_stop, make_generator, repeats_ngram, sample_tokens
from dsvl2.model.vl2 import DeepseekVL2


class PromptTooLong(InputError):
    """A prompt that leaves no room in the model's context for even one answer token. Raised by the step that
    admits it, which drops the requests in flight as any failed step does; alone, the request fails by itself."""

    def __init__(self, n_prompt: int, context: int) -> None:
        super().__init__(
            f"the prompt has {n_prompt:,} tokens and the model's context holds {context:,} positions, prompt and "
            "answer together; use fewer or smaller images"
        )
        self.n_prompt, self.context = n_prompt, context


@dataclass
class _Sequence:
    """One request's state while it is queued or running."""

    index: int  # submission order: prefill goes by it
    request: Request
    submitted: float
    prepared: Prepared | None = None  # processor output (pixels included), dropped once embedded
    n_prompt: int = 0  # prompt tokens, known from admission
    budget: int = 0  # new tokens it may generate: its max_new_tokens, or what the context leaves after the prompt
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
    """Continuous batching over a loaded model. `submit`, `cancel` and `has_work` may be called from any thread
    (or a callback); `step` and `generate` from one thread at a time."""

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
        self.context = model.cfg.language.max_position_embeddings  # positions for prompt plus answer
        self._lock = threading.Lock()  # guards what other threads touch: cancels, queue, ids in flight, outbox
        self._cancelled: set[str] = set()
        self._queue: deque[_Sequence] = deque()
        self._in_flight: set[str] = set()  # ids submitted and not finished
        self._outbox: list[Completion] = []  # finished inside generate() for requests it did not submit
        self._submitted = 0
        # Running state, kept from step to step while there is work and dropped when there is none:
        self._rows: list[_Sequence | None] = []  # cache row -> the sequence in it
        self._cache: KVCache | None = None
        self._seen: SeenTokens | None = None  # the rows' token ids, made when a request asks for a repetition penalty

    # -- requests ---------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue `request`; a later `step` admits it as soon as a row and the cache budget allow. Raises, with
        nothing queued, `InputError` for a conversation the processor refuses, `PromptTooLong` (one) for a
        prompt that leaves no room in the context, and ValueError when a request with the same id is in flight."""
        self._enqueue([request])

    @property
    def running(self) -> int:
        """Requests in cache rows now (prefilling or decoding): the batch the last step ran. Read it between steps."""
        return sum(seq is not None for seq in self._rows)

    def progress(self, request_id: str) -> tuple[int, ...] | None:
        """The tokens a running request has generated so far (None if it is not in a row). Between steps only:
        from the thread that calls `step`, as a server does to stream answers."""
        seq = next((s for s in self._rows if s is not None and s.request.id == request_id), None)
        return None if seq is None else tuple(seq.tokens)

    def cancel(self, request_id: str) -> None:
        """Stop a request: dropped if still queued, stopped at the next step if running. An id not in flight
        yet cancels the request that arrives with it."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        """True while a submitted request has not been returned by `step` (queued, running, or finished and held)."""
        with self._lock:
            return bool(self._in_flight or self._outbox)

    def _enqueue(self, requests: Sequence[Request]) -> None:
        for request in requests:  # refused before anything is queued, so no other request pays for it
            n_prompt = self.processor.count_tokens(request.conversation)
            if n_prompt >= self.context:
                raise PromptTooLong(n_prompt, self.context)
        with self._lock:
            clash = next((r.id for r in requests if r.id in self._in_flight), None)
            if clash is not None:
                raise ValueError(f"request id {clash!r} is already in flight; ids must be unique among them")
            now = time.perf_counter()
            for request in requests:
                self._queue.append(_Sequence(self._submitted, request, now))
                self._submitted += 1
            self._in_flight.update(r.id for r in requests)

    def _is_cancelled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._cancelled

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], *,
                 on_completion: Callable[[Completion], None] | None = None) -> list[Completion]:
        """Submit `requests`, step until every one has finished, and return their completions in request order;
        `on_completion` gets each as it finishes. Completions of requests submitted otherwise that finish
        meanwhile are held for the next `step`. If anything raises, every request in flight is dropped."""
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within one generate() call")
        self._enqueue(requests)
        mine, results = set(ids), {}
        try:
            while len(results) < len(ids):
                for completion in self._step():
                    if completion.id in mine and completion.id not in results:
                        results[completion.id] = completion
                        if on_completion is not None:
                            on_completion(completion)
                    else:
                        with self._lock:
                            self._outbox.append(completion)
        except BaseException:
            self._drop_all()
            raise
        finally:
            with self._lock:  # cancels that arrived after their request finished must not outlive the call
                self._cancelled.difference_update(ids)
        return [results[i] for i in ids]

    def step(self) -> list[Completion]:
        """One scheduling iteration: admit queued requests into free rows (within `max_batch_size` and
        `cache_budget`), run one prefill chunk and one decode step, and return the completions that finished,
        in the order they finished. If the step raises (out of memory, say), every request in flight is
        dropped with that step's completions, the engine is idle and usable again, and the exception propagates."""
        with self._lock:
            held, self._outbox = self._outbox, []
        return held + self._step()

    @torch.inference_mode()
    def _step(self) -> list[Completion]:
        finished: list[Completion] = []

        def finish(seq: _Sequence, reason: str) -> None:
            finished.append(self._complete(seq, reason))

        try:
            admitted = self._admit(finish)
            if admitted:
                self._cache = self._ensure_cache(self._cache, self._rows)
                self._cache.reset([s.row for s in admitted])
            for seq in [s for s in self._rows if s is not None and self._is_cancelled(s.request.id)]:
                finish(seq, "cancelled")
            if self._cache is not None and any(self._rows):
                self._prefill_step(self._cache, self._rows, finish)
                self._decode_step(self._cache, self._rows, finish)
        except BaseException:
            self._drop_all()
            raise
        with self._lock:
            idle = not self._queue
        if idle and not any(self._rows):  # no work: the cache's memory goes back until some arrives
            self._rows, self._cache, self._seen = [], None, None
        return finished

    def _complete(self, seq: _Sequence, reason: str) -> Completion:
        done = time.perf_counter()
        completion = Completion(
            id=seq.request.id, token_ids=tuple(seq.tokens), text=seq.text or self._decode(seq.tokens),
            finish_reason=reason, n_prompt=seq.n_prompt, n_generated=len(seq.tokens),
            timings=Timings(queued=(seq.admitted or done) - seq.submitted, prefill=seq.prefill_seconds,
                            decode=done - seq.decode_started if seq.decode_started else 0.0),
            max_new_tokens=seq.budget or None, context=self.context,
        )
        if seq.row >= 0:
            self._rows[seq.row] = None
        with self._lock:
            self._in_flight.discard(seq.request.id)
            self._cancelled.discard(seq.request.id)
        return completion

    def _drop_all(self) -> None:
        """Forget every queued and running request (after a failed step) and free the cache."""
        with self._lock:
            self._queue.clear()
            self._in_flight.clear()
        self._rows, self._cache, self._seen = [], None, None

    # -- admission --------------------------------------------------------------------------------------
    def _admit(self, finish) -> list[_Sequence]:
        """Move queued requests into free rows, in order, while the cache budget allows. Rows are added up to
        `max_batch_size` as the requests in flight need them, and never removed while there is work."""
        rows = self._rows
        with self._lock:
            waiting = len(self._queue)
        wanted = min(self.max_batch_size, max(waiting + sum(s is not None for s in rows), 1))
        rows.extend([None] * (wanted - len(rows)))
        wave = []
        free = [i for i, s in enumerate(rows) if s is None]
        while free:
            with self._lock:
                if not self._queue:
                    break
                seq = self._queue.popleft()
            if self._is_cancelled(seq.request.id):
                finish(seq, "cancelled")
                continue
            if seq.prepared is None:
                seq.prepared = self.processor.prepare(seq.request.conversation)
                seq.n_prompt = int(seq.prepared.input_ids.shape[0])
                if seq.n_prompt >= self.context:
                    raise PromptTooLong(seq.n_prompt, self.context)
                seq.budget = min(seq.request.sampling.max_new_tokens, self.context - seq.n_prompt)
            if not self._fits_budget(seq, free[0], rows, self._cache):
                with self._lock:
                    self._queue.appendleft(seq)  # waits, prepared, for running rows to finish
                break
            seq.row, seq.admitted = free.pop(0), time.perf_counter()
            seq.generator = make_generator(seq.request.sampling)
            if seq.request.sampling.repetition_penalty != 1.0:
                self._seen_tokens().start(seq.row, seq.prepared.input_ids.tolist())
            rows[seq.row] = seq
            wave.append(seq)
        if wave:
            self._embed(wave)
        return wave

    def _seen_tokens(self) -> SeenTokens:
        """The rows' token ids for the repetition penalty: one row per possible cache row, made on first need."""
        if self._seen is None:
            self._seen = SeenTokens(self.max_batch_size, self.model.cfg.language.vocab_size, self.model.device)
        return self._seen

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
        """Cache slots `seq` may fill: its prompt plus its token budget (never past the context)."""
        return seq.n_prompt + seq.budget

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
        """A cache with room for every running row's prompt plus its token budget, rows up to `len(rows)` and
        slots up to the context as far as `cache_budget` allows: on a CPU all of it at once (unwritten slots take
        no memory there, kv_cache.py), elsewhere grown by copying, the slots doubling, when an admission needs it."""
        batch, need = self._shape_for([(s.row, s) for s in rows if s is not None], None)
        if cache is not None and cache.capacity >= need and cache.batch >= batch:
            return cache
        batch = max(batch, cache.batch if cache is not None else 0)
        context = self.model.cfg.language.max_position_embeddings
        lazy = lazily_mapped(self.model.device)
        capacity = max(need, context if lazy else 2 * cache.capacity if cache is not None else 0)
        capacity = min(capacity, max(need, context))
        if self.cache_budget is None:
            batch = len(rows)
        elif lazy:  # rows first (each at its need), then slots
            batch = max(batch, min(len(rows), self.cache_budget // (need * self._token_bytes)))
            capacity = max(need, min(capacity, self.cache_budget // (batch * self._token_bytes)))
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
        view.advance(sizes)
        elapsed = (time.perf_counter() - start) / len(pending)
        ready, logits = [], []
        for b, seq in enumerate(pending):
            seq.prefilled += sizes[b]
            seq.prefill_seconds += elapsed
            if seq.decoding:  # prompt complete: its last hidden state gives the first token
                seq.embeds = None
                seq.decode_started = time.perf_counter()
                ready.append(seq)
                logits.append(self.model.language.logits(hidden[b, sizes[b] - 1]))  # (V,), row by row as ever
        if ready:
            for seq, token in zip(ready, self._sample(ready, torch.stack(logits)), strict=True):
                self._accept(seq, token, finish)

    def _chunk_size(self, seq: _Sequence) -> int:
        """This step's chunk of `seq`'s prompt: ceil(n / budget) equal parts of its n tokens, or what is left."""
        parts = -(-seq.n_prompt // self.prefill_chunk)
        return min(-(-seq.n_prompt // parts), seq.n_prompt - seq.prefilled)

    def _decode_step(self, cache: KVCache, rows: list[_Sequence | None], finish) -> None:
        """One token for every decoding row. The step runs over all cache rows (views, no copies); rows
        that are idle or still prefilling get a zero embedding whose cache write is never counted. The
        inputs go to the device in one copy and the sampled ids come back in one."""
        active = [s for s in rows if s is not None and s.decoding and s.tokens]
        if not active:
            return
        last, live = [0] * cache.batch, [0] * cache.batch
        for seq in active:
            last[seq.row], live[seq.row] = seq.tokens[-1], 1
        inputs = to_device([last, live], cache.device)  # (2, B): last token, 1 where the row decodes
        x = self.model.language.embed(inputs[0, :, None]) * inputs[1, :, None, None].to(self.model.dtype)
        hidden = self.model.language(x, cache)
        cache.advance(live)
        logits = self.model.language.logits(hidden[:, 0])  # (B, V)
        if len(active) < cache.batch:
            logits = logits[to_device([s.row for s in active], cache.device)]
        for seq, token in zip(active, self._sample(active, logits), strict=True):
            self._accept(seq, token, finish)

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """The next token of each of `seqs` from its row of `logits` (N, V) float32, which this may change. The
        repetition penalty goes first, as transformers applies its logits processors before its warpers."""
        samplings = [s.request.sampling for s in seqs]
        penalized = [n for n, s in enumerate(samplings) if s.repetition_penalty != 1.0]
        if penalized:
            seen = self._seen_tokens()
            logits = seen.penalize(logits, [s.row for s in seqs], [s.repetition_penalty for s in samplings])
        suppress = [n for n, s in enumerate(samplings) if s.suppress_eos]
        if suppress:
            logits[to_device(suppress, logits.device), self.eos_id] = float("-inf")
        tokens = sample_tokens(logits, samplings, [s.generator for s in seqs])
        if penalized:
            seen.add([seqs[n].row for n in penalized], [tokens[n] for n in penalized])
        return tokens

    def _accept(self, seq: _Sequence, token: int, finish) -> None:
        """Append `token` to `seq` and apply the stop rules."""
        sampling = seq.request.sampling
        if token == self.eos_id:
            finish(seq, "eos")
            return
        seq.tokens.append(token)
        if sampling.stop and self._stop_in_tail(seq.tokens, sampling.stop):
            text = self._decode(seq.tokens)
            cut = find_stop(text, sampling.stop)
            if cut >= 0:
                seq.text = text[:cut]
                finish(seq, "stop")
                return
        if sampling.no_repeat_ngram and repeats_ngram(seq.tokens, sampling.no_repeat_ngram, sampling.repeat_window):
            finish(seq, "repetition")
        elif len(seq.tokens) >= seq.budget:
            finish(seq, "length")
        elif self._is_cancelled(seq.request.id):
            finish(seq, "cancelled")

    def _stop_in_tail(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        """Whether a stop string shows in the text of the last tokens. Checked every step, a stop seen earlier would
        have ended the answer then, so one completed now lies in the text's last len(stop) characters: decoded from
        enough of the last tokens that a few more characters come first (a tail's first characters may decode broken,
        mid-character; the caller confirms on the whole text). Decoding the whole answer at every step cost O(n^2)
        over a long one (~0.17 us a token: 0.3 ms a step at 2,000 tokens)."""
        need = max(len(s) for s in stops) + 4
        window = 4 * need  # a character is at most 4 bytes, a token mostly at least one
        while True:
            tail = self._decode(tokens[-window:])
            if len(tail) >= need or window >= len(tokens):
                return find_stop(tail, stops) >= 0
            window *= 2  # tokens that decode to nothing (dropped ids): look further back

    def _decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens)
