"""A reward model (StackLLaMA, Ouyang et al. 2022): the LLaMA body and a scalar head.

The head (a Linear n_embd -> 1) reads the final-norm hidden state of the last non-padding token of
each row; with right padding and causal attention, that state is exactly the one the unpadded text
gives. Trained with LoRA on the body (the head trains too) on pairs, with the pairwise loss
-log sigmoid(r_chosen - r_rejected).

The weights file (`lit_reward.safetensors`) holds the LoRA tensors and the head, and its metadata
the LoRA config and the base model's config, so that loading it onto another base fails clearly.

API for other scripts (PPO, self-distillation): `load_reward_model(checkpoint_dir, reward_path,
device)` and `score(reward_model, tokenizer, texts)`.
"""

from dataclasses import asdict, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_llama.data.records import read_records
from lit_llama.io.checkpoint import (DEFAULT_CHECKPOINT_DIR, CheckpointError, load_config, load_model, load_weights_file,
                                     save_weights_file, validate_checkpoint_dir)
from lit_llama.peft.lora import LoRAConfig, add_lora, lora_state_dict
from lit_llama.model import Config, LLaMA
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError, make_fabric, run_cli

REWARD_FILE = "lit_reward.safetensors"
KIND = "reward_model"


class RewardModel(nn.Module):
    def __init__(self, model: LLaMA):
        super().__init__()
        self.model = model
        self.config = model.config
        w = model.transformer.wte.weight
        device = w.device if w.device.type != "meta" else None
        self.head = nn.Linear(model.config.n_embd, 1, device=device)
        with torch.no_grad():  # small outputs at the start: the loss begins near log 2
            nn.init.normal_(self.head.weight, std=1.0 / (model.config.n_embd + 1) ** 0.5)
            nn.init.zeros_(self.head.bias)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The body's final-norm hidden states (B, T, n_embd): LLaMA.forward without the output head."""
        return self.model.hidden_states(idx)

    def forward(self, idx: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One reward per row (float32, shape (B,)), read at position lengths - 1 (default: the last)."""
        h = self.hidden_states(idx)
        if lengths is None:
            last = h[:, -1]
        else:
            last = h[torch.arange(h.size(0), device=h.device), lengths.to(h.device) - 1]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()


def pairwise_loss(rewards: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Rewards of 2B rows, the B chosen then the B rejected: (-mean log sigmoid(r_c - r_r),
    {"accuracy": fraction with r_c > r_r, "margin": mean r_c - r_r})."""
    chosen, rejected = rewards.float().chunk(2)
    diff = chosen - rejected
    return -F.logsigmoid(diff).mean(), {"accuracy": (diff > 0).float().mean(), "margin": diff.mean().detach()}


def reward_loss(model, batch: Dict[str, torch.Tensor]):
    """`compute_loss` for training.fit: the pairwise loss of a collate_pairs batch."""
    return pairwise_loss(model(batch["input_ids"], batch["lengths"]))


def build_reward_model(base: LLaMA, lora_config: LoRAConfig) -> RewardModel:
    """LoRA on `base` (frozen), wrapped with a trainable head."""
    model = RewardModel(add_lora(base, lora_config))
    for p in model.head.parameters():
        p.requires_grad_(True)
    return model


def reward_state_dict(model: RewardModel) -> Dict[str, torch.Tensor]:
    return {**lora_state_dict(model), **{f"head.{k}": v for k, v in model.head.state_dict().items()}}


def save_reward_model(model: RewardModel, path: Path, base_dir: Optional[Path] = None) -> Path:
    """Write the LoRA and head weights with the LoRA and base configs (atomically). `path` is a
    `.safetensors` file or a folder (gets lit_reward.safetensors)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / REWARD_FILE
    meta = {"kind": KIND, "lora": asdict(model.model.lora_config), "base": model.config.asdict(),
            "base_dir": str(base_dir) if base_dir is not None else None}
    save_weights_file(path, reward_state_dict(model), meta)
    return path


def _describe(config: Config) -> str:
    return f"{config.name or 'unnamed'} ({config.n_layer} layers, n_embd {config.n_embd}, vocab {config.vocab_size})"


def read_reward_file(path: Path, base: Config) -> Tuple[Dict[str, torch.Tensor], LoRAConfig]:
    """The tensors and LoRA config of a reward file, checked against the base model's config."""
    tensors, meta = load_weights_file(path, REWARD_FILE)
    if meta.get("kind") != KIND or "base" not in meta or "lora" not in meta:
        raise CheckpointError(f"{path} is not a reward model file (train one with finetune/reward_model.py)")
    try:
        trained_on = Config(**meta["base"])
        lora = LoRAConfig(**{f.name: meta["lora"][f.name] for f in fields(LoRAConfig)})
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} has corrupted metadata: {e}")
    diff = [f"{k}={v!r}, not {getattr(base, k)!r}" for k, v in trained_on.asdict().items()
            if k != "name" and v != getattr(base, k)]
    if diff:
        where = f" ({meta['base_dir']})" if meta.get("base_dir") else ""
        raise CheckpointError(f"reward model {path} was trained on base {_describe(trained_on)}{where}, not "
                              f"{_describe(base)}: {'; '.join(diff[:3])}")
    return tensors, lora


def load_reward_model(checkpoint_dir: Path, reward_path: Path, device="cpu",
                      dtype: Optional[torch.dtype] = None) -> RewardModel:
    """The base checkpoint with the reward file's LoRA and head, on `device`, in eval mode.

    A file trained on another base, or whose tensors do not fit, raises CheckpointError (a
    UserError: one line from the scripts)."""
    validate_checkpoint_dir(checkpoint_dir)
    config = load_config(checkpoint_dir)
    tensors, lora = read_reward_file(reward_path, config)
    with torch.device("meta"):
        expected = reward_state_dict(build_reward_model(LLaMA(config), lora))
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    bad = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{reward_path} does not fit its recorded config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, wrong shape {bad[:3]}")
    model = build_reward_model(load_model(checkpoint_dir, config), lora)
    model.load_state_dict(tensors, strict=False)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def score(reward_model: RewardModel, tokenizer, texts: List[str], batch_size: int = 8) -> torch.Tensor:
    """One reward (float32, on CPU) per text, each encoded as in training (with EOS appended) and
    cut to the model's context, keeping its end."""
    was_training = reward_model.training
    reward_model.eval()
    device = next(reward_model.parameters()).device
    block = reward_model.config.block_size
    pad = tokenizer.eos_id or 0
    out = []
    for start in range(0, len(texts), batch_size):
        seqs = [tokenizer.encode(t, eos=True)[-block:] for t in texts[start:start + batch_size]]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        lengths = torch.tensor([len(s) for s in seqs])
        out.append(reward_model(ids.to(device), lengths.to(device)).cpu())
    reward_model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def main(
    reward_path: Path = Path("out/reward"),
    checkpoint_dir: Optional[Path] = None,
    text: Optional[str] = None,
    texts_file: Optional[Path] = None,
    precision: Optional[str] = None,
) -> None:
    """Print the reward of each text, one per line (``python -m lit_llama.align.reward``).

    Args:
        reward_path: finetune/reward_model.py's --out_dir, or the lit_reward.safetensors file in it.
        checkpoint_dir: the base model the reward model was trained on (default: the embedded model).
        text: one text to score, e.g. "Question: ...\\n\\nAnswer: ..." for a StackLLaMA reward model.
        texts_file: a JSON list of strings, or a file of JSON strings one per line, to score.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
    """
    checkpoint_dir = checkpoint_dir or DEFAULT_CHECKPOINT_DIR
    texts = [text] if text is not None else []
    if texts_file is not None:
        items = read_records(texts_file, "texts file")
        if not all(isinstance(t, str) for t in items):
            raise UserError(f"{texts_file} holds something other than strings")
        texts += items
    if not texts:
        raise UserError("pass --text or --texts_file")
    fabric = make_fabric(precision)
    with fabric.init_tensor():
        model = load_reward_model(checkpoint_dir, reward_path, device=fabric.device)
    model = fabric.setup_module(model)
    for r in score(model, Tokenizer(checkpoint_dir), texts).tolist():
        print(f"{r:.6f}")


if __name__ == "__main__":
    run_cli(main)
