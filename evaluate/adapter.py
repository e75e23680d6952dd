"""Perplexity of a base model plus LLaMA-Adapter weights from finetune/adapter.py on a text."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.peft.adapter import load_adapter  # noqa: E402
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR  # noqa: E402
from lit_llama.eval.perplexity import evaluate_checkpoint  # noqa: E402
from lit_llama.utils import run_cli  # noqa: E402


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    adapter_path: Path = Path("out/adapter/alpaca"),
    text_file: Optional[Path] = None,
    dataset: Optional[str] = None,
    seqlen: Optional[int] = None,
    max_windows: Optional[int] = None,
    quantize: Optional[str] = None,
    precision: Optional[str] = None,
) -> None:
    """Perplexity of a model with its adapter over non-overlapping context-length windows of a text.

    The last line printed is `perplexity: <number>`; progress, speed and memory go to stderr.

    Args:
        checkpoint_dir: the base model the adapter was trained on (or its quantize/gptq.py version).
        adapter_path: finetune/adapter.py's --out_dir, or the lit_adapter.safetensors file in it.
        text_file: a UTF-8 text to evaluate on.
        dataset: wikitext2 (the default without --text_file), ptb or c4: the standard test sets,
            downloaded with Hugging Face `datasets` (needs the network and the `eval` extra).
        seqlen: tokens per window (default: the model's context, at most 2048 as in the GPTQ paper).
        max_windows: score only the first this many windows (a quick estimate).
        quantize: llm.int8 (bitsandbytes int8 layers, quantized while loading), or gptq.int4 /
            gptq.int3 for a checkpoint written by quantize/gptq.py.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
    """
    evaluate_checkpoint(checkpoint_dir, lambda model: load_adapter(model, adapter_path), quantize=quantize,
                        precision=precision, text_file=text_file, dataset=dataset, seqlen=seqlen,
                        max_windows=max_windows)


if __name__ == "__main__":
    run_cli(main)
