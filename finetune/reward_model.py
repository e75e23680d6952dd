"""Train a reward model (StackLLaMA's step 2) on preference pairs: LoRA on the base model plus a
scalar head, trained on the pairwise loss -log sigmoid(r_chosen - r_rejected)."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.peft.lora import LoRAConfig
from lit_llama.align.preference import maybe_quantize, train_on_pairs
from lit_llama.align.reward import REWARD_FILE, build_reward_model, reward_loss, save_reward_model
from lit_llama.train.training import TrainArgs
from lit_llama.utils import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/prefs"),
    out_dir: Path = Path("out/reward"),
    precision: Optional[str] = None,
    devices: int = 1,
    max_iters: int = 1000,
    micro_batch_size: int = 4,
    global_batch_size: int = 32,
    learning_rate: float = 2e-5,
    weight_decay: float = 0.0,
    warmup_iters: int = 50,
    eval_interval: int = 100,
    eval_iters: int = 20,
    save_interval: int = 500,
    resume: bool = False,
    seed: int = 1337,
    lora_r: int = 8,
    lora_alpha: float = 32,
    lora_dropout: float = 0.1,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    quantize: Optional[Literal["nf4", "fp4"]] = None,
) -> None:
    """Train a reward model on prepared preference pairs (defaults: StackLLaMA's LoRA r=8, alpha=32,
    dropout 0.1 on q and v, learning rate 2e-5). Validation loss, accuracy (the fraction of pairs
    with r_chosen > r_rejected) and mean margin are printed every --eval_interval steps and at the
    end; the LoRA and head weights go to out_dir/lit_reward.safetensors.

    Args:
        checkpoint_dir: the base model's checkpoint directory (usually the supervised-finetuned model).
        data_dir: pairs prepared by scripts/prepare_preferences.py with this tokenizer.
        out_dir: where training checkpoints (step-*.ckpt) and the final lit_reward.safetensors go.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        devices: number of devices (data parallel).
        max_iters: optimizer steps.
        micro_batch_size: pairs per forward pass per device (each pair is two sequences).
        global_batch_size: pairs per optimizer step over all devices (gradient accumulation).
        learning_rate: peak learning rate of the warmup + cosine schedule.
        weight_decay: AdamW weight decay.
        warmup_iters: steps of linear warmup.
        eval_interval: steps between validation loss and accuracy reports.
        eval_iters: validation micro-batches per evaluation.
        save_interval: steps between training checkpoints (LoRA, head and optimizer only).
        resume: continue from the last step-*.ckpt in out_dir (weights, optimizer, step, data order).
        seed: random seed (data order, head and LoRA initialisation).
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
    args = TrainArgs(learning_rate=learning_rate, weight_decay=weight_decay, warmup_iters=warmup_iters,
                     max_iters=max_iters, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                     eval_interval=eval_interval, eval_iters=eval_iters, save_interval=save_interval)
    lora = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key,
                      value=lora_value, projection=lora_projection, mlp=lora_mlp)

    def save_final(fabric, model, out):
        path = save_reward_model(model.module, out / REWARD_FILE, base_dir=checkpoint_dir)
        print(f"saved the reward model to {path}")

    result = train_on_pairs(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=args,
                            build=lambda base: build_reward_model(maybe_quantize(base, quantize), lora),
                            compute_loss=reward_loss, save_final=save_final, precision=precision, devices=devices,
                            resume=resume, seed=seed)
    if result.get("val"):
        v = result["val"]
        print(f"final validation: loss {v['loss']:.4f}, accuracy {v['accuracy']:.4f}, margin {v['margin']:.4f}")


if __name__ == "__main__":
    run_cli(main)
