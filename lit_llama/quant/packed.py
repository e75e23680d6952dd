"""Packed integer layers: GPTQ's or round-to-nearest's 4- or 3-bit integers (6 or 8 for the head)
packed into bytes, with a scale and a zero point per group (`PackedLinear`, `PackedEmbedding`),
made by lit_llama/quant/gptq.py (quantize/gptq.py), and the checkpoints that hold them.

The embedding and the output head stay in floating point by default, as in QLoRA and GPTQ: they are
a small part of a large model and the most sensitive to quantization error.
"""

import functools
import math
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.io.checkpoint import (CheckpointError, check_state_dict, load_state_dict, read_checkpoint_config,
                                     validate_checkpoint_dir)
from lit_llama.model import Config, LLaMA, linear
from lit_llama.utils import UserError

PACKED_BITS = (3, 4)
HEAD_BITS = (3, 4, 6, 8)  # the head / embedding may keep more bits (pack_int handles 6 and 8 too)


def _pack_unit(bits: int):
    # the smallest run of values filling whole bytes: 2 values in 1 byte (4-bit), 8 in 3 (3-bit)
    values = 8 // math.gcd(8, bits)
    return values, values * bits // 8


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) along the last dimension into uint8, as a little-endian bit
    stream: value i occupies bits [i*bits, (i+1)*bits). The last dimension must be a multiple of
    the pack unit (2 for 4-bit, 8 for 3-bit)."""
    values, nbytes = _pack_unit(bits)
    *lead, cols = q.shape
    units = q.to(torch.int32).reshape(*lead, cols // values, values)
    shifts = torch.arange(values, device=q.device, dtype=torch.int32) * bits
    word = (units << shifts).sum(-1, dtype=torch.int32)  # at most 24 bits
    byte_shifts = torch.arange(nbytes, device=q.device, dtype=torch.int32) * 8
    return ((word[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(*lead, cols // values * nbytes)


def unpack_int(packed: torch.Tensor, bits: int, cols: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The inverse of pack_int: the values as `dtype` (int32 or a float type), last dimension `cols`."""
    values, nbytes = _pack_unit(bits)
    *lead, _ = packed.shape
    if bits == 8:
        return packed.reshape(*lead, cols).to(dtype)
    if bits == 4:  # the common cases, byte by byte without the int32 word
        b = packed.reshape(*lead, cols // 2)
        return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*lead, cols).to(dtype)
    if bits == 6:  # four values in three bytes
        b = packed.reshape(*lead, cols // 4, 3).to(torch.int32)
        b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
        values = (b0 & 63, (b0 >> 6) | ((b1 & 15) << 2), (b1 >> 4) | ((b2 & 3) << 4), b2 >> 2)
        return torch.stack(values, dim=-1).reshape(*lead, cols).to(dtype)
    b = packed.reshape(*lead, cols // values, nbytes).to(torch.int32)
    byte_shifts = torch.arange(nbytes, device=packed.device, dtype=torch.int32) * 8
    word = (b << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(values, device=packed.device, dtype=torch.int32) * bits
    return ((word[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*lead, cols).to(dtype)


def check_packed_shape(in_features: int, bits: int, groupsize: int, where: str = "", allowed=PACKED_BITS,
                       flag: str = "--bits") -> None:
    """UserError unless a layer with `in_features` inputs can be packed at `bits` with `groupsize`."""
    if bits not in allowed:
        raise UserError(f"unsupported {flag} {bits}: use {' or '.join(map(str, allowed))}")
    if groupsize != -1 and groupsize < 1:
        raise UserError(f"unsupported --groupsize {groupsize}: use a positive group size or -1 (one group per row)")
    values, _ = _pack_unit(bits)
    if in_features % values:
        where = f" {where}" if where else ""
        raise UserError(f"{bits}-bit packing needs a multiple of {values} inputs; the layer{where} has {in_features}")


def dequantize_ints(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groupsize: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """scale * (q - zero) for codes q (out, in) and per-group scales and zeros (out, groups). The
    last group may be shorter (576 inputs in groups of 128: four of 128 and one of 64)."""
    rows, cols = q.shape
    groups = scales.size(1)
    q = F.pad(q.to(dtype), (0, groups * groupsize - cols)).view(rows, groups, groupsize)
    w = (q - zeros.to(dtype)[..., None]) * scales.to(dtype)[..., None]
    return w.view(rows, groups * groupsize)[:, :cols]


def unpermute_columns(w: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """Columns stored in act-order `perm` back in the layer's own order: column j goes to perm[j]."""
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm.long()] = w
    return out


_triton_failed = []  # the error of a first kernel call that failed: later calls dequantize instead


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _triton_matmul(x: torch.Tensor, layer: "PackedLinear") -> Optional[torch.Tensor]:
    """The Triton kernel's result, or None where it cannot run (warned once): a Triton too old or
    broken for this GPU should cost speed, not the run."""
    if _triton_failed:
        return None
    try:
        # kernels.py imports triton at its top, an optional (CUDA-only) dependency
        from lit_llama.quant.kernels import packed_matmul

        return packed_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.bits, layer.groupsize)
    except Exception as e:
        _triton_failed.append(e)
        warnings.warn(f"the Triton kernel for packed layers failed ({type(e).__name__}: {str(e)[:200]}); "
                      "dequantizing in PyTorch instead")
        return None


def add_bias(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The output of an integer layer's product plus its float bias, if it has one."""
    return y if bias is None else y + bias.to(y.dtype)


class PackedLinear(nn.Linear):
    """A linear layer with `bits`-bit integer weights q, packed along the inputs (see pack_int), and
    per output row a float scale and an integer zero point for each group of `groupsize` inputs (the
    last group may be shorter): w = scale * (q - zero); a float `bias`, if set, is added after the
    product.

    With act-order the columns were quantized in the order `perm` and are stored in that order, so
    that groups are contiguous; the input is permuted to match.

    It subclasses nn.Linear so that code finding linear layers by type (adapter v2's wrappers)
    finds it too, but holds no float weight: `weight` dequantizes on access, for code that inspects
    or merges it. The forward pass uses a Triton kernel on CUDA when Triton is installed, and
    otherwise dequantizes and multiplies."""

    def __init__(self, in_features: int, out_features: int, bits: int, groupsize: int, act_order: bool = False,
                 device=None, scale_dtype: torch.dtype = torch.float16):
        nn.Module.__init__(self)  # not nn.Linear's: no float weight to allocate
        check_packed_shape(in_features, bits, groupsize, allowed=HEAD_BITS)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.groupsize = in_features if groupsize == -1 or groupsize > in_features else groupsize
        groups = -(-in_features // self.groupsize)
        values, nbytes = _pack_unit(bits)
        packed_cols = in_features // values * nbytes
        self.register_buffer("qweight", torch.empty(out_features, packed_cols, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        self.register_buffer("perm", torch.empty(in_features, dtype=torch.int32, device=device) if act_order else None)
        self.register_parameter("bias", None)

    @classmethod
    def from_ints(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, groupsize: int,
                  perm: Optional[torch.Tensor] = None) -> "PackedLinear":
        """A layer from integer codes q (out, in) in stored column order, scales and zeros (out, groups)."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bits, groupsize, perm is not None, device="meta", scale_dtype=scales.dtype)
        layer.qweight = pack_int(q, bits)
        layer.scales, layer.zeros = scales, zeros.to(torch.uint8)
        if perm is not None:
            layer.perm = perm.to(torch.int32)
        return layer

    def ints(self) -> torch.Tensor:
        return unpack_int(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight (out, in) in stored column order (permuted with act-order), in `dtype`."""
        return dequantize_ints(self.ints(), self.scales, self.zeros, self.groupsize, dtype or self.scales.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return unpermute_columns(self.dequantize(), self.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_bias(self.matmul(x), self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T. Without the Triton kernel, group by group from the integers: with
        w = s (q - z), y = sum over groups g of s_g (x_g . q_g) - s_g z_g sum(x_g), so the integers
        become floats in one pass and no scaled copy of the weight is made (about 2x faster on CPU
        than dequantizing, then multiplying: 1.7 vs 3.6 ms for a 1536x576 4-bit layer)."""
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if x.is_cuda and self.bits in PACKED_BITS and triton_available():
            y = _triton_matmul(x, self)
            if y is not None:
                return y
        if torch.compiler.is_compiling():
            # one fused reduction over the packed bytes (model.linear); the unpacked floats of the
            # grouped form would be constant-folded by freezing into a float copy of the weights
            return linear(x, self.dequantize(x.dtype))
        q = unpack_int(self.qweight, self.bits, self.in_features, x.dtype)
        scales = self.scales.to(x.dtype)
        scaled_zeros = scales * self.zeros.to(x.dtype)
        y = None
        for g, g0 in enumerate(range(0, self.in_features, self.groupsize)):
            xg = x[..., g0:g0 + self.groupsize]
            # in place: a head's products over a long prompt are large (tokens x vocabulary)
            part = F.linear(xg, q[:, g0:g0 + self.groupsize]).mul_(scales[:, g])
            part.addcmul_(xg.sum(-1, keepdim=True), scaled_zeros[:, g], value=-1)
            y = part if y is None else y.add_(part)
        return y

    def extra_repr(self) -> str:
        act = ", act_order" if self.perm is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, groupsize={self.groupsize}{act}"


class PackedEmbedding(PackedLinear):
    """The token embedding as packed integers, rows = tokens: a lookup unpacks only the rows it
    reads. A tied head reads `weight` (every row dequantized), as the float model reads wte's."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = idx.reshape(-1)
        q = unpack_int(self.qweight[rows], self.bits, self.in_features)
        w = dequantize_ints(q, self.scales[rows], self.zeros[rows], self.groupsize, self.scales.dtype)
        return unpermute_columns(w, self.perm).view(*idx.shape, self.in_features)


# ---------------------------------------------------------------- packed checkpoints


def replace_with_packed(model: nn.Module, bits: int, groupsize: int, act_order: bool,
                        head: Optional[dict] = None, layers: Optional[Dict[str, int]] = None) -> nn.Module:
    """Swap every nn.Linear of the blocks for an empty PackedLinear on the meta device, ready for
    a packed state dict (load_state_dict with assign=True); `layers` maps a block layer's name
    (mlp.c_proj) to its own bits. With `head` (the entry's head: bits, groupsize, act_order) the
    embedding and head too. An untied model's embedding has no Hessian (it is a lookup): it is
    rounded to nearest, without act-order."""
    layers = layers or {}
    for block in model.transformer.h:
        for path, parent in list(block.named_modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    b = layers.get(f"{path}.{name}" if path else name, bits)
                    packed = PackedLinear(child.in_features, child.out_features, b, groupsize, act_order, device="meta")
                    packed.bias = child.bias  # float (None: none), from the state dict as the norms are
                    setattr(parent, name, packed.train(child.training))
    if head is not None:
        vocab, n_embd = model.transformer.wte.weight.shape
        hb, hg, ha = head["bits"], head["groupsize"], head["act_order"]
        tied = model.lm_head is None
        model.transformer.wte = PackedEmbedding(n_embd, vocab, hb, hg, ha and tied, device="meta")
        if not tied:
            model.lm_head = PackedLinear(n_embd, vocab, hb, hg, ha, device="meta")
    return model


def load_packed_model(checkpoint_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a checkpoint written by quantize/gptq.py: packed layers in the blocks, the other
    floating-point tensors (and the scales) in `dtype`, on the CPU. The packed integers stay
    memory-mapped from the file."""
    validate_checkpoint_dir(checkpoint_dir)
    config, quantization = read_checkpoint_config(checkpoint_dir)
    if quantization is None:
        raise CheckpointError(f"{checkpoint_dir} is not a GPTQ checkpoint: its config has no quantization entry")
    return build_packed_model(checkpoint_dir, config, quantization, dtype)


def build_packed_model(checkpoint_dir: Path, config: Config, quantization: dict,
                       dtype: torch.dtype = torch.float32) -> nn.Module:
    """load_packed_model for a directory already validated, whose config and quantization entry
    were read (read_checkpoint_config)."""
    entry = quantization
    try:
        bits, groupsize, act_order = int(entry["bits"]), int(entry["groupsize"]), bool(entry.get("act_order"))
        head = entry.get("head")  # absent: a float embedding and head (checkpoints before the option too)
        if head is not None:
            head = {"bits": int(head["bits"]), "groupsize": int(head["groupsize"]), "act_order": bool(head["act_order"])}
        layers = {str(k): int(v["bits"]) for k, v in entry.get("layers", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{checkpoint_dir}: the quantization entry of its config is corrupted: {entry}")
    with torch.device("meta"):
        model = LLaMA(config)
    try:
        replace_with_packed(model, bits, groupsize, act_order, head, layers)
    except UserError as e:
        raise CheckpointError(f"{checkpoint_dir}: its quantization entry does not fit its config: {e}")
    state_dict = load_state_dict(checkpoint_dir)
    check_state_dict(model, state_dict, checkpoint_dir)
    model.load_state_dict(state_dict, assign=True)
    # new tensors, not `.data =` on the memory-mapped views: a float32 view of a float16 base is
    # a tensor torch.compile cannot trace
    for module in model.modules():
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and t.is_floating_point() and t.dtype != dtype:
                setattr(module, name, nn.Parameter(t.detach().to(dtype), requires_grad=t.requires_grad)
                        if isinstance(t, nn.Parameter) else t.to(dtype))
    return model
