"""Batched generation: many sequences decode together through one KV cache (continuous batching),
and prompts that start with tokens already computed reuse their keys and values (prefix cache).

The cache has `rows` rows of `max_seq_length` positions each (llama.cpp's server calls them slots).
A request owns one row while it runs. Rows 0..D-1 hold the D sequences decoding now, so that a
decode step is one forward pass over the first rows of the cache, each row at its own position
(its own rotary angles and its own mask over its keys). A newcomer is prefilled in another row,
at most `prefill_chunk` tokens per step, so the running sequences keep decoding meanwhile; once its
prompt is in, its row is swapped into row D and it decodes with the others. A finished sequence is
swapped out of the decoding rows at once and its row is free.

A free row keeps the tokens whose keys and values it holds: a new request takes the free row that
shares the longest prefix with its prompt and prefills only the rest (the least recently used row
when none shares anything). Rows beyond `max_batch_size` exist only for that cache.

Exactness: every row computes what it would alone, up to float rounding (its keys are its own; the
mask hides the rest), so greedy tokens equal `generation.generate`'s (tested). Compiled: the decode
step is compiled for a few batch sizes (powers of two up to max_batch_size) and key lengths (powers
of two from 256), so a bounded number of graphs serves every mix of requests. Unused rows of a
compiled batch decode a dummy token written to the scratch position max_seq_length, which no real
query reads.

Why one file: the row bookkeeping, the prefix cache and the batched step change together (a row's
tokens, its cache and its position must agree).
"""

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence

import torch
import torch._dynamo

from lit_llama.infer.generation import TextStream, row_forward, sample
from lit_llama.model import LLaMA
from lit_llama.infer.speculative import accept
from lit_llama.utils import UserError


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: Optional[int] = None  # the request's own random numbers (None: from torch's global generator)
    stop_ids: Sequence[int] = ()  # tokens that end the answer (not part of it)
    stop_strings: Sequence[str] = ()  # texts that end the answer (not part of it); needs a tokenizer


class Request:
    """One prompt's generation. Its tokens and text grow as the engine runs; `finish_reason` is set
    at the end: "stop" (a stop id or string), "length" (max_new_tokens or the row's capacity),
    "cancelled" or "error". `on_update(request, piece)` is called from the engine's thread after each
    token with the new text ("" while held back) and once more when it finishes."""

    _ids = itertools.count()

    def __init__(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
                 on_update: Optional[Callable[["Request", str], None]] = None):
        self.id = next(self._ids)
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.on_update = on_update
        self.tokens: List[int] = []
        self.text_stream: Optional[TextStream] = None
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None
        self.stop_id: Optional[int] = None  # the stop id that ended it (not in tokens)
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.generator: Optional[torch.Generator] = None
        self.row: Optional[int] = None
        self.prefilled = 0  # prompt tokens in the cache so far
        self.pending: Optional[int] = None  # the last token, not yet in the cache
        self.engine: Optional["Engine"] = None  # the engine it was submitted to
        self.submitted = time.perf_counter()
        self.first_token_time: Optional[float] = None
        self.done = threading.Event()
        self._cancelled = False

    def cancel(self) -> None:
        """Stop at the engine's next step (or leave the queue); finish_reason "cancelled"."""
        self._cancelled = True

    @property
    def text(self) -> str:
        return self.text_stream.text if self.text_stream is not None else ""

    def wait(self, timeout: Optional[float] = None) -> "Request":
        self.done.wait(timeout)
        return self


class EngineFull(Exception):
    """The waiting queue is full: the caller should try again later (a server answers 503)."""


@dataclass
class _Row:
    tokens: List[int] = field(default_factory=list)  # whose keys and values the row holds, from position 0
    owner: Optional[Request] = None
    last_used: int = 0


def _bucket(n: int, sizes: Sequence[int]) -> int:
    return next(s for s in sizes if s >= n)


def batched_step(model: LLaMA, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of T tokens per row (the last token, then any drafted ones): tokens and pos
    (B, T), mask (B, 1, T, keys)."""
    x = model.hidden_states(tokens, pos, mask=mask)
    return model.logits(x)


class Engine:
    """Runs requests in batches; see the module's docstring. Call `step()` yourself (`run` does it
    until a list of requests is done) or `start()` a thread that steps whenever there is work."""

    def __init__(self, model: LLaMA, tokenizer=None, *, max_batch_size: int = 8, max_seq_length: Optional[int] = None,
                 cache_rows: Optional[int] = None, prefill_chunk: int = 256, compile: bool = False,
                 max_waiting: int = 64, prefix_cache: bool = True, device=None, drafter=None, draft_tokens: int = 5):
        if max_batch_size < 1:
            raise UserError(f"--max_batch_size must be at least 1, got {max_batch_size}")
        if draft_tokens < 1:
            raise UserError(f"--draft_tokens must be at least 1, got {draft_tokens}")
        if prefill_chunk < 1:
            raise UserError(f"--prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        c = model.config
        self.capacity = min(max_seq_length or c.block_size, c.block_size)
        self.max_batch_size = max_batch_size
        self.n_rows = max(cache_rows or 2 * max_batch_size, max_batch_size)
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self.max_waiting = max_waiting
        w = model.transformer.ln_f.weight
        self.device = torch.device(device) if device is not None else w.device
        # one position more than the capacity: the scratch position of a compiled batch's unused rows
        model.set_kv_cache(self.n_rows, self.capacity + 1, self.device)  # the model's cache dtype
        self.caches = [block.attn.kv_cache for block in model.transformer.h]
        # speculative decoding (lit_llama/infer/speculative.py): up to draft_tokens guesses per row and step
        self.drafter, self.draft_tokens = drafter, draft_tokens
        if drafter is not None:
            drafter.attach(self.n_rows, self.capacity + draft_tokens, self.device)
        self.rows = [_Row() for _ in range(self.n_rows)]
        self.decoding: List[Request] = []  # row i is decoding[i]
        self.prefilling: List[Request] = []
        self.waiting: Deque[Request] = deque()
        self._incoming: Deque[Request] = deque()
        self._cv = threading.Condition()
        self._clock = itertools.count(1)
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.batch_sizes = sorted({1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
                                  | {max_batch_size})
        self.compiled = compile
        self.step_fn = batched_step
        if compile:
            # one graph per (batch size, key length, tokens per row: 1 or 1 + draft_tokens) bucket
            graphs = len(self.batch_sizes) * len(self._key_lengths()) * (2 if drafter is not None else 1)
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * graphs)
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.step_fn = torch.compile(batched_step, mode=mode, fullgraph=True, dynamic=False)
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "prompt_tokens": 0,
                      "cached_prompt_tokens": 0, "prefix_cache_hits": 0, "generated_tokens": 0, "steps": 0,
                      "decode_rows": 0, "draft_tokens": 0, "accepted_draft_tokens": 0}
        self._recent: Deque = deque(maxlen=64)  # (time, tokens) of recent steps, for tokens/s

    # ---------------------------------------------------------------- requests in

    def submit(self, *requests: Request) -> None:
        """Queue `requests` (thread-safe), all or none: UserError if one can never run, EngineFull if
        they do not all fit in the waiting queue."""
        for r in requests:
            self._check(r)
        with self._cv:
            if self.queued() + len(requests) > self.max_waiting:
                raise EngineFull(f"{self.queued()} requests are waiting already (at most {self.max_waiting})")
            for r in requests:
                r.engine = self
            self._incoming.extend(requests)
            self._cv.notify()

    def _check(self, request: Request) -> None:
        n, p = len(request.prompt), request.params
        if request.engine is not None:
            raise ValueError(f"request {request.id} was submitted already")
        if n == 0:
            raise UserError("the prompt is empty")
        if n >= self.capacity:
            raise UserError(f"the prompt has {n} tokens; a sequence holds at most {self.capacity} "
                            f"(the KV cache's length per row), prompt and answer together")
        if p.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {p.max_new_tokens}")
        if p.stop_strings and self.tokenizer is None:
            raise UserError("stop strings need the engine's tokenizer")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise UserError(f"the prompt has token ids outside the vocabulary (0..{vocab - 1})")
        if self.tokenizer is not None:
            request.text_stream = TextStream(self.tokenizer.decode, p.stop_strings)
        if p.seed is not None and p.temperature > 0:
            request.generator = torch.Generator(self.device).manual_seed(p.seed)

    def run(self, requests: Sequence[Request]) -> List[Request]:
        """Submit `requests` (those not submitted yet) and step until they are all finished (in this
        thread)."""
        self.submit(*[r for r in requests if r.engine is None])
        while not all(r.finish_reason for r in requests):
            self.step()
        return list(requests)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams()) -> List[List[int]]:
        """The generated tokens of each prompt, run as one batch."""
        return [r.tokens for r in self.run([Request(p, params) for p in prompts])]

    # ---------------------------------------------------------------- a thread that steps

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="lit_llama-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not (self._incoming or self.waiting or self.decoding or self.prefilling):
                    self._cv.wait()
                if self._closed:
                    return
            self.step()

    @property
    def busy(self) -> bool:
        return bool(self.decoding or self.prefilling)

    def queued(self) -> int:
        return len(self.waiting) + len(self._incoming)

    # ---------------------------------------------------------------- one step

    @torch.inference_mode()
    def step(self) -> None:
        """Admit newcomers, prefill up to `prefill_chunk` prompt tokens, decode one token of every
        running sequence."""
        with self._cv:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
        try:
            self._drop_cancelled()
            self._admit()
            self._prefill()
            if self.decoding:
                self._decode()
            self.stats["steps"] += 1
        except Exception as e:  # a bug or a device error: the requests in flight fail, the engine goes on
            import traceback

            traceback.print_exc()
            for r in [*self.decoding, *self.prefilling]:
                self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.waiting if r._cancelled]:
            self.waiting.remove(r)
            self._finish(r, "cancelled")
        for r in [r for r in (*self.decoding, *self.prefilling) if r._cancelled]:
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        while self.waiting and len(self.decoding) + len(self.prefilling) < self.max_batch_size:
            r = self.waiting.popleft()
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(r.prompt)
            free = [i for i, row in enumerate(self.rows) if row.owner is None]
            # the free row sharing the longest prefix; else the least recently used
            shared = {i: _common_prefix(self.rows[i].tokens, r.prompt, len(r.prompt) - 1) if self.prefix_cache else 0
                      for i in free}
            best = max(free, key=lambda i: (shared[i], self.rows[i].last_used if shared[i] else -self.rows[i].last_used))
            row = self.rows[best]
            row.tokens = row.tokens[: shared[best]]
            row.owner, row.last_used = r, next(self._clock)
            r.row, r.prefilled = best, shared[best]
            r.cached_tokens = shared[best]
            if r.cached_tokens:
                self.stats["prefix_cache_hits"] += 1
                self.stats["cached_prompt_tokens"] += r.cached_tokens
            self.prefilling.append(r)

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for r in list(self.prefilling):
            if budget <= 0:
                break
            p0 = r.prefilled
            chunk = r.prompt[p0: p0 + budget]
            budget -= len(chunk)
            x = row_forward(self.model, r.row, chunk, p0, self.device)
            self.rows[r.row].tokens.extend(chunk)
            r.prefilled += len(chunk)
            if r.prefilled == len(r.prompt):
                self.prefilling.remove(r)
                logits = self.model.logits(x[:, -1:])[:, -1]
                self._swap(r.row, len(self.decoding))
                self.decoding.append(r)
                self._emit(r, self._sample([r], logits)[0])

    def _decode(self) -> None:
        """One forward pass over the decoding rows: each row's last token and its drafted tokens."""
        D = len(self.decoding)
        drafts = self._drafts()
        T = 1 + max(map(len, drafts))
        B = _bucket(D, self.batch_sizes) if self.compiled else D
        if self.compiled and T > 1:
            T = 1 + self.draft_tokens
        tokens = torch.zeros(B, T, dtype=torch.long)
        pos = torch.full((B, T), self.capacity, dtype=torch.long)  # unused places: the scratch position
        longest = 0
        for i, r in enumerate(self.decoding):
            seq, n0 = [r.pending, *drafts[i]], len(self.rows[i].tokens)
            tokens[i, : len(seq)] = torch.tensor(seq)
            pos[i, : len(seq)] = torch.arange(n0, n0 + len(seq))
            longest = max(longest, n0 + len(seq))
        L = _bucket(longest, self._key_lengths()) if self.compiled else -(-longest // 64) * 64
        L = min(L, self.capacity + 1)
        tokens, pos = tokens.to(self.device), pos.to(self.device)
        mask = (torch.arange(L, device=self.device)[None, None, :] <= pos[:, :, None])[:, None]
        logits = self.step_fn(self.model, tokens, pos, mask)[:D]
        requests = list(self.decoding)
        if self.drafter is None:
            outs = [[t] for t in self._sample(requests, logits[:, 0])]
        else:
            outs = []
            for r, d, row_logits in zip(requests, drafts, logits):
                p = r.params
                accepted, nxt = accept(d, row_logits[: len(d) + 1], p.temperature, p.top_k, p.top_p, r.generator)
                self.stats["draft_tokens"] += len(d)
                self.stats["accepted_draft_tokens"] += len(accepted)
                outs.append(accepted + [nxt])
        for i, (r, out) in enumerate(zip(requests, outs)):
            # keys and values now held: the last token and the accepted guesses
            self.rows[i].tokens.extend([r.pending, *out[:-1]])
        self._recent.append((time.perf_counter(), sum(map(len, outs))))
        self.stats["decode_rows"] += D
        for r, out in zip(requests, outs):
            for t in out:
                self._emit(r, t)
                if r.finish_reason is not None:
                    break

    def _drafts(self) -> List[List[int]]:
        """The drafter's guesses for each decoding row: at most draft_tokens, and no more than the
        request may still generate (one token more comes with them) or its row can hold."""
        if self.drafter is None:
            return [[] for _ in self.decoding]
        limits = [max(0, min(self.draft_tokens, r.params.max_new_tokens - len(r.tokens) - 1,
                             self.capacity - 1 - len(self.rows[i].tokens)))
                  for i, r in enumerate(self.decoding)]
        contexts = [r.prompt + r.tokens for r in self.decoding]
        return [d[:k] for d, k in zip(self.drafter.propose(contexts, limits), limits)]

    def _key_lengths(self) -> List[int]:
        lengths, n = [], 256
        while n < self.capacity + 1:
            lengths.append(n)
            n *= 2
        return lengths + [self.capacity + 1]

    def _sample(self, requests: List[Request], logits: torch.Tensor) -> List[int]:
        tokens = logits.argmax(dim=-1)
        for i, r in enumerate(requests):
            p = r.params
            if p.temperature > 0:
                tokens[i] = sample(logits[i: i + 1], p.temperature, p.top_k, p.top_p, r.generator)[0]
        return tokens.tolist()

    # ---------------------------------------------------------------- tokens out

    def _emit(self, r: Request, token: int) -> None:
        p = r.params
        if r.first_token_time is None:
            r.first_token_time = time.perf_counter()
        if token in p.stop_ids:
            r.stop_id = token
            self._finish(r, "stop")
            return
        r.tokens.append(token)
        self.stats["generated_tokens"] += 1
        piece = ""
        if r.text_stream is not None:
            piece = r.text_stream.add(token)
            if r.text_stream.stopped:
                self._finish(r, "stop", piece=piece)
                return
        # the next token would be written at position len(prompt) + len(tokens) - 1
        if len(r.tokens) >= p.max_new_tokens or len(r.prompt) + len(r.tokens) >= self.capacity:
            self._finish(r, "length", piece=piece)
            return
        r.pending = token
        if r.on_update is not None:
            r.on_update(r, piece)

    def _finish(self, r: Request, reason: str, error: Optional[str] = None, piece: str = "") -> None:
        if r.finish_reason is not None:
            return
        if r in self.decoding:
            # the last decoding row takes its place: rows 0..D-1 stay the decoding ones
            i, last = r.row, len(self.decoding) - 1
            self._swap(i, last)
            self.decoding[i], self.decoding[last] = self.decoding[last], self.decoding[i]
            self.decoding.pop()
        elif r in self.prefilling:
            self.prefilling.remove(r)
        if r.row is not None:
            self.rows[r.row].owner = None
            self.rows[r.row].last_used = next(self._clock)
        r.row = None
        if reason in ("stop", "length") and r.text_stream is not None:
            piece += r.text_stream.flush()  # what was held back ("" after a stop string)
        r.finish_reason, r.error = reason, error
        self.stats[{"cancelled": "cancelled", "error": "failed"}.get(reason, "finished")] += 1
        if r.on_update is not None:
            r.on_update(r, piece)
        r.done.set()

    # ---------------------------------------------------------------- rows

    def _swap(self, a: int, b: int) -> None:
        """Exchange rows a and b: their keys and values in every layer and their bookkeeping."""
        if a == b:
            return
        n = max(len(self.rows[a].tokens), len(self.rows[b].tokens))
        if n:
            ab, ba = [a, b], [b, a]
            for cache in self.caches:
                for buf in (cache.k, cache.v):
                    buf[ab, :, :n] = buf[ba, :, :n]
        self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
        if self.drafter is not None:
            self.drafter.swap(a, b)
        for i in (a, b):
            if self.rows[i].owner is not None:
                self.rows[i].owner.row = i

    def metrics(self) -> Dict[str, float]:
        """Counters and gauges for a /metrics endpoint."""
        recent = list(self._recent)
        rate = 0.0
        if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
            rate = sum(n for _, n in recent[1:]) / (recent[-1][0] - recent[0][0])
        return {**self.stats, "requests_running": len(self.decoding) + len(self.prefilling),
                "requests_waiting": self.queued(), "tokens_per_second": rate}


def stream(engine: Engine, request: Request) -> Iterator[str]:
    """Submit `request` and step `engine` in this thread until it finishes, yielding its text as it
    comes. Stopped early (the caller closes the generator, e.g. on Ctrl-C), the request is cancelled
    and its row freed. A request that fails raises RuntimeError."""
    pieces: Deque[str] = deque()
    on_update = request.on_update
    request.on_update = lambda r, piece: (pieces.append(piece), on_update and on_update(r, piece))
    engine.submit(request)
    try:
        while request.finish_reason is None:
            engine.step()
            while pieces:
                piece = pieces.popleft()
                if piece:
                    yield piece
        while pieces:
            piece = pieces.popleft()
            if piece:
                yield piece
        if request.finish_reason == "error":
            raise RuntimeError(request.error)
    finally:
        if request.finish_reason is None:
            request.cancel()
            engine.step()


def speculation_summary(engine: Engine) -> str:
    """How the drafts fared, for a line on stderr."""
    s = engine.stats
    drafted, accepted = s["draft_tokens"], s["accepted_draft_tokens"]
    steps = max(1, s["decode_rows"])
    return (f"draft tokens accepted: {accepted}/{drafted} ({accepted / max(1, drafted):.0%}), "
            f"{(s['decode_rows'] + accepted) / steps:.2f} tokens per decode step")


def cache_row_bytes(model: LLaMA, max_seq_length: int) -> int:
    """Memory of one row of the engine's KV cache: keys and values of every layer, max_seq_length + 1
    positions (the scratch one included), in the dtype of the model's norms."""
    c = model.config
    itemsize = model.transformer.ln_f.weight.element_size()
    return 2 * c.n_layer * c.n_query_groups * (max_seq_length + 1) * c.head_size * itemsize


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= limit:
            break
        n += 1
    return n
