"""Generate text with a LLaMA-family checkpoint: `python generate.py --prompt "Hello"`."""

import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from lit_llama.infer.cli import peak_memory_gb, print_completion
from lit_llama.infer.engine import Engine, Request, SamplingParams, speculation_summary, stream
from lit_llama.infer.generation import SamplingArgs, compile_decode_step, decode_step, warm_up
from lit_llama.infer.load import LoadArgs, load_for_inference
from lit_llama.infer.speculative import SpeculativeArgs
from lit_llama.io.checkpoint import DEFAULT_INFERENCE_DIR
from lit_llama.templates import ChatFormat, choose_template
from lit_llama.utils import run_cli


def main(
    prompt: str = "Hello, my name is",
    checkpoint_dir: Path = DEFAULT_INFERENCE_DIR,
    chat: bool = False,
    template: Optional[str] = None,
    num_samples: int = 1,
    sampling: SamplingArgs = SamplingArgs(max_new_tokens=100, temperature=0.8, top_k=200),
    seed: int = 1234,
    loading: LoadArgs = LoadArgs(),
    compile: bool = False,
    speculative: SpeculativeArgs = SpeculativeArgs(),
) -> None:
    """Generate a completion of a prompt, streamed to stdout; speed and memory go to stderr.

    Args:
        prompt: the text to complete.
        checkpoint_dir: a checkpoint directory (weights, lit_config.json, tokenizer); the default
            is the embedded SmolLM2-135M-Instruct model (`make model` creates it).
        chat: wrap the prompt as a user message in the checkpoint's chat template (as chat.py and the
            server render it) and stop where the template ends a turn.
        template: with --chat, a chat template by name instead of the checkpoint's (as in chat.py).
        num_samples: how many completions to generate, one after another (max_new_tokens is per sample).
        seed: random seed for sampling.
        compile: compile the decode step with torch.compile (slow first token, faster after).
    """
    sampling.check()
    speculative.check()
    precision = loading.precision
    fabric, model, tokenizer = load_for_inference(checkpoint_dir, precision, quantize=loading.quantize, compile=compile,
                                                  kv_cache_dtype=loading.kv_cache_dtype)
    drafter = speculative.drafter(tokenizer, fabric, precision)
    if chat:  # the one rendering of chat.py and the server: a template writing its own BOS gets no second
        fmt = ChatFormat(choose_template(tokenizer, checkpoint_dir, template)[0], tokenizer)
        ids, stop_ids = fmt.prompt_ids([{"role": "user", "content": prompt}]), fmt.stop_ids
    else:
        ids, stop_ids = tokenizer.encode(prompt).tolist(), tokenizer.stop_ids
    if drafter is not None:
        fabric.seed_everything(seed, verbose=False)
        print_speculative(model, tokenizer, drafter, ids, stop_ids, fabric.device, num_samples, sampling,
                          speculative.draft_tokens, compile=compile)
        print(f"Peak memory: {peak_memory_gb(fabric.device):.2f} GB", file=sys.stderr)
        return
    step = decode_step
    if compile:
        step = compile_decode_step(fabric.device)
        length = len(ids) + sampling.max_new_tokens
        print(f"Compiled the decode step in {warm_up(model, step, fabric.device, length):.1f} s", file=sys.stderr)
    fabric.seed_everything(seed, verbose=False)
    for _ in range(num_samples):
        print_completion(model, tokenizer, ids, fabric.device, sampling.max_new_tokens,
                         temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, step=step,
                         stop_ids=stop_ids)
    print(f"Peak memory: {peak_memory_gb(fabric.device):.2f} GB", file=sys.stderr)


def print_speculative(model, tokenizer, drafter, ids: List[int], stop_ids: Sequence[int], device, num_samples: int,
                      sampling: SamplingArgs, draft_tokens: int, *, compile: bool = False) -> None:
    """generate.py with a drafter: each sample streams to stdout through a one-row engine; the speed
    and the drafts' acceptance go to stderr."""
    length = min(model.config.block_size, len(ids) + sampling.max_new_tokens + 1)
    engine = Engine(model, tokenizer, max_batch_size=1, cache_rows=1, max_seq_length=length, compile=compile,
                    device=device, drafter=drafter, draft_tokens=draft_tokens)
    params = SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_k=sampling.top_k, top_p=sampling.top_p, stop_ids=tuple(stop_ids))
    for _ in range(num_samples):
        t0 = time.perf_counter()
        request = Request(ids, params)
        for piece in stream(engine, request):
            print(piece, end="", flush=True)
        print(flush=True)
        dt = time.perf_counter() - t0
        n = len(request.tokens)
        print(f"Time for inference: {dt:.2f} s, {n} tokens, {n / dt:.2f} tokens/s; {speculation_summary(engine)}",
              file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
