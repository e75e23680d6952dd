"""LLaMA-Adapter v1 (Zhang et al. 2023, arXiv:2303.16199): a learnable prompt per upper layer whose
keys and values join the attention through a separate, zero-gated softmax.

In each adapted layer the queries of the tokens also attend to `prompt_length` learned vectors:

    y = softmax(Q Kᵀ/√d) V  +  tanh(g) · softmax(Q P_kᵀ/√d) P_v      (per head, g one scalar a head)

P_k and P_v are the layer's own frozen key/value projections of the prompt, without rotary
embedding (the prompt has no position), and the prompt is seen by every token (no mask). The gate
starts at zero, so a freshly adapted model is exactly the base model and finetuning starts from it.
Only the prompts and gates train: 1.2M parameters for 7B.

    model = add_adapter(load_model(checkpoint_dir), AdapterConfig())
    ... train ...
    save_adapter(model, out_dir)                    # out_dir/lit_adapter.safetensors
    load_adapter(load_model(checkpoint_dir), out_dir)
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.io.checkpoint import CheckpointError, load_weights_file, save_weights_file
from lit_llama.model import CausalSelfAttention, Config, LLaMA
from lit_llama.utils import UserError

ADAPTER_FILE = "lit_adapter.safetensors"
# parameter names (suffixes) that v1 adds; everything else stays frozen
ADAPTER_PARAMS = ("adapter_wte.weight", "gating_factor")


@dataclass
class AdapterConfig:
    prompt_length: int = 10  # learned prompt vectors per adapted layer
    start_layer: int = 2  # layers start_layer .. n_layer-1 are adapted (7B: the last 30 of 32)

    def check(self, config: Config) -> None:
        if self.prompt_length < 1:
            raise UserError(f"adapter prompt_length must be at least 1, got {self.prompt_length}")
        if not 0 <= self.start_layer < config.n_layer:
            raise UserError(f"adapter start_layer must be in [0, {config.n_layer}), got {self.start_layer}")


class AdapterAttention(CausalSelfAttention):
    """The base attention plus a gated attention over a learned prompt. Only `attend` changes:
    it gets the queries after rotary embedding and adds the prompt term, which depends on the
    current queries alone, so the KV cache (and generation) works unchanged."""

    def __init__(self, config: Config, prompt_length: int, device=None, dtype=None):
        super().__init__(config)
        self.adapter_wte = nn.Embedding(prompt_length, config.n_embd, device=device, dtype=dtype)
        nn.init.normal_(self.adapter_wte.weight, std=0.02)  # as the base model's embeddings
        # zero: tanh(0) = 0 switches the prompt off, so training starts from the base model exactly
        self.gating_factor = nn.Parameter(torch.zeros(config.n_head, device=device, dtype=dtype))

    @classmethod
    def from_base(cls, base: CausalSelfAttention, prompt_length: int) -> "AdapterAttention":
        """An adapter attention sharing `base`'s projections (no copy); the new parameters are put on
        the device and dtype of the base weights (meta stays meta)."""
        w = base.c_attn.weight
        # the parent's own projections are built on meta (no memory) and replaced by the base's
        with torch.device("meta"):
            new = cls(base.config, prompt_length, device=w.device, dtype=w.dtype)
        new.c_attn, new.c_proj, new.kv_cache = base.c_attn, base.c_proj, base.kv_cache
        return new.train(base.training)

    def prompt_kv(self):
        """Keys and values of the prompt, (1, n_query_groups, prompt_length, head_size) each: the
        layer's c_attn (with v2's bias and scale, if any) on the prompt vectors, no rotary."""
        c, hs = self.config, self.config.head_size
        P = self.adapter_wte.weight.size(0)
        _, k, v = self.c_attn(self.adapter_wte.weight).split(
            [c.n_head * hs, c.n_query_groups * hs, c.n_query_groups * hs], dim=-1)
        return tuple(t.view(1, P, c.n_query_groups, hs).transpose(1, 2) for t in (k, v))

    def attend(self, q, k, v, mask):
        y = super().attend(q, k, v, mask)
        pk, pv = (t.expand(q.size(0), -1, -1, -1) for t in self.prompt_kv())
        gqa = self.config.n_query_groups != self.config.n_head
        # a separate softmax over the prompt, no mask: every token sees the whole prompt
        yp = F.scaled_dot_product_attention(q, pk, pv, enable_gqa=gqa)
        return y + torch.tanh(self.gating_factor).view(1, -1, 1, 1) * yp


def add_adapter(model: LLaMA, config: AdapterConfig) -> LLaMA:
    """Adapt `model` in place: adapter attention in layers start_layer.., everything else frozen."""
    if getattr(model, "adapter_config", None) is not None:
        raise UserError("the model already has an adapter; add or load one onto a fresh base model")
    config.check(model.config)
    for block in model.transformer.h[config.start_layer:]:
        block.attn = AdapterAttention.from_base(block.attn, config.prompt_length)
    model.adapter_config = config
    mark_trainable(model, adapter_param_names(model))
    return model


def adapter_param_names(model: nn.Module) -> List[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(ADAPTER_PARAMS)]


def mark_trainable(model: nn.Module, names: List[str]) -> None:
    names = set(names)
    for n, p in model.named_parameters():
        p.requires_grad = n in names


def adapter_state_dict(model: LLaMA) -> Dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in adapter_param_names(model)}


# ---------------------------------------------------------------- adapter files (shared with v2)

# what each kind of file is called in errors, and how to load it
KINDS = {"adapter": ("a LLaMA-Adapter v1 file", "load_adapter"),
         "adapter_v2": ("a LLaMA-Adapter v2 file", "load_adapter_v2")}
# fields of the base Config that change no weight and no computation within the context
_BASE_FIELDS_IGNORED = ("name", "block_size")


def save_adapter_file(model: LLaMA, path: Path, kind: str, default_name: str,
                      tensors: Dict[str, torch.Tensor]) -> Path:
    """Write `tensors` with the adapter and base configs; `path` is the file or (no .safetensors
    suffix) the folder to hold `default_name`. Returns the file written."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / default_name
    meta = {"kind": kind, "adapter": asdict(model.adapter_config), "base": model.config.asdict()}
    save_weights_file(path, tensors, meta)
    return path


def load_adapter_file(model: LLaMA, path: Path, kind: str, default_name: str,
                      add: Callable[[LLaMA, AdapterConfig], LLaMA],
                      names: Callable[[LLaMA], List[str]]) -> LLaMA:
    """Check a file's kind and base config against `model`, `add` the adapter it describes, then copy
    the tensors `names` lists into the model (same device and dtype as the model's weights)."""
    tensors, meta = load_weights_file(path, default_name)
    found = meta.get("kind")
    if found != kind:
        what = KINDS[found][0] + f"; load it with {KINDS[found][1]}" if found in KINDS else "not an adapter file"
        raise CheckpointError(f"{path} is {what}, not {KINDS[kind][0]}")
    base, mine = meta.get("base") or {}, model.config.asdict()
    diffs = [f"{k}={v!r} (model: {mine.get(k)!r})" for k, v in base.items()
             if k not in _BASE_FIELDS_IGNORED and mine.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} was trained for a different base model: {', '.join(diffs)}")
    try:
        config = AdapterConfig(**meta["adapter"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path} has no valid adapter config ({e})")
    add(model, config)
    params = dict(model.named_parameters())
    expected = names(model)
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    bad = [n for n in expected if n in tensors and tensors[n].shape != params[n].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{path} does not match its own config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shape {bad[:3]}")
    with torch.no_grad():
        for n in expected:
            params[n].copy_(tensors[n])
    return model


def save_adapter(model: LLaMA, path: Path) -> Path:
    return save_adapter_file(model, path, "adapter", ADAPTER_FILE, adapter_state_dict(model))


def load_adapter(model: LLaMA, path: Path) -> LLaMA:
    """Add the adapter of `path` (a file or the folder holding lit_adapter.safetensors) to the base
    `model`, in place."""
    return load_adapter_file(model, path, "adapter", ADAPTER_FILE, add_adapter, adapter_param_names)
