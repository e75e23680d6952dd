"""LoRA finetuning on instruction data (and QLoRA with --quantize nf4): low-rank updates of the
chosen projections train; the base stays frozen (and, for QLoRA, 4-bit)."""

from pathlib import Path
from typing import Literal, Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.peft.lora import add_lora, save_lora
from lit_llama.quant.bnb import quantize_linears
from lit_llama.train.flags import LoRAArgs
from lit_llama.train.loop import TrainArgs
from lit_llama.train.setup import finetune
from lit_llama.utils import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/lora/alpaca"),
    precision: Optional[str] = None,
    devices: int = 1,
    train: TrainArgs = TrainArgs(max_iters=1200),
    resume: bool = False,
    seed: int = 1337,
    lora: LoRAArgs = LoRAArgs(),
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
        resume: continue from the last step-*.ckpt in out_dir (LoRA weights, optimizer and step).
        seed: random seed (data order, initialisation).
        quantize: QLoRA: hold the frozen base linear layers in bitsandbytes 4-bit (nf4 or fp4).
    """
    config = lora.config()

    def wrap(model):
        if quantize is not None:
            model = quantize_linears(model, quantize)
        return add_lora(model, config)

    finetune(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=train, wrap=wrap,
             save_final=lambda module, out, _: save_lora(module, out),
             precision=precision, devices=devices, resume=resume, seed=seed)


if __name__ == "__main__":
    run_cli(main)
