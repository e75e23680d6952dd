"""Continue pretraining a converted checkpoint on packed data (a new language, a new domain), as
OpenChineseLLaMA and Chinese-LLaMA continue LLaMA on Chinese text; see docs/pretraining.md."""

from pathlib import Path
from typing import Optional

from lit_llama.train.loop import TrainArgs
from lit_llama.train.setup import pretrain
from lit_llama.utils import run_cli


def main(
    initial_checkpoint_dir: Path,
    train_data_dir: Path,
    val_data_dir: Optional[Path] = None,
    out_dir: Path = Path("out/continued"),
    block_size: Optional[int] = None,
    devices: int = 1,
    num_nodes: int = 1,
    precision: Optional[str] = None,
    train: TrainArgs = TrainArgs(max_iters=10_000, global_batch_size=512, micro_batch_size=4, learning_rate=2e-4, warmup_iters=200, weight_decay=0.01, eval_interval=500, eval_iters=50, save_interval=1000),
    keep_last: int = 2,
    activation_checkpointing: bool = True,
    num_workers: int = 2,
    resume: bool = False,
    seed: int = 1337,
    prompt: Optional[str] = None,
) -> None:
    """Continue pretraining a checkpoint (its weights, config and tokenizer) on packed data.

    A fresh AdamW, warmup to a new peak and cosine decay, FSDP across devices and nodes,
    checkpoints generate.py loads and `--resume`, all as pretrain/redpajama.py. The data must be
    prepared with this checkpoint's tokenizer (scripts/prepare_text_files.py --checkpoint_dir
    INITIAL_CHECKPOINT_DIR). The default peak learning rate, 2e-4, is the one we read in
    Chinese-LLaMA's paper (Cui et al. 2023; see docs/pretraining.md).

    Args:
        initial_checkpoint_dir: the checkpoint to continue (e.g. one scripts/extend_tokenizer.py wrote).
        train_data_dir: packed shards prepared with its tokenizer, or a folder with a mix.json.
        val_data_dir: packed validation shards (none: no validation).
        out_dir: training states (step-*.ckpt, for --resume), model folders (step-*/, for
            generate.py --checkpoint_dir) and logs.
        block_size: the training context (default: the model's; the saved checkpoints keep the model's).
        devices: devices per node (GPUs, or CPU processes); more than one in all: FSDP.
        num_nodes: machines; each runs this same command (see docs/pretraining.md).
        precision: a Fabric precision (default bf16-mixed on GPUs that support it, 32-true on CPU).
        keep_last: checkpoints kept (older ones are deleted; 0 keeps all).
        activation_checkpointing: recompute activations in backward to save memory.
        num_workers: data-loader processes per device.
        resume: continue from the last checkpoint in out_dir: weights, optimizer, step, data position.
        seed: random seed (data order).
        prompt: a text to continue at each evaluation, to watch progress (none: no samples).
    """
    pretrain(train_data_dir=train_data_dir, val_data_dir=val_data_dir, out_dir=out_dir, model_name=None,
             tokenizer_dir=None, args=train, block_size=block_size, devices=devices, num_nodes=num_nodes,
             precision=precision, resume=resume, seed=seed, activation_checkpointing=activation_checkpointing,
             num_workers=num_workers, keep_last=keep_last, sample_prompt=prompt,
             initial_checkpoint_dir=initial_checkpoint_dir)


if __name__ == "__main__":
    run_cli(main)
