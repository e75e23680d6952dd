"""Convert Meta's original LLaMA checkpoint (consolidated.*.pth + params.json) to a checkpoint dir."""

from pathlib import Path
from typing import Optional

from lit_llama.io.convert import convert_meta_checkpoint
from lit_llama.utils import run_cli


def main(checkpoint_dir: Path, output_dir: Path, tokenizer_path: Optional[Path] = None,
         dtype: Optional[str] = None, block_size: Optional[int] = None, template: Optional[str] = None) -> None:
    """Convert a Meta LLaMA checkpoint, model-parallel shards included, into our format.

    Args:
        checkpoint_dir: Meta's directory with params.json and consolidated.00.pth (.01.pth, ...).
        output_dir: the checkpoint directory to create (lit_config.json, weights, tokenizer).
        tokenizer_path: Meta's tokenizer.model; by default looked for in checkpoint_dir and its parent.
        dtype: float32, float16 or bfloat16; by default the dtype of the files.
        block_size: the context length; by default 4096 for Llama 2 files, 2048 for LLaMA.
        template: the chat template to record with the checkpoint (chatml, llama-2, alpaca, vicuna, baize);
            by default llama-2 for Llama 2 chat folders (named like llama-2-7b-chat), none otherwise.
    """
    convert_meta_checkpoint(checkpoint_dir, output_dir, tokenizer_path=tokenizer_path, dtype=dtype,
                            block_size=block_size, template=template)


if __name__ == "__main__":
    run_cli(main)
