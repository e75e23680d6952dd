"""Train a tiny LLaMA from scratch in minutes on a CPU, on Python's own documentation (shipped with
Python: no download), then sample from it."""

import json
import tempfile
from pathlib import Path
from typing import Optional

from pydoc_data.topics import topics

from lit_llama.data.corpus import prepare_text_folder, train_tokenizer
from lit_llama.train.loop import TrainArgs
from lit_llama.train.setup import pretrain
from lit_llama.utils import UserError, run_cli

DATA_DIR = Path("data/pydoc")  # tokenizer/ and packed/{train,val} are made here on first use


def prepare_pydoc(tokenizer_dir: Path, block_size: int) -> None:
    """The ~80 help topics of pydoc_data (the language reference, 0.5 MB of text) as documents, and,
    unless given, a 1,024-token BPE tokenizer learned from them (small, so that the tiny model's
    time is not spent in a 50k-wide output layer)."""
    texts = [topics[name] for name in sorted(topics)]
    if not Path(tokenizer_dir).exists():
        train_tokenizer(texts, tokenizer_dir, vocab_size=1024)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pydoc_topics.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        prepare_text_folder(Path(tmp), tokenizer_dir, DATA_DIR / "packed", block_size=block_size,
                            blocks_per_shard=256, val_fraction=0.1, num_workers=1)


def main(
    train_data_dir: Optional[Path] = None,
    val_data_dir: Optional[Path] = None,
    out_dir: Path = Path("out/tiny"),
    model_name: str = "tiny",
    tokenizer_dir: Optional[Path] = None,
    block_size: int = 128,
    devices: int = 1,
    num_nodes: int = 1,
    precision: Optional[str] = None,
    train: TrainArgs = TrainArgs(max_iters=600, global_batch_size=16, micro_batch_size=8, learning_rate=3e-3, warmup_iters=30, weight_decay=0.1, eval_iters=2, save_interval=100, log_interval=10),
    keep_last: int = 2,
    activation_checkpointing: bool = False,
    num_workers: int = 2,
    resume: bool = False,
    seed: int = 1337,
    prompt: str = "The ",
) -> None:
    """Pretrain the `tiny` config (2 layers, 64 wide) on pydoc's help topics, printing a sample at
    each evaluation. The data is prepared into data/pydoc on first use.

    Args:
        train_data_dir: packed training shards (default: pydoc's, prepared into data/pydoc/packed if absent).
        val_data_dir: packed validation shards (default: pydoc's with the default training data).
        out_dir: checkpoints (step-*.ckpt for --resume, step-*/ for generate.py) and logs.
        model_name: a Config name from lit_llama/model.py.
        tokenizer_dir: the directory of the tokenizer the data was prepared with (default, with
            pydoc's data: data/pydoc/tokenizer, learned from it).
        block_size: the training context.
        devices: devices per node (GPUs, or CPU processes); more than one in all: FSDP.
        num_nodes: machines, each running this same command.
        precision: a Fabric precision (default bf16-mixed on GPUs that support it, 32-true on CPU).
        keep_last: checkpoints kept (0: all).
        activation_checkpointing: recompute activations in backward to save memory.
        num_workers: data-loader processes per device.
        resume: continue from the last checkpoint in out_dir.
        seed: random seed.
        prompt: the text each sample continues.
    """
    if train_data_dir is None:
        tokenizer_dir = tokenizer_dir or DATA_DIR / "tokenizer"
        train_data_dir, val_data_dir = DATA_DIR / "packed" / "train", val_data_dir or DATA_DIR / "packed" / "val"
        if not train_data_dir.is_dir():
            prepare_pydoc(tokenizer_dir, block_size)
    elif tokenizer_dir is None:
        raise UserError("--tokenizer_dir is needed with --train_data_dir: the tokenizer the data was prepared with")
    pretrain(train_data_dir=train_data_dir, val_data_dir=val_data_dir, out_dir=out_dir, model_name=model_name,
             tokenizer_dir=tokenizer_dir, args=train, block_size=block_size, devices=devices, num_nodes=num_nodes,
             precision=precision, resume=resume, seed=seed, activation_checkpointing=activation_checkpointing,
             num_workers=num_workers, keep_last=keep_last, sample_prompt=prompt)


if __name__ == "__main__":
    run_cli(main)
