"""What the generate scripts print: a completion streamed to stdout, its speed and the peak memory
to stderr; and the one main of the generate/ scripts (an instruction in the finetuning template,
answered by a checkpoint with finetuned weights)."""

import resource
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from lit_llama.infer.generation import SamplingArgs, compile_decode_step, decode_step, generate, stream_text
from lit_llama.infer.load import FinetunedArgs, LoadArgs, load_for_inference
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.model import LLaMA
from lit_llama.templates import instruction_prompt


def print_completion(model: LLaMA, tokenizer, prompt: Union[str, List[int]], device, max_new_tokens: int, *,
                     temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                     step: Callable = decode_step, stop_ids: Optional[Sequence[int]] = None) -> str:
    """Generate after `prompt` (text, or token ids as a chat format renders them), streaming the text
    to stdout and the speed to stderr; returns the text. Stops at `stop_ids` (default: the tokenizer's)."""
    ids = tokenizer.encode(prompt).tolist() if isinstance(prompt, str) else list(prompt)
    t0, pieces, n = time.perf_counter(), [], 0
    tokens = generate(model, torch.tensor(ids, device=device), max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, stop_ids=tokenizer.stop_ids if stop_ids is None else stop_ids, step=step)

    def counted(tokens):
        nonlocal n
        for t in tokens:
            n += 1
            yield t

    for piece in stream_text(tokenizer.decode, counted(tokens)):
        print(piece, end="", flush=True)
        pieces.append(piece)
    print(flush=True)
    dt = time.perf_counter() - t0
    print(f"Time for inference: {dt:.2f} s, {n} tokens, {n / dt:.2f} tokens/s", file=sys.stderr)
    return "".join(pieces)


def peak_memory_gb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def answer_instruction(checkpoint_dir: Path, instruction: str, input: str = "", *,
                       weights: FinetunedArgs = FinetunedArgs(), sampling: SamplingArgs = SamplingArgs(),
                       loading: LoadArgs = LoadArgs(), compile: bool = False, seed: int = 1234) -> str:
    """What the generate/ scripts do: wrap the instruction in the finetuning template and stream
    the answer of the checkpoint with `weights` to stdout."""
    sampling.check()
    fabric, model, tokenizer = load_for_inference(checkpoint_dir, loading.precision, quantize=loading.quantize,
                                                  compile=compile, kv_cache_dtype=loading.kv_cache_dtype, **vars(weights))
    fabric.seed_everything(seed, verbose=False)
    step = compile_decode_step(fabric.device) if compile else decode_step
    return print_completion(model, tokenizer, instruction_prompt(instruction, input), fabric.device,
                            sampling.max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                            top_p=sampling.top_p, step=step)


def instruction_main(default_weights: FinetunedArgs = FinetunedArgs()) -> Callable:
    """The main of generate/finetuned.py, whose finetuned weights default to `default_weights`: the
    Lit-LLaMA scripts generate/lora.py, adapter.py, adapter_v2.py, full.py are this main with the
    folder their finetune/ script writes as the default."""

    def main(
        prompt: str = "What food do llamas eat?",
        input: str = "",
        checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
        weights: FinetunedArgs = default_weights,
        sampling: SamplingArgs = SamplingArgs(max_new_tokens=100, temperature=0.8, top_k=200),
        loading: LoadArgs = LoadArgs(),
        compile: bool = False,
        seed: int = 1234,
    ) -> None:
        """Generate a response to an instruction, in the Alpaca template used for finetuning, by the
        base model plus finetuned weights (LoRA, adapter, adapter v2, or finetune/full.py's).

        Args:
            prompt: the instruction.
            input: optional context for the instruction (the template's "Input" section).
            checkpoint_dir: the base model that was finetuned (its config and tokenizer).
            compile: compile the decode step with torch.compile.
            seed: random seed for sampling.
        """
        answer_instruction(checkpoint_dir, prompt, input, weights=weights, sampling=sampling, loading=loading,
                           compile=compile, seed=seed)

    return main
