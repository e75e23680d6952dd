"""Prepare instruction data (the cleaned Alpaca set, or any Alpaca-style JSON/JSONL) for finetuning."""

from pathlib import Path
from typing import Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.data.instruction import prepare_source
from lit_llama.utils import run_cli

DATA_URL = "https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data_cleaned_archive.json"


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    destination_path: Path = Path("data/alpaca"),
    data_file_path: Optional[Path] = None,
    max_seq_length: int = 256,
    mask_inputs: bool = False,
    val_fraction: float = 0.04,
    seed: int = 42,
) -> None:
    """Tokenise instruction data with the checkpoint's tokenizer and the Alpaca prompt template.

    Args:
        checkpoint_dir: the checkpoint whose tokenizer is used (the model you will finetune).
        destination_path: folder to write train.pt, val.pt and meta.json into.
        data_file_path: a local JSON or JSONL file with instruction/input/output fields (or Dolly's
            instruction/context/response); default: download the cleaned Alpaca data.
        max_seq_length: examples are cut to this many tokens (Alpaca-LoRA: 256).
        mask_inputs: compute the loss on the response only, not on the prompt.
        val_fraction: fraction of examples held out for validation.
        seed: seed of the shuffle before the split.
    """
    prepare_source(checkpoint_dir, destination_path, data_file_path, DATA_URL, max_seq_length, mask_inputs,
                   val_fraction, seed)


if __name__ == "__main__":
    run_cli(main)
