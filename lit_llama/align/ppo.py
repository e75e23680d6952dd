"""Proximal policy optimization (PPO, Schulman et al. 2017) of a LoRA policy against a reward, the
way StackLLaMA (Beeching et al. 2023) runs it through TRL's PPOTrainer, itself Ziegler et al. 2019's
recipe for language models.

Each step:

1. generate responses to a batch of prompts with the policy (sampling, temperature 1, no top-k);
2. score prompt + response with the reward model (a scalar per response);
3. turn the score into per-token rewards: -beta * (log pi(a|s) - log pi_ref(a|s)) on every response
   token (a KL penalty that keeps the policy near the model it started from) plus the score on the
   last one; beta follows an adaptive controller that aims the KL at a target;
4. estimate advantages with GAE (gamma 1, lambda 0.95) from a value head on the policy's last hidden
   states, whiten them, and take a few epochs of clipped policy and value updates over mini-batches.

The policy is the base LLaMA plus LoRA (lit_llama/peft/lora.py) plus a linear value head; the frozen
reference is the same model with the LoRA branch switched off, so there is one copy of the base
weights. Prompts are left-padded into one batch: each row gets its own rotary positions and an
attention mask that hides its padding, so batched generation equals one-at-a-time generation.

Why one file: the steps above share the rollout tensors and their masks; split, each piece would be
read only beside the others.
"""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from lit_llama.align.preference import load_preference_data, stackllama_prompt
from lit_llama.data.records import read_records
from lit_llama.infer.engine import Engine, Request, SamplingParams
from lit_llama.io.checkpoint import CheckpointError, load_weights_file, save_weights_file
from lit_llama.peft.lora import lora_disabled
from lit_llama.model import LLaMA
from lit_llama.templates import instruction_prompt
from lit_llama.train.loop import TrainArgs, clip_gradients, lr_at
from lit_llama.train.state import load_training_state, save_training_state
from lit_llama.utils import UserError, format_duration

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PPOConfig:
    # defaults: StackLLaMA's run (trl/examples/research_projects/stack_llama/scripts/rl_training.py)
    # and TRL's PPOConfig
    batch_size: int = 32  # prompts (and responses) per PPO step
    mini_batch_size: int = 4  # responses per gradient step; batch_size / mini_batch_size steps per epoch
    ppo_epochs: int = 4  # passes over each batch
    learning_rate: float = 1.41e-5
    warmup_steps: int = 0  # linear warmup of the learning rate over the first PPO steps
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    gamma: float = 1.0  # discount: the response is one short episode
    lam: float = 0.95  # GAE's lambda: bias/variance trade-off of the advantage estimate
    cliprange: float = 0.2  # PPO's epsilon for the probability ratio
    cliprange_value: float = 0.2  # the value prediction moves at most this far from the old one
    vf_coef: float = 0.1  # weight of the value loss next to the policy loss
    init_kl_coef: float = 0.2  # beta at the start
    adaptive_kl: bool = True  # adapt beta (Ziegler et al.) or keep it fixed
    target_kl: float = 6.0  # the adaptive controller aims the per-response KL (nats) at this
    kl_horizon: int = 10000
    max_new_tokens: int = 128
    temperature: float = 1.0  # TRL samples from the full distribution: temperature 1, top_k 0
    top_k: Optional[int] = None
    reward_baseline: float = 0.0  # subtracted from every score (StackLLaMA's --reward_baseline)

    def check(self) -> None:
        for name in ("batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.mini_batch_size:
            raise UserError(f"--batch_size {self.batch_size} must be a multiple of --mini_batch_size "
                            f"{self.mini_batch_size}")
        if self.learning_rate <= 0 or self.init_kl_coef < 0 or self.target_kl <= 0:
            raise UserError("--learning_rate and --target_kl must be positive and --init_kl_coef non-negative")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise UserError("--gamma and --lam must be in [0, 1]")
        if self.temperature <= 0:
            raise UserError("--temperature must be positive: PPO needs the probabilities of sampled tokens")

    def schedule(self, steps: int) -> TrainArgs:
        """The learning rate as fit's schedule (`lr_at`) gives it: linear warmup over warmup_steps,
        then constant (a cosine that ends where it starts, as TRL's PPO keeps it)."""
        return TrainArgs(learning_rate=self.learning_rate, warmup_iters=self.warmup_steps, max_iters=steps,
                         min_lr_ratio=1.0, grad_clip=self.max_grad_norm)


# ---------------------------------------------------------------- the policy and its reference


class PolicyWithValueHead(nn.Module):
    """A LLaMA (with LoRA) and a value head, Linear(n_embd, 1) on the final hidden states (after
    the last norm, as TRL's AutoModelForCausalLMWithValueHead), trained together: the value loss
    also shapes the shared body, weighted by vf_coef."""

    def __init__(self, model: LLaMA):
        super().__init__()
        self.model = model
        w = model.transformer.wte.weight
        self.value_head = nn.Linear(model.config.n_embd, 1, device=w.device, dtype=w.dtype)

    def forward(self, idx: torch.Tensor, pad: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                start: int = 0, end: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, values) of positions start:end of left-padded `idx`; `pad` (B,) is each row's
        number of padding tokens. Slicing before the head saves a (B, T, vocab) tensor."""
        hidden = hidden_states(self.model, idx, pad, input_pos)[:, start:end]
        return self.model.logits(hidden), self.value_head(hidden).squeeze(-1)


def hidden_states(model: LLaMA, idx: torch.Tensor, pad: torch.Tensor,
                  input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """LLaMA.forward up to the final norm for left-padded rows: row b's first pad[b] slots are
    padding. Its real tokens get rotary positions 0, 1, ... and attend only to real tokens, so they
    compute what they would unpadded. With `input_pos` (the slots of `idx`), the KV cache is used."""
    B, T = idx.shape
    c = model.config
    slots = torch.arange(T, device=idx.device) if input_pos is None else input_pos
    if input_pos is None:
        if T > c.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({c.block_size})")
        key_slots = slots
    else:
        key_slots = torch.arange(model.transformer.h[0].attn.kv_cache.k.size(2), device=idx.device)
    pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T): each row counts from its first token
    causal = slots[:, None] >= key_slots[None, :]  # (T, K)
    real_key = key_slots[None, :] >= pad[:, None]  # (B, K)
    # a padding slot attends to itself only: a row with nothing to attend to would give NaN
    itself = slots[:, None] == key_slots[None, :]
    mask = (causal[None] & (real_key[:, None, :] | itself[None]))[:, None]  # (B, 1, T, K)
    return model.hidden_states(idx, input_pos, positions=pos, mask=mask)


# ---------------------------------------------------------------- rollouts


def left_pad(rows: Sequence[torch.Tensor], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(idx (B, T), pad (B,)) with each row right-aligned."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = r
    return idx, torch.tensor([T - len(r) for r in rows], device=rows[0].device)


def generate_batch(policy: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int, *,
                   temperature: float = 1.0, top_k: Optional[int] = None, stop_ids: Sequence[int] = (),
                   pad_id: int = 0) -> List[torch.Tensor]:
    """Sample a response to every prompt (1-D token tensors), all as rows of one batch of the
    batched engine (lit_llama/infer/engine.py). A response ends with its first stop id (kept: emitting it
    is an action the policy is rewarded for) or after `max_new_tokens`; a finished row leaves the
    batch at once. `pad_id` is unused (rows are not padded), kept for the callers' symmetry."""
    model = _llama(policy)
    T = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, model.config.block_size - T)
    if max_new_tokens < 1:
        raise UserError(f"a prompt of {T} tokens leaves no room in the model's context ({model.config.block_size})")
    device = prompts[0].device
    engine = Engine(model, max_batch_size=len(prompts), cache_rows=len(prompts), max_seq_length=T + max_new_tokens,
                    prefill_chunk=sum(len(p) for p in prompts), prefix_cache=False, device=device,
                    max_waiting=len(prompts))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            stop_ids=tuple(stop_ids))
    try:
        requests = engine.run([Request(p.tolist(), params) for p in prompts])
    finally:
        model.clear_kv_cache()  # training runs without the cache
    return [torch.tensor(r.tokens + ([r.stop_id] if r.stop_id is not None else []), dtype=torch.long, device=device)
            for r in requests]


def _llama(policy: nn.Module) -> LLaMA:
    # the LLaMA inside a PolicyWithValueHead, possibly inside Fabric's wrapper
    return getattr(policy, "module", policy).model


@dataclass
class Rollouts:
    """A batch of prompt + response rows: [left-padded prompt (P) | right-padded response (R)].
    The logits at slot P - 1 + t predict response token t; `mask` (B, R) marks real ones."""

    idx: torch.Tensor
    pad: torch.Tensor
    mask: torch.Tensor
    prompt_len: int

    @classmethod
    def pack(cls, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], pad_id: int) -> "Rollouts":
        prompt, pad = left_pad(queries, pad_id)
        R = max(len(r) for r in responses)
        resp = torch.full((len(responses), R), pad_id, dtype=torch.long, device=prompt.device)
        mask = torch.zeros(len(responses), R, dtype=torch.bool, device=prompt.device)
        for i, r in enumerate(responses):
            resp[i, : len(r)] = r
            mask[i, : len(r)] = True
        return cls(torch.cat([prompt, resp], dim=1), pad, mask, prompt.size(1))

    @property
    def responses(self) -> torch.Tensor:
        return self.idx[:, self.prompt_len:]


def logprobs_and_values(policy: nn.Module, batch: Rollouts, rows=slice(None)) -> Tuple[torch.Tensor, torch.Tensor]:
    """log pi(response token t | everything before) and the value of that state, (B, R) each,
    in float32."""
    P, R = batch.prompt_len, batch.mask.size(1)
    logits, values = policy(batch.idx[rows], batch.pad[rows], start=P - 1, end=P - 1 + R)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, batch.responses[rows, :, None]).squeeze(-1), values.float()


@torch.no_grad()
def rollout_stats(policy: nn.Module, batch: Rollouts, chunk: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old log-probs, old values, reference log-probs) of a batch, `chunk` rows at a time, in eval
    mode (no dropout): the quantities PPO holds fixed while it updates the policy."""
    was_training = policy.training
    policy.eval()
    logprobs, values, ref = [], [], []
    for s in range(0, batch.idx.size(0), chunk):
        rows = slice(s, s + chunk)
        lp, v = logprobs_and_values(policy, batch, rows)
        with lora_disabled(policy):
            ref_lp, _ = logprobs_and_values(policy, batch, rows)
        logprobs.append(lp), values.append(v), ref.append(ref_lp)
    policy.train(was_training)
    return torch.cat(logprobs), torch.cat(values), torch.cat(ref)


# ---------------------------------------------------------------- the math


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the real tokens (unbiased variance, as TRL's masked_whiten): advantages
    of unit scale whatever the reward's scale, so one learning rate and clip range fit all."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def kl_penalty_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                       mask: torch.Tensor, kl_coef: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both (B, R). kl is the sampled estimate log pi - log pi_ref of each response
    token (its mean over samples is the KL divergence); the reward of a token is -kl_coef * kl, and
    the last real token also gets the reward model's score: the score judges the whole response,
    which is complete only there (Ziegler et al. 2019, sec. 2.2)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1  # index of each response's last token
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards, kl


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016), (advantages, returns), (B, R).

    delta_t = r_t + gamma V(s_t+1) - V(s_t);  A_t = delta_t + gamma lam A_t+1, backwards in t.
    Values and rewards past a response's end are zeroed, so the state after the last token is
    terminal (value 0) and padding contributes nothing. returns = A + V are the value targets."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    R = rewards.size(1)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


def ppo_losses(logprobs: torch.Tensor, values: torch.Tensor, old_logprobs: torch.Tensor, old_values: torch.Tensor,
               advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float = 0.2,
               cliprange_value: float = 0.2, vf_coef: float = 0.1) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(loss, stats): PPO's clipped surrogate plus the clipped value loss, averaged over real tokens.

    Policy: with ratio = pi / pi_old, minimize max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), the
    pessimistic bound: moving the ratio beyond the clip range earns nothing, so each batch can take
    several gradient steps without the policy running away from the data it sampled.
    Value: the same idea (as TRL and OpenAI's baselines): 0.5 max((V - G)^2, (V_clipped - G)^2) with
    V_clipped within cliprange_value of the old value."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    stats = {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
             "clipfrac": masked_mean((pg2 > pg1).float(), mask),
             "vf_clipfrac": masked_mean((vf2 > vf1).float(), mask),
             # the policy's movement within the step, (log ratio)^2 / 2 (TRL's approxkl)
             "approx_kl": 0.5 * masked_mean((logprobs - old_logprobs).detach() ** 2, mask)}
    return pg_loss + vf_coef * vf_loss, stats


class KLController:
    """beta, the weight of the KL penalty; saved with the training state (Fabric saves and restores
    objects with these methods), so a resumed run goes on from the beta it had reached."""

    value: float

    def update(self, current: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(KLController):
    """Ziegler et al. 2019 (sec. 2.2), as TRL's AdaptiveKLController: beta grows when the KL is above
    its target and shrinks when below, by at most 20% of the error per `horizon` samples:
    beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current: float, n_steps: int) -> None:
        error = min(max(current / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


class FixedKLController(KLController):
    def __init__(self, kl_coef: float):
        self.value = kl_coef


def kl_controller(config: PPOConfig):
    if config.adaptive_kl:
        return AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
    return FixedKLController(config.init_kl_coef)


# ---------------------------------------------------------------- one PPO step


def ppo_step(policy: nn.Module, optimizer: torch.optim.Optimizer, queries: Sequence[torch.Tensor],
             responses: Sequence[torch.Tensor], scores: torch.Tensor, config: PPOConfig, kl_ctl, *,
             pad_id: int = 0, fabric=None) -> Dict[str, float]:
    """One PPO update on a batch of (prompt, response, score): returns the step's statistics.
    `fabric`, where given, does the backward pass and the clipping (mixed precision's scaler)."""
    batch = Rollouts.pack(queries, responses, pad_id)
    mask = batch.mask.float()
    scores = scores.detach().float().clone().to(mask.device) - config.reward_baseline
    old_logprobs, old_values, ref_logprobs = rollout_stats(policy, batch, config.mini_batch_size)
    rewards, kl = kl_penalty_rewards(old_logprobs, ref_logprobs, scores, mask, kl_ctl.value)
    advantages, returns = compute_gae(old_values, rewards, mask, config.gamma, config.lam)
    advantages = whiten(advantages, mask)  # over the whole batch, before it is split

    policy.train()
    B = len(queries)
    totals: Dict[str, float] = {}
    n = 0
    for _ in range(config.ppo_epochs):
        for rows in torch.randperm(B).split(config.mini_batch_size):
            rows = rows.to(mask.device)
            logprobs, values = logprobs_and_values(policy, batch, rows)
            loss, stats = ppo_losses(logprobs, values, old_logprobs[rows], old_values[rows], advantages[rows],
                                     returns[rows], mask[rows], config.cliprange, config.cliprange_value,
                                     config.vf_coef)
            if fabric is not None:
                fabric.backward(loss)
            else:
                loss.backward()
            clip_gradients(policy, optimizer, config.max_grad_norm, fabric)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            n += 1

    # the KL of the batch as sampled (summed over each response, averaged over responses) steers beta
    mean_kl = float(kl.sum(1).mean())
    out = {k: v / n for k, v in totals.items()}
    out.update(score=float(scores.mean() + config.reward_baseline), kl=mean_kl, kl_coef=kl_ctl.value,
               response_length=float(mask.sum(1).mean()),
               non_score_reward=float((-kl_ctl.value * kl).sum(1).mean()))
    kl_ctl.update(mean_kl, B)
    return out


# ---------------------------------------------------------------- the loop


RewardFn = Callable[[List[torch.Tensor], List[torch.Tensor]], torch.Tensor]  # (prompts, responses) -> (B,)


class PromptSampler:
    """Batches of prompts: shuffled epochs, each prompt once per epoch (seeded by the global RNG)."""

    def __init__(self, prompts: Sequence[torch.Tensor], batch_size: int):
        self.prompts, self.batch_size = list(prompts), batch_size
        self.order: List[int] = []

    def __call__(self) -> List[torch.Tensor]:
        out = []
        while len(out) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.prompts)).tolist()
            out.append(self.prompts[self.order.pop()])
        return out

    # the position in the epoch, saved with the training state
    def state_dict(self) -> dict:
        return {"order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.order = [int(i) for i in state["order"]]


def train(policy: nn.Module, optimizer: torch.optim.Optimizer, prompts: Sequence[torch.Tensor], reward_fn: RewardFn,
          config: PPOConfig, steps: int, *, stop_ids: Sequence[int] = (), pad_id: int = 0, fabric=None,
          log_interval: int = 1, save_interval: int = 0, on_save: Optional[Callable[[int, object], None]] = None,
          log: Callable[[str], None] = print, out_dir: Optional[Path] = None, resume: bool = False
          ) -> List[Dict[str, float]]:
    """PPO steps up to `steps`: sample prompts, generate, score with `reward_fn`, update. Returns the
    statistics of each step run; every `save_interval` steps and at the end, the training state
    (step-*.ckpt in `out_dir`, with `fabric`: trainable weights, optimizer, step, beta, the prompt
    order and the RNG, as fit writes it) and then `on_save(step, kl_ctl)`. With `resume`, the run
    continues from out_dir's last training state exactly as if it had not stopped."""
    config.check()
    if out_dir is not None and fabric is None:
        raise ValueError("saving training states needs `fabric`")
    kl_ctl = kl_controller(config)
    batches = PromptSampler(prompts, config.batch_size)
    schedule = config.schedule(steps)
    state = {"model": policy, "optimizer": optimizer, "step": 0, "kl_controller": kl_ctl, "prompts": batches,
             "args": asdict(config)}
    if resume:
        load_training_state(fabric, Path(out_dir), state, trainable_only=True)
    history: List[Dict[str, float]] = []
    t_start, start_step = time.perf_counter(), state["step"]
    device = next(p for p in policy.parameters()).device
    while state["step"] < steps:
        step = state["step"] + 1
        t0 = time.perf_counter()
        lr = lr_at(step - 1, schedule)
        for g in optimizer.param_groups:
            g["lr"] = lr
        queries = [q.to(device) for q in batches()]
        policy.eval()  # no dropout while sampling
        responses = generate_batch(policy, queries, config.max_new_tokens, temperature=config.temperature,
                                   top_k=config.top_k, stop_ids=stop_ids, pad_id=pad_id)
        scores = torch.as_tensor(reward_fn(queries, responses)).float().clone()
        stats = ppo_step(policy, optimizer, queries, responses, scores, config, kl_ctl, pad_id=pad_id, fabric=fabric)
        state["step"] = step
        dt = time.perf_counter() - t0
        tokens = sum(len(q) + len(r) for q, r in zip(queries, responses))
        stats.update(step=step, lr=lr, tokens_per_sec=tokens / dt, step_time=dt)
        history.append(stats)
        if step % log_interval == 0 or step == steps:
            eta = (time.perf_counter() - t_start) / (step - start_step) * (steps - step)
            log(format_stats(stats, steps, eta))
            if fabric is not None:
                fabric.log_dict({k: v for k, v in stats.items() if k != "step"}, step=step)
        if (save_interval and step % save_interval == 0) or step == steps:
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                save_training_state(fabric, Path(out_dir), state, trainable_only=True)
            if on_save is not None:
                on_save(step, kl_ctl)
    return history


def format_stats(s: Dict[str, float], steps: int, eta: float) -> str:
    return (f"step {s['step']}/{steps} | score {s['score']:.3f} | kl {s['kl']:.3f} | beta {s['kl_coef']:.4f} | "
            f"len {s['response_length']:.1f} | pg_loss {s['pg_loss']:.4f} | vf_loss {s['vf_loss']:.4f} | "
            f"clipfrac {s['clipfrac']:.3f} | {s['tokens_per_sec']:.0f} tokens/s | ETA {format_duration(eta)}")


# ---------------------------------------------------------------- prompts and weights files


def read_prompt_texts(path: Path) -> List[str]:
    """Prompts of a JSON list or JSONL file: strings, records with a "prompt" (used as it is, as in
    preference rows), StackExchange-paired's "question" (StackLLaMA's "Question: ...\n\nAnswer: "
    template) or Alpaca/Dolly records (instruction and optional input or context, in the Alpaca
    template that SFT used). Duplicates (one prompt, several preference pairs) are kept once."""
    raw = read_records(path, "prompts file")
    prompts = []
    for i, r in enumerate(raw):
        if isinstance(r, str):
            prompts.append(r)
        elif isinstance(r, dict) and isinstance(r.get("prompt"), str):
            prompts.append(r["prompt"])
        elif isinstance(r, dict) and isinstance(r.get("question"), str):
            prompts.append(stackllama_prompt(r["question"]))
        elif isinstance(r, dict) and isinstance(r.get("instruction"), str):
            prompts.append(instruction_prompt(r["instruction"], str(r.get("input") or r.get("context") or "")))
        else:
            raise UserError(f"{path}: record {i} is neither a string nor a record with a prompt, question or instruction")
    prompts = [p for p in dict.fromkeys(prompts) if p.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def load_prompts(path: Path, tokenizer, checkpoint_dir: Path, max_prompt_length: int) -> List[Tuple[str, torch.Tensor]]:
    """(text, token ids) of every distinct prompt of `path`: a prompts file (read_prompt_texts) or
    a folder prepared by scripts/prepare_preferences.py (the prompts of its training pairs, as
    tokenised there). Prompts longer than `max_prompt_length` tokens are left out, as StackLLaMA
    leaves out long questions; none left is an error."""
    path = Path(path)
    if path.is_dir():
        train, _, _ = load_preference_data(path, checkpoint_dir)
        seen = dict.fromkeys(tuple(p["chosen"][: int(p["prompt_length"])].tolist()) for p in train)
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        # the text the reward model is given: the prompt decoded (without the BOS the tokenizer adds again)
        prompts = [(tokenizer.decode(ids[len(bos):] if list(ids[:len(bos)]) == bos else ids), torch.tensor(ids))
                   for ids in seen if ids]
    else:
        prompts = [(t, tokenizer.encode(t)) for t in read_prompt_texts(path)]
    kept = [(t, ids) for t, ids in prompts if 0 < len(ids) <= max_prompt_length]
    if not kept:
        raise UserError(f"{path}: none of its {len(prompts)} prompts has 1 to {max_prompt_length} tokens")
    return kept


def save_value_head(policy: nn.Module, path: Path, metadata: dict) -> Path:
    """The value head (with `metadata`, e.g. the step and beta) as a safetensors file, atomically."""
    head = getattr(policy, "module", policy).value_head
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / VALUE_HEAD_FILE
    save_weights_file(path, {"weight": head.weight, "bias": head.bias},
                      {**metadata, "n_embd": head.in_features})
    return path


def load_value_head(policy: nn.Module, path: Path) -> dict:
    """Load a value head saved by save_value_head; returns its metadata."""
    tensors, meta = load_weights_file(path, VALUE_HEAD_FILE)
    head = getattr(policy, "module", policy).value_head
    if meta.get("n_embd") != head.in_features or set(tensors) != {"weight", "bias"}:
        raise CheckpointError(f"{path} is not a value head for a model of width {head.in_features}")
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    return meta
