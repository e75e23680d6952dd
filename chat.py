"""Chat with a model in the terminal: `python chat.py` (the embedded model) or `python chat.py < questions.txt`."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.utils import UserError, run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    lora_path: Optional[Path] = None,
    adapter_path: Optional[Path] = None,
    template: Optional[str] = None,
    system: Optional[str] = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    seed: int = 1234,
    max_seq_length: Optional[int] = None,
    precision: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    prompt_lookup: bool = False,
    draft_checkpoint_dir: Optional[Path] = None,
    draft_tokens: int = 5,
) -> None:
    """Multi-turn chat: each answer streams as it is generated, the conversation is kept and its
    oldest turns are left out when it no longer fits the context. Commands: /reset, /system TEXT,
    /template NAME, /help, /exit (or end of input). Ctrl-C stops the current answer.

    Args:
        checkpoint_dir: the model's checkpoint directory (default: the embedded SmolLM2-135M-Instruct).
        lora_path: LoRA weights from finetune/lora.py (its --out_dir or the lit_lora.safetensors file).
        adapter_path: adapter weights from finetune/adapter.py or adapter_v2.py (folder or file).
        template: the chat template: checkpoint (the checkpoint's own), chatml, llama-2, alpaca, vicuna or
            baize. Default: the one recorded with the finetuned weights or the checkpoint, else the
            checkpoint's own.
        system: a system message for the whole conversation (default: the template's own, if any).
        max_new_tokens: the longest answer, in tokens (an answer also ends at the template's stop).
        temperature: sampling temperature; 0 means greedy decoding.
        top_k: sample only among the k most likely tokens (none: all).
        top_p: sample only among the most likely tokens whose probabilities sum to top_p.
        seed: random seed for sampling.
        max_seq_length: use at most this many tokens of context (default: the model's context).
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        quantize: llm.int8 (bitsandbytes int8 layers, quantized while loading), or gptq.int4 /
            gptq.int3 for a checkpoint written by quantize/gptq.py.
        compile: compile the decode step with torch.compile (one graph per key-length bucket).
        prompt_lookup: speculative decoding with drafts copied from the prompt and the text so far
            (what followed the last few tokens' latest earlier occurrence): fast when the answer
            repeats its input. The output is the same as without it.
        draft_checkpoint_dir: speculative decoding with this smaller model's greedy guesses; it must
            have the same tokenizer.
        draft_tokens: the most tokens drafted per step.
    """
    from lit_llama.infer.chat import ChatSession, load_chat_model, run_chat
    from lit_llama.infer.generation import check_sampling_args
    from lit_llama.templates import get_template
    from lit_llama.infer.speculative import check_draft_tokens, load_drafter

    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    check_draft_tokens(draft_tokens)
    if max_seq_length is not None and max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    if template not in (None, "checkpoint"):
        get_template(template)  # an unknown name fails before any loading
    fabric, model, tokenizer, fmt, source = load_chat_model(checkpoint_dir, precision, lora_path, adapter_path,
                                                            template, quantize=quantize, compile=compile)
    drafter = load_drafter(prompt_lookup, draft_checkpoint_dir, tokenizer, fabric, precision)
    fabric.seed_everything(seed, verbose=False)
    session = ChatSession(model, tokenizer, fmt, fabric.device, system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, max_seq_length=max_seq_length,
                          compile=compile, drafter=drafter, draft_tokens=draft_tokens)
    print(f"Chatting with {Path(checkpoint_dir).name} (template {fmt.template.name}: {source}; context "
          f"{session.context} tokens). /reset clears the history, /exit leaves, Ctrl-C stops an answer.",
          file=sys.stderr, flush=True)
    run_chat(session, tokenizer)


if __name__ == "__main__":
    run_cli(main)
