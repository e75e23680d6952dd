"""Full finetuning on instruction data: every weight trains; FSDP-sharded across devices."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.train.training import TrainArgs, finetune, fsdp_strategy, save_full_checkpoint
from lit_llama.utils import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/full/alpaca"),
    precision: Optional[str] = None,
    devices: int = 1,
    max_iters: int = 1000,
    micro_batch_size: int = 4,
    global_batch_size: int = 128,
    learning_rate: float = 3e-5,
    weight_decay: float = 0.0,
    warmup_iters: int = 100,
    eval_interval: int = 100,
    eval_iters: int = 20,
    save_interval: int = 500,
    activation_checkpointing: bool = False,
    resume: bool = False,
    seed: int = 1337,
) -> None:
    """Finetune all weights of a checkpoint on prepared instruction data.

    Args:
        checkpoint_dir: the base model's checkpoint directory.
        data_dir: data prepared by scripts/prepare_alpaca.py (or prepare_dolly.py) with this tokenizer.
        out_dir: where training checkpoints (step-*.ckpt) and the final model (out_dir/final) go.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        devices: number of devices (GPUs, or CPU processes); above 1 the model is FSDP-sharded.
        max_iters: optimizer steps.
        micro_batch_size: examples per forward pass per device.
        global_batch_size: examples per optimizer step over all devices (gradient accumulation).
        learning_rate: peak learning rate of the warmup + cosine schedule.
        weight_decay: AdamW weight decay.
        warmup_iters: steps of linear warmup.
        eval_interval: steps between validation losses and sample generations.
        eval_iters: validation batches per evaluation.
        save_interval: steps between training checkpoints.
        activation_checkpointing: recompute activations in backward to save memory (FSDP only).
        resume: continue from the last step-*.ckpt in out_dir (model, optimizer and step).
        seed: random seed (data order, initialisation).
    """
    args = TrainArgs(learning_rate=learning_rate, weight_decay=weight_decay, warmup_iters=warmup_iters,
                     max_iters=max_iters, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                     eval_interval=eval_interval, eval_iters=eval_iters, save_interval=save_interval)
    finetune(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=args, wrap=lambda m: m,
             save_final=lambda fabric, model, out: save_full_checkpoint(fabric, model, out / "final", checkpoint_dir),
             precision=precision, devices=devices, resume=resume, seed=seed, trainable_only=False,
             strategy=fsdp_strategy(devices, activation_checkpointing))


if __name__ == "__main__":
    run_cli(main)
