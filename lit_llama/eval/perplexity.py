"""Perplexity of a checkpoint on a text: what the evaluate/ scripts share, and their one main.

As in the GPTQ paper: the text is tokenized once, cut into non-overlapping windows of the context
length (the remainder shorter than a window is left out), every window is scored independently,
and perplexity = exp(mean negative log-likelihood of every token predicted from its window).
"""

import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_llama.infer.cli import peak_memory_gb
from lit_llama.infer.load import FinetunedArgs, LoadArgs, finetuned_source, load_for_inference
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR, load_config, validate_checkpoint_dir
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError

DATASETS = ("wikitext2", "ptb", "c4")


def load_dataset_text(name: str) -> str:
    """The evaluation split of a standard dataset, joined as GPTQ joins it; downloaded (and cached)
    by Hugging Face `datasets`, so it needs the network the first time."""
    if name not in DATASETS:
        raise UserError(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}, or pass --text_file")
    try:
        from datasets import load_dataset
    except ImportError:
        raise UserError(f"--dataset {name} needs the `datasets` package (pip install -e '.[eval]'); or pass --text_file")
    # the hub client logs every retry of an unreachable host; the one error line below says it all
    for logger in ("huggingface_hub", "datasets", "fsspec"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        if name == "wikitext2":
            return "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
        if name == "ptb":
            return " ".join(load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"])
        c4 = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                          split="validation")
        return " ".join(c4[:1100]["text"])  # GPTQ's C4 evaluation: the start of the first validation shard
    except Exception as e:  # network, hub and format errors all mean: not available here
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the {name} dataset ({reason}); pass --text_file with a local text instead")


def evaluation_text(text_file: Optional[Path], dataset: Optional[str]) -> str:
    if text_file is not None and dataset is not None:
        raise UserError("pass --text_file or --dataset, not both")
    if text_file is None:
        return load_dataset_text(dataset or "wikitext2")
    text_file = Path(text_file)
    if not text_file.is_file():
        raise UserError(f"--text_file {text_file} does not exist")
    return text_file.read_text(encoding="utf-8", errors="replace")


def check_windows(tokens: torch.Tensor, seqlen: int) -> int:
    """The number of whole windows of `seqlen` tokens; UserError if there is none."""
    if tokens.numel() < seqlen:
        raise UserError(f"the text has {tokens.numel()} tokens, fewer than one window of {seqlen}: "
                        "pass a longer text or a smaller --seqlen")
    return tokens.numel() // seqlen


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, device, max_windows: Optional[int] = None,
               log: Callable[[str], None] = lambda s: None) -> float:
    """exp(mean NLL) over the non-overlapping windows of `seqlen` tokens of the 1-D `tokens`."""
    n = check_windows(tokens, seqlen)
    n = min(n, max_windows) if max_windows else n
    nll, count = 0.0, 0
    for i in range(n):
        ids = tokens[i * seqlen:(i + 1) * seqlen].to(device)[None]
        logits = model(ids)[0, :-1]
        nll += F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
        count += seqlen - 1
        log(f"window {i + 1}/{n}: perplexity so far {math.exp(nll / count):.4f}")
    return math.exp(nll / count)


def weights_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as they are held (quantized or not), each storage
    counted once (tied weights share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def evaluation_tokens(checkpoint_dir: Path, text_file: Optional[Path], dataset: Optional[str],
                      seqlen: Optional[int]) -> Tuple[torch.Tensor, int]:
    """(token ids of the text, window length), checked before anything slow is loaded."""
    if seqlen is not None and seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {seqlen}")
    text = evaluation_text(text_file, dataset)
    validate_checkpoint_dir(checkpoint_dir)
    block_size = load_config(checkpoint_dir).block_size
    seqlen = seqlen or min(block_size, 2048)
    if seqlen > block_size:
        raise UserError(f"--seqlen {seqlen} is longer than the model's context ({block_size})")
    tokens = Tokenizer(checkpoint_dir).encode(text)
    check_windows(tokens, seqlen)
    return tokens, seqlen


def evaluate_checkpoint(checkpoint_dir: Path, wrap: Optional[Callable] = None, *,
                        weights: FinetunedArgs = FinetunedArgs(), quantize: Optional[str] = None,
                        precision: Optional[str] = None, text_file: Optional[Path] = None,
                        dataset: Optional[str] = None, seqlen: Optional[int] = None,
                        max_windows: Optional[int] = None) -> float:
    """What the evaluate/ scripts do: load the model (with `weights` or `wrap`, quantized), print
    progress, speed and memory to stderr, and the perplexity as the last line of stdout."""
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max_windows must be at least 1, got {max_windows}")
    if weights.given() is not None:
        # with gptq.* and finetune/full.py's weights the checkpoint is the finetuned one
        checkpoint_dir, wrap = finetuned_source(checkpoint_dir, weights, quantize)
    tokens, seqlen = evaluation_tokens(checkpoint_dir, text_file, dataset, seqlen)
    t0 = time.perf_counter()
    fabric, model, _ = load_for_inference(checkpoint_dir, precision, wrap, quantize)
    print(f"Loaded in {time.perf_counter() - t0:.1f} s, peak memory {peak_memory_gb(fabric.device):.3f} GB, "
          f"weights {weights_bytes(model) / 1e6:.1f} MB", file=sys.stderr)
    t0 = time.perf_counter()
    ppl = perplexity(model, tokens, seqlen, fabric.device, max_windows,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"Evaluated in {time.perf_counter() - t0:.1f} s, peak memory {peak_memory_gb(fabric.device):.3f} GB",
          file=sys.stderr)
    print(f"perplexity: {ppl:.4f}", flush=True)
    return ppl


def perplexity_main(default_weights: FinetunedArgs = FinetunedArgs()) -> Callable:
    """The main of evaluate/perplexity.py, whose finetuned weights default to `default_weights`: the
    Lit-LLaMA scripts evaluate/full.py, lora.py, adapter.py, adapter_v2.py are this main with the
    folder their finetune/ script writes as the default."""

    def main(
        checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
        weights: FinetunedArgs = default_weights,
        text_file: Optional[Path] = None,
        dataset: Optional[str] = None,
        seqlen: Optional[int] = None,
        max_windows: Optional[int] = None,
        loading: LoadArgs = LoadArgs(),
    ) -> None:
        """Perplexity of a model, with or without finetuned weights, over non-overlapping
        context-length windows of a text.

        The last line printed is `perplexity: <number>`; progress, speed and memory go to stderr.

        Args:
            checkpoint_dir: the checkpoint directory (a float one, or one written by quantize/gptq.py);
                with finetuned weights, the base model they were trained on.
            text_file: a UTF-8 text to evaluate on.
            dataset: wikitext2 (the default without --text_file), ptb or c4: the standard test sets,
                downloaded with Hugging Face `datasets` (needs the network and the `eval` extra).
            seqlen: tokens per window (default: the model's context, at most 2048 as in the GPTQ paper).
            max_windows: score only the first this many windows (a quick estimate).
        """
        evaluate_checkpoint(checkpoint_dir, weights=weights, quantize=loading.quantize, precision=loading.precision,
                            text_file=text_file, dataset=dataset, seqlen=seqlen, max_windows=max_windows)

    return main
