"""Self-distillation with feedback (Baize v2): sample several answers per prompt from the chat model,
keep the one a reward model scores best, and write them as chat data:

    python scripts/self_distill.py --prompts_file questions.txt --reward_path out/reward \\
        --lora_path out/lora/chat --output_path data/distilled.jsonl
    python scripts/prepare_chat.py --data_file_path data/distilled.jsonl --destination_path data/distilled
"""

import sys
from pathlib import Path
from typing import Literal, Optional


from lit_llama.align.reward import load_reward_model, score
from lit_llama.align.self_chat import read_seeds, reward_texts, run_self_distill, sample_answers
from lit_llama.infer.generation import check_sampling_args
from lit_llama.infer.load import load_chat_model
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.templates import get_template
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError, run_cli


def main(
    prompts_file: Path,
    reward_path: Path,
    output_path: Path = Path("data/self_distill.jsonl"),
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    lora_path: Optional[Path] = None,
    template: Optional[str] = None,
    reward_checkpoint_dir: Optional[Path] = None,
    reward_format: Literal["stackllama", "hh", "chat"] = "stackllama",
    prompt_field: Optional[str] = None,
    num_samples: int = 4,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    seed: int = 1234,
    limit: Optional[int] = None,
    keep_samples: bool = False,
    precision: Optional[str] = None,
) -> None:
    """For each prompt, sample num_samples answers from the chat model (with optional LoRA weights),
    score prompt + answer with a reward model (lit_llama/align/reward.py) and append the best to output_path
    as {"prompt", "dialogue": [user, assistant], "instruction", "input", "output", "score"}, which
    scripts/prepare_chat.py (and prepare_alpaca.py) read. Rerunning with the same output_path resumes:
    prompts already in it are skipped. Progress (tokens/s, ETA) goes to stderr.

    Args:
        prompts_file: prompts, one a line (.txt), or a .json list / .jsonl file of strings or objects.
        reward_path: the reward model: finetune/reward_model.py's --out_dir or its lit_reward.safetensors.
        output_path: the JSONL file the best answers are appended to (created if missing).
        checkpoint_dir: the chat model's checkpoint directory (default: the embedded SmolLM2-135M-Instruct).
        lora_path: LoRA weights from finetune/lora.py to add to the chat model (a Baize model, say).
        template: the chat template the prompts are given in (default: the one recorded with the
            weights or the checkpoint's own).
        reward_checkpoint_dir: the base checkpoint of the reward model (default: checkpoint_dir).
        reward_format: how prompt and answer are given to the reward model, as it was trained:
            stackllama ("Question: ...\\n\\nAnswer: ..."), hh ("\\n\\nHuman: ...\\n\\nAssistant: ...") or
            chat (the conversation in the chat model's template).
        prompt_field: the field holding the prompt in .json/.jsonl objects (default: the first of seed,
            topic, question, instruction, prompt, text, title).
        num_samples: answers sampled per prompt.
        max_new_tokens: the longest answer, in tokens.
        temperature: sampling temperature (must be above 0: the samples should differ).
        top_k: sample only among the k most likely tokens (none: all).
        top_p: sample only among the most likely tokens whose probabilities sum to top_p.
        seed: random seed; each prompt gets its own sampling seed from it (a resumed run is the same).
        limit: use only the first `limit` prompts of the file.
        keep_samples: also write every sample with its score.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {num_samples}")
    if temperature == 0 and num_samples > 1:
        raise UserError("--temperature 0 gives the same answer every time; use a temperature above 0")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if Path(output_path).is_dir():
        raise UserError(f"--output_path {output_path} is a directory")
    if not Path(reward_path).exists():
        raise UserError(f"--reward_path {reward_path} does not exist")
    prompts = read_seeds(prompts_file, prompt_field)[:limit]
    run(prompts, output_path, checkpoint_dir, lora_path, template, reward_path, reward_checkpoint_dir, reward_format,
        num_samples, max_new_tokens, temperature, top_k, top_p, seed, keep_samples, precision)


def run(prompts, output_path, checkpoint_dir, lora_path, template, reward_path, reward_checkpoint_dir, reward_format,
        num_samples, max_new_tokens, temperature, top_k, top_p, seed, keep_samples, precision, scorer=None):
    """Load the models and distil. `scorer(texts) -> scores` replaces the reward model (tests)."""
    if template not in (None, "checkpoint"):
        get_template(template)  # an unknown name fails before any loading
    fabric, model, tokenizer, fmt, _ = load_chat_model(checkpoint_dir, precision, lora_path, None, template)
    if scorer is None:
        reward_dir = reward_checkpoint_dir or checkpoint_dir
        reward_model = load_reward_model(reward_dir, reward_path, fabric.device)
        reward_tokenizer = Tokenizer(reward_dir)

        def scorer(texts):
            return score(reward_model, reward_tokenizer, texts)

    def sample(messages):
        return sample_answers(model, fmt, fabric.device, messages, num_samples, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p)

    def rate(messages, answers):
        return scorer(reward_texts(messages, answers, reward_format, fmt))

    print(f"self-distillation on {len(prompts)} prompts: {num_samples} samples each from "
          f"{Path(checkpoint_dir).name}{' + ' + str(lora_path) if lora_path else ''}", file=sys.stderr, flush=True)
    counts = run_self_distill(prompts, output_path, sample, rate, seed, keep_samples)
    print(f"kept {counts['kept']} answers ({counts['empty']} prompts with only empty answers, {counts['skipped']} "
          f"done before); output: {output_path}", file=sys.stderr)
    return counts


if __name__ == "__main__":
    run_cli(main)
