"""Weight-only int8 and int4, quantized while loading any float checkpoint, as in gpt-fast: no
calibration data, activations stay in floating point, and a decode step reads 1 or 0.5 bytes per
weight instead of 4.

  int8   one scale per output row, symmetric: q = round(w / s), s = max|w| / 127 (rounded to
         float16), q in [-127, 127]
  int4   one scale and one offset per group of `groupsize` inputs (32 by default; 64, 128), min-max
         over 16 levels: w = (q - 8) s + z, with s = (max - min) / 15 and z = min + 8 s (min and s
         rounded to float16, as GGUF's Q4_1 stores them), so q = 0 is the group's minimum

On CPU, products of a few rows of activations (decoding) run in lit_llama/csrc/lowbit_matmul.cpp
(LowBitLinear), which reads the 8- or 4-bit codes and their scales at close to the memory's
bandwidth with float32 activations (on a 2-core Zen 4, 1.4-1.5x torch's `_weight_int4pack_mm_for_cpu`,
which takes bfloat16 activations, and faster than int8 codes cast inside a compiled reduction);
prompts multiply the weight it dequantizes, in bfloat16 where the CPU has it natively. Where the
kernel cannot be built, int8 layers are Int8Linear: torch's `_weight_int8pack_mm`, fast with
bfloat16 activations where the CPU has AVX512-BF16 or AMX (measured on a 2-core Xeon with AMX, a
4096x4096 int8 layer: 0.57 ms, against 6.5 ms with float32 activations and 1.4 ms for the float32
layer), and in a compiled step of one row, or on other devices, the integers cast to the
activations' type inside the product (gpt-fast's form); int4 layers dequantize their codes for
each product (fused into it in a compiled step).

The output head is quantized too (it is a fifth of a small model's weights); at int4 it stays at
int8, as llama.cpp keeps its output tensor at more bits than the blocks. A tied embedding looks up
the head's own int8 rows: a lookup dequantizes only the rows it reads.

quantize/weight_only.py quantizes a checkpoint once (quantize_checkpoint), with the same quantizer:
its integer layers are stored in the kernel's layout (lit_llama.io.checkpoint.lowbit_tiles), as
are a GGUF file's integers kept by --keep_quantized, and build_lowbit_model makes the layers from
the memory-mapped file's tensors as they are, so that a start copies nothing.

Why one file: the quantizers, the layers that multiply their codes and the model-wide replacement
(GGUF's kept tensors included) share one format of codes, scales and offsets; split, each part
would restate it.
"""

import functools
import re
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from lit_llama import cpu_kernels
from lit_llama.io.checkpoint import (TILE_ROWS, WEIGHT_ONLY_METHOD, CheckpointError, QuantizedRows, ShardedWriter,
                                     check_state_dict, copy_tokenizer_files, load_state_dict, lowbit_tiles,
                                     read_checkpoint_config, read_tiles, release_freed_heap, scales_and_mins, release_mapped_pages,
                                     tile_entry, tile_tensors, untile, validate_checkpoint_dir, write_config)
from lit_llama.model import Config, LLaMA, linear
from lit_llama.quant.packed import PackedLinear, add_bias, pack_int, unpack_int, unpermute_columns
from lit_llama.utils import UserError, atomic_dir, check_disk

MODES = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128")
INT4_GROUPS = (32, 64, 128)
KERNEL_GROUPS = (16, 32, 64, 128)  # the group sizes the CPU kernel takes (16: GGUF's Q6_K)
# rows of activations up to which the CPU kernel multiplies them one by one; more are multiplied by the
# weight dequantized a block at a time (_prefill). On a 2-core Xeon with AMX, a 11008 x 4096 int4 layer:
# 32 rows take 30 ms either way, 64 rows 62 ms by the kernel and 32 ms by blocks
KERNEL_ROWS = 32
PREFILL_BLOCK = 256  # rows of a weight dequantized at a time for a prompt's product (LowBitLinear._prefill)


def parse_mode(mode: str) -> Tuple[int, Optional[int]]:
    """(bits, groupsize) of a weight-only mode: int8 -> (8, None), int4 -> (4, 32), int4-g64 -> (4, 64)."""
    if mode == "int8":
        return 8, None
    m = re.fullmatch(r"int4(?:-g(\d+))?", mode)
    if m is None or (m.group(1) is not None and int(m.group(1)) not in INT4_GROUPS):
        raise UserError(f"unknown weight-only mode {mode!r}; choose one of {', '.join(MODES)}")
    return 4, int(m.group(1) or 32)


@functools.lru_cache(maxsize=None)
def fast_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there torch's weight-only
    kernels are fast with bfloat16 activations; elsewhere bfloat16 is emulated and slow."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def kernel_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the products of a layer on `device`, for activations of `dtype`, are computed in."""
    if torch.device(device).type == "cpu" and fast_bf16_cpu():
        return torch.bfloat16
    return dtype


# ---------------------------------------------------------------- quantizers


def quantize_int8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scales float32 (out,)) with w ~ q * scales[:, None]; the scale is rounded to
    float16 first, so the CPU kernel's float16 copy of it is exact."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).half().float().clamp(min=2.0 ** -24)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, groupsize: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int32 (out, in) in [0, 15], scales (out, groups), offsets z (out, groups)), float32, with
    w ~ (q - 8) * scale + z per group of `groupsize` inputs. The scale and the group's minimum are
    rounded to float16 first (as GGUF's Q4_1 stores them), so the CPU kernel's float16 copies of
    them are exact."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // groupsize, groupsize)
    lo, hi = g.amin(-1).half().float(), g.amax(-1)
    scales = ((hi - lo) / 15).half().float().clamp(min=2.0 ** -24)  # float16's smallest step
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(rows, cols), scales, lo + 8 * scales


def quantize_rows(w: torch.Tensor, bits: int, groupsize: Optional[int]) -> QuantizedRows:
    """`w` quantized as --quantize does, as integer rows w = q * scale + offset: int8 per row
    (quantize_int8; the row's scale repeated for each group of int8_groupsize inputs, the groups the
    kernel's layout takes), int4 per group (quantize_int4). The form quantize/weight_only.py stores
    and the layers at load are made from, so that both give the same weights."""
    if bits == 8:
        q, scales = quantize_int8(w)
        g = int8_groupsize(w.size(1))
        scales = scales[:, None].expand(-1, w.size(1) // g).contiguous()
        return QuantizedRows(q.to(torch.int32), scales, torch.zeros_like(scales), g, 8, "int8")
    q, scales, zeros = quantize_int4(w, groupsize)
    return QuantizedRows(q, scales, zeros - 8 * scales, groupsize, 4, f"int4-g{groupsize}")


def int8_groupsize(in_features: int) -> int:
    """The groups an int8 layer's per-row scale is repeated over: the largest the kernel takes."""
    return max([g for g in INT4_GROUPS if in_features % g == 0], default=in_features)


def check_int4_shape(in_features: int, out_features: int, groupsize: int, where: str) -> None:
    if in_features % groupsize:
        raise UserError(f"--quantize int4 with groups of {groupsize} needs a layer width divisible by {groupsize}; "
                        f"{where} has {in_features} inputs (choose another group size: "
                        f"{', '.join(f'int4-g{g}' for g in INT4_GROUPS if in_features % g == 0) or 'int8'})")


# ---------------------------------------------------------------- layers


class Int8Linear(nn.Linear):
    """A linear layer with int8 weights and one scale per output row, w = q * scale, where the CPU
    kernel is not built (elsewhere int8 layers are LowBitLinear); a `bias`, if set (with_bias), is
    float and added after the product. It subclasses nn.Linear so that code finding linear layers
    by type finds it, but holds no float weight: `weight` dequantizes on access (for code that
    inspects or merges it)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        nn.Module.__init__(self)  # not nn.Linear's: no float weight to allocate
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q)
        self.kernel_dtype = kernel_dtype(q.device, dtype)
        self.register_buffer("scales", scales.to(dtype))
        self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, w: torch.Tensor, device=None, dtype: Optional[torch.dtype] = None) -> "Int8Linear":
        """`dtype`: that of the activations it will see (default: the weight's)."""
        q, scales = quantize_int8(w.to(device) if device is not None else w)
        return cls(q, scales, dtype or w.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.rows(slice(None), self.scales.dtype)

    def rows(self, idx, dtype: torch.dtype) -> torch.Tensor:
        """Rows `idx` of the weight (an embedding lookup), dequantized to `dtype`."""
        return self.qweight[idx].to(dtype) * self.scales[idx].to(dtype)[..., None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_bias(self.matmul(x), self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # gpt-fast's form, the cast fused into the product, in a compiled step of one row, of several
        # rows where the CPU lacks native bfloat16, and on other devices
        compiled = torch.compiler.is_compiling()
        if x.device.type != "cpu" or (compiled and (x.numel() == x.size(-1) or self.kernel_dtype != torch.bfloat16)):
            return linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        kd = self.kernel_dtype  # torch's kernel: prefill and batched steps, and every eager product
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(kd), self.qweight, self.scales.to(kd))
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """The token embedding as the int8 rows of a layer (an Int8Linear's or a LowBitLinear's: the tied
    head's own tensors, or its own with `shared=False`): a lookup dequantizes only the rows it reads."""

    def __init__(self, head: nn.Linear, dtype: torch.dtype, shared: bool = True):
        super().__init__()
        self.dtype = dtype
        if shared:  # in a list: not a submodule, so not a second state-dict entry
            self.head = [head]
        else:
            self.table = head
            self.head = [self.table]

    @property
    def weight(self) -> torch.Tensor:
        return self.head[0].weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head[0].rows(idx, self.dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.head[0].matmul(x)


class CastEmbedding(nn.Embedding):
    """An embedding table kept in its stored dtype (memory-mapped from the checkpoint) whose looked-up
    rows are cast to `out_dtype`, the activations': the same rows as casting the table first, without
    a copy of it (a 7B-shaped model's float32 copy of a bfloat16 table was 0.8 GB)."""

    out_dtype: torch.dtype = torch.float32

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return super().forward(idx).to(self.out_dtype)


class LowBitLinear(nn.Linear):
    """A linear layer with 4- or 8-bit weights (`bits`), a scale and an offset per group of
    `groupsize` inputs: w = (q - 2^(bits-1)) * scale + z, q unsigned, and a float `bias` added after
    the product if set (with_bias). On CPU, where lit_llama/csrc/lowbit_matmul.cpp builds, the codes
    are held in its tiles of 16 rows with scales and offsets (w = q s + m, see lowbit_tiles; the
    form a checkpoint stores, so a loaded layer uses the file's pages as they are), and a few rows
    of activations (decoding) are multiplied by that kernel, more rows (a prompt) by the weight it
    dequantizes; elsewhere as packed bytes (low bits first) that the forward pass dequantizes
    (fused into the product in a compiled step)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groupsize: int,
                 dtype: torch.dtype, perm: Optional[torch.Tensor] = None, bits: int = 4):
        nn.Module.__init__(self)
        out_features, in_features = q.shape
        self._setup(out_features, in_features, groupsize, bits, dtype, perm, on_kernel(groupsize, q.device))
        if self.kernel:
            mins = zeros.float() - 2 ** (bits - 1) * scales.float()
            codes, sm = lowbit_tiles(q, scales, mins, bits)
            self.register_buffer("qweight", codes)
            self.register_buffer("scales_and_mins", sm)
        else:
            self.register_buffer("qweight", pack_int(q, bits))
            # (groups, out, 2): scale and offset side by side
            self.register_buffer("scales_and_zeros", torch.stack((scales.t(), zeros.t()), dim=-1).to(dtype).contiguous())

    def _setup(self, out_features: int, in_features: int, groupsize: int, bits: int, dtype: torch.dtype,
               perm: Optional[torch.Tensor], kernel: bool) -> None:
        self.out_features, self.in_features = out_features, in_features
        self.groupsize, self.bits, self.dtype, self.kernel = groupsize, bits, dtype, kernel
        # GPTQ's act-order: columns stored in the order they were quantized; the input is permuted to match
        self.register_buffer("perm", None if perm is None else perm.to(dtype=torch.int32))
        self.register_parameter("bias", None)

    @classmethod
    def from_tiles(cls, codes: torch.Tensor, sm: torch.Tensor, groupsize: int, bits: int, out_features: int,
                   dtype: torch.dtype, device=None) -> "LowBitLinear":
        """The layer of a low-bit layout (lowbit_tiles) as a checkpoint stores it: on a CPU where the
        kernel runs, the tensors themselves (memory-mapped pages stay file-backed, nothing is copied);
        elsewhere unpacked onto `device`."""
        device = torch.device(device or codes.device)
        if not on_kernel(groupsize, device):
            q, s, m = (t.to(device) for t in untile(codes, sm, bits, out_features))
            return cls(q, s, m + 2 ** (bits - 1) * s, groupsize, dtype, bits=bits)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(out_features, codes.size(1) * 32 // bits, groupsize, bits, dtype, None, True)
        layer.register_buffer("qweight", codes)
        layer.register_buffer("scales_and_mins", sm)
        return layer

    @classmethod
    def from_float(cls, w: torch.Tensor, groupsize: int, device=None, dtype: Optional[torch.dtype] = None,
                   where: str = "a layer") -> "LowBitLinear":
        """4-bit weights, quantize_int4's."""
        check_int4_shape(w.size(1), w.size(0), groupsize, where)
        return lowbit_layer(quantize_rows(w.to(device) if device is not None else w, 4, groupsize),
                            device or w.device, dtype or w.dtype)

    @classmethod
    def from_packed(cls, layer: PackedLinear, dtype: torch.dtype) -> "LowBitLinear":
        """The same weights as a 3- or 4-bit GPTQ/RTN PackedLinear, w = s (q - zero) = (q - 8) s + s (8 - zero)
        (codes of 3 bits are 4-bit codes below 8)."""
        s = layer.scales.float()
        z = s * (8 - layer.zeros.float())
        return cls(layer.ints(), s, z, layer.groupsize, dtype, layer.perm)

    @property
    def weight(self) -> torch.Tensor:
        if self.kernel:
            w = torch.ops.lit_llama.lowbit_dequantize(self.qweight, self.scales_and_mins, self.groupsize, self.bits)
            w = w[: self.out_features].to(self.dtype)
        else:
            w = self._dequantize(self.dtype)
        return unpermute_columns(w, self.perm)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `idx` of the weight (an embedding lookup), dequantized to `dtype`: only their codes
        are read."""
        if self.perm is not None:
            raise ValueError("rows of a layer with permuted columns are not looked up")
        if self.kernel:  # row r is lane r % 16 of tile r // 16 (lowbit_tiles)
            t, lane = idx // TILE_ROWS, idx % TILE_ROWS
            words = self.qweight.view(self.qweight.size(0), -1, TILE_ROWS, 4)[t, :, lane]  # (..., blocks, 4 bytes)
            q = words if self.bits == 8 else torch.stack((words & 15, words >> 4), dim=-1)
            s, m = scales_and_mins(self.scales_and_mins[t, :, :, lane].to(dtype), -1, self.bits)  # (..., groups) each
        else:
            q = unpack_int(self.qweight[idx], self.bits, self.in_features)
            s, z = self.scales_and_zeros[:, idx].to(dtype).movedim(0, -2).unbind(-1)
            m = z - 2 ** (self.bits - 1) * s
        g = q.reshape(*idx.shape, -1, self.groupsize).to(dtype)
        return (g * s[..., None] + m[..., None]).flatten(-2)

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        q = unpack_int(self.qweight, self.bits, self.in_features, dtype)
        s, z = self.scales_and_zeros.to(dtype).unbind(-1)  # (groups, out) each
        g = q.view(self.out_features, -1, self.groupsize)
        return ((g - 2 ** (self.bits - 1)) * s.t()[..., None] + z.t()[..., None]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_bias(self.matmul(x), self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if not self.kernel:
            return F.linear(x, self._dequantize(x.dtype))
        rows = x.reshape(-1, self.in_features)
        args = (self.qweight, self.scales_and_mins, self.groupsize, self.bits)
        if rows.size(0) <= KERNEL_ROWS:
            y = torch.ops.lit_llama.lowbit_matmul(rows, *args)
        else:
            y = self._prefill(rows)
        if y.size(-1) != self.out_features:  # rows padded to whole tiles
            y = y[:, : self.out_features]
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _prefill(self, rows: torch.Tensor) -> torch.Tensor:
        """rows @ W.T for many rows (a prompt): W dequantized a block of rows at a time, each block
        multiplied while it is in the cache (in bfloat16 where the CPU has it natively). The whole
        weight dequantized at once would be written to memory and read back: at 7B that took longer
        than the products themselves."""
        kd = kernel_dtype(rows.device, rows.dtype)
        x = rows.to(kd).t()
        tiles, step = self.qweight.size(0), PREFILL_BLOCK // TILE_ROWS
        out = x.new_empty(tiles * TILE_ROWS, x.size(1))  # the product transposed: each block's rows are contiguous
        for t0 in range(0, tiles, step):
            t1 = min(tiles, t0 + step)
            w = torch.ops.lit_llama.lowbit_dequantize(self.qweight[t0:t1], self.scales_and_mins[t0:t1], self.groupsize,
                                                      self.bits)
            torch.mm(w.to(kd), x, out=out[t0 * TILE_ROWS: t1 * TILE_ROWS])
        return out.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, groupsize={self.groupsize}"


def with_bias(layer: nn.Linear, bias: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """`layer` (integer weights) with the float `bias` of the layer it replaces, if any, frozen on its
    integers' device, in `dtype` (default the bias's own)."""
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(layer.qweight.device, dtype or bias.dtype), requires_grad=False)
    return layer


# ---------------------------------------------------------------- a model


def quantize_weight_only(model: LLaMA, mode: str, device=None, dtype: Optional[torch.dtype] = None,
                         release_mapped: bool = False) -> LLaMA:
    """Replace every float nn.Linear of the blocks (LoRA's and adapters' base layers included) by
    its quantized_layer on `device` (default: where the weight is), and the head by its int8 codes (int8_head; tied: the embedding becomes an Int8Embedding of the head), in place. Every
    shape is checked before anything is replaced, so a bad group size changes nothing. `dtype`: the
    activations' (the model's after Fabric's precision; default the weights'). With `release_mapped`,
    the pages of each memory-mapped float weight are given back once quantized."""
    dtype = dtype or model.transformer.ln_f.weight.dtype
    bits, groupsize = parse_mode(mode)
    targets = []
    for i, block in enumerate(model.transformer.h):
        for path, parent in list(block.named_modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:  # exactly: quantized layers subclass it
                    where = f"transformer.h.{i}.{f'{path}.' if path else ''}{name}"
                    if bits == 4:
                        check_int4_shape(child.in_features, child.out_features, groupsize, where)
                    targets.append((parent, name, child, where))
    for parent, name, child, where in targets:
        w = child.weight.detach()
        if w.is_meta:
            raise ValueError("cannot quantize weights on the meta device: load them first")
        layer = quantized_layer(w, bits, groupsize, device, dtype)
        setattr(parent, name, with_bias(layer, child.bias, dtype).train(child.training))
        if release_mapped:
            release_mapped_pages(child.weight)
            release_freed_heap()
    wte = model.transformer.wte
    if model.lm_head is None:  # tied: one int8 tensor is the head and the embedding
        model.lm_head = int8_head(wte.weight.detach(), device, dtype)
        model.transformer.wte = Int8Embedding(model.lm_head, dtype)
        if release_mapped:
            release_mapped_pages(wte.weight)
    elif type(model.lm_head) is nn.Linear:
        old = model.lm_head.weight
        model.lm_head = int8_head(old.detach(), device, dtype)
        if release_mapped:
            release_mapped_pages(old)
    release_freed_heap()
    return model


def int8_head(w: torch.Tensor, device, dtype: torch.dtype) -> nn.Linear:
    """The head: w quantized per row to int8 (at int4 too, as llama.cpp keeps its output tensor at
    more bits than the blocks)."""
    return quantized_layer(w, 8, None, device, dtype)


def quantized_layer(w: torch.Tensor, bits: int, groupsize: Optional[int], device, dtype: torch.dtype) -> nn.Linear:
    """The layer of `w` quantized by quantize_rows on `device` (default: where `w` is): LowBitLinear,
    or, for int8 where the CPU kernel is not built, Int8Linear (torch's int8 kernel)."""
    device = torch.device(device or w.device)
    if bits == 8 and not on_kernel(int8_groupsize(w.size(1)), device):
        return Int8Linear.from_float(w, device, dtype)
    return lowbit_layer(quantize_rows(w.to(device), bits, groupsize), device, dtype)


def lowbit_layer(rows: QuantizedRows, device, dtype: torch.dtype) -> "LowBitLinear":
    """The LowBitLinear of integer rows, through the layout a checkpoint stores (tile_tensors)."""
    t = tile_tensors(rows)
    return LowBitLinear.from_tiles(t["codes"], t["sm"], rows.groupsize, rows.bits, rows.shape[0], dtype, device)


def on_kernel(groupsize: int, device) -> bool:
    """Whether the CPU kernel takes a layer in groups of `groupsize` on `device`."""
    return groupsize in KERNEL_GROUPS and torch.device(device).type == "cpu" and cpu_kernels.available()


def use_int4_kernels(model: nn.Module, dtype: torch.dtype) -> int:
    """Swap each 3- or 4-bit PackedLinear (quantize/gptq.py's checkpoints) on the CPU whose groups are
    whole for the LowBitLinear with the same weights, in place:
    the CPU int4 kernel instead of unpacking the integers at every product; `dtype`: the activations'.
    Returns how many. The embedding and a 6- or 8-bit head stay packed."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is PackedLinear and child.bits in (3, 4) and child.qweight.device.type == "cpu"
                    and child.in_features % child.groupsize == 0):
                setattr(parent, name, with_bias(LowBitLinear.from_packed(child, dtype), child.bias).train(child.training))
                swapped += 1
    return swapped


# ---------------------------------------------------------------- checkpoints of integer layers


def build_lowbit_model(checkpoint_dir: Path, config: Config, quantization: dict, device=None,
                       dtype: torch.dtype = torch.float32) -> LLaMA:
    """The model of a checkpoint whose layers are stored in the low-bit layout (a GGUF file's integers
    kept by scripts/convert_gguf_checkpoint.py --keep_quantized, or quantize/weight_only.py's):
    each layer of the entry's `layers` a LowBitLinear on `device` made from the file's tensors as
    they are (on a CPU with the kernel: memory-mapped, nothing copied); an integer embedding looks
    up its rows (tied: the same layer is the head); the float tensors left (norms, an untied float
    embedding) in `dtype`."""
    layers = quantization.get("layers")
    if not isinstance(layers, dict):
        raise CheckpointError(f"{checkpoint_dir}: the quantization entry of its config is corrupted: {quantization}")
    with torch.device("meta"):
        model = LLaMA(config)
    state_dict = load_state_dict(checkpoint_dir)
    vocab_shape = (config.padded_vocab_size, config.n_embd)
    for name, info in layers.items():
        codes, sm, bits, groupsize, shape = read_tiles(state_dict, name, info, checkpoint_dir)
        try:
            expected = vocab_shape if name in ("transformer.wte", "lm_head") else tuple(model.get_submodule(name).weight.shape)
        except AttributeError:
            raise CheckpointError(f"{checkpoint_dir}: its config has no layer {name}")
        if shape != expected:
            raise CheckpointError(f"weights in {checkpoint_dir}: {name} has shape {shape}, the config needs {expected}")
        layer = LowBitLinear.from_tiles(codes, sm, groupsize, bits, shape[0], dtype, device)
        if name == "transformer.wte":  # looked up by rows; tied, the same codes are the head
            model.transformer.wte = Int8Embedding(layer, dtype, shared=False)
            if config.tie_embeddings:
                model.lm_head = layer
        else:
            parent, _, child = name.rpartition(".")
            bias = getattr(model.get_submodule(name), "bias", None)  # float, on meta: assigned from the file below
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            layer.bias = bias
    # the integer layers' own tensors count as present: every other tensor is checked as a float model's
    state_dict.update({k: v for k, v in model.state_dict().items() if not v.is_meta})
    check_state_dict(model, state_dict, checkpoint_dir)
    model.load_state_dict(state_dict, assign=True)
    wte = model.transformer.wte
    if type(wte) is nn.Embedding and torch.device(device or "cpu").type == "cpu":  # an untied float embedding
        wte.__class__, wte.out_dtype = CastEmbedding, dtype  # looked up in place, the rows cast: no copy of the table
    for module in model.modules():  # the float tensors left (norms, biases), in `dtype` on `device`
        if type(module) is CastEmbedding:
            continue
        for key, t in list(module._parameters.items()):
            if t is not None and t.is_floating_point():
                module._parameters[key] = nn.Parameter(t.detach().to(device=device, dtype=dtype), requires_grad=False)
    release_freed_heap()
    return model


# ---------------------------------------------------------------- quantize once (quantize/weight_only.py)

# the float linear layers of the blocks, which --quantize replaces (the head is int8 in every mode)
BLOCK_LINEAR = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc1|mlp\.c_fc2|mlp\.c_proj)\.weight")


def quantize_checkpoint(checkpoint_dir: Path, mode: str, output_dir: Path) -> None:
    """Write `checkpoint_dir` quantized as `--quantize mode` quantizes it at load (the same
    quantize_rows, so the same weights) into a checkpoint directory that every inference script
    loads without --quantize: each block linear layer and the head (tied: the embedding) in the
    low-bit layout the kernel reads, the other tensors as they are. One tensor at a time from the
    memory-mapped source, its pages given back once written: peak memory is about one layer. Shapes
    and free disk are checked before anything is written; the output appears only when complete."""
    bits, groupsize = parse_mode(mode)
    validate_checkpoint_dir(checkpoint_dir)
    config, quantization = read_checkpoint_config(checkpoint_dir)
    if quantization is not None:
        raise UserError(f"{checkpoint_dir} is already quantized (method {quantization.get('method')}): "
                        "quantize the float checkpoint it was made from")
    state_dict = load_state_dict(checkpoint_dir)
    head = "transformer.wte.weight" if config.tie_embeddings else "lm_head.weight"
    targets = {name for name in state_dict if BLOCK_LINEAR.fullmatch(name)} | {head}
    if bits == 4:
        for name in sorted(targets - {head}):
            check_int4_shape(state_dict[name].size(1), state_dict[name].size(0), groupsize, name.removesuffix(".weight"))
    check_disk(output_dir, quantized_bytes(state_dict, targets, bits, groupsize))
    layers = {}
    with atomic_dir(output_dir) as tmp:
        writer = ShardedWriter(tmp)
        for name in tqdm(list(state_dict), desc=f"quantizing to {mode}", unit="tensor"):
            t = state_dict.pop(name)
            if name in targets:
                rows = quantize_rows(t, 8 if name == head else bits, groupsize)
                layer = name.removesuffix(".weight")
                for key, part in tile_tensors(rows).items():
                    writer.add(f"{layer}.{key}", part)
                layers[layer] = tile_entry(rows)
                del rows
            else:
                writer.add(name, t)
            release_mapped_pages(t)
            release_freed_heap()
        writer.close()
        write_config(tmp, config, {"method": WEIGHT_ONLY_METHOD, "mode": mode, "layers": layers})
        copy_tokenizer_files(Path(checkpoint_dir), tmp)
    print(f"wrote {output_dir}")


def quantized_bytes(state_dict, targets, bits: int, groupsize: Optional[int]) -> int:
    """The size of quantize_checkpoint's output: codes plus a float16 scale and offset per group
    for the quantized layers, the others as they are."""
    total = 0
    for name, t in state_dict.items():
        if name not in targets:
            total += t.numel() * t.element_size()
            continue
        b, g = (8, int8_groupsize(t.size(1))) if bits == 8 or name.startswith(("lm_head", "transformer.wte")) else (bits, groupsize)
        rows = -(-t.size(0) // TILE_ROWS) * TILE_ROWS
        total += rows * t.size(1) * b // 8 + rows * (t.size(1) // g) * 4
    return total
