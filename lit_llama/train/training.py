"""The one training loop: gradient accumulation, AdamW, warmup + cosine LR, clipping, validation,
periodic checkpoints and exact resume. Finetuning and pretraining scripts only build the model and
the batches; everything that happens per step lives here."""

import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from lit_llama.data.instruction import IGNORE_INDEX
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


def load_training_state(fabric, out_dir: Path, state: dict, trainable_only: bool) -> None:
    """Restore `state` (model, optimizer, step) and the RNG from the last checkpoint in out_dir."""
    from torch.distributed.checkpoint.api import CheckpointException  # not an Exception subclass

    path = last_checkpoint(out_dir)
    try:
        rest = fabric.load(path, state, strict=not trainable_only, weights_only=True)  # keys not in `state`
    except (Exception, CheckpointException) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot resume from {path}: it is corrupted or was written for another model ({reason})")
    set_rng_state(rest.get("rng"))
    fabric.print(f"resumed from {path} at step {state['step']}")


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
        if args.grad_clip > 0:
            fabric.clip_gradients(model, optimizer, max_norm=args.grad_clip)
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


def format_duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    clock = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {clock}" if days else clock


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


def instruction_sampler(model, tokenizer, device, instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason.",
                        max_new_tokens: int = 40) -> Callable[[], str]:
    """A callback that answers one fixed instruction greedily, to watch finetuning progress."""
    from lit_llama.infer.generation import generate
    from lit_llama.templates import instruction_prompt

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
    from lit_llama.io.checkpoint import load_config, load_model, validate_checkpoint_dir
    from lit_llama.data.instruction import InstructionBatches, load_instruction_data
    from lit_llama.templates import save_template_name
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
    launch(fabric)
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
    if fabric.global_rank == 0:  # chat.py / serve.py use the format the model was finetuned on
        template = meta.get("template", "alpaca")
        save_template_name(out_dir, template)
        if (Path(out_dir) / "final").is_dir():  # full finetuning's checkpoint directory
            save_template_name(Path(out_dir) / "final", template)
    return result


def checkpoint_blocks(model) -> None:
    """Recompute each block's activations in backward instead of keeping them (less memory, about a
    third more compute); the wrapper's hooks keep the state-dict keys unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = checkpoint_wrapper(block)


def launch(fabric) -> None:
    """Start the processes Fabric needs, unless `fabric run` did: then Fabric set them up itself
    when it was created, and a second launch is an error."""
    if os.environ.get("LT_CLI_USED") != "1":
        fabric.launch()


def fsdp_strategy(devices: int, activation_checkpointing: bool = False, num_nodes: int = 1):
    """FSDP through Fabric: each Block and then the whole model sharded with torch's `fully_shard`
    (FSDP2) under ModelParallelStrategy, which, unlike FSDPStrategy, also runs on CPU with gloo.
    All devices of all nodes form one data-parallel group."""
    if devices * num_nodes <= 1:
        return "auto"
    from lightning.fabric.strategies import ModelParallelStrategy

    def parallelize(model, device_mesh):
        from torch.distributed.fsdp import fully_shard

        mesh = device_mesh["data_parallel"]
        if activation_checkpointing:
            checkpoint_blocks(model)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    return ModelParallelStrategy(parallelize_fn=parallelize, data_parallel_size=devices * num_nodes,
                                 tensor_parallel_size=1)


def save_full_checkpoint(fabric, model, out_dir: Path, tokenizer_dir: Path) -> None:
    """Gather a (possibly sharded) model and write it as an ordinary checkpoint directory on rank 0."""
    from lit_llama.io.checkpoint import save_checkpoint

    inner = getattr(model, "module", model)
    if fabric.world_size > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state_dict = inner.state_dict()
    if fabric.global_rank == 0:
        save_checkpoint(out_dir, inner, tokenizer_dir, state_dict=state_dict)
        print(f"saved the model to {out_dir}")
    fabric.barrier()


# ---------------------------------------------------------------- pretraining from scratch


def launcher_sizes(devices: int, num_nodes: int) -> Tuple[int, int]:
    """(devices per node, nodes): the flags, or, when torchrun or `fabric run` started this process,
    the launcher's counts (the flags may then be left out, or must agree)."""
    if not (torch.distributed.is_available() and torch.distributed.is_torchelastic_launched()):
        return devices, num_nodes
    local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    launched = (local, world // local)
    if (devices, num_nodes) not in ((1, 1), launched):
        raise UserError(f"--devices {devices} --num_nodes {num_nodes} disagree with the launcher's {local} "
                        f"process(es) per node on {world // local} node(s)")
    if os.environ.get("LT_STRATEGY"):
        raise UserError("leave --strategy out of `fabric run`: the script shards the model with FSDP itself")
    return launched


def check_training_state(path: Path) -> None:
    """A quick look at a training state before resuming: a file must be a whole torch.save archive
    (memory-mapped, nothing read in full); a sharded folder needs its index and metadata."""
    try:
        if path.is_dir():
            if not (path / ".metadata").is_file():
                raise FileNotFoundError("the shards' index .metadata is missing")
            torch.load(path / "meta.pt", weights_only=True)  # Fabric's file of step and RNG state
        else:
            torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot resume from {path}: it is truncated or corrupted ({reason})")


def pretrain_config(model_name: str, vocab_size: int, block_size: Optional[int]):
    """The named config for the tokenizer's vocabulary, trained at `block_size` (default: its own
    context), which must fit the config's context."""
    from lit_llama.model import Config, configs

    if model_name not in configs:
        raise UserError(f"unknown --model_name {model_name!r}; known: {', '.join(configs)}")
    context = Config.from_name(model_name).block_size
    if block_size is not None and not 1 <= block_size <= context:
        raise UserError(f"--block_size {block_size} does not fit model {model_name}, whose context is {context} tokens")
    return Config.from_name(model_name, vocab_size=vocab_size, block_size=block_size or context)


def pretrain_precision() -> str:
    """bf16 autocast over fp32 weights on GPUs that have it (weights and Adam's state stay exact
    over hundreds of thousands of small updates); else the inference default."""
    from lit_llama.utils import default_precision

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return default_precision()


def init_weights(module: torch.nn.Module) -> None:
    """The model's initialisation, module by module: N(0, 0.02) for linear and embedding weights
    (nanoGPT / LLaMA practice), ones for the RMSNorm scales."""
    from lit_llama.model import RMSNorm

    with torch.no_grad():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)


def build_model(fabric, config, activation_checkpointing: bool):
    """The model on its device. Sharded, it is built on the meta device (no memory) and Fabric
    materialises each shard after `fully_shard`, calling `reset_parameters`, here our init."""
    from functools import partial

    from lit_llama.model import LLaMA

    with fabric.init_module(empty_init=fabric.world_size > 1):
        model = LLaMA(config)
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters = partial(init_weights, m)
    if activation_checkpointing and fabric.world_size == 1:
        checkpoint_blocks(model)  # the FSDP strategy does this itself, before sharding
    return model


def make_loggers(out_dir: Path) -> list:
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    return [CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=10),
            TensorBoardLogger(out_dir, name="tensorboard")]


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` training states (step-*.ckpt) and model folders (step-*/)."""
    import shutil

    if keep_last < 1:
        return
    states = sorted(Path(out_dir).glob("step-*.ckpt"))
    models = sorted(p for p in Path(out_dir).glob("step-*") if p.is_dir() and not p.name.endswith(".ckpt"))
    for old in states[:-keep_last] + models[:-keep_last]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def remove_partial_saves(out_dir: Path) -> None:
    """Leftovers of a run killed while saving: a training state not yet renamed into place
    (step-*.ckpt.tmp) or a model folder still under its temporary name (.step-*.tmp-*)."""
    import shutil

    for p in list(Path(out_dir).glob("step-*.ckpt.tmp")) + list(Path(out_dir).glob(".step-*.tmp-*")) \
            + list(Path(out_dir).glob(".step-*.old-*")):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def text_sampler(model, tokenizer, device, prompt: str, max_new_tokens: int = 60) -> Callable[[], str]:
    """A callback that continues `prompt` (temperature 0.8, top-k 200) with a fixed seed, leaving
    the training's random state untouched."""
    from lit_llama.infer.generation import generate

    def sample() -> str:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(1234)
            ids = list(generate(model, tokenizer.encode(prompt).to(device), max_new_tokens, temperature=0.8,
                                top_k=200, stop_ids=tokenizer.stop_ids))
        model.clear_kv_cache()
        return prompt + tokenizer.decode(ids)

    return sample


def pretrain(*, train_data_dir: Path, val_data_dir: Optional[Path], out_dir: Path, model_name: str,
             tokenizer_dir: Path, args: TrainArgs, block_size: Optional[int] = None, devices: int = 1,
             num_nodes: int = 1, precision: Optional[str] = None, resume: bool = False, seed: int = 1337,
             activation_checkpointing: bool = False, num_workers: int = 2, keep_last: int = 2,
             sample_prompt: Optional[str] = None) -> dict:
    """Train a `model_name` config from scratch on packed shards: everything is checked before
    any process starts or any file is written; then `fit` with FSDP across devices and nodes, a
    checkpoint folder that generate.py loads next to each training state, CSV and TensorBoard logs."""
    from lit_llama.data.instruction import tokenizer_fingerprint
    from lit_llama.data.packed import LoaderBatches, PackedBatches, check_tokenizer_dir, open_dataset
    from lit_llama.tokenizer import Tokenizer
    from lit_llama.utils import make_fabric

    devices, num_nodes = launcher_sizes(devices, num_nodes)
    check_tokenizer_dir(tokenizer_dir)
    tokenizer = Tokenizer(tokenizer_dir)
    config = pretrain_config(model_name, tokenizer.vocab_size, block_size)
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    train = open_dataset(train_data_dir, config.block_size, fingerprint, tokenizer_dir, seed, shuffle=True)
    val = open_dataset(val_data_dir, config.block_size, fingerprint, tokenizer_dir, seed, shuffle=False) \
        if val_data_dir is not None else None
    args.accumulation_steps(devices * num_nodes)
    out_dir = Path(out_dir)
    if not resume and any(out_dir.glob("step-*.ckpt")):
        raise UserError(f"{out_dir} already holds training checkpoints: pass --resume true to continue them, "
                        f"or choose another --out_dir")
    if resume:
        check_training_state(last_checkpoint(out_dir))  # before any process starts or file is written

    fabric = make_fabric(precision or os.environ.get("LT_PRECISION") or pretrain_precision(), devices,
                         num_nodes=num_nodes, strategy=fsdp_strategy(devices, activation_checkpointing, num_nodes),
                         loggers=make_loggers(out_dir))
    launch(fabric)
    # different streams per rank while the shards are initialised, then one seed for all
    fabric.seed_everything(seed + fabric.global_rank, verbose=False)
    with warnings.catch_warnings():
        # on CPU, DTensor draws each shard from its rank's generator: seeded per rank above
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        model = fabric.setup_module(build_model(fabric, config, activation_checkpointing))
    fabric.seed_everything(seed)
    optimizer = fabric.setup_optimizers(make_optimizer(model, args))
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            remove_partial_saves(out_dir)
        for logger in fabric.loggers:
            try:
                logger.log_hyperparams({**asdict(args), "model": config.asdict(), "devices": devices,
                                        "nodes": num_nodes})
            except NotImplementedError:  # the CSV logger keeps metrics only
                pass
    fabric.barrier()
    # (a sharded parameter counts its whole size)
    fabric.print(f"training {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                 f"parameters) on {len(train) * (config.block_size + 1) / 1e6:.2f}M tokens an epoch, "
                 f"{fabric.world_size} process(es)")

    def on_save(step: int) -> None:
        save_full_checkpoint(fabric, model, out_dir / f"step-{step:06d}", tokenizer_dir)
        if fabric.global_rank == 0:
            prune_checkpoints(out_dir, keep_last)
        fabric.barrier()

    train_batches = LoaderBatches(PackedBatches(train, args.micro_batch_size), fabric.global_rank,
                                  fabric.world_size, num_workers, pin_memory=fabric.device.type == "cuda")
    val_batches = PackedBatches(val, args.micro_batch_size) if val is not None else None
    sample = text_sampler(model, tokenizer, fabric.device, sample_prompt) \
        if sample_prompt is not None and fabric.world_size == 1 else None
    try:
        return fit(fabric, model, optimizer, train_batches, val_batches, args, out_dir, resume=resume,
                   sample=sample, flops_per_token=flops_per_token(config, config.block_size), on_save=on_save)
    finally:
        train_batches.close()
        for logger in fabric.loggers:
            logger.finalize("success")
