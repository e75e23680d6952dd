"""Generate text with a LLaMA-family checkpoint: `python generate.py --prompt "Hello"`."""

import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.infer.generation import (check_sampling_args, compile_decode_step, decode_step, load_for_inference,
                                  peak_memory_gb, print_completion, warm_up)
from lit_llama.infer.engine import Engine, Request, SamplingParams, speculation_summary, stream
from lit_llama.infer.speculative import check_draft_tokens, load_drafter
from lit_llama.utils import run_cli


def main(
    prompt: str = "Hello, my name is",
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    chat: bool = False,
    num_samples: int = 1,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    seed: int = 1234,
    precision: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
    prompt_lookup: bool = False,
    draft_checkpoint_dir: Optional[Path] = None,
    draft_tokens: int = 5,
) -> None:
    """Generate a completion of a prompt, streamed to stdout; speed and memory go to stderr.

    Args:
        prompt: the text to complete.
        checkpoint_dir: a checkpoint directory (weights, lit_config.json, tokenizer); the default
            is the embedded SmolLM2-135M-Instruct model (`make model` creates it).
        chat: wrap the prompt as a user message in the checkpoint's chat template.
        num_samples: how many completions to generate, one after another.
        max_new_tokens: the most tokens to generate per sample (generation also stops at EOS).
        temperature: sampling temperature; 0 means greedy decoding.
        top_k: sample only among the k most likely tokens (none: all).
        top_p: sample only among the most likely tokens whose probabilities sum to top_p.
        seed: random seed for sampling.
        precision: a Lightning Fabric precision such as 32-true, bf16-true, 16-true; default
            bf16-true on GPUs that support it, 16-true on other GPUs, 32-true on CPU.
        compile: compile the decode step with torch.compile (slow first token, faster after).
        quantize: llm.int8 (bitsandbytes int8 layers, quantized while loading), or gptq.int4 /
            gptq.int3 for a checkpoint written by quantize/gptq.py.
        prompt_lookup: speculative decoding with drafts copied from the prompt and the text so far
            (what followed the last few tokens' latest earlier occurrence): fast when the answer
            repeats its input. The output is the same as without it.
        draft_checkpoint_dir: speculative decoding with this smaller model's greedy guesses; it must
            have the same tokenizer.
        draft_tokens: the most tokens drafted per step.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    check_draft_tokens(draft_tokens)
    fabric, model, tokenizer = load_for_inference(checkpoint_dir, precision, quantize=quantize, compile=compile)
    drafter = load_drafter(prompt_lookup, draft_checkpoint_dir, tokenizer, fabric, precision)
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    if drafter is not None:
        fabric.seed_everything(seed, verbose=False)
        print_speculative(model, tokenizer, drafter, prompt, fabric.device, num_samples, max_new_tokens,
                          draft_tokens, temperature=temperature, top_k=top_k, top_p=top_p, compile=compile)
        print(f"Peak memory: {peak_memory_gb(fabric.device):.2f} GB", file=sys.stderr)
        return
    step = decode_step
    if compile:
        step = compile_decode_step(fabric.device)
        length = len(tokenizer.encode(prompt)) + max_new_tokens
        print(f"Compiled the decode step in {warm_up(model, step, fabric.device, length):.1f} s", file=sys.stderr)
    fabric.seed_everything(seed, verbose=False)
    for _ in range(num_samples):
        print_completion(model, tokenizer, prompt, fabric.device, max_new_tokens, temperature=temperature,
                         top_k=top_k, top_p=top_p, step=step)
    print(f"Peak memory: {peak_memory_gb(fabric.device):.2f} GB", file=sys.stderr)


def print_speculative(model, tokenizer, drafter, prompt: str, device, num_samples: int, max_new_tokens: int,
                      draft_tokens: int, *, temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                      compile: bool = False) -> None:
    """generate.py with a drafter: each sample streams to stdout through a one-row engine; the speed
    and the drafts' acceptance go to stderr."""
    ids = tokenizer.encode(prompt).tolist()
    length = min(model.config.block_size, len(ids) + max_new_tokens + 1)
    engine = Engine(model, tokenizer, max_batch_size=1, cache_rows=1, max_seq_length=length, compile=compile,
                    device=device, drafter=drafter, draft_tokens=draft_tokens)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_ids=tuple(tokenizer.stop_ids))
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
