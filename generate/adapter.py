"""Answer an instruction with a base model plus LLaMA-Adapter weights from finetune/adapter.py."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.peft.adapter import load_adapter
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.infer.generation import answer_instruction
from lit_llama.utils import run_cli


def main(
    prompt: str = "What food do llamas eat?",
    input: str = "",
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    adapter_path: Path = Path("out/adapter/alpaca"),
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    seed: int = 1234,
    precision: Optional[str] = None,
    compile: bool = False,
    quantize: Optional[str] = None,
) -> None:
    """Generate a response to an instruction, in the Alpaca template used for finetuning.

    Args:
        prompt: the instruction.
        input: optional context for the instruction (the template's "Input" section).
        checkpoint_dir: the base model the adapter was trained on.
        adapter_path: finetune/adapter.py's --out_dir, or the lit_adapter.safetensors file in it.
        max_new_tokens: the most tokens to generate (generation also stops at EOS).
        temperature: sampling temperature; 0 means greedy decoding.
        top_k: sample only among the k most likely tokens (none: all).
        top_p: sample only among the most likely tokens whose probabilities sum to top_p.
        seed: random seed for sampling.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        compile: compile the decode step with torch.compile.
        quantize: llm.int8 (bitsandbytes int8 layers, quantized while loading), or gptq.int4 /
            gptq.int3 for a checkpoint written by quantize/gptq.py.
    """
    answer_instruction(checkpoint_dir, prompt, input, lambda model: load_adapter(model, adapter_path),
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, precision=precision, compile=compile, quantize=quantize)


if __name__ == "__main__":
    run_cli(main)
