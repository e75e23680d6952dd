"""Tokenise a folder of .txt / .jsonl files into packed shards for pretraining."""

from pathlib import Path
from typing import Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.data.corpus import prepare_text_folder
from lit_llama.utils import run_cli


def main(
    source_path: Path,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    destination_path: Path = Path("data/text"),
    block_size: int = 2048,
    blocks_per_shard: int = 8192,
    val_fraction: float = 0.01,
    num_workers: Optional[int] = None,
) -> None:
    """Tokenise every .txt file (one document each) and .jsonl file (one {"text": ...} document per
    line) under source_path, in parallel, into uint16/uint32 shards with EOS after each document.

    Args:
        source_path: the folder of text files (searched recursively).
        checkpoint_dir: the checkpoint directory whose tokenizer is used; pretrain with the same
            directory as --tokenizer_dir.
        destination_path: output folder; shards go to its train/ and val/ subfolders.
        block_size: the training context the shards are sized for (windows of block_size + 1).
        blocks_per_shard: windows per shard file.
        val_fraction: fraction of the documents held out for validation (every n-th document).
        num_workers: tokenising processes (default: one per CPU core).
    """
    prepare_text_folder(source_path, checkpoint_dir, destination_path, block_size, blocks_per_shard, val_fraction,
                        num_workers)


if __name__ == "__main__":
    run_cli(main)
