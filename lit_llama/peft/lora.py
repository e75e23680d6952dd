"""Low-rank adaptation (LoRA, Hu et al. 2021) of a LLaMA model, by composition.

A targeted linear W (out, in) stays frozen and gains a trainable update B @ A of rank r, A (r, in)
and B (out, r), scaled by alpha / r: y = W x + (alpha / r) B A dropout(x). A starts Kaiming-uniform
and B at zero, so at initialization the adapted model computes exactly what the base model does.
Defaults are Alpaca-LoRA's: r=8, alpha=16, dropout 0.05, on the query and value projections.

The modules wrap the model's own linears (a plain nn.Linear or a bitsandbytes Linear4bit for
QLoRA) instead of patching nn.Linear, so `merge_lora` can fold the update into the weights and put
the plain modules back, leaving an ordinary LLaMA.
"""

import contextlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from lit_llama.io.checkpoint import CheckpointError, load_weights_file, save_weights_file
from lit_llama.model import Config, LLaMA
from lit_llama.quant.quantization import dequantize_weight

LORA_FILE = "lit_lora.safetensors"


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    # which matrices are adapted: parts of the fused attention input, its output projection, the MLP
    query: bool = True
    key: bool = False
    value: bool = True
    projection: bool = False
    mlp: bool = False


def _new_lora_pair(base: nn.Linear, r: int, out_features: int) -> Tuple[nn.Parameter, nn.Parameter]:
    """A (r, in) and B (out, r) on the base weight's device, in its compute dtype: a 4-bit weight
    is stored as uint8, so its module's `compute_dtype` is the dtype the update must have. On the
    meta device nothing is allocated; the caller materializes and calls `reset_parameters`."""
    w = base.weight
    dtype = getattr(base, "compute_dtype", None) or (w.dtype if w.is_floating_point() else torch.float32)
    A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=dtype))
    B = nn.Parameter(torch.empty(out_features, r, device=w.device, dtype=dtype))
    return A, B


def _reset_pair(A: torch.Tensor, B: torch.Tensor) -> None:
    # A as nn.Linear initializes its weight (and as Alpaca-LoRA/peft do); B = 0 makes the update 0
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


class LoRALinear(nn.Module):
    """`base(x) + scale * B A dropout(x)` with `base` frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.lora_A, self.lora_B = _new_lora_pair(base, r, base.out_features)
        self.disabled = False  # set by `lora_disabled`: the base layer alone
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_pair(self.lora_A, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


class LoRAQKVLinear(nn.Module):
    """LoRA for the fused q/k/v projection: each enabled part ("q", "k", "v") has its own A and B,
    and its update is added to that part's slice of the output only, so q-and-v LoRA leaves k as
    the base computes it (as separate q_proj/v_proj adapters would)."""

    def __init__(self, base: nn.Linear, sizes: Dict[str, int], enabled: List[str], r: int, alpha: float,
                 dropout: float):
        super().__init__()
        if sum(sizes.values()) != base.out_features:
            raise ValueError(f"q/k/v sizes {sizes} do not add up to the layer's {base.out_features} outputs")
        self.base = base
        self.sizes = sizes  # in output order: q, k, v
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        pairs = {p: _new_lora_pair(base, r, sizes[p]) for p in enabled}
        self.lora_A = nn.ParameterDict({p: A for p, (A, _) in pairs.items()})
        self.lora_B = nn.ParameterDict({p: B for p, (_, B) in pairs.items()})
        self.disabled = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in self.lora_A:
            _reset_pair(self.lora_A[p], self.lora_B[p])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        parts = dict(zip(self.sizes, self.base(x).split(list(self.sizes.values()), dim=-1)))
        x = self.dropout(x)
        for p in self.lora_A:
            parts[p] = parts[p] + (x @ self.lora_A[p].T @ self.lora_B[p].T) * self.scale
        return torch.cat(list(parts.values()), dim=-1)

    def delta_weight(self) -> torch.Tensor:
        # B A for the parts with LoRA, zero rows for the others
        device = self.base.weight.device
        rows = [(self.lora_B[p].float() @ self.lora_A[p].float()) * self.scale if p in self.lora_A
                else torch.zeros(n, self.base.in_features, device=device) for p, n in self.sizes.items()]
        return torch.cat(rows, dim=0)


LORA_MODULES = (LoRALinear, LoRAQKVLinear)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRA module computes its frozen base layer only, exactly (the branch
    is skipped, not multiplied by zero): the reference model of DPO and PPO without a second copy
    of the weights. Works through Fabric's and other wrappers."""
    modules = [m for m in model.modules() if isinstance(m, LORA_MODULES)]
    if not modules:
        raise ValueError("the model has no LoRA modules to disable")
    try:
        for m in modules:
            m.disabled = True
        yield model
    finally:
        for m in modules:
            m.disabled = False


def add_lora(model: LLaMA, config: LoRAConfig) -> LLaMA:
    """Wrap the targeted linears of `model` in LoRA modules (in place), freeze everything but the
    LoRA parameters, and record `model.lora_config`. Returns `model`."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA; merge_lora it first or use it as it is")
    if config.r <= 0:
        raise ValueError(f"LoRA rank must be positive, got r={config.r}")
    c = model.config
    for p in model.parameters():
        p.requires_grad_(False)
    kw = dict(r=config.r, alpha=config.alpha, dropout=config.dropout)
    qkv = [p for p, on in (("q", config.query), ("k", config.key), ("v", config.value)) if on]
    hs = c.head_size
    sizes = {"q": c.n_head * hs, "k": c.n_query_groups * hs, "v": c.n_query_groups * hs}
    targets = [(b.attn, "c_attn") for b in model.transformer.h if qkv]
    targets += [(b.attn, "c_proj") for b in model.transformer.h if config.projection]
    targets += [(b.mlp, n) for b in model.transformer.h if config.mlp for n in ("c_fc1", "c_fc2", "c_proj")]
    for parent, name in targets:
        base = getattr(parent, name)
        lora = LoRAQKVLinear(base, sizes, qkv, **kw) if name == "c_attn" else LoRALinear(base, **kw)
        # new modules start in training mode: follow the model's, or an eval model would get dropout
        setattr(parent, name, lora.train(base.training))
    model.lora_config = config
    return model


def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Only the LoRA tensors (A and B of every adapted matrix), under their state-dict names."""
    return {k: v for k, v in model.state_dict().items() if any(s.startswith("lora_") for s in k.split("."))}


def save_lora(model: LLaMA, path: Path) -> Path:
    """Write the LoRA weights, the LoRA config and the base model's config (to recognize a file
    made for another base) to `path`: a `.safetensors` file or a folder (gets `lit_lora.safetensors`)."""
    if getattr(model, "lora_config", None) is None:
        raise ValueError("the model has no LoRA to save (add_lora or load_lora first)")
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_FILE
    meta = {**asdict(model.lora_config), "base": model.config.asdict()}
    save_weights_file(path, lora_state_dict(model), meta)
    return path


def load_lora(model: LLaMA, path: Path) -> LLaMA:
    """Add the LoRA of `path` (file or folder) to `model` with the file's config and weights.

    A model that already has LoRA with the same config just gets the weights (resuming training).
    A file made for another base model, or whose tensors do not fit, raises CheckpointError."""
    tensors, meta = load_weights_file(path, LORA_FILE)
    names = {f.name for f in fields(LoRAConfig)}
    if "base" not in meta or not names <= set(meta):
        raise CheckpointError(f"{path} is not a LoRA file (its metadata has no LoRA config)")
    try:
        base = Config(**meta["base"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has a corrupted base-model config: {e}")
    # `name` is cosmetic; every other field changes shapes or numerics
    diff = [f"{k}={v!r} (model: {getattr(model.config, k)!r})" for k, v in base.asdict().items()
            if k != "name" and v != getattr(model.config, k)]
    if diff:
        raise CheckpointError(f"{path} is a LoRA for another base model: {', '.join(diff[:4])}")
    config = LoRAConfig(**{k: meta[k] for k in names})
    current = getattr(model, "lora_config", None)
    if current is not None and current != config:
        raise CheckpointError(f"{path} has LoRA config {config}, the model already has {current}")
    # check the tensors against a LoRA model on the meta device (nothing allocated) before
    # touching `model`, so that a bad file leaves it as it was
    with torch.device("meta"):
        expected = lora_state_dict(add_lora(LLaMA(model.config), config))
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its LoRA config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in expected.items():
        if v.shape != tensors[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model needs {tuple(v.shape)}")
    if current is None:
        add_lora(model, config)
    model.load_state_dict(tensors, strict=False)
    return model


def merge_lora(model: LLaMA) -> LLaMA:
    """Fold each update into its base weight (W + scale * B A, summed in float32) and put plain
    nn.Linear modules back: the result is an ordinary LLaMA with the base model's state-dict keys.
    A 4-bit base layer is dequantized (merged in its compute dtype) and the layers without LoRA
    stay 4-bit; for a full-precision result, load the LoRA onto the full-precision base and merge
    that, as scripts/merge_lora.py does."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LORA_MODULES):
                base = child.base
                w = dequantize_weight(base)  # a plain weight as it is
                merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                   device="meta")
                merged.weight = nn.Parameter((w.float() + child.delta_weight().to(w.device)).to(w.dtype),
                                             requires_grad=False)
                if base.bias is not None:
                    merged.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
                setattr(parent, name, merged.train(child.training))
    model.lora_config = None
    return model
