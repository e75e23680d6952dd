"""LLaMA-Adapter v2 finetuning on instruction data: v1 plus a bias and scale on every linear layer
and trainable RMSNorm weights; the rest of the base stays frozen."""

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.peft.adapter import AdapterConfig
from lit_llama.peft.adapter_v2 import add_adapter_v2, save_adapter_v2
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.train.training import TrainArgs, finetune
from lit_llama.utils import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/adapter_v2/alpaca"),
    precision: Optional[str] = None,
    devices: int = 1,
    max_iters: int = 4000,
    micro_batch_size: int = 4,
    global_batch_size: int = 64,
    learning_rate: float = 9e-3,
    weight_decay: float = 0.02,
    warmup_iters: int = 1600,
    eval_interval: int = 100,
    eval_iters: int = 20,
    save_interval: int = 500,
    resume: bool = False,
    seed: int = 1337,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
) -> None:
    """Finetune a LLaMA-Adapter v2 on prepared instruction data (defaults: the v1 recipe, 5 epochs
    of Alpaca-52K at batch 64 with 2 warmup epochs).

    Args:
        checkpoint_dir: the base model's checkpoint directory.
        data_dir: data prepared by scripts/prepare_alpaca.py (or prepare_dolly.py) with this tokenizer.
        out_dir: where training checkpoints (step-*.ckpt) and the final lit_adapter_v2.safetensors go.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        devices: number of devices (data parallel).
        max_iters: optimizer steps.
        micro_batch_size: examples per forward pass per device.
        global_batch_size: examples per optimizer step over all devices (gradient accumulation).
        learning_rate: peak learning rate of the warmup + cosine schedule.
        weight_decay: AdamW weight decay.
        warmup_iters: steps of linear warmup.
        eval_interval: steps between validation losses and sample generations.
        eval_iters: validation batches per evaluation.
        save_interval: steps between training checkpoints (adapter weights and optimizer only).
        resume: continue from the last step-*.ckpt in out_dir (adapter weights, optimizer and step).
        seed: random seed (data order, initialisation).
        adapter_prompt_length: learned prompt vectors per adapted layer.
        adapter_start_layer: the first adapted layer (7B: 2, so the last 30 of 32 layers).
    """
    args = TrainArgs(learning_rate=learning_rate, weight_decay=weight_decay, warmup_iters=warmup_iters,
                     max_iters=max_iters, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                     eval_interval=eval_interval, eval_iters=eval_iters, save_interval=save_interval)
    config = AdapterConfig(prompt_length=adapter_prompt_length, start_layer=adapter_start_layer)
    finetune(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=args,
             wrap=lambda model: add_adapter_v2(model, config),
             save_final=lambda fabric, model, out: fabric.global_rank == 0 and save_adapter_v2(model.module, out),
             precision=precision, devices=devices, resume=resume, seed=seed)


if __name__ == "__main__":
    run_cli(main)
