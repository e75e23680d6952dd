"""LoRA finetuning on instruction data (and QLoRA with --quantize nf4): low-rank updates of the
chosen projections train; the base stays frozen (and, for QLoRA, 4-bit)."""

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.peft.lora import LoRAConfig, add_lora, save_lora
from lit_llama.quant.quantization import quantize_linears
from lit_llama.train.training import TrainArgs, finetune
from lit_llama.utils import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/lora/alpaca"),
    precision: Optional[str] = None,
    devices: int = 1,
    max_iters: int = 1200,
    micro_batch_size: int = 4,
    global_batch_size: int = 128,
    learning_rate: float = 3e-4,
    weight_decay: float = 0.0,
    warmup_iters: int = 100,
    eval_interval: int = 100,
    eval_iters: int = 20,
    save_interval: int = 500,
    resume: bool = False,
    seed: int = 1337,
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_query: bool = True,
    lora_key: bool = False,
    lora_value: bool = True,
    lora_projection: bool = False,
    lora_mlp: bool = False,
    quantize: Optional[Literal["nf4", "fp4"]] = None,
) -> None:
    """Finetune LoRA weights on prepared instruction data (defaults: Alpaca-LoRA's recipe, 3 epochs
    of Alpaca at batch 128).

    Args:
        checkpoint_dir: the base model's checkpoint directory.
        data_dir: data prepared by scripts/prepare_alpaca.py (or prepare_dolly.py) with this tokenizer.
        out_dir: where training checkpoints (step-*.ckpt) and the final lit_lora.safetensors go.
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
        save_interval: steps between training checkpoints (LoRA weights and optimizer only).
        resume: continue from the last step-*.ckpt in out_dir (LoRA weights, optimizer and step).
        seed: random seed (data order, initialisation).
        lora_r: rank of the low-rank update.
        lora_alpha: the update is scaled by alpha / r.
        lora_dropout: dropout on the LoRA branch's input.
        lora_query: adapt the query projection.
        lora_key: adapt the key projection.
        lora_value: adapt the value projection.
        lora_projection: adapt the attention output projection.
        lora_mlp: adapt the three MLP matrices.
        quantize: QLoRA: hold the frozen base linear layers in bitsandbytes 4-bit (nf4 or fp4).
    """
    args = TrainArgs(learning_rate=learning_rate, weight_decay=weight_decay, warmup_iters=warmup_iters,
                     max_iters=max_iters, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                     eval_interval=eval_interval, eval_iters=eval_iters, save_interval=save_interval)
    config = LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, query=lora_query, key=lora_key,
                        value=lora_value, projection=lora_projection, mlp=lora_mlp)

    def wrap(model):
        if quantize is not None:
            model = quantize_linears(model, quantize)
        return add_lora(model, config)

    finetune(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=args, wrap=wrap,
             save_final=lambda fabric, model, out: fabric.global_rank == 0 and save_lora(model.module, out),
             precision=precision, devices=devices, resume=resume, seed=seed)


if __name__ == "__main__":
    run_cli(main)
