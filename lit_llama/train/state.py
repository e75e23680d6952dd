"""Training state on disk: the step-*.ckpt files `fit` writes (weights, optimizer, step, RNG) and
reads back for an exact resume, the checks made before a run starts, and pruning of old saves."""

import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException  # not an Exception subclass

from lit_llama.utils import UserError


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
    path = last_checkpoint(out_dir)
    try:
        rest = fabric.load(path, state, strict=not trainable_only, weights_only=True)  # keys not in `state`
    except (Exception, CheckpointException) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot resume from {path}: it is corrupted or was written for another model ({reason})")
    set_rng_state(rest.get("rng"))
    fabric.print(f"resumed from {path} at step {state['step']}")


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



def check_resume(out_dir: Path, resume: bool, refuse_existing: bool = False) -> None:
    """Before any process starts or any file is written: with `resume`, the last training state in
    out_dir must exist and be whole; without, `refuse_existing` forbids starting over one."""
    if resume:
        check_training_state(last_checkpoint(out_dir))
    elif refuse_existing and any(Path(out_dir).glob("step-*.ckpt")):
        raise UserError(f"{out_dir} already holds training checkpoints: pass --resume true to continue them, "
                        f"or choose another --out_dir")


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` training states (step-*.ckpt) and model folders (step-*/)."""
    if keep_last < 1:
        return
    states = sorted(Path(out_dir).glob("step-*.ckpt"))
    models = sorted(p for p in Path(out_dir).glob("step-*") if p.is_dir() and not p.name.endswith(".ckpt"))
    for old in states[:-keep_last] + models[:-keep_last]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def remove_partial_saves(out_dir: Path) -> None:
    """Leftovers of a run killed while saving: a training state not yet renamed into place
    (step-*.ckpt.tmp) or a model folder still under its temporary name (.step-*.tmp-*)."""
    for p in list(Path(out_dir).glob("step-*.ckpt.tmp")) + list(Path(out_dir).glob(".step-*.tmp-*")) \
            + list(Path(out_dir).glob(".step-*.old-*")):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
