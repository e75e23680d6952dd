"""Tokenise RedPajama (or any folder of JSONL sources) into packed shards mixed by LLaMA's weights."""

from pathlib import Path
from typing import Dict, Optional

from lit_llama.data.corpus import prepare_mix
from lit_llama.utils import run_cli


def main(
    source_path: Path = Path("data/RedPajama-Data-1T-Sample"),
    checkpoint_dir: Path = Path("checkpoints/Llama-2-7b-hf"),
    destination_path: Path = Path("data/redpajama"),
    weights: Optional[Dict[str, float]] = None,
    block_size: int = 2048,
    blocks_per_shard: int = 8192,
    val_fraction: float = 0.001,
    num_workers: Optional[int] = None,
) -> None:
    """Tokenise each source of a RedPajama download (JSONL with a "text" field, optionally .zst)
    into destination_path/{train,val}/<source>/ and write the sampling weights to mix.json there.

    Args:
        source_path: the download: one folder per source (RedPajama-Data-1T: arxiv/, book/, c4/,
            common_crawl/, github/, stackexchange/, wikipedia/) or files named by source prefix
            (the 1T-Sample: arxiv_*.jsonl, book_*.jsonl, c4-*.jsonl, cc_*.jsonl, ...).
        checkpoint_dir: the checkpoint directory whose tokenizer is used (pretrain with it as --tokenizer_dir).
        destination_path: output folder.
        weights: sampling weight per source, e.g. '{"c4": 15, "github": 4.5}'; default: LLaMA's
            Table 1 (CommonCrawl 67%, C4 15%, GitHub, Wikipedia and Books 4.5% each, ArXiv 2.5%,
            StackExchange 2%). Sources without files are left out.
        block_size: the training context the shards are sized for.
        blocks_per_shard: windows of block_size + 1 tokens per shard file.
        val_fraction: fraction of each source's documents held out for validation.
        num_workers: tokenising processes (default: one per CPU core).
    """
    prepare_mix(source_path, checkpoint_dir, destination_path, weights, block_size, blocks_per_shard, val_fraction,
                num_workers)


if __name__ == "__main__":
    run_cli(main)
