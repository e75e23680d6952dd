"""bitsandbytes layers, from full-precision weights with no data needed (`quantize_linears`):
  nf4, fp4   4-bit, QLoRA's format (Dettmers et al. 2023): block-wise absmax scales over 64
             weights, themselves quantized again; matmuls dequantize to the compute dtype (the
             model's), so LoRA on top trains in that dtype. fp4 uses a 4-bit float code.
  llm.int8   Linear8bitLt (Dettmers et al. 2022): int8 weights with an absmax scale per output row;
             input features holding an outlier (|x| > 6) are multiplied in 16-bit, the rest in int8.
             Quantized one layer at a time while loading (lit_llama/infer/load.py).

bitsandbytes is imported inside the functions: its import loads a native library, which can fail
on a machine (import_bitsandbytes turns that into one line) that never asks for these modes.
"""

import logging

import torch
import torch.nn as nn

from lit_llama.io.checkpoint import release_freed_heap, release_mapped_pages
from lit_llama.utils import UserError

MODES = ("nf4", "fp4", "llm.int8")
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


def dequantize_bnb_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of a bitsandbytes layer (or a plain one) in floating point."""
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
