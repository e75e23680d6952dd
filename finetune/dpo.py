"""Direct Preference Optimization (Rafailov et al. 2023) with LoRA: the policy is the base model
plus LoRA, the reference the same model with LoRA bypassed (no second copy of the weights)."""

from pathlib import Path
from typing import Literal, Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.align.dpo import make_dpo_loss
from lit_llama.peft.lora import add_lora, save_lora
from lit_llama.align.preference import maybe_quantize, train_on_pairs
from lit_llama.train.flags import LoRAArgs
from lit_llama.train.loop import TrainArgs
from lit_llama.utils import UserError, run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/prefs"),
    out_dir: Path = Path("out/dpo"),
    beta: float = 0.1,
    precision: Optional[str] = None,
    devices: int = 1,
    train: TrainArgs = TrainArgs(micro_batch_size=2, global_batch_size=32, learning_rate=5e-5),
    resume: bool = False,
    seed: int = 1337,
    lora: LoRAArgs = LoRAArgs(),
    quantize: Optional[Literal["nf4", "fp4"]] = None,
) -> None:
    """Train LoRA weights with DPO on prepared preference pairs. Validation loss, reward margin
    (beta times the chosen-minus-rejected log-ratio, averaged) and accuracy (the fraction of pairs
    with a positive margin) are printed every --eval_interval steps and at the end; the LoRA weights
    go to out_dir/lit_lora.safetensors, which generate/lora.py and scripts/merge_lora.py read.

    Args:
        checkpoint_dir: the base model (usually the supervised-finetuned one); also the reference.
        data_dir: pairs prepared by scripts/prepare_preferences.py with this tokenizer.
        out_dir: where training checkpoints (step-*.ckpt) and the final lit_lora.safetensors go.
        beta: DPO's temperature: how far the policy may move from the reference (0.1 in the paper).
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        devices: number of devices (data parallel).
        resume: continue from the last step-*.ckpt in out_dir (weights, optimizer, step, data order).
        seed: random seed (data order, LoRA initialisation).
        quantize: QLoRA: hold the frozen base linear layers in bitsandbytes 4-bit (nf4 or fp4).
    """
    if beta <= 0:
        raise UserError(f"--beta must be positive, got {beta}")

    lora_config = lora.config()

    def save_final(module, out, _):
        print(f"saved the LoRA weights to {save_lora(module, out)}")

    result = train_on_pairs(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=train,
                            build=lambda base: add_lora(maybe_quantize(base, quantize), lora_config),
                            compute_loss=make_dpo_loss(beta), save_final=save_final, precision=precision,
                            devices=devices, resume=resume, seed=seed)
    if result.get("val"):
        v = result["val"]
        print(f"final validation: loss {v['loss']:.4f}, margin {v['margin']:.4f}, accuracy {v['accuracy']:.4f}")


if __name__ == "__main__":
    run_cli(main)
