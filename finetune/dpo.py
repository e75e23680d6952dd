"""Direct Preference Optimization (Rafailov et al. 2023) with LoRA: the policy is the base model
plus LoRA, the reference the same model with LoRA bypassed (no second copy of the weights)."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.align.dpo import make_dpo_loss
from lit_llama.peft.lora import LoRAConfig, add_lora, save_lora
from lit_llama.align.preference import maybe_quantize, train_on_pairs
from lit_llama.train.training import TrainArgs
from lit_llama.utils import UserError, run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/prefs"),
    out_dir: Path = Path("out/dpo"),
    beta: float = 0.1,
    precision: Optional[str] = None,
    devices: int = 1,
    max_iters: int = 1000,
    micro_batch_size: int = 2,
    global_batch_size: int = 32,
    learning_rate: float = 5e-5,
    weight_decay: float = 0.0,
    warmup_iters: int = 100,
    eval_interval: int = 100,
    eval_iters: int = 20,
    save_interval: int = 500,
    resume: bool = False,
    seed: int = 1337,
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    quantize: Optional[Literal["nf4", "fp4"]] = None,
) -> None:
    """Train LoRA weights with DPO on prepared preference pairs. Validation loss, reward margin
    (beta times the chosen-minus-rejected log-ratio, averaged) and accuracy (the fraction of pairs
    with a positive margin) are printed every --eval_interval steps and at the end; the LoRA weights
    go to out_dir/lit_lora.safetensors, which generate/lora.py and scripts/merge_lora.py read.

    Args:
        checkpoint_dir: the base model (usually the supervised-finetuned one); also the reference.
        data_dir: pairs prepared by scripts/prepare_preferences.py with this tokenizer.
        out_dir: where training checkpoints (step-*.ckpt) and the final lit_lora.safetensors go.
        beta: DPO's temperature: how far the policy may move from the reference (0.1 in the paper).
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        devices: number of devices (data parallel).
        max_iters: optimizer steps.
        micro_batch_size: pairs per forward pass per device (each pair is two sequences).
        global_batch_size: pairs per optimizer step over all devices (gradient accumulation).
        learning_rate: peak learning rate of the warmup + cosine schedule.
        weight_decay: AdamW weight decay.
        warmup_iters: steps of linear warmup.
        eval_interval: steps between validation reports.
        eval_iters: validation micro-batches per evaluation.
        save_interval: steps between training checkpoints (LoRA weights and optimizer only).
        resume: continue from the last step-*.ckpt in out_dir (weights, optimizer, step, data order).
        seed: random seed (data order, LoRA initialisation).
        lora_r: rank of the low-rank update.
        lora_alpha: the update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA branch's input.
        lora_query: adapt the query projection.
        lora_key: adapt the key projection.
        lora_value: adapt the value projection.
        lora_projection: adapt the attention output projection.
        lora_mlp: adapt the three MLP matrices.
        quantize: QLoRA: hold the frozen base linear layers in bitsandbytes 4-bit (nf4 or fp4).
    """
    if beta <= 0:
        raise UserError(f"--beta must be positive, got {beta}")
    args = TrainArgs(learning_rate=learning_rate, weight_decay=weight_decay, warmup_iters=warmup_iters,
                     max_iters=max_iters, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                     eval_interval=eval_interval, eval_iters=eval_iters, save_interval=save_interval)
    lora = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key,
                      value=lora_value, projection=lora_projection, mlp=lora_mlp)

    def save_final(fabric, model, out):
        print(f"saved the LoRA weights to {save_lora(model.module, out)}")

    result = train_on_pairs(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=args,
                            build=lambda base: add_lora(maybe_quantize(base, quantize), lora),
                            compute_loss=make_dpo_loss(beta), save_final=save_final, precision=precision,
                            devices=devices, resume=resume, seed=seed)
    if result.get("val"):
        v = result["val"]
        print(f"final validation: loss {v['loss']:.4f}, margin {v['margin']:.4f}, accuracy {v['accuracy']:.4f}")


if __name__ == "__main__":
    run_cli(main)
