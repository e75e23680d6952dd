"""LLaMA-Adapter v2 (Gao et al. 2023, arXiv:2304.15010): v1's gated prompts, plus a learnable bias
and scale on every linear layer of the blocks, y = s ⊙ (W x + b), and trainable RMSNorm weights.

Bias 0 and scale 1 leave each layer exactly as it was, so (with v1's zero gates) a freshly adapted
model is the base model. The frozen linears are wrapped, not copied. Wrapping renames their weights
in the state dict (`c_attn.weight` -> `c_attn.linear.weight`); adapter files hold only the new
parameters and the norms, so they are unaffected.
"""

from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

from lit_llama.peft.adapter import (ADAPTER_PARAMS, AdapterConfig, add_adapter, load_adapter_file, mark_trainable,
                               save_adapter_file)
from lit_llama.model import LLaMA, RMSNorm

ADAPTER_V2_FILE = "lit_adapter_v2.safetensors"
V2_PARAMS = ADAPTER_PARAMS + ("adapter_bias", "adapter_scale")


class AdapterV2Linear(nn.Module):
    """A frozen linear layer with a learnable per-output bias and scale: s ⊙ (W x + b)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        w = linear.weight
        self.adapter_bias = nn.Parameter(torch.zeros(linear.out_features, device=w.device, dtype=w.dtype))
        self.adapter_scale = nn.Parameter(torch.ones(linear.out_features, device=w.device, dtype=w.dtype))

    @property
    def weight(self) -> torch.Tensor:  # code that reads a layer's weight keeps working
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_scale * (self.linear(x) + self.adapter_bias)


def add_adapter_v2(model: LLaMA, config: AdapterConfig) -> LLaMA:
    """v1's prompts (layers start_layer..), bias and scale on every linear layer of every block,
    trainable RMSNorms; everything else frozen. In place."""
    add_adapter(model, config)
    for block in model.transformer.h:
        # collect first: replacing children while iterating named_modules would visit the wrappers
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        for name, linear in linears:
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, AdapterV2Linear(linear))
    mark_trainable(model, adapter_v2_param_names(model))
    return model


def adapter_v2_param_names(model: nn.Module) -> List[str]:
    norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, RMSNorm)}
    return [n for n, _ in model.named_parameters() if n.endswith(V2_PARAMS) or n in norms]


def adapter_v2_state_dict(model: LLaMA) -> Dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in adapter_v2_param_names(model)}


def save_adapter_v2(model: LLaMA, path: Path) -> Path:
    return save_adapter_file(model, path, "adapter_v2", ADAPTER_V2_FILE, adapter_v2_state_dict(model))


def load_adapter_v2(model: LLaMA, path: Path) -> LLaMA:
    """Add the v2 adapter of `path` (a file or the folder holding lit_adapter_v2.safetensors) to
    the base `model`, in place; its RMSNorm weights replace the base's."""
    return load_adapter_file(model, path, "adapter_v2", ADAPTER_V2_FILE, add_adapter_v2, adapter_v2_param_names)
