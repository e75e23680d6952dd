"""Prepare preference pairs (prompt, chosen, rejected) for the reward model and DPO."""

from pathlib import Path
from typing import Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.align.preference import prepare_preferences
from lit_llama.utils import run_cli


def main(
    data_file_path: Optional[Path] = None,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    destination_path: Path = Path("data/prefs"),
    url: Optional[str] = None,
    max_seq_length: int = 512,
    val_fraction: float = 0.05,
    seed: int = 42,
) -> None:
    """Tokenise preference pairs with the checkpoint's tokenizer into train.pt, val.pt and meta.json.

    Rows are JSON or JSONL objects with prompt/chosen/rejected (concatenated verbatim), or
    StackExchange-paired's question/response_j/response_k (response_j preferred), rendered with
    StackLLaMA's "Question: {question}\\n\\nAnswer: {answer}", or Anthropic HH-RLHF's chosen/rejected
    dialogues (the prompt is everything up to the last "\\n\\nAssistant:").

    Args:
        data_file_path: a local JSON or JSONL file (may be gzipped) of preference rows.
        checkpoint_dir: the checkpoint whose tokenizer is used (the model you will train).
        destination_path: folder to write train.pt, val.pt and meta.json into (atomically).
        url: download this JSON/JSONL(.gz) file beside the destination instead of --data_file_path,
            e.g. https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/helpful-base/train.jsonl.gz
        max_seq_length: each prompt + answer is cut to this many tokens (the prompt's start goes
            first, down to half of it, then the answer's end).
        val_fraction: fraction of pairs held out for validation.
        seed: seed of the shuffle before the split.
    """
    prepare_preferences(checkpoint_dir, destination_path, data_file_path, url, max_seq_length,
                        val_fraction, seed)


if __name__ == "__main__":
    run_cli(main)
