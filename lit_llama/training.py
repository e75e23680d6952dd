"""The one training loop: gradient accumulation, AdamW, warmup + cosine LR, clipping, validation,
periodic checkpoints and exact resume. Finetuning and pretraining scripts only build the model and
the batches; everything that happens per step lives here."""

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_llama.data import IGNORE_INDEX
from lit_llama.utils import UserError

Batches = Callable[[int], Tuple[torch.Tensor, torch.Tensor]]  # micro-step -> (inputs, targets)


@dataclass
class TrainArgs:
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decay ends at this fraction of the peak (LLaMA: 10%)
    warmup_iters: int = 100
    max_iters: int = 1000  # optimizer steps
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    global_batch_size: int = 128  # examples per optimizer step, across all devices
    micro_batch_size: int = 4  # examples per forward pass on one device
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


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay,
                             betas=(args.beta1, args.beta2))


@torch.no_grad()
def validate(fabric, model, val_batches: Optional[Batches], eval_iters: int) -> Optional[float]:
    if val_batches is None or eval_iters < 1:
        return None
    model.eval()
    losses = [loss_fn(model(x), y) for x, y in (fabric.to_device(val_batches(i)) for i in range(eval_iters))]
    model.train()
    return torch.stack(losses).mean().item()


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step:06d}.ckpt"


def last_checkpoint(out_dir: Path) -> Path:
    found = sorted(Path(out_dir).glob("step-*.ckpt"))
    if not found:
        raise UserError(f"--resume: no step-*.ckpt checkpoint in {out_dir}")
    return found[-1]


def trainable_filter(model: torch.nn.Module) -> Callable[[str, object], bool]:
    """A filter for Fabric's save that keeps only trainable weights (adapters, LoRA)."""
    # names as in the saved state dict: of the module inside Fabric's wrapper
    names = {n for n, p in getattr(model, "module", model).named_parameters() if p.requires_grad}
    return lambda key, _: key in names


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Optional[dict]) -> None:
    if state:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def save_training_state(fabric, out_dir: Path, state: dict, trainable_only: bool) -> Path:
    path = checkpoint_path(out_dir, state["step"])
    state["rng"] = rng_state()  # dropout draws continue exactly where they stopped
    filt = {"model": trainable_filter(state["model"])} if trainable_only else None
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, state, filter=filt)
    fabric.barrier()  # every rank's shard is written before the rename
    if fabric.global_rank == 0:
        tmp.rename(path)  # atomic: a half-written checkpoint never carries the final name
    fabric.barrier()
    fabric.print(f"saved {path}")
    return path


def fit(fabric, model, optimizer, train_batches: Batches, val_batches: Optional[Batches], args: TrainArgs,
        out_dir: Path, *, resume: bool = False, trainable_only: bool = False,
        sample: Optional[Callable[[], str]] = None) -> dict:
    """Train `model` (already set up with Fabric) for args.max_iters optimizer steps."""
    out_dir = Path(out_dir)
    accum = args.accumulation_steps(fabric.world_size)
    state = {"model": model, "optimizer": optimizer, "step": 0, "args": asdict(args)}
    if resume:
        path = last_checkpoint(out_dir)
        rest = fabric.load(path, state, strict=not trainable_only, weights_only=True)  # keys not in `state`
        set_rng_state(rest.get("rng"))
        fabric.print(f"resumed from {path} at step {state['step']}")
    model.train()
    t_start, tokens, start_step = time.perf_counter(), 0, state["step"]
    history = []
    while state["step"] < args.max_iters:
        step = state["step"]
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, args)
        loss_sum = 0.0
        for micro in range(accum):
            # micro-batches are indexed globally, so each rank and each resume sees its own share
            x, y = fabric.to_device(train_batches((step * accum + micro) * fabric.world_size + fabric.global_rank))
            with fabric.no_backward_sync(model, enabled=micro < accum - 1):
                loss = loss_fn(model(x), y)
                fabric.backward(loss / accum)
            loss_sum += loss.item() / accum
            tokens += x.numel() * fabric.world_size
        if args.grad_clip > 0:
            fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        history.append(loss_sum)
        if state["step"] % args.log_interval == 0 or state["step"] == args.max_iters:
            log_progress(fabric, state["step"], args, loss_sum, tokens, time.perf_counter() - t_start, start_step)
        if state["step"] % args.eval_interval == 0 or state["step"] == args.max_iters:
            val_loss = validate(fabric, model, val_batches, args.eval_iters)
            if val_loss is not None:
                fabric.print(f"step {state['step']}: val loss {val_loss:.4f}")
                fabric.log_dict({"val_loss": val_loss}, step=state["step"])
            if sample is not None:
                model.eval()
                fabric.print(f"sample: {sample()!r}")
                model.train()
        if state["step"] % args.save_interval == 0 or state["step"] == args.max_iters:
            save_training_state(fabric, out_dir, state, trainable_only)
    return {"losses": history, "step": state["step"]}


def log_progress(fabric, step: int, args: TrainArgs, loss: float, tokens: int, elapsed: float, start_step: int) -> None:
    done = step - start_step
    eta = elapsed / max(1, done) * (args.max_iters - step)
    fabric.print(f"step {step}/{args.max_iters} | loss {loss:.4f} | lr {lr_at(step - 1, args):.2e} | "
                 f"{tokens / max(elapsed, 1e-9):.0f} tokens/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
    fabric.log_dict({"loss": loss, "lr": lr_at(step - 1, args), "tokens_per_sec": tokens / max(elapsed, 1e-9)}, step=step)
    sys.stdout.flush()


def instruction_sampler(model, tokenizer, device, instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason.",
                        max_new_tokens: int = 40) -> Callable[[], str]:
    """A callback that answers one fixed instruction greedily, to watch finetuning progress."""
    from lit_llama.generation import generate
    from lit_llama.prompts import instruction_prompt

    def sample() -> str:
        prompt = tokenizer.encode(instruction_prompt(instruction)).to(device)
        ids = list(generate(model, prompt, max_new_tokens, stop_ids=tokenizer.stop_ids))
        model.clear_kv_cache()  # the cache is for generation only; training runs without it
        return tokenizer.decode(ids)

    return sample


def finetune(*, checkpoint_dir: Path, data_dir: Path, out_dir: Path, args: TrainArgs, wrap: Callable,
             save_final: Callable, precision: Optional[str] = None, devices: int = 1, resume: bool = False,
             seed: int = 1337, trainable_only: bool = True, strategy="auto") -> dict:
    """Finetune on prepared instruction data: load the base checkpoint (memory-mapped), `wrap` it
    (add LoRA/adapters and freeze, or nothing), train with `fit`, then `save_final(fabric, model, out_dir)`."""
    from lit_llama.checkpoint import load_config, load_model, validate_checkpoint_dir
    from lit_llama.data import InstructionBatches, load_instruction_data
    from lit_llama.tokenizer import Tokenizer
    from lit_llama.utils import make_fabric

    validate_checkpoint_dir(checkpoint_dir)
    train, val, meta = load_instruction_data(data_dir, checkpoint_dir)
    config = load_config(checkpoint_dir)
    if meta["max_seq_length"] > config.block_size:
        raise UserError(f"{data_dir} was prepared with max_seq_length {meta['max_seq_length']}, "
                        f"above the model's context {config.block_size}")
    fabric = make_fabric(precision, devices, strategy=strategy)
    args.accumulation_steps(fabric.world_size)  # fail before any work if the batch sizes don't divide
    fabric.launch()
    fabric.seed_everything(seed)
    model = wrap(load_model(checkpoint_dir, config))
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, args))
    tokenizer = Tokenizer(checkpoint_dir)
    pad = tokenizer.eos_id or 0
    train_batches = InstructionBatches(train, args.micro_batch_size, seed=seed, pad_id=pad)
    val_batches = InstructionBatches(val, args.micro_batch_size, seed=seed, pad_id=pad) if val else None
    sample = instruction_sampler(model, tokenizer, fabric.device) if fabric.world_size == 1 else None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    result = fit(fabric, model, optimizer, train_batches, val_batches, args, out_dir, resume=resume,
                 trainable_only=trainable_only, sample=sample)
    save_final(fabric, model, Path(out_dir))
    return result


def fsdp_strategy(devices: int, activation_checkpointing: bool = False):
    """FSDP through Fabric: each Block and then the whole model sharded with torch's `fully_shard`
    (FSDP2) under ModelParallelStrategy, which, unlike FSDPStrategy, also runs on CPU with gloo."""
    if devices <= 1:
        return "auto"
    from lightning.fabric.strategies import ModelParallelStrategy

    def parallelize(model, device_mesh):
        from torch.distributed.fsdp import fully_shard

        mesh = device_mesh["data_parallel"]
        for i, block in enumerate(model.transformer.h):
            if activation_checkpointing:
                # recompute each block's activations in backward; the wrapper's hooks keep state-dict keys
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

                block = model.transformer.h[i] = checkpoint_wrapper(block)
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    return ModelParallelStrategy(parallelize_fn=parallelize, data_parallel_size=devices, tensor_parallel_size=1)


def save_full_checkpoint(fabric, model, out_dir: Path, tokenizer_dir: Path) -> None:
    """Gather a (possibly sharded) model and write it as an ordinary checkpoint directory on rank 0."""
    from lit_llama.checkpoint import save_checkpoint

    inner = getattr(model, "module", model)
    if fabric.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state_dict = inner.state_dict()
    if fabric.global_rank == 0:
        save_checkpoint(out_dir, inner, tokenizer_dir, state_dict=state_dict)
        print(f"saved the finetuned model to {out_dir}")
    fabric.barrier()
