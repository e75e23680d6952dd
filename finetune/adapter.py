"""LLaMA-Adapter v1 finetuning on instruction data: a zero-gated learnable prompt in the upper
layers; the base stays frozen and only the prompts and gates (1.2M weights on 7B) train."""

from pathlib import Path
from typing import Optional

from lit_llama.peft.adapter import AdapterConfig, add_adapter, save_adapter
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.train.loop import TrainArgs
from lit_llama.train.setup import finetune
from lit_llama.utils import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/alpaca"),
    out_dir: Path = Path("out/adapter/alpaca"),
    precision: Optional[str] = None,
    devices: int = 1,
    train: TrainArgs = TrainArgs(max_iters=4000, global_batch_size=64, learning_rate=9e-3, weight_decay=0.02, warmup_iters=1600),
    resume: bool = False,
    seed: int = 1337,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
) -> None:
    """Finetune a LLaMA-Adapter on prepared instruction data (defaults: the paper's recipe, 5 epochs
    of Alpaca-52K at batch 64 with 2 warmup epochs).

    Args:
        checkpoint_dir: the base model's checkpoint directory.
        data_dir: data prepared by scripts/prepare_alpaca.py (or prepare_dolly.py) with this tokenizer.
        out_dir: where training checkpoints (step-*.ckpt) and the final lit_adapter.safetensors go.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        devices: number of devices (data parallel).
        resume: continue from the last step-*.ckpt in out_dir (adapter weights, optimizer and step).
        seed: random seed (data order, initialisation).
        adapter_prompt_length: learned prompt vectors per adapted layer.
        adapter_start_layer: the first adapted layer (7B: 2, so the last 30 of 32 layers).
    """
    config = AdapterConfig(prompt_length=adapter_prompt_length, start_layer=adapter_start_layer)
    finetune(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=train,
             wrap=lambda model: add_adapter(model, config),
             save_final=lambda module, out, _: save_adapter(module, out),
             precision=precision, devices=devices, resume=resume, seed=seed)


if __name__ == "__main__":
    run_cli(main)
