"""Download a LLaMA-architecture model from the Hugging Face hub and convert it."""

from pathlib import Path
from typing import Optional

from lit_llama.io.download import download_hf
from lit_llama.utils import run_cli


def main(repo_id: str, output_dir: Optional[Path] = None, download_dir: Optional[Path] = None,
         access_token: Optional[str] = None, dtype: Optional[str] = None) -> None:
    """Download config, weights and tokenizer of a hub model, then convert them to a checkpoint dir.

    Args:
        repo_id: the model on the hub, as org/name (e.g. HuggingFaceTB/SmolLM2-135M-Instruct).
        output_dir: the checkpoint directory to create; default checkpoints/NAME.
        download_dir: where the hub's files are kept; default checkpoints/hf/ORG/NAME.
        access_token: a Hugging Face token, for gated or private repos (or set HF_TOKEN).
        dtype: float32, float16 or bfloat16; by default the dtype of the files.
    """
    download_hf(repo_id, output_dir=output_dir, download_dir=download_dir, access_token=access_token, dtype=dtype)


if __name__ == "__main__":
    run_cli(main)
