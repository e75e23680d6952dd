"""The one training loop: gradient accumulation, AdamW, warmup + cosine LR, clipping, validation,
periodic checkpoints and exact resume (the state on disk is train/state.py's), and the progress
line. Finetuning and pretraining scripts only build the model and the batches (train/setup.py);
everything that happens per step lives here."""

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_llama.data.instruction import IGNORE_INDEX
from lit_llama.train.state import load_training_state, save_training_state
from lit_llama.utils import UserError, format_duration

Batches = Callable[[int], Tuple[torch.Tensor, torch.Tensor]]  # micro-step -> (inputs, targets)


@dataclass
class TrainArgs:
    """The optimisation of a training run; every script that trains takes these as flags.

    Args:
        learning_rate: peak learning rate of the warmup + cosine schedule.
        min_lr_ratio: the cosine decay ends at this fraction of the peak (LLaMA: 10%).
        warmup_iters: steps of linear warmup.
        max_iters: optimizer steps.
        weight_decay: AdamW weight decay.
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        grad_clip: clip the gradient norm to this (0: no clipping).
        global_batch_size: examples per optimizer step over all devices (gradient accumulation).
        micro_batch_size: examples per forward pass per device.
        eval_interval: steps between validations (and samples, where the script prints them).
        eval_iters: validation batches per evaluation.
        save_interval: steps between training checkpoints (step-*.ckpt, for --resume).
        log_interval: steps between progress lines.
    """

    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_iters: int = 100
    max_iters: int = 1000
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    global_batch_size: int = 128
    micro_batch_size: int = 4
    eval_interval: int = 100
    eval_iters: int = 20
    save_interval: int = 500
    log_interval: int = 1

    def accumulation_steps(self, world_size: int) -> int:
        per_device, rest = divmod(self.global_batch_size, world_size)
        if rest or per_device % self.micro_batch_size or per_device == 0:
            raise UserError(f"global batch size {self.global_batch_size} must be a multiple of micro batch size "
                            f"{self.micro_batch_size} x {world_size} device(s)")
        return per_device // self.micro_batch_size


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup from 0, then cosine decay to min_lr_ratio of the peak at max_iters."""
    if step < args.warmup_iters:
        return args.learning_rate * (step + 1) / args.warmup_iters
    progress = min(1.0, (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    floor = args.learning_rate * args.min_lr_ratio
    return floor + 0.5 * (args.learning_rate - floor) * (1 + math.cos(math.pi * progress))


def clip_gradients(model: torch.nn.Module, optimizer, max_norm: float, fabric=None) -> None:
    """Clip the gradient norm of the trainable weights to `max_norm` (0: not at all); through
    `fabric` where given (it unscales mixed precision's gradients first)."""
    if max_norm <= 0:
        return
    if fabric is not None:
        fabric.clip_gradients(model, optimizer, max_norm=max_norm)
    else:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                             betas=(args.beta1, args.beta2))


def lm_loss(model, batch) -> torch.Tensor:
    """The default `compute_loss`: next-token cross-entropy of an (inputs, targets) batch."""
    x, y = batch
    return loss_fn(model(x), y)


def split_loss(out) -> Tuple[torch.Tensor, dict]:
    """(loss, metrics) of what a `compute_loss` returned: a loss tensor, or (loss, {name: value})."""
    if isinstance(out, (tuple, list)):
        return out[0], dict(out[1])
    return out, {}


def batch_tokens(batch) -> int:
    """Tokens in a batch, for the throughput line: the inputs of an (inputs, targets) pair, or the
    2-D integer tensors of a dict (e.g. the token ids of preference pairs)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, (tuple, list)):
        return batch_tokens(batch[0]) if batch else 0
    if isinstance(batch, dict):
        return sum(v.numel() for v in batch.values()
                   if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point())
    return 0


@torch.no_grad()
def validate_metrics(fabric, model, val_batches: Optional[Batches], eval_iters: int,
                     compute_loss: Optional[Callable] = None) -> Optional[dict]:
    """{"loss": mean validation loss, plus the mean of every metric `compute_loss` reports}."""
    if val_batches is None or eval_iters < 1:
        return None
    compute_loss = compute_loss or lm_loss
    model.eval()
    # the ranks split the validation batches (index i*world + rank, like training) and average
    indices = (i * fabric.world_size + fabric.global_rank for i in range(eval_iters))
    values = {}
    for batch in (fabric.to_device(val_batches(i)) for i in indices):
        loss, metrics = split_loss(compute_loss(model, batch))
        for k, v in {"loss": loss, **metrics}.items():
            values.setdefault(k, []).append(torch.as_tensor(v, dtype=torch.float32, device=loss.device).detach())
    model.train()
    return {k: fabric.all_reduce(torch.stack(v).mean(), reduce_op="mean").item() for k, v in values.items()}


def validate(fabric, model, val_batches: Optional[Batches], eval_iters: int,
             compute_loss: Optional[Callable] = None) -> Optional[float]:
    metrics = validate_metrics(fabric, model, val_batches, eval_iters, compute_loss)
    return None if metrics is None else metrics["loss"]


def fit(fabric, model, optimizer, train_batches: Batches, val_batches: Optional[Batches], args: TrainArgs,
        out_dir: Path, *, resume: bool = False, trainable_only: bool = False,
        sample: Optional[Callable[[], str]] = None, flops_per_token: Optional[float] = None,
        on_save: Optional[Callable[[int], None]] = None, compute_loss: Optional[Callable] = None) -> dict:
    """Train `model` (already set up with Fabric) for args.max_iters optimizer steps.

    `compute_loss(model, batch)` gives the loss of a micro-batch (any tuple or dict of tensors that
    `fabric.to_device` moves): a tensor, or (tensor, {name: scalar}) whose metrics are averaged and
    printed at each validation; the default is the language-model loss of (inputs, targets).
    `flops_per_token` (training FLOPs of one token) adds the MFU to the progress line where the
    device's peak is known; `on_save(step)` runs after each training checkpoint."""
    out_dir = Path(out_dir)
    compute_loss = compute_loss or lm_loss
    accum = args.accumulation_steps(fabric.world_size)
    val_metrics = None
    state = {"model": model, "optimizer": optimizer, "step": 0, "args": asdict(args)}
    if resume:
        load_training_state(fabric, out_dir, state, trainable_only)
    model.train()
    meter = Throughput(fabric, args, state["step"], flops_per_token)
    tokens = 0
    history = []
    while state["step"] < args.max_iters:
        step = state["step"]
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args)
        loss_sum = 0.0
        for micro in range(accum):
            # micro-batches are indexed globally, so each rank and each resume sees its own share
            batch = fabric.to_device(train_batches((step * accum + micro) * fabric.world_size + fabric.global_rank))
            with fabric.no_backward_sync(model, enabled=micro < accum - 1):
                loss, _ = split_loss(compute_loss(model, batch))
                fabric.backward(loss / accum)
            loss_sum += loss.item() / accum
            tokens += batch_tokens(batch) * fabric.world_size
        clip_gradients(model, optimizer, args.grad_clip, fabric)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        history.append(loss_sum)
        if state["step"] % args.log_interval == 0 or state["step"] == args.max_iters:
            meter.log(state["step"], loss_sum, tokens)
        if state["step"] % args.eval_interval == 0 or state["step"] == args.max_iters:
            val_metrics = validate_metrics(fabric, model, val_batches, args.eval_iters, compute_loss)
            if val_metrics is not None:
                extra = "".join(f", val {k} {v:.4f}" for k, v in val_metrics.items() if k != "loss")
                fabric.print(f"step {state['step']}: val loss {val_metrics['loss']:.4f}{extra}")
                fabric.log_dict({f"val_{k}": v for k, v in val_metrics.items()}, step=state["step"])
            if sample is not None:
                model.eval()
                fabric.print(f"sample: {sample()!r}")
                model.train()
        if state["step"] % args.save_interval == 0 or state["step"] == args.max_iters:
            save_training_state(fabric, out_dir, state, trainable_only)
            if on_save is not None:
                on_save(state["step"])
    return {"losses": history, "step": state["step"], "val": val_metrics}


class Throughput:
    """The progress line: loss, learning rate, tokens/s (over all devices, since the last line),
    MFU where the device's peak FLOPs are known, and the ETA from the average pace of this run."""

    def __init__(self, fabric, args: TrainArgs, start_step: int, flops_per_token: Optional[float]):
        self.fabric, self.args, self.start_step = fabric, args, start_step
        self.peak = peak_flops(fabric.device, fabric.strategy.precision) if flops_per_token else None
        self.flops_per_token = flops_per_token
        self.t0 = self.last_t = time.perf_counter()
        self.last_tokens = 0

    def log(self, step: int, loss: float, tokens: int) -> None:
        now = time.perf_counter()
        tps = (tokens - self.last_tokens) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_tokens = now, tokens
        eta = (now - self.t0) / max(1, step - self.start_step) * (self.args.max_iters - step)
        lr = lr_at(step - 1, self.args)
        parts = [f"step {step}/{self.args.max_iters}", f"loss {loss:.4f}", f"lr {lr:.2e}", f"{tps:.0f} tokens/s"]
        metrics = {"loss": loss, "lr": lr, "tokens_per_sec": tps}
        if self.peak:
            # model FLOPs per second per device over the device's peak (PaLM's MFU, recompute not counted)
            metrics["mfu"] = tps * self.flops_per_token / self.fabric.world_size / self.peak
            parts.append(f"MFU {metrics['mfu']:.1%}")
        parts.append(f"ETA {format_duration(eta)}")
        self.fabric.print(" | ".join(parts))
        self.fabric.log_dict(metrics, step=step)
        sys.stdout.flush()


def flops_per_token(config, block_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 6 per weight of each matmul
    (the embedding lookup is none) plus attention's scores and weighted sum, 12 x layers x
    n_embd x context (PaLM, appendix B, without discounting the causal mask)."""
    hs, n = config.head_size, config.n_embd
    attn = n * (config.n_head + 2 * config.n_query_groups) * hs + config.n_head * hs * n
    mlp = 3 * n * config.intermediate_size
    matmul_weights = config.n_layer * (attn + mlp) + config.vocab_size * n
    return 6 * matmul_weights + 12 * config.n_layer * n * block_size


# dense peak FLOP/s per GPU (vendor datasheets, no sparsity): half precision (bf16/fp16 tensor cores)
# and plain fp32; more specific names first
PEAK_FLOPS = [
    ("H100 PCIe", {"half": 756e12, "32": 51e12}),
    ("H100 NVL", {"half": 835e12, "32": 60e12}),
    ("H100", {"half": 989e12, "32": 67e12}),
    ("H200", {"half": 989e12, "32": 67e12}),
    ("A100", {"half": 312e12, "32": 19.5e12}),
    ("L4", {"half": 121e12, "32": 30e12}),
]


def peak_flops(device: torch.device, precision) -> Optional[float]:
    """The device's peak for the precision Fabric trains in, or None where it is not known (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    p = str(getattr(precision, "precision", precision))
    kind = "half" if "16" in p else "32" if p.startswith("32") else None
    return next((peaks[kind] for key, peaks in PEAK_FLOPS if key in name), None) if kind else None
