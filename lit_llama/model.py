"""The LLaMA model in one file.

Pre-norm decoder (RMSNorm), rotary position embeddings, SwiGLU MLP, grouped-query attention
through ``scaled_dot_product_attention`` (Flash kernels where the device has them), optional tied
embeddings and linear biases, and a preallocated KV cache for generation. Names follow nanoGPT /
the LLaMA paper.
"""

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    name: str = ""
    block_size: int = 2048  # the longest context the model was trained for
    vocab_size: int = 32000  # tokens the tokenizer knows
    padding_multiple: int = 64  # the embedding is padded to this multiple: faster matmuls on GPUs
    padded_vocab_size: Optional[int] = None
    n_layer: int = 32
    n_head: int = 32
    n_embd: int = 4096
    n_query_groups: Optional[int] = None  # key/value heads; < n_head is grouped-query attention
    head_size: Optional[int] = None  # None: n_embd // n_head; some models set head_dim apart from it
    intermediate_size: Optional[int] = None  # MLP hidden size; None: LLaMA's formula below
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    rope_base: float = 10000.0
    # None: plain RoPE; else {"type": "linear" | "dynamic" | "llama3" | "yarn", "factor": f, ...} (see rope_frequencies)
    rope_scaling: Optional[dict] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and the output projection (HF's attention_bias)
    mlp_bias: bool = False  # biases on the MLP's three matrices (HF's mlp_bias)

    def __post_init__(self):
        if self.padded_vocab_size is None:
            m = self.padding_multiple
            self.padded_vocab_size = m * math.ceil(self.vocab_size / m)
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if (self.head_size is None and self.n_embd % self.n_head) or self.n_head % self.n_query_groups:
            raise ValueError(f"n_embd ({self.n_embd}), n_head ({self.n_head}) and n_query_groups "
                             f"({self.n_query_groups}) must divide each other")
        if self.head_size is None:
            self.head_size = self.n_embd // self.n_head
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
            self.rope_scaling = dict(self.rope_scaling)  # a copy: configs made from one registry entry share none
        if self.intermediate_size is None:
            # LLaMA: 2/3 of 4*dim (SwiGLU has three matrices), scaled, rounded up to `multiple_of`
            hidden = int(2 * 4 * self.n_embd / 3)
            if self.ffn_dim_multiplier is not None:
                hidden = int(self.ffn_dim_multiplier * hidden)
            self.intermediate_size = self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "Config":
        if name not in configs:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(configs)}")
        return cls(**{**configs[name], **overrides})

    def asdict(self) -> dict:
        return asdict(self)


def llama3_scaling(factor: float) -> dict:
    return dict(type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)


LLAMA3 = dict(block_size=131072, vocab_size=128256, n_query_groups=8, rope_base=500000.0)

# the registry keeps only what is given, so that from_name's overrides re-derive the rest
configs = {c["name"]: c for c in [
    # LLaMA (Touvron et al. 2023), Table 2
    dict(name="7B", n_layer=32, n_head=32, n_embd=4096, norm_eps=1e-6),
    dict(name="13B", n_layer=40, n_head=40, n_embd=5120, norm_eps=1e-6),
    dict(name="30B", n_layer=60, n_head=52, n_embd=6656, norm_eps=1e-6),
    dict(name="65B", n_layer=80, n_head=64, n_embd=8192, norm_eps=1e-6),
    # Llama 2: longer context; 70B has grouped-query attention with 8 key/value heads
    dict(name="Llama-2-7b", block_size=4096, n_layer=32, n_head=32, n_embd=4096),
    dict(name="Llama-2-13b", block_size=4096, n_layer=40, n_head=40, n_embd=5120),
    dict(name="Llama-2-70b", block_size=4096, n_layer=80, n_head=64, n_embd=8192, n_query_groups=8,
         ffn_dim_multiplier=1.3, multiple_of=4096),
    # Llama 3 (Grattafiori et al. 2024): a 128256-token vocabulary, 8 key/value heads, RoPE base 5e5
    # stretched from 8192 to 131072 positions by the "llama3" scaling; 3.2's small models are tied
    dict(name="Llama-3.2-1B", **LLAMA3, n_layer=16, n_head=32, n_embd=2048, intermediate_size=8192,
         rope_scaling=llama3_scaling(32.0), tie_embeddings=True),
    dict(name="Llama-3.2-3B", **LLAMA3, n_layer=28, n_head=24, n_embd=3072, intermediate_size=8192,
         rope_scaling=llama3_scaling(32.0), tie_embeddings=True),
    dict(name="Llama-3.1-8B", **LLAMA3, n_layer=32, n_head=32, n_embd=4096, intermediate_size=14336,
         rope_scaling=llama3_scaling(8.0)),
    dict(name="Llama-3.1-70B", **LLAMA3, n_layer=80, n_head=64, n_embd=8192, intermediate_size=28672,
         rope_scaling=llama3_scaling(8.0)),
    # Code Llama: Llama 2 trained on 16k-token code contexts with RoPE base 1e6, 16 extra tokens (infilling)
    dict(name="CodeLlama-7b", block_size=16384, vocab_size=32016, padding_multiple=16, n_layer=32, n_head=32,
         n_embd=4096, intermediate_size=11008, rope_base=1e6),
    # TinyLlama: Llama 2's architecture at 1.1B with 4 key/value heads
    dict(name="TinyLlama-1.1B", block_size=2048, n_layer=22, n_head=32, n_embd=2048, n_query_groups=4,
         intermediate_size=5632),
    # SmolLM2: small LLaMA-architecture models with tied embeddings
    dict(name="SmolLM2-135M", block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_embd=576,
         n_query_groups=3, intermediate_size=1536, rope_base=100000.0, tie_embeddings=True),
    dict(name="SmolLM2-360M", block_size=8192, vocab_size=49152, n_layer=32, n_head=15, n_embd=960,
         n_query_groups=5, intermediate_size=2560, rope_base=100000.0, tie_embeddings=True),
    # tiny models for tests and smoke runs
    dict(name="tiny", block_size=256, vocab_size=500, n_layer=2, n_head=4, n_embd=64, intermediate_size=176),
    dict(name="tiny-gqa", block_size=256, vocab_size=500, n_layer=2, n_head=4, n_embd=64, n_query_groups=2,
         intermediate_size=176, tie_embeddings=True),
]}


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 like the reference."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# the keys each kind of rope_scaling needs, besides "type"
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
# and those it may have (transformers' names and defaults)
YARN_OPTIONAL_KEYS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


def check_rope_scaling(scaling: dict) -> None:
    kind = scaling.get("type")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope scaling {kind!r} is not supported; supported: {', '.join(ROPE_SCALING_KEYS)}")
    missing = [k for k in ROPE_SCALING_KEYS[kind] if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ValueError(f"rope scaling {kind!r} lacks {', '.join(missing)}")


def rope_frequencies(pos: torch.Tensor, config: Config) -> torch.Tensor:
    """The rotation frequency of each pair of a head, theta_i = base^(-2i/d), float32 (d/2,), rescaled
    to stretch a model's context past the one it was trained for as `config.rope_scaling` says:

      linear   every frequency divided by the factor: positions interpolated (Chen et al. 2023)
      dynamic  "NTK-aware": the base grows with the longest position in `pos` once past the original
               context, base (f L / L0 - (f - 1))^(d / (d - 2)), so the lowest frequency is slowed f-fold
      llama3   low frequencies (wavelengths past L0 / low_freq_factor) divided by the factor, high ones
               (below L0 / high_freq_factor) kept, those between blended linearly in L0 / wavelength
      yarn     (Peng et al. 2023) pairs turning more than beta_fast (32) times in L0 kept, fewer than
               beta_slow (1) times divided by the factor, those between blended linearly by pair index;
               the attention is sharpened too (yarn_attention_factor)
    """
    d, base = config.head_size, config.rope_base
    scaling = config.rope_scaling or {}
    kind, factor = scaling.get("type"), scaling.get("factor", 1.0)
    exponents = torch.arange(0, d, 2, device=pos.device).float() / d
    if kind == "dynamic":  # tensor arithmetic, not int(pos.max()): no sync, nothing for a compiled step to break on
        length = pos.max().float() + 1
        stretch = (factor * length / scaling["original_max_position_embeddings"] - (factor - 1)).clamp(min=1)
        base = base * stretch ** (d / (d - 2))
    inv_freq = 1.0 / (base ** exponents)
    if kind == "linear":
        inv_freq = inv_freq / factor
    elif kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        periods_in_context = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
        smooth = ((periods_in_context - low) / (high - low)).clamp(0, 1)  # 0: scaled, 1: kept
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif kind == "yarn":
        # the pair index at which a frequency turns r times in L0 positions: d ln(L0 / 2 pi r) / (2 ln base)
        pair = lambda r: d * math.log(scaling["original_max_position_embeddings"] / (2 * math.pi * r)) / (2 * math.log(base))
        low, high = pair(scaling.get("beta_fast") or 32), pair(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        ramp = ((torch.arange(d // 2, device=pos.device).float() - low) / ((high - low) or 0.001)).clamp(0, 1)
        inv_freq = ramp * inv_freq / factor + (1 - ramp) * inv_freq  # ramp 0: kept, 1: scaled
    return inv_freq


def yarn_attention_factor(scaling: dict) -> float:
    """YaRN's scale of cos and sin (so of the attention logits, squared): 0.1 ln(factor) + 1 (its
    paper's sqrt(1/t)), or mscale / mscale_all_dim variants of it, unless the config gives it."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    f = scaling["factor"]
    m = lambda mscale: 1.0 if f <= 1 else 0.1 * mscale * math.log(f) + 1.0
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return m(scaling["mscale"]) / m(scaling["mscale_all_dim"])
    return m(1.0)


def rope_cos_sin(pos: torch.Tensor, config: Config, dtype: torch.dtype):
    """cos and sin of the rotary angles for positions `pos`, shape (len(pos), head_size).

    Computed per call from the positions: no cache to build, move or resize, and cheap next to the
    matmuls (one outer product; a compiled step folds the frequencies into constants)."""
    freqs = pos.float()[:, None] * rope_frequencies(pos, config)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    a = yarn_attention_factor(config.rope_scaling) if (config.rope_scaling or {}).get("type") == "yarn" else 1.0
    return (emb.cos() * a).to(dtype), (emb.sin() * a).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotates the two halves of each head (the Hugging Face layout); Meta's and GGUF's
    # interleaved-pair layout is permuted into this one by the converters
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Keys and values of past positions, preallocated so decoding allocates nothing per token.

    With one row of positions per sequence (input_pos (B, T)), the batch is the cache's rows
    first_row .. first_row + B - 1 and each row is written at its own positions: the batched engine
    (lit_llama/infer/engine.py) keeps many sequences of different lengths in one cache this way.

    dtype int8 keeps each head's key and value at each position as 8-bit codes with one float32
    scale, max|x| / 127 (as llama.cpp's -ctk q8_0, per head and position): a row of head_size + 4
    int8, the scale's bytes last, so that slicing positions or rows slices both (dequantize_kv)."""

    def __init__(self, batch_size: int, n_groups: int, max_seq_length: int, head_size: int,
                 device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_groups, max_seq_length, head_size + (4 if dtype == torch.int8 else 0))
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.first_row = 0

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.k.dtype == torch.int8:
            k, v = quantize_kv(k), quantize_kv(v)
        if input_pos.dim() == 1:  # every row at the same positions
            self.k.index_copy_(2, input_pos, k)
            self.v.index_copy_(2, input_pos, v)
            return self.k, self.v
        rows = slice(self.first_row, self.first_row + k.size(0))
        k_rows, v_rows = self.k[rows], self.v[rows]
        b = torch.arange(k.size(0), device=k.device)[:, None]
        k_rows[b, :, input_pos] = k.transpose(1, 2)
        v_rows[b, :, input_pos] = v.transpose(1, 2)
        return k_rows, v_rows


def quantize_kv(x: torch.Tensor) -> torch.Tensor:
    """Rows (..., D) as int8 rows (..., D + 4): codes round(x / s), s = max|x| / 127, then s's bytes."""
    s = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-30)
    q = torch.round(x.float() / s).to(torch.int8)
    return torch.cat((q, s.view(torch.int8)), dim=-1)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize_kv, in `dtype`: codes times their row's scale."""
    return (x[..., :-4].to(dtype) * x[..., -4:].contiguous().view(torch.float32).to(dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        hs = config.head_size
        # one fused matmul for queries, keys and values: rows (and biases) are [q (n_head) | k (groups) | v (groups)]
        qkv = (config.n_head + 2 * config.n_query_groups) * hs
        self.c_attn = nn.Linear(config.n_embd, qkv, bias=config.attention_bias)
        self.c_proj = nn.Linear(config.n_head * hs, config.n_embd, bias=config.attention_bias)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        B, T, _ = x.shape
        c = self.config
        hs = c.head_size
        q, k, v = self.c_attn(x).split([c.n_head * hs, c.n_query_groups * hs, c.n_query_groups * hs], dim=-1)
        q = apply_rope(q.view(B, T, c.n_head, hs).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(B, T, c.n_query_groups, hs).transpose(1, 2), cos, sin)
        v = v.view(B, T, c.n_query_groups, hs).transpose(1, 2)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.set_kv_cache() first")
            k_all, v_all = self.kv_cache.update(input_pos, k, v)
            if mask is not None:  # attend over the cache (its first mask.size(-1) positions); without
                # a mask, a fresh prompt sees only itself
                k, v = k_all[:, :, : mask.size(-1)], v_all[:, :, : mask.size(-1)]
        y = self.attend(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, c.n_head * hs))

    def attend(self, q, k, v, mask):
        # with no mask the attention is plainly causal, which lets SDPA pick Flash kernels
        if k.dtype == torch.int8:  # an int8 cache's rows, read back for this product
            k, v = dequantize_kv(k, q.dtype), dequantize_kv(v, q.dtype)
        gqa = self.config.n_query_groups != self.config.n_head
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): c_proj(silu(c_fc1 x) * c_fc2 x); Meta's w1, w3, w2."""

    def __init__(self, config: Config):
        super().__init__()
        self.c_fc1 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.c_fc2 = nn.Linear(config.n_embd, config.intermediate_size, bias=config.mlp_bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.silu(self.c_fc1(x)) * self.c_fc2(x))


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.rms_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.rms_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        x = x + self.attn(self.rms_1(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.rms_2(x))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T. In a compiled CPU graph with a single row (batch-1 decoding) a row-major weight
    is multiplied and summed instead: inductor fuses that into one vectorized, multi-threaded
    reduction that streams the weight at close to memory bandwidth, about twice as fast as the BLAS
    matrix-vector product here (see docs/benchmarks.md). Everywhere else it is F.linear."""
    if (torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.size(-1)
            and weight.stride(-1) == 1):
        return (x.unsqueeze(-2) * weight).sum(-1)
    return F.linear(x, weight)


class LLaMA(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        ))
        # tied embeddings reuse wte in forward: one tensor, one key in the state dict
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # the KV cache's dtype when set_kv_cache is given none (None: the weights'; torch.int8: see KVCache)
        self.kv_cache_dtype: Optional[torch.dtype] = None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None, last: bool = False) -> torch.Tensor:
        """Logits for token ids `idx` (B, T). With `input_pos` (T,), the positions of `idx`, the KV
        cache is read and filled; without it, a plain causal forward pass (training). `last`: only
        the last position's logits (B, 1, V), all that generation needs: the head over every
        position of a prompt would be a fifth of its compute on a small model."""
        x = self.hidden_states(idx, input_pos)
        return self.logits(x[:, -1:] if last else x)

    def hidden_states(self, idx: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                      positions: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The final-norm hidden states (B, T, n_embd), for heads other than the vocabulary (reward
        and value heads). `positions` (B, T) and `mask` (B, 1, T, keys; True: attend) replace the
        rotary positions and the causal mask where rows differ, e.g. left-padded rows that count
        from their first real token and must not see their padding."""
        T = idx.size(1)
        c = self.config
        if input_pos is None:
            if T > c.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the context ({c.block_size})")
            pos = torch.arange(T, device=idx.device)
        else:
            pos = input_pos
            # a prompt written from position 0 attends causally to its own keys only (the rest of the
            # cache is empty): the plain causal kernel, not a masked pass over every cache slot
            fresh_prompt = input_pos.dim() == 2 or (T > 1 and positions is None and int(input_pos[0]) == 0
                                                    and int(input_pos[-1]) == T - 1)
            if mask is None and not fresh_prompt:
                kv_len = self.transformer.h[0].attn.kv_cache.k.size(2)
                mask = pos[:, None] >= torch.arange(kv_len, device=idx.device)[None, :]
        pos = pos if positions is None else positions
        x = self.transformer.wte(idx)
        cos, sin = rope_cos_sin(pos.flatten(), c, x.dtype)
        if pos.dim() == 2:  # one row of positions per sequence: broadcast over the heads
            cos, sin = cos.view(pos.size(0), 1, T, -1), sin.view(pos.size(0), 1, T, -1)
        for block in self.transformer.h:
            x = block(x, cos, sin, mask, input_pos)
        return self.transformer.ln_f(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # the padding rows are never a valid token: skip them (and return a fresh tensor, not a view)
        head = self.transformer.wte if self.lm_head is None else self.lm_head
        if hasattr(head, "matmul"):  # packed integers (quantize/gptq.py): multiplied without a float copy
            return head.matmul(x)[..., : self.config.vocab_size].contiguous()
        return linear(x, head.weight[: self.config.vocab_size])

    def set_kv_cache(self, batch_size: int, max_seq_length: Optional[int] = None, device=None, dtype=None) -> None:
        max_seq_length = max_seq_length or self.config.block_size
        if device is None or dtype is None:
            w = self.transformer.ln_f.weight  # not wte's: a packed embedding would dequantize for it
            device, dtype = device or w.device, dtype or self.kv_cache_dtype or w.dtype
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, self.config.n_query_groups, max_seq_length,
                                          self.config.head_size, device, dtype)

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None
