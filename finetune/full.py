"""Full finetuning on instruction data: every weight trains; FSDP-sharded across devices."""

from pathlib import Path
from typing import Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.train.loop import TrainArgs
from lit_llama.train.setup import checkpoint_folder_saver, finetune, fsdp_strategy
from lit_llama.utils import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/full/alpaca"),
    precision: Optional[str] = None,
    devices: int = 1,
    train: TrainArgs = TrainArgs(learning_rate=3e-5),
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
        activation_checkpointing: recompute activations in backward to save memory (FSDP only).
        resume: continue from the last step-*.ckpt in out_dir (model, optimizer and step).
        seed: random seed (data order, initialisation).
    """
    finetune(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=train, wrap=lambda m: m,
             save_final=checkpoint_folder_saver(checkpoint_dir, "final"),
             precision=precision, devices=devices, resume=resume, seed=seed, trainable_only=False,
             strategy=fsdp_strategy(devices, activation_checkpointing))


if __name__ == "__main__":
    run_cli(main)
