"""Quantize a checkpoint once to weight-only int8 or int4, as gpt-fast's quantize.py and llama.cpp's
llama-quantize do: the output loads in seconds, without --quantize, in every inference script."""

from pathlib import Path
from typing import Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.quant.weight_only import parse_mode, quantize_checkpoint
from lit_llama.utils import run_cli


def main(checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR, quantize: str = "int8", output_dir: Optional[Path] = None) -> None:
    """Write a checkpoint quantized as `--quantize` quantizes at load (the same weights, the same
    logits), stored in the layout the CPU kernel reads: loading maps the file and copies nothing.

    Args:
        checkpoint_dir: the float checkpoint directory to quantize.
        quantize: int8 (one scale per output row) or int4 (groups of 32 inputs; int4-g64, int4-g128).
            The head is int8 in every mode, as llama.cpp keeps its output tensor at more bits.
        output_dir: the checkpoint directory to write (default: checkpoint_dir-MODE).
    """
    parse_mode(quantize)
    output_dir = output_dir or Path(f"{Path(checkpoint_dir).resolve()}-{quantize}")
    quantize_checkpoint(checkpoint_dir, quantize, output_dir)


if __name__ == "__main__":
    run_cli(main)
