"""Add tokens learned from a corpus to a checkpoint's tokenizer and grow its embedding to match
(Chinese-LLaMA's vocabulary extension), writing an ordinary checkpoint directory."""

from pathlib import Path

from lit_llama.data.vocab import extend_checkpoint
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import run_cli


def main(checkpoint_dir: Path, corpus: Path, num_new_tokens: int, output_dir: Path) -> None:
    """Add tokens learned from a corpus to a checkpoint's tokenizer, and rows to its embedding.

    New BPE merges after the old ones for a tokenizer.json, new SentencePiece pieces for a
    tokenizer.model; each new token gets an embedding row (and head row), the mean of the rows of
    the old tokens its text was split into. Every old id stays: text without the new tokens'
    strings encodes as before, and the model's logits for the old vocabulary are unchanged. Continue pretraining from the result with
    `pretrain/continued.py --initial_checkpoint_dir OUTPUT_DIR` (docs/pretraining.md).

    Args:
        checkpoint_dir: the checkpoint directory to extend.
        corpus: a .txt or .jsonl file ({"text": ...} per line) or a folder of them, in the new language.
        num_new_tokens: how many tokens to add.
        output_dir: the checkpoint directory to create.
    """
    ext = extend_checkpoint(checkpoint_dir, corpus, num_new_tokens, output_dir)
    shown = ", ".join(repr(Tokenizer(output_dir).decode([ext.first_id + i])) for i in range(min(10, num_new_tokens)))
    print(f"added {num_new_tokens} tokens (ids {ext.first_id}..{ext.first_id + num_new_tokens - 1}; the first: "
          f"{shown}); vocabulary {ext.config.vocab_size}, embedding rows {ext.config.padded_vocab_size}")
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    run_cli(main)
