"""Quantization, by mode: which --quantize fits which checkpoint, and a layer's weight in floating
point whatever its format.

  nf4, fp4, llm.int8   bitsandbytes layers made from full-precision weights (lit_llama/quant/bnb.py):
                       QLoRA's 4-bit formats for finetuning, int8 for inference
  gptq.int4, .int3     packed integer layers (lit_llama/quant/packed.py) from calibration data
                       (lit_llama/quant/gptq.py, quantize/gptq.py), loaded from their own checkpoint
  int8, int4[-gN]      weight-only integers quantized while loading (lit_llama/quant/weight_only.py),
                       or once by quantize/weight_only.py into a checkpoint that loads without
                       --quantize; multiplied by lit_llama/csrc/lowbit_matmul.cpp on CPU: the fast
                       modes for inference
"""

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from lit_llama.io.checkpoint import KEPT_METHOD, LOWBIT_METHODS, describe_lowbit, packed_mode
from lit_llama.quant.bnb import dequantize_bnb_weight, import_bitsandbytes
from lit_llama.quant.packed import PackedLinear
from lit_llama.quant.weight_only import MODES as WEIGHT_ONLY_MODES, LowBitLinear, Int8Linear
from lit_llama.utils import UserError

# the --quantize choices of the generate and evaluate scripts
INFERENCE_MODES = WEIGHT_ONLY_MODES + ("llm.int8", "gptq.int4", "gptq.int3")


def check_quantize_mode(checkpoint_dir: Path, mode: Optional[str], quantization: Optional[dict]) -> None:
    """UserError unless --quantize `mode` fits the checkpoint whose quantization entry (None: float
    weights) is `quantization`: a packed checkpoint needs its own gptq.intN mode, a float one any other."""
    if mode is not None and mode not in INFERENCE_MODES:
        raise UserError(f"unknown --quantize {mode!r}; choose one of {', '.join(INFERENCE_MODES)}")
    entry = quantization
    if entry is not None and entry.get("method") in LOWBIT_METHODS:
        if mode is not None:
            source = ("convert the GGUF without --keep_quantized" if entry.get("method") == KEPT_METHOD
                      else "give the float checkpoint it was made from")
            raise UserError(f"{checkpoint_dir} is already quantized ({describe_lowbit(entry)}): load it without "
                            f"--quantize (for --quantize {mode}, {source})")
        return
    if entry is None and mode == "llm.int8":
        import_bitsandbytes(mode)
    if entry is not None and mode != packed_mode(entry):
        raise UserError(f"{checkpoint_dir} holds {entry.get('bits')}-bit weights packed by quantize/gptq.py "
                        f"(method {entry.get('method')}): load it with --quantize {packed_mode(entry)}"
                        + (f", not {mode}" if mode else ""))
    if entry is None and mode is not None and mode.startswith("gptq."):
        raise UserError(f"{checkpoint_dir} is not a GPTQ checkpoint: make one with `python quantize/gptq.py "
                        f"--checkpoint_dir {checkpoint_dir} --output_dir OUT --bits {mode[-1]}` and load OUT")


def dequantize_weight(linear: nn.Module) -> torch.Tensor:
    """The weight of `linear` in floating point: a quantized weight dequantized, a plain one as is."""
    if isinstance(linear, (PackedLinear, Int8Linear, LowBitLinear)):
        return linear.weight
    return dequantize_bnb_weight(linear)
