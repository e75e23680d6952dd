"""Collect Baize-style self-chat dialogues: one chat model plays both the human and the AI.

    python scripts/self_chat.py --seeds_file topics.txt --output_path data/self_chat.jsonl
    python scripts/prepare_chat.py --data_file_path data/self_chat.jsonl --destination_path data/chat
"""

import sys
from pathlib import Path
from typing import Optional


from lit_llama.align.self_chat import SelfChat, pending_seeds, read_seeds, run_self_chat
from lit_llama.infer.generation import check_sampling_args
from lit_llama.infer.load import load_chat_model, load_for_inference
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.templates import get_template
from lit_llama.utils import UserError, run_cli


def main(
    seeds_file: Path,
    output_path: Path = Path("data/self_chat.jsonl"),
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    lora_path: Optional[Path] = None,
    template: Optional[str] = None,
    seed_field: Optional[str] = None,
    max_turns: int = 4,
    seed_as_question: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    max_repeated_ngrams: float = 0.5,
    seed: int = 1234,
    limit: Optional[int] = None,
    precision: Optional[str] = None,
) -> None:
    """For each seed (a topic or question), let the model continue Baize's self-chat transcript
    (`[|Human|] ...` / `[|AI|] ...`) turn by turn, then drop an incomplete last turn, strip the tags and
    filter out duplicates and degenerate dialogues. Kept dialogues are appended to output_path as
    {"seed", "dialogue": [{"role", "content"}, ...], "text" (Baize chat format), "exchanges"}; rejected
    ones to the `.rejected.jsonl` file beside it, with the reason. Rerunning with the same output_path
    resumes: seeds in either file are skipped. Progress (tokens/s, ETA) goes to stderr.

    Args:
        seeds_file: seeds, one a line (.txt), or a .json list / .jsonl file of strings or objects.
        output_path: the JSONL file of kept dialogues (appended to; created if missing).
        checkpoint_dir: the chat model's checkpoint directory (default: the embedded SmolLM2-135M-Instruct).
        lora_path: LoRA weights from finetune/lora.py to add to the model.
        template: the chat template that wraps the self-chat instruction as a user message (the
            transcript is the model's answer, as Baize asked ChatGPT); default: the one recorded with
            the weights or the checkpoint's own. "none" (or "baize") gives the instruction and
            transcript as plain text to continue (base models, Baize-format models).
        seed_field: the field holding the seed in .json/.jsonl objects (default: the first of seed,
            topic, question, instruction, prompt, text, title).
        max_turns: the most exchanges (a human turn and the AI's answer) per dialogue.
        seed_as_question: the seed itself is the human's first turn (for seeds that are questions, like
            Baize's Quora and StackOverflow titles; small models then stay on topic). Default: the
            model writes the first question too, as in Baize.
        max_new_tokens: the longest turn, in tokens; a turn cut there is incomplete and dropped.
        temperature: sampling temperature; 0 means greedy decoding.
        top_k: sample only among the k most likely tokens (none: all).
        top_p: sample only among the most likely tokens whose probabilities sum to top_p.
        max_repeated_ngrams: reject a dialogue with a turn whose word 3-grams repeat more than this fraction.
        seed: random seed; each seed text gets its own sampling seed from it, so a resumed run
            produces what an uninterrupted one would.
        limit: use only the first `limit` seeds of the file.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if max_turns < 1:
        raise UserError(f"--max_turns must be at least 1, got {max_turns}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if not 0 < max_repeated_ngrams <= 1:
        raise UserError(f"--max_repeated_ngrams must be in (0, 1], got {max_repeated_ngrams}")
    if Path(output_path).is_dir():
        raise UserError(f"--output_path {output_path} is a directory")
    seeds = read_seeds(seeds_file, seed_field)[:limit]  # before any loading or writing
    if not pending_seeds(seeds, output_path):
        print(f"resuming {output_path}: {len(seeds)} of {len(seeds)} seeds already done; nothing to do", file=sys.stderr)
        return
    fabric, model, tokenizer, fmt = load(checkpoint_dir, template, lora_path, precision)
    if fmt is not None and fmt.template.name == "baize":
        fmt = None  # its own tags would end the answer: continue the plain transcript instead
    chatter = SelfChat(model, tokenizer, fabric.device, fmt, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p)
    print(f"self-chat on {len(seeds)} seeds with {Path(checkpoint_dir).name} "
          f"({'template ' + fmt.template.name if fmt else 'plain transcript'}), up to {max_turns} exchanges each",
          file=sys.stderr, flush=True)
    counts = run_self_chat(chatter, seeds, output_path, max_turns, seed, max_repeated_ngrams, seed_as_question)
    print(f"kept {counts['kept']} and rejected {counts['rejected']} dialogues ({counts['skipped']} seeds done "
          f"before); output: {output_path}", file=sys.stderr)


def load(checkpoint_dir: Path, template: Optional[str], lora_path: Optional[Path], precision: Optional[str]):
    """(fabric, model, tokenizer, ChatFormat or None for "none")."""
    if template == "none":
        if lora_path is not None and not Path(lora_path).exists():
            raise UserError(f"{lora_path} does not exist")
        fabric, model, tokenizer = load_for_inference(checkpoint_dir, precision, lora_path=lora_path)
        return fabric, model, tokenizer, None
    if template not in (None, "checkpoint"):
        get_template(template)  # an unknown name fails before any loading
    fabric, model, tokenizer, fmt, _ = load_chat_model(checkpoint_dir, precision, lora_path, None, template)
    return fabric, model, tokenizer, fmt


if __name__ == "__main__":
    run_cli(main)
