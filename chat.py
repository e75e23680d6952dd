"""Chat with a model in the terminal: `python chat.py` (the embedded model) or `python chat.py < questions.txt`."""

import sys
from pathlib import Path
from typing import Optional

from lit_llama.infer.chat import ChatSession, run_chat
from lit_llama.infer.generation import SamplingArgs
from lit_llama.infer.load import FinetunedArgs, LoadArgs, load_chat_model
from lit_llama.infer.speculative import SpeculativeArgs
from lit_llama.io.checkpoint import DEFAULT_INFERENCE_DIR
from lit_llama.templates import get_template
from lit_llama.utils import UserError, run_cli


def main(
    checkpoint_dir: Path = DEFAULT_INFERENCE_DIR,
    weights: FinetunedArgs = FinetunedArgs(),
    template: Optional[str] = None,
    system: Optional[str] = None,
    sampling: SamplingArgs = SamplingArgs(max_new_tokens=512, temperature=0.7, top_k=50),
    seed: int = 1234,
    max_seq_length: Optional[int] = None,
    loading: LoadArgs = LoadArgs(),
    compile: bool = False,
    speculative: SpeculativeArgs = SpeculativeArgs(),
) -> None:
    """Multi-turn chat: each answer streams as it is generated, the conversation is kept and its
    oldest turns are left out when it no longer fits the context. Commands: /reset, /system TEXT,
    /template NAME, /help, /exit (or end of input). Ctrl-C stops the current answer.

    Args:
        checkpoint_dir: the model's checkpoint directory (default: the embedded SmolLM2-135M-Instruct).
        template: the chat template: checkpoint (the checkpoint's own), chatml, llama-2, llama-3, alpaca, vicuna or
            baize. Default: the one recorded with the finetuned weights or the checkpoint, else the
            checkpoint's own.
        system: a system message for the whole conversation (default: the template's own, if any).
        seed: random seed for sampling.
        max_seq_length: use at most this many tokens of context (default: the model's context, at
            most 8192, since the KV cache is allocated whole).
        compile: compile the decode step with torch.compile (one graph per key-length bucket).
    """
    sampling.check()
    speculative.check()
    if max_seq_length is not None and max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    if template not in (None, "checkpoint"):
        get_template(template)  # an unknown name fails before any loading
    fabric, model, tokenizer, fmt, source = load_chat_model(checkpoint_dir, loading.precision, template=template,
                                                            quantize=loading.quantize, compile=compile,
                                                            kv_cache_dtype=loading.kv_cache_dtype, **vars(weights))
    drafter = speculative.drafter(tokenizer, fabric, loading.precision)
    fabric.seed_everything(seed, verbose=False)
    session = ChatSession(model, tokenizer, fmt, fabric.device, system=system, max_new_tokens=sampling.max_new_tokens,
                          temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                          max_seq_length=max_seq_length, compile=compile, drafter=drafter,
                          draft_tokens=speculative.draft_tokens)
    print(f"Chatting with {Path(checkpoint_dir).name} (template {fmt.template.name}: {source}; context "
          f"{session.context} tokens). /reset clears the history, /exit leaves, Ctrl-C stops an answer.",
          file=sys.stderr, flush=True)
    run_chat(session, tokenizer)


if __name__ == "__main__":
    run_cli(main)
