"""Weight quantization of the transformer blocks' linear layers with bitsandbytes.

Modes:
  nf4  4-bit NormalFloat, QLoRA's format (Dettmers et al. 2023): block-wise absmax scales over 64
       weights, themselves quantized again (double quantization); matmuls dequantize to the
       compute dtype (the model's dtype), so LoRA on top trains in that dtype.
  fp4  the same with a 4-bit float code.

The embedding and the output head stay in full precision, as in QLoRA: they are a small part of
the model and the most sensitive to quantization error.
"""

import torch
import torch.nn as nn

from lit_llama.utils import UserError

MODES = ("nf4", "fp4")


def _linear4bit(linear: nn.Linear, mode: str) -> nn.Module:
    from bitsandbytes.nn import Linear4bit, Params4bit

    w = linear.weight
    # built on meta so no random full-precision weight is allocated only to be replaced
    q = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                   compute_dtype=w.dtype, quant_type=mode, device="meta")
    # Params4bit quantizes when moved to a device; on CPU nothing else would trigger it, so move
    # it explicitly to the weight's own device (a memory-mapped weight is read once, not copied)
    q.weight = Params4bit(w.detach(), requires_grad=False, quant_type=mode, module=q).to(w.device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return q


_QUANTIZERS = {"nf4": _linear4bit, "fp4": _linear4bit}


def quantize_linears(model: nn.Module, mode: str) -> nn.Module:
    """Replace every full-precision nn.Linear in `model.transformer.h` (in place) by its quantized
    counterpart for `mode`; the new weights are frozen. Returns `model`."""
    if mode not in _QUANTIZERS:
        raise UserError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    for block in model.transformer.h:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                # exactly nn.Linear: bitsandbytes' layers subclass it and are already quantized
                if type(child) is nn.Linear:
                    if child.weight.is_meta:
                        raise ValueError("cannot quantize weights on the meta device: load them first")
                    # keep the replaced layer's train/eval mode (new modules start in training)
                    setattr(parent, name, _QUANTIZERS[mode](child, mode).train(child.training))
    return model


def dequantize_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of `linear` in floating point: a quantized weight dequantized, a plain one as is."""
    w = linear.weight
    if not getattr(w, "bnb_quantized", False):
        return w.detach()
    import bitsandbytes.functional as F

    if getattr(w.quant_state, "packing_format_for_cpu", False):
        # on CPUs with AVX512-BF16, bitsandbytes repacks the weight at the first inference forward;
        # unpack it (in place, as bitsandbytes' own state_dict does) to dequantize the usual layout
        w.data, w.quant_state = F._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return F.dequantize_4bit(w.data, w.quant_state)
