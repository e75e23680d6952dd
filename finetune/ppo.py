"""RLHF with PPO, as StackLLaMA: a LoRA policy (with a value head) on the SFT'd model learns to
raise a reward model's score, held near the SFT'd model by a KL penalty (the same weights with
the LoRA branch switched off). The math is in lit_llama/align/ppo.py."""

import json
from pathlib import Path
from typing import Optional

import torch

from lit_llama.align.ppo import PolicyWithValueHead, PPOConfig, load_prompts, save_value_head, train
from lit_llama.align.reward import load_reward_model, score
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR, load_config, load_model, validate_checkpoint_dir
from lit_llama.peft.lora import add_lora, save_lora
from lit_llama.tokenizer import Tokenizer
from lit_llama.train.flags import LoRAArgs
from lit_llama.train.state import check_resume
from lit_llama.utils import UserError, make_fabric, run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    reward_path: Path = Path("out/reward"),
    prompts_file: Path = Path("data/prefs"),
    out_dir: Path = Path("out/ppo"),
    reward_checkpoint_dir: Optional[Path] = None,
    precision: Optional[str] = None,
    steps: int = 1000,
    batch_size: int = 32,
    mini_batch_size: int = 4,
    ppo_epochs: int = 4,
    learning_rate: float = 1.41e-5,
    warmup_steps: int = 0,
    grad_clip: float = 1.0,
    init_kl_coef: float = 0.2,
    adaptive_kl: bool = True,
    target_kl: float = 6.0,
    kl_horizon: int = 10000,
    gamma: float = 1.0,
    lam: float = 0.95,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.1,
    max_new_tokens: int = 128,
    max_prompt_length: int = 512,
    stop_at_eos: bool = True,
    reward_baseline: float = 0.0,
    lora: LoRAArgs = LoRAArgs(lora_r=16, lora_alpha=32),
    log_interval: int = 1,
    save_interval: int = 100,
    resume: bool = False,
    seed: int = 1337,
) -> None:
    """Optimize LoRA weights with PPO against a reward model (defaults: StackLLaMA's run through
    TRL's PPOTrainer: Adam at 1.41e-5, 4 PPO epochs, beta 0.2 adapted towards a KL of 6 nats).

    Args:
        checkpoint_dir: the policy's base: the SFT'd model (merge an SFT LoRA into a checkpoint first
            with scripts/merge_lora.py). It is also the frozen reference of the KL penalty.
        reward_path: finetune/reward_model.py's --out_dir, or the lit_reward.safetensors file in it.
        prompts_file: a folder prepared by scripts/prepare_preferences.py (its training prompts), or a
            JSON/JSONL file of prompts: strings, {"prompt": ...} (used verbatim), {"question": ...}
            (StackLLaMA's "Question: ...\\n\\nAnswer: ") or {"instruction", "input"} (Alpaca template).
        out_dir: where lit_lora.safetensors (for generate/lora.py, chat.py and scripts/merge_lora.py),
            value_head.safetensors and ppo_config.json go; rewritten atomically at each save.
        reward_checkpoint_dir: the reward model's base checkpoint (default: checkpoint_dir).
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        steps: PPO steps, each on batch_size fresh responses.
        batch_size: prompts sampled, answered and scored per PPO step.
        mini_batch_size: responses per gradient step (batch_size / mini_batch_size steps per epoch).
        ppo_epochs: passes over each batch.
        learning_rate: Adam's learning rate.
        warmup_steps: linear learning-rate warmup over this many PPO steps (0: none).
        grad_clip: clip the gradient norm of each update to this (0: no clipping).
        init_kl_coef: beta, the weight of the per-token KL penalty, at the start.
        adaptive_kl: adapt beta so that the KL approaches target_kl (Ziegler et al.); false keeps it fixed.
        target_kl: the adaptive controller's target KL per response, in nats.
        kl_horizon: the adaptive controller's horizon, in responses.
        gamma: discount of GAE.
        lam: lambda of GAE.
        cliprange: PPO's clip range of the probability ratio.
        cliprange_value: the value prediction moves at most this far from the old one per step.
        vf_coef: weight of the value loss.
        max_new_tokens: the longest response.
        max_prompt_length: prompts with more tokens are left out.
        stop_at_eos: end a response at the tokenizer's end-of-text token (false: always max_new_tokens,
            as StackLLaMA, which samples lengths instead).
        reward_baseline: subtracted from every reward model score.
        lora: the LoRA flags (--lora_r, --lora_alpha, ...).
        log_interval: PPO steps between progress lines.
        save_interval: PPO steps between saves of the LoRA, the value head and the training state
            (step-*.ckpt, for --resume), and at the end.
        resume: continue from the last step-*.ckpt in out_dir (weights, optimizer, step, beta,
            prompt order and random state) as if the run had not stopped.
        seed: random seed (prompt order, sampling, initialisation).
    """
    config = PPOConfig(batch_size=batch_size, mini_batch_size=mini_batch_size, ppo_epochs=ppo_epochs,
                       learning_rate=learning_rate, warmup_steps=warmup_steps, max_grad_norm=grad_clip,
                       gamma=gamma, lam=lam, cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef,
                       init_kl_coef=init_kl_coef, adaptive_kl=adaptive_kl, target_kl=target_kl, kl_horizon=kl_horizon,
                       max_new_tokens=max_new_tokens, reward_baseline=reward_baseline)
    config.check()
    if steps < 1 or log_interval < 1 or save_interval < 0 or max_prompt_length < 1:
        raise UserError("--steps, --log_interval and --max_prompt_length must be at least 1, "
                        "--save_interval at least 0")
    lora_config = lora.config()
    out_dir = Path(out_dir)
    check_resume(out_dir, resume)

    # everything the user named is checked before any weight is read or anything written
    validate_checkpoint_dir(checkpoint_dir)
    model_config = load_config(checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    max_prompt_length = min(max_prompt_length, model_config.block_size - 1)
    prompts = load_prompts(prompts_file, tokenizer, checkpoint_dir, max_prompt_length)
    reward_dir = reward_checkpoint_dir or checkpoint_dir
    fabric = make_fabric(precision)
    fabric.seed_everything(seed, verbose=False)
    half = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(str(fabric.strategy.precision.precision))
    reward_model = load_reward_model(reward_dir, reward_path, fabric.device, half)
    reward_tokenizer = tokenizer if reward_checkpoint_dir is None else Tokenizer(reward_dir)
    fabric.print(f"{len(prompts)} prompts; reward model {reward_path} on {reward_dir}")

    model = add_lora(load_model(checkpoint_dir, model_config), lora_config)
    policy = PolicyWithValueHead(model)
    for p in policy.value_head.parameters():
        p.requires_grad_(True)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    fabric.print(f"{sum(p.numel() for p in trainable):,} trainable parameters (LoRA and value head)")
    policy = fabric.setup_module(policy)
    optimizer = fabric.setup_optimizers(torch.optim.Adam(trainable, lr=learning_rate))

    stop_ids = tuple(tokenizer.stop_ids) if stop_at_eos else ()
    text_of = {tuple(ids.tolist()): text for text, ids in prompts}
    samples = []

    def reward_fn(queries, responses):
        answers = [tokenizer.decode([t for t in r.tolist() if t not in stop_ids]) for r in responses]
        texts = [text_of[tuple(q.tolist())] + a for q, a in zip(queries, answers)]
        samples[:] = [(texts[0], answers[0])]
        return score(reward_model, reward_tokenizer, texts)

    def on_save(step, kl_ctl):
        out_dir.mkdir(parents=True, exist_ok=True)
        save_lora(model, out_dir)
        save_value_head(policy, out_dir, {"step": step, "kl_coef": kl_ctl.value})
        (out_dir / "ppo_config.json").write_text(json.dumps(
            {"step": step, "kl_coef": kl_ctl.value, "checkpoint_dir": str(checkpoint_dir),
             "reward_path": str(reward_path), "lora": lora_config.__dict__, "ppo": config.__dict__}, indent=2))
        fabric.print(f"saved {out_dir / 'lit_lora.safetensors'} at step {step}; sample answer: {samples[0][1][:200]!r}")

    history = train(policy, optimizer, [ids for _, ids in prompts], reward_fn, config, steps, stop_ids=stop_ids,
                    pad_id=tokenizer.eos_id or 0, fabric=fabric, log_interval=log_interval,
                    save_interval=save_interval, on_save=on_save, log=fabric.print, out_dir=out_dir, resume=resume)
    first, last = history[: max(1, len(history) // 4)], history[-max(1, len(history) // 4):]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    fabric.print(f"mean score {mean(first, 'score'):.3f} (first {len(first)} steps) -> {mean(last, 'score'):.3f} "
                 f"(last {len(last)}); KL {mean(last, 'kl'):.3f}")


if __name__ == "__main__":
    run_cli(main)
