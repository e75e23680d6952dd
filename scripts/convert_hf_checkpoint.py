"""Convert a Hugging Face LLaMA-architecture model folder to a checkpoint dir."""

from pathlib import Path
from typing import Optional

from lit_llama.io.convert import convert_hf_checkpoint
from lit_llama.utils import run_cli


def main(checkpoint_dir: Path, output_dir: Path, dtype: Optional[str] = None, template: Optional[str] = None) -> None:
    """Convert a Hugging Face model folder (config.json, safetensors or .bin weights, tokenizer).

    Args:
        checkpoint_dir: the Hugging Face folder, e.g. from `huggingface-cli download`.
        output_dir: the checkpoint directory to create (lit_config.json, weights, tokenizer).
        dtype: float32, float16 or bfloat16; by default the dtype of the files.
        template: a built-in chat template to record with the checkpoint (chatml, llama-2, alpaca, vicuna,
            baize), for folders without a chat template of their own; chat.py and serve.py use it.
    """
    convert_hf_checkpoint(checkpoint_dir, output_dir, dtype=dtype, template=template)


if __name__ == "__main__":
    run_cli(main)
