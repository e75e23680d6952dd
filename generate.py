"""Generate text with a LLaMA-family checkpoint: `python generate.py --prompt "Hello"`."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_llama.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.generation import (check_sampling_args, compile_decode_step, decode_step, load_for_inference,
                                  peak_memory_gb, print_completion, warm_up)
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
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    fabric, model, tokenizer = load_for_inference(checkpoint_dir, precision, quantize=quantize, compile=compile)
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
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


if __name__ == "__main__":
    run_cli(main)
