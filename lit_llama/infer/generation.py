"""Autoregressive generation: prefill, then one token at a time through the KV cache."""

import time
import types
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import torch

from lit_llama.io.checkpoint import release_mapped_pages
from lit_llama import cpu_kernels
from lit_llama.model import CausalSelfAttention, LLaMA, linear
from lit_llama.utils import UserError


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 means greedy; `generator`:
    the random numbers' source (default: torch's global one)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = sample_probs(logits, temperature, top_k, top_p)
    # exponential race instead of torch.multinomial: same distribution, no host-device sync
    return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(dim=-1)


def sample_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                 top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample` draws from (temperature > 0): softmax(logits / temperature) over the
    top_k most likely tokens and the nucleus of probability top_p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # nucleus: keep the most likely tokens until their probability sums to top_p (always >= 1)
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


@dataclass
class SamplingArgs:
    """How the answer is sampled.

    Args:
        max_new_tokens: the most tokens to generate (generation also stops at EOS, or at the chat
            template's stop).
        temperature: sampling temperature; 0 means greedy decoding.
        top_k: sample only among the k most likely tokens (none: all).
        top_p: sample only among the most likely tokens whose probabilities sum to top_p.
    """

    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: Optional[int] = 200
    top_p: float = 1.0

    def check(self) -> "SamplingArgs":
        check_sampling_args(self.max_new_tokens, self.temperature, self.top_k, self.top_p)
        return self


def check_sampling_args(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: float) -> None:
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")


def decode_step(model: LLaMA, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    return model(x, input_pos, last=True)[:, -1]


def compile_decode_step(device: torch.device) -> Callable:
    """decode_step compiled, for one model: each call returns a step with graphs of its own."""
    # one graph for every position: input_pos is a tensor, the KV cache has a fixed size.
    # On CUDA, CUDA graphs remove the launch overhead; on CPU, freezing folds the weights into the
    # graph as constants (inference only: the model must not change afterwards), and the C++
    # wrapper calls the step's ~450 kernels without a Python call each (the weight-only int8/int4
    # steps, whose products are library kernels, decoded 9% / 17% faster with it, fp32 the same, in
    # one timing run of the embedded model on a 2-core Xeon with AMX).
    if device.type == "cuda":
        return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    options = {"freezing": True, "cpp_wrapper": True}
    if hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe"):  # torch 2.8+ takes guard filters
        options["guard_filter_fn"] = _decode_guards
    return torch.compile(_own_copy(decode_step), fullgraph=True, dynamic=False, options=options)


def _own_copy(fn: Callable) -> Callable:
    """`fn` with a code object of its own: Dynamo keeps compiled graphs, and looks them up, per code
    object, so a step compiled from the copy holds the graphs of the one model it is used with."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# the model's tensors whose guards a compiled CPU step keeps (see _decode_guards)
_GUARDED_TENSORS = ("kv_cache", "['wte']", "['lm_head']", "['ln_f']", "_modules['h']._modules['0']._")


def _decode_guards(guards: list) -> List[bool]:
    """Which of the compiled step's guards to check before every call. Dynamo guards every module,
    hook dict, attribute and tensor of the model: ~4,700 checks took 1.5 ms of a 10 ms int8 step of
    the embedded model (AMD EPYC, 2 threads), and the ~430 weight tensors' checks alone 0.75 ms.
    A compiled step serves one model (a code object of its own: _own_copy) and freezing already
    requires a model that no longer changes, so of the model's guards only these are kept: the KV
    cache's tensors (its size, the batch: a new one compiles again), the config's values, and, so
    that a step given another model than its own compiles again rather than running the wrong
    graph, the tensors of the embedding, the head, the final norm and the first block. Everything
    outside the model is kept."""
    return [not g.name.startswith("model")
            or (g.guard_type == "TENSOR_MATCH" and any(t in g.name for t in _GUARDED_TENSORS))
            or (g.guard_type == "EQUALS_MATCH" and ".config." in g.name) for g in guards]


@torch.inference_mode()
def warm_up(model: LLaMA, step: Callable, device, length: int) -> float:
    """Run (and so compile) `step` once on a KV cache sized for `length` positions, so that the
    compilation is not counted in the first generation's speed; returns the seconds it took. The
    cache content it leaves is overwritten by the next prompt (positions are written before read)."""
    t0 = time.perf_counter()
    prepare_cache(model, length)
    step(model, torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))
    return time.perf_counter() - t0


class DecodeLinear(torch.nn.Linear):
    """nn.Linear whose product goes through `model.linear`, so that a compiled CPU decode step
    computes it as a fused reduction. Same parameters, same results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        return y if self.bias is None else y + self.bias


HALF_KERNEL_ROWS = 8  # rows of activations up to which half-precision products run dense_matvec


def half_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a bfloat16/float16 weight: a few rows (decoding) by lit_llama/csrc/dense_matvec.cpp
    on the row-major weight as it is (float32 accumulation), more (a prompt) by F.linear."""
    if x.numel() // x.size(-1) <= HALF_KERNEL_ROWS and not torch.compiler.is_compiling():
        y = torch.ops.lit_llama.dense_matvec(x.reshape(-1, x.size(-1)), w)
        return y.view(*x.shape[:-1], w.size(0)).to(x.dtype)
    return torch.nn.functional.linear(x, w)


class HalfLinear(torch.nn.Linear):
    """nn.Linear with a half-precision weight, multiplied by half_matmul (eager CPU decoding: the
    checkpoint's row-major weight read in place). Same parameters, same results to float32 rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return half_matmul(x, self.weight)


class HalfEmbedding(torch.nn.Embedding):
    """A tied half-precision embedding whose product as the head (LLaMA.logits) is half_matmul's."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return half_matmul(x, self.weight)


KERNEL_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


class DecodeAttention(CausalSelfAttention):
    """CausalSelfAttention whose one-query-per-row steps (decoding) run the CPU decode kernel
    (lit_llama/csrc/decode_attention.cpp), which reads only the cache slots the mask lets through;
    prompts (several queries) keep scaled_dot_product_attention. Same parameters, same results."""

    def attend(self, q, k, v, mask):
        if q.size(2) == 1 and mask is not None and q.device.type == "cpu" and k.dtype in KERNEL_CACHE_DTYPES:
            return torch.ops.lit_llama.decode_attention(q, k, v, mask)
        return super().attend(q, k, v, mask)


def decode_layout(model: torch.nn.Module, compiled: bool = False) -> torch.nn.Module:
    """Prepare the float matrices for CPU decoding, where at batch 1 every step is matrix-vector
    products bound by memory bandwidth (measured on AMD EPYC, see docs/benchmarks.md).

    compiled: the plain linear layers become DecodeLinear (their class is swapped in place, the
    parameters stay), whose row-major weights the compiled step streams as fused reductions.
    Eager: the wide matrices (more outputs than inputs: the fused QKV, the MLP's input projections,
    the head / tied embedding) are stored column-major, which MKL's x @ W.T streams 1.2-1.9x faster
    than row-major (and which the compiled reduction would stream 3x slower); same values and
    shapes, only the strides change, and the memory-mapped originals' pages are given back, so
    peak memory stays one model. Half-precision weights, where the CPU kernels are built, stay as
    they are (memory-mapped) instead: HalfLinear / HalfEmbedding multiply them row-major."""
    kernel = cpu_kernels.available()
    for module in model.modules():
        if kernel and type(module) is CausalSelfAttention:
            module.__class__ = DecodeAttention
        if compiled:
            if type(module) is torch.nn.Linear:
                module.__class__ = DecodeLinear
            continue
        if type(module) not in (torch.nn.Linear, torch.nn.Embedding):  # before reading `weight`: a
            continue  # quantized layer's is a property that dequantizes the whole matrix
        if kernel and module.weight.dtype in (torch.bfloat16, torch.float16) and module.weight.is_contiguous():
            module.__class__ = HalfLinear if type(module) is torch.nn.Linear else HalfEmbedding
            continue
        w = module.weight
        if w is not None and w.dim() == 2 and w.is_floating_point() and w.size(0) > w.size(1) and w.is_contiguous():
            old = w.data
            w.data = old.t().contiguous().t()
            release_mapped_pages(old)
    return model


def row_forward(model: LLaMA, row: int, chunk: Sequence[int], p0: int, device) -> torch.Tensor:
    """Hidden states (1, T, n_embd) of `chunk` written at positions p0.. of row `row` of the model's
    batched KV cache (the batched engine's rows; lit_llama/infer/engine.py). A chunk from position 0
    attends to itself only (the causal kernel); a later one also to the row's earlier keys."""
    T = len(chunk)
    idx = torch.tensor([list(chunk)], dtype=torch.long, device=device)
    pos = torch.arange(p0, p0 + T, device=device)[None]
    mask = None if p0 == 0 else (torch.arange(p0 + T, device=device)[None, :] <= pos[0, :, None])[None, None]
    caches = [block.attn.kv_cache for block in model.transformer.h]
    for cache in caches:
        cache.first_row = row
    try:
        return model.hidden_states(idx, pos, mask=mask)
    finally:
        for cache in caches:
            cache.first_row = 0


def prepare_cache(model: LLaMA, length: int, batch_size: int = 1) -> None:
    """Give every layer a KV cache of at least `length` positions (rounded up so that small changes
    in prompt length reuse the cache and the compiled graph)."""
    length = min(model.config.block_size, 256 * -(-length // 256))
    cache = model.transformer.h[0].attn.kv_cache
    if cache is None or cache.k.size(2) < length or cache.k.size(0) != batch_size:
        model.set_kv_cache(batch_size, length)


@torch.inference_mode()
def generate(model: LLaMA, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             step: Callable = decode_step) -> Iterator[int]:
    """Yield up to `max_new_tokens` token ids after `prompt` (1-D), stopping after a stop id (not
    yielded) or at the end of the context. `step` is `decode_step`, possibly compiled."""
    T = prompt.numel()
    if T >= model.config.block_size:
        raise UserError(f"the prompt has {T} tokens; the model's context is {model.config.block_size}")
    max_new_tokens = min(max_new_tokens, model.config.block_size - T)
    prepare_cache(model, T + max_new_tokens)
    device = prompt.device
    logits = model(prompt[None], torch.arange(T, device=device), last=True)[:, -1]
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p)
        t = int(token.item())
        if t in stop_ids:
            return
        yield t
        if i + 1 < max_new_tokens:
            logits = step(model, token.view(1, 1), torch.tensor([T + i], device=device))


class TextStream:
    """Turns generated token ids into text pieces, as they arrive, and stops at a stop string.

    The whole sequence is decoded each time and the new suffix emitted (SentencePiece spaces and
    multi-byte characters stay right); text that could be the beginning of a stop string is held
    back until it is clear it is not one, so a stop string is never shown, even in part."""

    def __init__(self, decode: Callable[[list], str], stop_strings: Sequence[str] = ()):
        self.decode = decode
        self.stops = [s for s in stop_strings if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.ids: List[int] = []
        self.text = ""  # the answer so far, stop string excluded
        self._emitted = 0
        self.stopped = False  # a stop string was found

    def add(self, token: int) -> str:
        """The text that can be shown after `token` ("" if none yet); sets `stopped` at a stop string."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            return ""
        safe = len(text)
        if self.stops:
            start = max(0, self._emitted - self.longest)
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(text[: min(hits)], min(hits))
            safe -= max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._emit(text, safe)

    def _emit(self, text: str, upto: int) -> str:
        piece = text[self._emitted: upto] if upto > self._emitted else ""
        self._emitted = max(self._emitted, upto)
        self.text = text[: self._emitted]
        return piece

    def flush(self) -> str:
        """What was held back, at the end of generation (nothing after a stop string)."""
        if self.stopped or not self.ids:
            return ""
        text = self.decode(self.ids)
        return self._emit(text, len(text))


def stream_text(decode: Callable[[list], str], tokens: Iterable[int], stop_strings: Sequence[str] = ()) -> Iterator[str]:
    """Text pieces as tokens arrive, ending before the first stop string (TextStream's rules)."""
    stream = TextStream(decode, stop_strings)
    for t in tokens:
        piece = stream.add(t)
        if piece:
            yield piece
        if stream.stopped:
            return
    rest = stream.flush()
    if rest:
        yield rest
