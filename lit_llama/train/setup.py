"""How a training run is set up around `fit`, once for every kind of training: `run` (resume check,
Fabric, launch, seeds, model, optimizer, fit, the final save on rank 0), and what instruction
finetuning (`finetune`) and pretraining, from scratch or continued from a checkpoint (`pretrain`),
give it; the devices' side: FSDP sharding, activation checkpointing, launching, gathering a
sharded model to save it."""

import os
import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from lightning.fabric.loggers import CSVLogger, TensorBoardLogger
from lightning.fabric.plugins.precision import HalfPrecision
from lightning.fabric.strategies import ModelParallelStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from lit_llama.data.instruction import InstructionBatches, load_instruction_data, tokenizer_fingerprint
from lit_llama.data.packed import LoaderBatches, PackedBatches, check_tokenizer_dir, open_dataset
from lit_llama.infer.generation import generate
from lit_llama.io.checkpoint import (load_config, load_model, read_checkpoint_config, save_checkpoint,
                                     validate_checkpoint_dir)
from lit_llama.model import LLaMA, Config, RMSNorm, configs
from lit_llama.templates import instruction_prompt, save_template_name
from lit_llama.tokenizer import Tokenizer
from lit_llama.train.loop import Batches, TrainArgs, fit, flops_per_token, make_optimizer
from lit_llama.train.state import check_resume, prune_checkpoints, remove_partial_saves
from lit_llama.utils import UserError, default_precision, make_fabric

# what a run's final save is handed: the trained module (outside Fabric's wrapper), the output
# folder, and the whole model's weights gathered from every rank when every weight trains (else None)
SaveFinal = Callable[[torch.nn.Module, Path, Optional[Dict[str, torch.Tensor]]], None]


class RunData(NamedTuple):
    """What a run trains on, made once the model is set up (a sampler needs the model)."""

    train: Batches
    val: Optional[Batches] = None
    sample: Optional[Callable[[], str]] = None  # text printed at each validation, to watch progress


def run(*, out_dir: Path, args: TrainArgs, build: Callable, data: Callable, save_final: Optional[SaveFinal] = None,
        precision: Optional[str] = None, devices: int = 1, num_nodes: int = 1, strategy="auto", loggers=None,
        resume: bool = False, refuse_existing: bool = False, seed: int = 1337, trainable_only: bool = True,
        compute_loss: Optional[Callable] = None, flops_per_token: Optional[float] = None,
        on_save: Optional[Callable] = None, hparams: Optional[dict] = None) -> dict:
    """The one setup of a training run, for instruction finetuning, preference training and pretraining.

    The resume check comes before any work; then Fabric, the launch, `build(fabric)` (the model with
    its trainable weights marked, before Fabric wraps it), AdamW over those weights, `data(fabric,
    model)` (a RunData), `fit`, and `save_final(module, out_dir, state_dict)` on rank 0 only (the
    others wait). `trainable_only`: checkpoints hold only the trainable weights (adapters, LoRA);
    `on_save(fabric, model, step)` runs after each training checkpoint."""
    out_dir = Path(out_dir)
    check_resume(out_dir, resume, refuse_existing)
    fabric = make_fabric(precision, devices, num_nodes=num_nodes, strategy=strategy, loggers=loggers)
    args.accumulation_steps(fabric.world_size)  # fail before any work if the batch sizes don't divide
    launch(fabric)
    # a stream per rank while the weights are initialised (a sharded model draws each shard on its
    # own rank; a replicated one is broadcast from rank 0 by DDP), then one seed for all
    fabric.seed_everything(seed + fabric.global_rank, verbose=False)
    with warnings.catch_warnings():
        # on CPU, DTensor draws each shard from its rank's generator: seeded per rank above
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        model = fabric.setup_module(build(fabric))
    fabric.seed_everything(seed, verbose=False)
    optimizer = fabric.setup_optimizers(make_optimizer(model, args))
    batches = data(fabric, model)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            remove_partial_saves(out_dir)
        log_hyperparams(fabric, {**asdict(args), **(hparams or {})})
    fabric.barrier()
    try:
        result = fit(fabric, model, optimizer, batches.train, batches.val, args, out_dir, resume=resume,
                     trainable_only=trainable_only, sample=batches.sample, flops_per_token=flops_per_token,
                     on_save=partial(on_save, fabric, model) if on_save else None, compute_loss=compute_loss)
    finally:
        if hasattr(batches.train, "close"):  # a loader's worker processes
            batches.train.close()
        for logger in fabric.loggers:
            logger.finalize("success")
    if save_final is not None:
        save_model(fabric, model, out_dir, save_final, gather=not trainable_only)
    return result


def log_hyperparams(fabric, hparams: dict) -> None:
    for logger in fabric.loggers:
        try:
            logger.log_hyperparams(hparams)
        except NotImplementedError:  # the CSV logger keeps metrics only
            pass


def save_model(fabric, model, out_dir: Path, save: SaveFinal, gather: bool) -> None:
    """`save(module, out_dir, state_dict)` on rank 0, every rank taking part in the gathering first:
    with `gather`, state_dict is the whole model's weights (from every rank's shards); else None
    (an adapter's weights are whole on every rank, its save reads them from the module)."""
    inner = getattr(model, "module", model)
    state_dict = full_state_dict(fabric, inner) if gather else None
    if fabric.global_rank == 0:
        save(inner, Path(out_dir), state_dict)
    fabric.barrier()


def full_state_dict(fabric, module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    if fabric.world_size > 1:
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return module.state_dict()


def checkpoint_folder_saver(tokenizer_dir: Path, subdir: Optional[str] = None) -> SaveFinal:
    """A SaveFinal that writes an ordinary checkpoint directory (out_dir, or out_dir/subdir)."""

    def save(module, out_dir: Path, state_dict) -> None:
        folder = out_dir / subdir if subdir else out_dir
        save_checkpoint(folder, module, tokenizer_dir, state_dict=state_dict)
        print(f"saved the model to {folder}")

    return save


def checkpoint_blocks(model) -> None:
    """Recompute each block's activations in backward instead of keeping them (less memory, about a
    third more compute); the wrapper's hooks keep the state-dict keys unchanged."""
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

    def parallelize(model, device_mesh):
        mesh = device_mesh["data_parallel"]
        if activation_checkpointing:
            checkpoint_blocks(model)
        # continued pretraining (load_initial_model): a checkpoint's weights (bf16, say) train in
        # float32, cast block by block just before sharding, so that one block at a time is ever
        # whole in float32; every other model keeps the dtype Fabric's precision gave it
        cast = (lambda m: m.float()) if getattr(model, "cast_to_float_when_sharded", False) else (lambda m: m)
        for block in model.transformer.h:
            fully_shard(cast(block), mesh=mesh)
        for m in (model.transformer.wte, model.transformer.ln_f, model.lm_head):
            if m is not None:
                cast(m)
        fully_shard(model, mesh=mesh)
        return model

    return ModelParallelStrategy(parallelize_fn=parallelize, data_parallel_size=devices * num_nodes,
                                 tensor_parallel_size=1)


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


# ---------------------------------------------------------------- instruction finetuning


def instruction_sampler(model, tokenizer, device, instruction: str = "Recommend a movie for me to watch during the weekend and explain the reason.",
                        max_new_tokens: int = 40) -> Callable[[], str]:
    """A callback that answers one fixed instruction greedily, to watch finetuning progress."""

    def sample() -> str:
        prompt = tokenizer.encode(instruction_prompt(instruction)).to(device)
        ids = list(generate(model, prompt, max_new_tokens, stop_ids=tokenizer.stop_ids))
        model.clear_kv_cache()  # the cache is for generation only; training runs without it
        return tokenizer.decode(ids)

    return sample


def finetune(*, checkpoint_dir: Path, data_dir: Path, out_dir: Path, args: TrainArgs, wrap: Callable,
             save_final: SaveFinal, precision: Optional[str] = None, devices: int = 1, resume: bool = False,
             seed: int = 1337, trainable_only: bool = True, strategy="auto") -> dict:
    """Finetune on prepared instruction data: load the base checkpoint (memory-mapped), `wrap` it
    (add LoRA/adapters and freeze, or nothing), train with `run`, then `save_final` and the
    template's name (chat.py and serve.py use the format the model was finetuned on)."""
    validate_checkpoint_dir(checkpoint_dir)
    train, val, meta = load_instruction_data(data_dir, checkpoint_dir)
    config = load_config(checkpoint_dir)
    if meta["max_seq_length"] > config.block_size:
        raise UserError(f"{data_dir} was prepared with max_seq_length {meta['max_seq_length']}, "
                        f"above the model's context {config.block_size}")
    tokenizer = Tokenizer(checkpoint_dir)
    pad = tokenizer.eos_id or 0

    def data(fabric, model) -> RunData:
        sample = instruction_sampler(model, tokenizer, fabric.device) if fabric.world_size == 1 else None
        return RunData(InstructionBatches(train, args.micro_batch_size, seed=seed, pad_id=pad),
                       InstructionBatches(val, args.micro_batch_size, seed=seed, pad_id=pad) if val else None,
                       sample)

    def save(module, out: Path, state_dict) -> None:
        save_final(module, out, state_dict)
        template = meta.get("template", "alpaca")
        save_template_name(out, template)
        if (out / "final").is_dir():  # full finetuning's checkpoint directory
            save_template_name(out / "final", template)

    return run(out_dir=out_dir, args=args, build=lambda fabric: wrap(load_model(checkpoint_dir, config)),
               data=data, save_final=save, precision=precision, devices=devices, strategy=strategy,
               resume=resume, seed=seed, trainable_only=trainable_only)


# ---------------------------------------------------------------- pretraining, from scratch or continued


def pretrain_config(model_name: str, vocab_size: int, block_size: Optional[int]) -> Config:
    """The named config for the tokenizer's vocabulary, trained at `block_size` (default: its own
    context), which must fit the config's context."""
    if model_name not in configs:
        raise UserError(f"unknown --model_name {model_name!r}; known: {', '.join(configs)}")
    context = Config.from_name(model_name).block_size
    if block_size is not None and not 1 <= block_size <= context:
        raise UserError(f"--block_size {block_size} does not fit model {model_name}, whose context is {context} tokens")
    return Config.from_name(model_name, vocab_size=vocab_size, block_size=block_size or context)


def pretrain_precision() -> str:
    """bf16 autocast over fp32 weights on GPUs that have it (weights and Adam's state stay exact
    over hundreds of thousands of small updates); else the inference default."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return default_precision()


def init_weights(module: torch.nn.Module) -> None:
    """The model's initialisation, module by module: N(0, 0.02) for linear and embedding weights
    (nanoGPT / LLaMA practice), zeros for linear biases, ones for the RMSNorm scales."""
    with torch.no_grad():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)


def build_model(fabric, config: Config, activation_checkpointing: bool) -> LLaMA:
    """The model on its device. Sharded, it is built on the meta device (no memory) and Fabric
    materialises each shard after `fully_shard`, calling `reset_parameters`, here our init."""
    with fabric.init_module(empty_init=fabric.world_size > 1):
        model = LLaMA(config)
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters = partial(init_weights, m)
    if activation_checkpointing and fabric.world_size == 1:
        checkpoint_blocks(model)  # the FSDP strategy does this itself, before sharding
    return model


def make_loggers(out_dir: Path) -> list:
    return [CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=10),
            TensorBoardLogger(out_dir, name="tensorboard")]


def text_sampler(model, tokenizer, device, prompt: str, max_new_tokens: int = 60) -> Callable[[], str]:
    """A callback that continues `prompt` (temperature 0.8, top-k 200) with a fixed seed, leaving
    the training's random state untouched."""

    def sample() -> str:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(1234)
            ids = list(generate(model, tokenizer.encode(prompt).to(device), max_new_tokens, temperature=0.8,
                                top_k=200, stop_ids=tokenizer.stop_ids))
        model.clear_kv_cache()
        return prompt + tokenizer.decode(ids)

    return sample


def continued_config(checkpoint_dir: Path, tokenizer_dir: Optional[Path], block_size: Optional[int]) -> Config:
    """The config of a checkpoint that pretraining continues from (its context kept, for the saved
    checkpoints), after checking the directory, its weights' kind, its tokenizer and `block_size`."""
    validate_checkpoint_dir(checkpoint_dir)
    config, quantization = read_checkpoint_config(checkpoint_dir)
    if quantization is not None:
        raise UserError(f"--initial_checkpoint_dir {checkpoint_dir} holds quantized weights; continue pretraining "
                        f"from a float checkpoint")
    if tokenizer_dir is not None and tokenizer_fingerprint(tokenizer_dir) != tokenizer_fingerprint(checkpoint_dir):
        raise UserError(f"--tokenizer_dir {tokenizer_dir} holds another tokenizer than --initial_checkpoint_dir "
                        f"{checkpoint_dir}; leave it out: the checkpoint's own tokenizer is used")
    if Tokenizer(checkpoint_dir).vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer of {checkpoint_dir} has more tokens than the model's {config.vocab_size} "
                        f"embedding rows (scripts/extend_tokenizer.py grows both together)")
    if block_size is not None and not 1 <= block_size <= config.block_size:
        raise UserError(f"--block_size {block_size} does not fit {checkpoint_dir}, whose context is "
                        f"{config.block_size} tokens")
    return config


def load_initial_model(fabric, checkpoint_dir: Path, config: Config, activation_checkpointing: bool) -> LLaMA:
    """The checkpoint's weights (memory-mapped, copy-on-write: the file is never written), in float32
    (Adam's small updates need it) unless the precision is a half `-true` one, which Fabric casts to;
    sharded, the FSDP strategy casts each block just before sharding it. Nothing is drawn at random."""
    model = load_model(checkpoint_dir, config)
    half = isinstance(fabric._precision, HalfPrecision)  # bf16-true, 16-true: Fabric casts the model itself
    if fabric.world_size > 1:
        model.cast_to_float_when_sharded = not half
        return model
    if not half:
        model.float()
    if activation_checkpointing:
        checkpoint_blocks(model)
    return model


def pretrain(*, train_data_dir: Path, val_data_dir: Optional[Path], out_dir: Path, model_name: Optional[str],
             tokenizer_dir: Optional[Path], args: TrainArgs, block_size: Optional[int] = None, devices: int = 1,
             num_nodes: int = 1, precision: Optional[str] = None, resume: bool = False, seed: int = 1337,
             activation_checkpointing: bool = False, num_workers: int = 2, keep_last: int = 2,
             sample_prompt: Optional[str] = None, initial_checkpoint_dir: Optional[Path] = None) -> dict:
    """Train a `model_name` config from scratch on packed shards, or continue pretraining the model
    of `initial_checkpoint_dir` (its config, weights and tokenizer; a new optimizer and warmup):
    everything is checked before any process starts or any file is written; then `run` with FSDP
    across devices and nodes, a checkpoint folder that generate.py loads next to each training
    state, CSV and TensorBoard logs."""
    devices, num_nodes = launcher_sizes(devices, num_nodes)
    if initial_checkpoint_dir is not None:
        if model_name is not None:
            raise UserError("--model_name and --initial_checkpoint_dir exclude each other: the checkpoint's "
                            "config is continued")
        config = continued_config(initial_checkpoint_dir, tokenizer_dir, block_size)
        tokenizer_dir = initial_checkpoint_dir
        model_name = config.name or str(initial_checkpoint_dir)
    else:
        if model_name is None or tokenizer_dir is None:
            raise UserError("pass --model_name and --tokenizer_dir (from scratch) or --initial_checkpoint_dir")
        check_tokenizer_dir(tokenizer_dir)
        config = pretrain_config(model_name, Tokenizer(tokenizer_dir).vocab_size, block_size)
    tokenizer = Tokenizer(tokenizer_dir)
    seq_len = block_size or config.block_size  # the training context; a continued model keeps its own
    fingerprint = tokenizer_fingerprint(tokenizer_dir)
    train = open_dataset(train_data_dir, seq_len, fingerprint, tokenizer_dir, seed, shuffle=True)
    val = open_dataset(val_data_dir, seq_len, fingerprint, tokenizer_dir, seed, shuffle=False) \
        if val_data_dir is not None else None
    args.accumulation_steps(devices * num_nodes)
    out_dir = Path(out_dir)
    save_folder = checkpoint_folder_saver(tokenizer_dir)
    if initial_checkpoint_dir is not None:
        build = lambda fabric: load_initial_model(fabric, initial_checkpoint_dir, config, activation_checkpointing)
    else:
        build = lambda fabric: build_model(fabric, config, activation_checkpointing)

    def data(fabric, model) -> RunData:
        # (a sharded parameter counts its whole size)
        fabric.print(f"training {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                     f"parameters) on {len(train) * (seq_len + 1) / 1e6:.2f}M tokens an epoch, "
                     f"{fabric.world_size} process(es)")
        sample = text_sampler(model, tokenizer, fabric.device, sample_prompt) \
            if sample_prompt is not None and fabric.world_size == 1 else None
        return RunData(LoaderBatches(PackedBatches(train, args.micro_batch_size), fabric.global_rank,
                                     fabric.world_size, num_workers, pin_memory=fabric.device.type == "cuda"),
                       PackedBatches(val, args.micro_batch_size) if val is not None else None, sample)

    def on_save(fabric, model, step: int) -> None:
        save_model(fabric, model, out_dir / f"step-{step:06d}", save_folder, gather=True)
        if fabric.global_rank == 0:
            prune_checkpoints(out_dir, keep_last)
        fabric.barrier()

    return run(out_dir=out_dir, args=args, build=build, data=data, precision=precision or os.environ.get("LT_PRECISION") or pretrain_precision(),
               devices=devices, num_nodes=num_nodes, strategy=fsdp_strategy(devices, activation_checkpointing, num_nodes),
               loggers=make_loggers(out_dir), resume=resume, refuse_existing=True, seed=seed, trainable_only=False,
               flops_per_token=flops_per_token(config, seq_len), on_save=on_save,
               hparams={"model": config.asdict(), "devices": devices, "nodes": num_nodes, "block_size": seq_len,
                        "initial_checkpoint_dir": str(initial_checkpoint_dir or "")})
