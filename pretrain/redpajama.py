"""Pretrain a LLaMA from scratch on RedPajama (or any packed data) with the LLaMA paper's recipe."""

from pathlib import Path
from typing import Optional

from lit_llama.train.loop import TrainArgs
from lit_llama.train.setup import pretrain
from lit_llama.utils import run_cli


def main(
    train_data_dir: Path = Path("data/redpajama/train"),
    val_data_dir: Optional[Path] = Path("data/redpajama/val"),
    out_dir: Path = Path("out/redpajama"),
    model_name: Optional[str] = None,
    tokenizer_dir: Optional[Path] = None,
    initial_checkpoint_dir: Optional[Path] = None,
    block_size: Optional[int] = None,
    devices: int = 1,
    num_nodes: int = 1,
    precision: Optional[str] = None,
    train: TrainArgs = TrainArgs(max_iters=238_419, global_batch_size=2048, learning_rate=3e-4, warmup_iters=2000, weight_decay=0.1, eval_interval=1000, eval_iters=100, save_interval=1000),
    keep_last: int = 2,
    activation_checkpointing: bool = True,
    num_workers: int = 2,
    resume: bool = False,
    seed: int = 1337,
) -> None:
    """Pretrain a model config from scratch (or continue a checkpoint). Defaults: LLaMA-7B (Touvron et al. 2023): AdamW
    beta (0.9, 0.95), weight decay 0.1, gradient clipping 1.0, 2,000 warmup steps, cosine decay to
    10% of the peak 3e-4, 2,048-token context, 2,048 sequences (4M tokens) per step, 1T tokens.

    Args:
        train_data_dir: packed shards (scripts/prepare_redpajama.py or prepare_text_files.py), or a
            folder with a mix.json of weighted subfolders.
        val_data_dir: packed validation shards (none: no validation).
        out_dir: training states (step-*.ckpt, for --resume), model folders (step-*/, for
            generate.py --checkpoint_dir), CSV logs (logs/) and TensorBoard logs (tensorboard/).
        model_name: a Config name (lit_llama/model.py), trained from random weights (default: 7B,
            unless --initial_checkpoint_dir is given).
        tokenizer_dir: the checkpoint directory whose tokenizer the data was prepared with (default:
            checkpoints/Llama-2-7b-hf; with --initial_checkpoint_dir, that checkpoint's).
        initial_checkpoint_dir: continue pretraining this checkpoint (its config, weights and
            tokenizer) instead of training from random weights (pretrain/continued.py does the same).
        block_size: the training context (default: the config's).
        devices: devices per node (GPUs, or CPU processes); more than one in all: FSDP.
        num_nodes: machines; each runs this same command (see docs/pretraining.md).
        precision: a Fabric precision (default bf16-mixed on GPUs that support it, 32-true on CPU).
        keep_last: checkpoints kept (older ones are deleted; 0 keeps all).
        activation_checkpointing: recompute activations in backward to save memory.
        num_workers: data-loader processes per device.
        resume: continue from the last checkpoint in out_dir: weights, optimizer, step, data position.
        seed: random seed (initialisation, data order).
    """
    if initial_checkpoint_dir is None:
        model_name, tokenizer_dir = model_name or "7B", tokenizer_dir or Path("checkpoints/Llama-2-7b-hf")
    pretrain(train_data_dir=train_data_dir, val_data_dir=val_data_dir, out_dir=out_dir, model_name=model_name,
             tokenizer_dir=tokenizer_dir, initial_checkpoint_dir=initial_checkpoint_dir, args=train, block_size=block_size, devices=devices, num_nodes=num_nodes,
             precision=precision, resume=resume, seed=seed, activation_checkpointing=activation_checkpointing,
             num_workers=num_workers, keep_last=keep_last)


if __name__ == "__main__":
    run_cli(main)
