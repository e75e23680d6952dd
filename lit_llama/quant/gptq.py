"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): quantize each linear layer's weights to 4 or 3 bits
one input column at a time, pushing every column's rounding error onto the columns not yet
quantized so that the layer's outputs on calibration data change as little as possible; and
round-to-nearest (RTN) at the same bits and groups, for comparison.

For a layer W (rows: outputs, columns: inputs) whose inputs on the calibration data are x:
  H = 2/n Σ x xᵀ, the Hessian of the output error ||W x - Q x||² in the weights of a row.
  A column whose input is always zero is dead: its weights never matter; they are set to 0.
  H is damped by 1% of its mean diagonal (well conditioned), and U is the upper Cholesky factor of
  H⁻¹: row i of U gives how the remaining columns must move to compensate an error in column i
  once the columns before i are fixed (the paper's Cholesky reformulation of OBQ's updates).
  Column i: q = quant(w_i), err = (w_i - q) / U[i, i], w_j -= err · U[i, j] for the later j.
  The updates are applied at once inside a batch of 128 columns and, lazily, as one matmul to the
  columns after it (the same result, far fewer memory passes).
  Groups: each run of `groupsize` columns gets its own scale and zero point, computed from its
  columns as they are when the group starts (after the updates of the columns before it).
  Act-order: columns in order of decreasing H[i, i] (the most active inputs first).
The quantizer is asymmetric min-max: the range [min(w, 0), max(w, 0)] of a row (or group) in
2^bits - 1 steps, scale = (max - min) / (2^bits - 1), zero = round(-min / scale).

The model is quantized block by block (a model larger than memory stays memory-mapped and only one
block is on the device): the calibration windows' hidden states enter a block; within it the layers
are quantized in the order the data flows (attention input, attention output, MLP input, MLP
output: "true sequential"), each from inputs computed with the layers before it already quantized;
the quantized block's outputs are the next block's inputs.

Why one file: the algorithm above, the calibration data it needs and the layer-by-layer driver are
one procedure, in the paper's order.
"""

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from pydoc_data.topics import topics  # the default calibration text (standard library)

from lit_llama.data.instruction import load_instruction_data
from lit_llama.io.checkpoint import (ShardedWriter, copy_tokenizer_files, load_model, read_quantization,
                                     release_mapped_pages, validate_checkpoint_dir, write_config)
from lit_llama.model import rope_cos_sin
from lit_llama.quant.packed import HEAD_BITS, PackedLinear, check_packed_shape, dequantize_ints, unpermute_columns
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError, atomic_dir

# the linear layers of a block in the order the data reaches them; layers of one entry share inputs
SEQUENTIAL = (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc1", "mlp.c_fc2"), ("mlp.c_proj",))
METHODS = ("gptq", "rtn")
# The MLP's down projection: its input, the SwiGLU hidden units, has statistics of the calibration
# text's kind, so GPTQ's error feedback there fits that kind and not another (on the embedded model,
# calibrated on Python's docs: its output error on license texts 0.23 of the output's energy, RTN's
# 0.29, and 0.08 when calibrated on the license texts themselves, which then lose on the docs);
# quantize/gptq.py gives it more bits (--down_bits), as llama.cpp's Q4_K_M does ffn_down.
DOWN = "mlp.c_proj"
DEFAULT_SINK_SHARE = 1 / 8  # quantize/gptq.py's --sink_share (sink_weights)


# ---------------------------------------------------------------- quantizer


def minmax_params(w: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (rows,) of the asymmetric min-max quantizer for each row of w. The scale
    is rounded to float16, as it is stored, so that quantization uses the value inference will."""
    maxq = 2 ** bits - 1
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    flat = (lo == 0) & (hi == 0)  # an all-zero row: any scale represents it
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    fp16 = torch.finfo(torch.float16)
    scale = ((hi - lo) / maxq).clamp(2.0 ** -24, fp16.max).half().float()
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


@dataclass
class QuantizedWeight:
    """Integer codes q (rows, cols) with columns in stored order (`perm` order with act-order),
    float16 scales and integer zeros (rows, groups) for groups of `groupsize` columns."""
    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    groupsize: int
    perm: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        """The quantized weight (rows, cols) in float32, columns in the layer's own order."""
        w = dequantize_ints(self.q, self.scales, self.zeros, self.groupsize, torch.float32)
        return unpermute_columns(w, self.perm)

    def to_layer(self) -> PackedLinear:
        return PackedLinear.from_ints(self.q.to(torch.uint8), self.scales.half(), self.zeros, self.bits,
                                      self.groupsize, self.perm)


# ---------------------------------------------------------------- one layer


def _groupsize(groupsize: int, cols: int) -> int:
    return cols if groupsize == -1 or groupsize > cols else groupsize


def rtn(W: torch.Tensor, bits: int, groupsize: int = 128) -> QuantizedWeight:
    """Round each weight to the nearest level of its row's (or group's) min-max grid."""
    W = W.float()
    rows, cols = W.shape
    gs = _groupsize(groupsize, cols)
    q = torch.empty_like(W)
    scales, zeros = [], []
    for g0 in range(0, cols, gs):
        scale, zero = minmax_params(W[:, g0:g0 + gs], bits)
        q[:, g0:g0 + gs] = quantize(W[:, g0:g0 + gs], scale[:, None], zero[:, None], 2 ** bits - 1)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(q, torch.stack(scales, 1), torch.stack(zeros, 1), bits, gs)


class Hessian:
    """H = 2/n Σ c x xᵀ over the rows x of every input seen, kept as a running weighted mean: each
    row counts c times (1 unless `weights` says), n = Σ c."""

    def __init__(self, columns: int, device=None):
        self.H = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.n = 0.0

    def add(self, x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        """x (..., columns); weights broadcast against x's leading dimensions (e.g. (seqlen,))."""
        c = torch.ones(x.shape[:-1], device=x.device) if weights is None else weights.to(x.device).expand(x.shape[:-1])
        x, c = x.reshape(-1, x.size(-1)).float(), c.reshape(-1, 1).float()
        total = c.sum().item()
        self.H *= self.n / (self.n + total)
        self.n += total
        x = x * (c * 2 / self.n).sqrt()
        self.H += x.T @ x


def sink_weights(x: torch.Tensor, sink_share: float, massive: float = 20.0) -> Optional[torch.Tensor]:
    """Weights (1, seqlen) of the positions of one calibration window, from its block input x
    (1, seqlen, n_embd): the attention sinks, its first position and any whose hidden state is
    massive (norm above `massive` times the window's median), carry `sink_share` of the window's
    weight together; the other positions 1 each. None (all 1) when sink_share is 0.

    Why: a LLaMA turns the first token of any window (and at times the one after it) into an
    attention sink: hidden states 100x the others' in a few dimensions, attended by every later
    query. By count it is 1/seqlen of the tokens, so GPTQ, which minimizes the error summed over
    tokens, pushes rounding error into exactly the directions only the sink uses; its keys and
    values then go wrong, and with them every position's attention. Measured on SmolLM2-135M
    (calibration 64 x 256): GPTQ's QKV output error at the first position 8x RTN's in layers 12-24,
    and worse with 2,048-token windows, where the sink is rarer. A fixed share keeps the sinks'
    weight independent of the window length."""
    T = x.size(1)
    if not sink_share or T < 2:
        return None
    norms = x.detach().float().norm(dim=-1)
    sink = norms > massive * norms.median()
    sink[:, 0] = True
    k = int(sink.sum())
    w = torch.ones_like(norms)
    w[sink] = sink_share * (T - k) / (1 - sink_share) / k
    return w


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)⁻¹, damp = percdamp * mean(diag H). `H` is modified."""
    H.diagonal().add_(percdamp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if info.item() == 0:
            return U
    raise UserError(f"GPTQ: a layer's Hessian is not positive definite even with {percdamp:.0%} dampening "
                    "(too few or degenerate calibration tokens?); raise --percdamp or add calibration data")


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, groupsize: int = 128, act_order: bool = False,
         blocksize: int = 128, percdamp: float = 0.01) -> QuantizedWeight:
    """GPTQ for one layer: W (rows, cols), H (cols, cols) from Hessian. Neither is modified."""
    W, H = W.float().clone(), H.float().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_hessian_factor(H, percdamp)
    gs = _groupsize(groupsize, cols)
    # transposed, so that a column of W is a contiguous row: three times faster on CPUs
    Wt, Qt = W.T.contiguous(), torch.zeros(cols, rows, device=W.device)
    scales, zeros = W.new_zeros(-(-cols // gs), rows), W.new_zeros(-(-cols // gs), rows)
    # every group starts a batch, so a group's parameters see all the updates before it
    starts = sorted(set(range(0, cols, blocksize)) | set(range(0, cols, gs)))
    for i1, i2 in zip(starts, starts[1:] + [cols]):
        g = i1 // gs
        if i1 % gs == 0:
            scales[g], zeros[g] = minmax_params(Wt[i1:i1 + gs].T, bits)
        err = _quantize_batch(Wt[i1:i2], Qt[i1:i2], U[i1:i2, i1:i2], scales[g], zeros[g], 2 ** bits - 1)
        Wt[i2:].addmm_(U[i1:i2, i2:].T, err, alpha=-1)  # the lazy update of all later columns
    return QuantizedWeight(Qt.T, scales.T, zeros.T, bits, gs, perm)


def _quantize_batch(W1: torch.Tensor, Q1: torch.Tensor, U1: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize the columns W1 (batch, rows: transposed) in place, codes into Q1, with error feedback
    inside the batch; returns the scaled errors (batch, rows) for the update of the later columns."""
    err = torch.empty_like(W1)
    for i in range(W1.size(0)):
        w = W1[i]
        q = quantize(w, scale, zero, maxq)
        Q1[i] = q
        e = (w - scale * (q - zero)) / U1[i, i]
        W1[i:].addr_(U1[i, i:], e, alpha=-1)
        err[i] = e
    return err


# ---------------------------------------------------------------- calibration data


def default_calibration_text() -> str:
    """Python's own reference documentation (pydoc_data.topics): English prose with code, offline."""
    return "\n\n".join(topics.values())


def calibration_tokens(tokenizer, text_file: Optional[Path] = None, data_dir: Optional[Path] = None,
                       checkpoint_dir: Optional[Path] = None) -> torch.Tensor:
    """One stream of token ids: a text file, the examples of a prepared dataset (scripts/prepare_*.py)
    one after another, or the default text."""
    if text_file is not None and data_dir is not None:
        raise UserError("pass --text_file or --data_dir, not both")
    if data_dir is not None:
        train, _, _ = load_instruction_data(data_dir, checkpoint_dir)
        return torch.cat([torch.as_tensor(e["input_ids"]) for e in train])
    if text_file is not None:
        text_file = Path(text_file)
        if not text_file.is_file():
            raise UserError(f"--text_file {text_file} does not exist")
        text = text_file.read_text(encoding="utf-8", errors="replace")
    else:
        text = default_calibration_text()
    return tokenizer.encode(text)


def sample_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` windows (nsamples, seqlen) at random positions of the stream, as GPTQ samples C4."""
    n = tokens.numel()
    if nsamples < 1 or seqlen < 2:
        raise UserError(f"--nsamples must be at least 1 and --seqlen at least 2, got {nsamples} and {seqlen}")
    if n < seqlen:
        raise UserError(f"the calibration text has {n} tokens, fewer than one window of {seqlen}: "
                        "pass a longer text or a smaller --seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen) for _ in range(nsamples)]
    return torch.stack([tokens[s:s + seqlen] for s in starts])


# ---------------------------------------------------------------- the whole model, block by block


class _Captured(Exception):
    """Raised by the capture hook with the layer's input, to end the forward pass there."""


@torch.no_grad()
def input_hessian(block: nn.Module, name: str, inputs: List[torch.Tensor],
                  rope: Tuple[torch.Tensor, torch.Tensor], weights: Optional[List] = None) -> Hessian:
    """The Hessian of the inputs that layer `name` of `block` receives from `inputs` (the positions
    of input i weighted by weights[i], None for all 1); each forward pass ends as soon as the layer
    has its input (the rest of the block is not needed)."""
    layer = block.get_submodule(name)
    hessian = Hessian(layer.in_features, device=inputs[0].device)

    def record(module, args):
        raise _Captured(args[0])

    handle = layer.register_forward_pre_hook(record)
    try:
        for x, w in zip(inputs, weights or [None] * len(inputs)):
            try:
                block(x, *rope)
            except _Captured as captured:
                hessian.add(captured.args[0], w)
    finally:
        handle.remove()
    return hessian


@dataclass
class GPTQSettings:
    method: str = "gptq"
    bits: int = 4
    groupsize: int = 128
    act_order: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    head_bits: Optional[int] = None  # None: the embedding and head stay float
    down_bits: Optional[int] = None  # bits of the MLP's down projections (DOWN); None: `bits`
    sink_share: float = DEFAULT_SINK_SHARE  # the Hessian weight of the attention sinks of each window (sink_weights)

    def __post_init__(self):
        # act-order orders columns by the Hessian: round-to-nearest has none (and writes no perm)
        self.act_order = self.act_order and self.method == "gptq"

    def check(self, model: nn.Module) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name, layer in model.transformer.h[0].named_modules():
            if type(layer) is nn.Linear:
                check_packed_shape(layer.in_features, self.bits, self.groupsize, name)
        if self.head_bits is not None:
            check_packed_shape(model.config.n_embd, self.head_bits, self.groupsize, "head", HEAD_BITS, "--head_bits")
        if self.down_bits is not None:
            check_packed_shape(model.config.intermediate_size, self.down_bits, self.groupsize, DOWN, HEAD_BITS,
                               "--down_bits")
        if not 0 <= self.percdamp < 1:
            raise UserError(f"--percdamp must be in [0, 1), got {self.percdamp}")
        if not 0 <= self.sink_share < 1:
            raise UserError(f"--sink_share must be in [0, 1), got {self.sink_share}")

    def entry(self) -> dict:
        """The checkpoint config's `quantization` entry."""
        entry = {"method": self.method, "bits": self.bits, "groupsize": self.groupsize, "act_order": self.act_order,
                 "format": "packed-little-endian", "scale_dtype": "float16"}
        if self.method == "gptq":
            entry["sink_share"] = self.sink_share
        if self.head_bits is not None:
            entry["head"] = {"bits": self.head_bits, "groupsize": self.groupsize, "act_order": self.act_order}
        if self.down_bits is not None and self.down_bits != self.bits:
            entry["layers"] = {DOWN: {"bits": self.down_bits}}  # the block layers whose bits differ
        return entry

    def layer_bits(self, name: str) -> int:
        return self.down_bits if name == DOWN and self.down_bits is not None else self.bits


def quantize_block(block: nn.Module, inputs: Optional[List[torch.Tensor]], rope, settings: GPTQSettings
                   ) -> Dict[str, QuantizedWeight]:
    """Quantize the linear layers of `block` in data-flow order; each quantized weight replaces the
    float one in the block (dequantized) so that the layers after it see its outputs."""
    s = settings
    out = {}
    # the sinks are found in the block's input: every layer of the block weighs the same tokens
    weights = [sink_weights(x, s.sink_share) for x in inputs] if s.method == "gptq" else None
    for names in SEQUENTIAL:
        # the layers of one entry see the same input, so they share one Hessian
        H = input_hessian(block, names[0], inputs, rope, weights).H if s.method == "gptq" else None
        for name in names:
            layer = block.get_submodule(name)
            bits = s.layer_bits(name)
            if s.method == "gptq":
                qw = gptq(layer.weight, H, bits, s.groupsize, s.act_order, s.blocksize, s.percdamp)
            else:
                qw = rtn(layer.weight, bits, s.groupsize)
            layer.weight = nn.Parameter(qw.dequantize().to(layer.weight.dtype), requires_grad=False)
            out[name] = qw
    return out


def block_state(block: nn.Module, quantized: Dict[str, QuantizedWeight], store_dtype: torch.dtype
                ) -> Dict[str, torch.Tensor]:
    """The block's entries of the packed state dict: each quantized layer's packed buffers, and the
    other parameters (the norms, the layers' biases) in `store_dtype`."""
    state = {}
    for name, qw in quantized.items():
        state.update({f"{name}.{k}": v for k, v in qw.to_layer().state_dict().items()})
    for name, p in block.named_parameters():
        layer, _, kind = name.rpartition(".")
        if layer not in quantized or kind != "weight":
            state[name] = p.detach().to("cpu", store_dtype)
    return state


@torch.no_grad()
def quantize_head(model: nn.Module, inputs: Optional[List[torch.Tensor]], settings: GPTQSettings,
                  device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The packed state dict entries of the head (and embedding) at `settings.head_bits`. GPTQ's
    Hessian is that of the head's inputs, the final norm of the last block's outputs `inputs`. A
    tied embedding is the head's matrix: it reads the same packed rows. An untied one is a lookup,
    with no input to weigh the error by: rounded to nearest."""
    s = settings
    tied = model.lm_head is None
    W = (model.transformer.wte.weight if tied else model.lm_head.weight).to(device, dtype)
    if s.method == "gptq":
        ln_f = model.transformer.ln_f.to(device, dtype)
        hessian = Hessian(W.size(1), device=device)
        for x in inputs:
            hessian.add(ln_f(x))
        qw = gptq(W, hessian.H, s.head_bits, s.groupsize, s.act_order, s.blocksize, s.percdamp)
    else:
        qw = rtn(W, s.head_bits, s.groupsize)
    state = {f"{'transformer.wte' if tied else 'lm_head'}.{k}": v for k, v in qw.to_layer().state_dict().items()}
    if not tied:
        emb = rtn(model.transformer.wte.weight.to(device, dtype), s.head_bits, s.groupsize)
        state.update({f"transformer.wte.{k}": v for k, v in emb.to_layer().state_dict().items()})
    return {k: v.cpu() for k, v in state.items()}


def calibration_inputs(model: nn.Module, windows: torch.Tensor, device: torch.device, dtype: torch.dtype
                       ) -> Tuple[List[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]:
    """The first block's inputs, one (1, seqlen, n_embd) tensor per window, and the rotary (cos, sin)
    of positions 0..seqlen-1: with them, `block(x, cos, sin)` block after block reproduces the
    hidden states of a plain forward pass (tested)."""
    c = model.config
    inputs = [model.transformer.wte.weight[w].to(device, dtype)[None] for w in windows]
    rope = rope_cos_sin(torch.arange(windows.size(1), device=device), c, dtype)
    return inputs, rope


@torch.no_grad()
def quantize_model(model: nn.Module, windows: Optional[torch.Tensor], settings: GPTQSettings,
                   device: torch.device, dtype: torch.dtype, store_dtype: torch.dtype = torch.float16,
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
                   ) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield packed state dict entries (full names), block by block, then the head's with
    settings.head_bits. Each block is moved to `device` in `dtype` while it is quantized, then
    emptied (moved to the meta device): `model` is used up. `windows` (nsamples, seqlen) are the
    calibration token ids (None for RTN)."""
    inputs, rope = calibration_inputs(model, windows, device, dtype) if settings.method == "gptq" else (None, None)
    n = len(model.transformer.h)
    for i, block in enumerate(model.transformer.h):
        t0 = time.perf_counter()
        originals = list(block.parameters())  # memory-mapped: their pages are given back below
        block.to(device=device, dtype=dtype)
        quantized = quantize_block(block, inputs, rope, settings)
        if inputs is not None and (i + 1 < n or settings.head_bits is not None):
            inputs = [block(x, *rope) for x in inputs]  # the quantized block feeds the next (or the head)
        state = block_state(block, quantized, store_dtype)
        block.to("meta")
        for p in originals:
            release_mapped_pages(p)
        log(f"block {i + 1}/{n} quantized in {time.perf_counter() - t0:.1f}s")
        yield {f"transformer.h.{i}.{k}": v for k, v in state.items()}
    if settings.head_bits is not None:
        t0 = time.perf_counter()
        yield quantize_head(model, inputs, settings, device, dtype)
        log(f"head quantized to {settings.head_bits} bits in {time.perf_counter() - t0:.1f}s")


def quantize_checkpoint(checkpoint_dir: Path, output_dir: Path, settings: GPTQSettings, *,
                        text_file: Optional[Path] = None, data_dir: Optional[Path] = None, nsamples: int = 128,
                        seqlen: Optional[int] = None, seed: int = 0, device: Optional[str] = None) -> None:
    """What quantize/gptq.py does: quantize a float checkpoint directory into a packed one, written
    atomically, with a `quantization` entry in its lit_config.json and the tokenizer files."""

    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    validate_checkpoint_dir(checkpoint_dir)
    if read_quantization(checkpoint_dir) is not None:
        raise UserError(f"{checkpoint_dir} is already quantized; quantize the float checkpoint it was made from")
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise UserError("--output_dir must differ from --checkpoint_dir")
    model = load_model(checkpoint_dir)
    settings.check(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source_dtype = model.transformer.wte.weight.dtype
    # float32 on CPUs (no fast half-precision math); on GPUs GPTQ's float16, or the model's bfloat16
    dtype = torch.float32 if device.type == "cpu" else (torch.bfloat16 if source_dtype == torch.bfloat16 else torch.float16)
    store_dtype = torch.bfloat16 if source_dtype == torch.bfloat16 else torch.float16
    windows, entry = None, settings.entry()
    if settings.method == "gptq":
        seqlen = seqlen or min(2048, model.config.block_size)
        if seqlen > model.config.block_size:
            raise UserError(f"--seqlen {seqlen} is longer than the model's context ({model.config.block_size})")
        tokens = calibration_tokens(Tokenizer(checkpoint_dir), text_file, data_dir, checkpoint_dir)
        windows = sample_windows(tokens, nsamples, seqlen, seed)
        source = str(text_file or data_dir or "pydoc_data.topics")
        entry["calibration"] = {"source": source, "tokens": tokens.numel(), "nsamples": nsamples, "seqlen": seqlen,
                                "seed": seed}
        print(f"calibration: {nsamples} windows of {seqlen} tokens from {source} ({tokens.numel()} tokens)",
              file=sys.stderr)
    with atomic_dir(output_dir) as tmp:
        writer = ShardedWriter(tmp)
        packed_head = ("transformer.wte.", "lm_head.") if settings.head_bits is not None else ()
        for name, t in model.state_dict().items():
            if not name.startswith(("transformer.h.", *packed_head)):
                writer.add(name, t.to(store_dtype) if t.is_floating_point() else t)
        for state in quantize_model(model, windows, settings, device, dtype, store_dtype):
            for k, v in state.items():
                writer.add(k, v)
        writer.close()
        write_config(tmp, model.config, quantization=entry)
        copy_tokenizer_files(checkpoint_dir, tmp)
