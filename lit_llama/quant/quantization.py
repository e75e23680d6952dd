"""Quantized linear layers for the transformer blocks, swapped in explicitly.

From full-precision weights, no data needed (`quantize_linears`):
  nf4, fp4   bitsandbytes 4-bit, QLoRA's format (Dettmers et al. 2023): block-wise absmax scales
             over 64 weights, themselves quantized again; matmuls dequantize to the compute dtype
             (the model's), so LoRA on top trains in that dtype. fp4 uses a 4-bit float code.
  llm.int8   bitsandbytes Linear8bitLt (Dettmers et al. 2022): int8 weights with an absmax scale per
             output row; input features holding an outlier (|x| > 6) are multiplied in 16-bit, the
             rest in int8. Quantized one layer at a time while loading (`load_for_inference`).

From calibration data (lit_llama/quant/gptq.py, quantize/gptq.py): `PackedLinear`, GPTQ's or
round-to-nearest's 4- or 3-bit integers packed into bytes, with a scale and a zero point per group.

The embedding and the output head stay in floating point, as in QLoRA and GPTQ: they are a small
part of a large model and the most sensitive to quantization error.
"""

import ctypes
import functools
import json
import logging
import math
import mmap
import sys
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.model import linear
from lit_llama.utils import UserError

MODES = ("nf4", "fp4", "llm.int8")
# the --quantize choices of the generate and evaluate scripts
INFERENCE_MODES = ("llm.int8", "gptq.int4", "gptq.int3")
PACKED_BITS = (3, 4)
HEAD_BITS = (3, 4, 6, 8)  # the head / embedding may keep more bits (pack_int handles 6 and 8 too)
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold: larger input magnitudes are multiplied in 16-bit


def import_bitsandbytes(mode: str):
    """bitsandbytes, or a UserError saying why `mode` cannot run here. Its import can fail with
    more than ImportError (a missing native library raises RuntimeError or OSError)."""
    try:
        import bitsandbytes
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--quantize {mode} needs bitsandbytes, which cannot be loaded here: {reason}")
    return bitsandbytes


# ---------------------------------------------------------------- bitsandbytes layers


def _linear4bit(linear: nn.Linear, mode: str, device=None) -> nn.Module:
    from bitsandbytes.nn import Linear4bit, Params4bit

    w = linear.weight
    # built on meta so no random full-precision weight is allocated only to be replaced
    q = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   compute_dtype=w.dtype, quant_type=mode, device="meta")
    # Params4bit quantizes when moved to a device; on CPU nothing else would trigger it, so move
    # it explicitly to the weight's own device (a memory-mapped weight is read once, not copied)
    q.weight = Params4bit(w.detach(), requires_grad=False, quant_type=mode, module=q).to(device or w.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    # bitsandbytes, on CPUs with AVX512-BF16, repacks a Linear4bit's weight at its first inference
    # forward for a bfloat16 kernel. The repacking fails on widths that are not whole 32-row tiles
    # with whole scale blocks, and it is one-way: back in training mode the layer keeps the packed
    # kernel, which has no backward, so the LoRA layers below it silently stop learning after an
    # evaluation pass. QLoRA here trains and samples in the model's dtype: the generic path always.
    q.support_avx512bf16_for_cpu = False
    return q


def _linear8bit(linear: nn.Linear, mode: str, device=None) -> nn.Module:
    from bitsandbytes.nn import Int8Params, Linear8bitLt

    _quiet_int8_cast_notice()
    w = linear.weight.detach()
    q = Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
    # Int8Params quantizes when moved from the CPU to a device (the CPU included): the float
    # weight goes to the target one layer at a time and only its int8 copy stays there
    q.weight = Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False).to(device or "cpu")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().to(device or w.device), requires_grad=False)
    return q


class _DropCastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


def _quiet_int8_cast_notice() -> None:
    # bitsandbytes logs at every int8 matmul that float32 inputs are cast to float16 for quantization:
    # expected here, and one line per layer per token otherwise
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in logger.filters):
        logger.addFilter(_DropCastNotice())


_QUANTIZERS = {"nf4": _linear4bit, "fp4": _linear4bit, "llm.int8": _linear8bit}


def quantize_linears(model: nn.Module, mode: str, device=None, release_mapped: bool = False) -> nn.Module:
    """Replace every full-precision nn.Linear in `model.transformer.h` (in place), block by block,
    by its quantized counterpart for `mode`, on `device` (default: where the weight is); the new
    weights are frozen. With `release_mapped`, the pages of each memory-mapped float weight are
    given back once quantized, so peak memory stays near the quantized size. Returns `model`."""
    if mode not in _QUANTIZERS:
        raise UserError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    import_bitsandbytes(mode)
    for block in model.transformer.h:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                # exactly nn.Linear: quantized layers subclass it
                if type(child) is nn.Linear:
                    if child.weight.is_meta:
                        raise ValueError("cannot quantize weights on the meta device: load them first")
                    # keep the replaced layer's train/eval mode (new modules start in training)
                    setattr(parent, name, _QUANTIZERS[mode](child, mode, device).train(child.training))
                    if release_mapped:
                        release_mapped_pages(child.weight)
                        release_freed_heap()
    return model


def dequantize_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of `linear` in floating point: a quantized weight dequantized, a plain one as is."""
    if isinstance(linear, PackedLinear):
        return linear.weight
    w = linear.weight
    if getattr(w, "bnb_quantized", False):
        import bitsandbytes.functional as bnbF

        # never repacked for bitsandbytes' CPU kernel: _linear4bit keeps the generic path
        return bnbF.dequantize_4bit(w.data, w.quant_state)
    if w.dtype == torch.int8:  # Linear8bitLt: int8 rows times their absmax / 127
        scb = getattr(w, "SCB", None)
        scb = scb if scb is not None else linear.state.SCB
        return w.detach().float() * (scb.float() / 127)[:, None]
    return w.detach()


# ---------------------------------------------------------------- memory-mapped pages


@functools.lru_cache(maxsize=None)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _file_backed(address: int) -> bool:
    # /proc/self/maps lines: "start-end perms offset dev inode path"; inode 0 is anonymous memory
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            start, end = (int(a, 16) for a in parts[0].split("-"))
            if start <= address < end:
                return len(parts) >= 6 and parts[4] != "0"
    return False


def release_mapped_pages(t: torch.Tensor) -> None:
    """Drop the resident pages of a tensor memory-mapped from a file (a weight loaded from a
    checkpoint) once it is no longer needed: they would otherwise count in the process's memory
    until the whole file is unmapped. Only whole pages inside the tensor are dropped (neighbours
    keep theirs), and only for a file mapping, which reads the data back from the file if it is
    touched again; anything else (Linux only, CPU only) is left alone."""
    if t.device.type != "cpu" or t.numel() == 0 or not sys.platform.startswith("linux"):
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first or not _file_backed(start):
        return
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def release_freed_heap() -> None:
    """Give memory freed by temporaries back to the OS (glibc's malloc_trim). Without it, a layer's
    freed float copy stays in the heap below the int8 weights allocated after it: quantizing layer
    by layer would still end at several times the int8 size."""
    if sys.platform.startswith("linux"):
        try:
            _libc().malloc_trim(0)
        except AttributeError:  # not glibc
            pass


# ---------------------------------------------------------------- packed 4-bit / 3-bit layers


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
        from lit_llama.quant.kernels import packed_matmul

        return packed_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.bits, layer.groupsize)
    except Exception as e:
        _triton_failed.append(e)
        warnings.warn(f"the Triton kernel for packed layers failed ({type(e).__name__}: {str(e)[:200]}); "
                      "dequantizing in PyTorch instead")
        return None


class PackedLinear(nn.Linear):
    """A bias-free linear layer with `bits`-bit integer weights q, packed along the inputs (see
    pack_int), and per output row a float scale and an integer zero point for each group of
    `groupsize` inputs (the last group may be shorter): w = scale * (q - zero).

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
        return self.matmul(x)

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


def read_quantization(checkpoint_dir: Path) -> Optional[dict]:
    """The `quantization` entry of a checkpoint's lit_config.json (None for a float checkpoint)."""
    from lit_llama.io.checkpoint import CONFIG_FILE

    path = Path(checkpoint_dir) / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("quantization")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # validate_checkpoint_dir / load_config report these


def packed_mode(entry: dict) -> str:
    return f"gptq.int{entry.get('bits')}"


def check_quantize_mode(checkpoint_dir: Path, mode: Optional[str]) -> Optional[dict]:
    """UserError unless --quantize `mode` fits the checkpoint: a packed checkpoint needs its own
    gptq.intN mode, a float one any other. Returns the checkpoint's quantization entry."""
    if mode is not None and mode not in INFERENCE_MODES:
        raise UserError(f"unknown --quantize {mode!r}; choose one of {', '.join(INFERENCE_MODES)}")
    entry = read_quantization(checkpoint_dir)
    if entry is None and mode == "llm.int8":
        import_bitsandbytes(mode)
    if entry is not None and mode != packed_mode(entry):
        raise UserError(f"{checkpoint_dir} holds {entry.get('bits')}-bit weights packed by quantize/gptq.py "
                        f"(method {entry.get('method')}): load it with --quantize {packed_mode(entry)}"
                        + (f", not {mode}" if mode else ""))
    if entry is None and mode is not None and mode.startswith("gptq."):
        raise UserError(f"{checkpoint_dir} is not a GPTQ checkpoint: make one with `python quantize/gptq.py "
                        f"--checkpoint_dir {checkpoint_dir} --output_dir OUT --bits {mode[-1]}` and load OUT")
    return entry


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
                    setattr(parent, name, PackedLinear(child.in_features, child.out_features, b, groupsize,
                                                       act_order, device="meta").train(child.training))
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
    from lit_llama.io.checkpoint import (CheckpointError, check_state_dict, load_config, load_state_dict,
                                      validate_checkpoint_dir)
    from lit_llama.model import LLaMA

    validate_checkpoint_dir(checkpoint_dir)
    entry = read_quantization(checkpoint_dir)
    try:
        bits, groupsize, act_order = int(entry["bits"]), int(entry["groupsize"]), bool(entry.get("act_order"))
        head = entry.get("head")  # absent: a float embedding and head (checkpoints before the option too)
        if head is not None:
            head = {"bits": int(head["bits"]), "groupsize": int(head["groupsize"]), "act_order": bool(head["act_order"])}
        layers = {str(k): int(v["bits"]) for k, v in entry.get("layers", {}).items()}
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{checkpoint_dir}: the quantization entry of its config is corrupted: {entry}")
    config = load_config(checkpoint_dir)
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
