"""Train a reward model (StackLLaMA's step 2) on preference pairs: LoRA on the base model plus a
scalar head, trained on the pairwise loss -log sigmoid(r_chosen - r_rejected)."""

from pathlib import Path
from typing import Literal, Optional

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR
from lit_llama.align.preference import maybe_quantize, train_on_pairs
from lit_llama.align.reward import REWARD_FILE, build_reward_model, reward_loss, save_reward_model
from lit_llama.train.flags import LoRAArgs
from lit_llama.train.loop import TrainArgs
from lit_llama.utils import run_cli


def main(
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    data_dir: Path = Path("data/prefs"),
    out_dir: Path = Path("out/reward"),
    precision: Optional[str] = None,
    devices: int = 1,
    train: TrainArgs = TrainArgs(global_batch_size=32, learning_rate=2e-5, warmup_iters=50),
    resume: bool = False,
    seed: int = 1337,
    lora: LoRAArgs = LoRAArgs(lora_alpha=32, lora_dropout=0.1),
    quantize: Optional[Literal["nf4", "fp4"]] = None,
) -> None:
    """Train a reward model on prepared preference pairs (defaults: StackLLaMA's LoRA r=8, alpha=32,
    dropout 0.1 on q and v, learning rate 2e-5). Validation loss, accuracy (the fraction of pairs
    with r_chosen > r_rejected) and mean margin are printed every --eval_interval steps and at the
    end; the LoRA and head weights go to out_dir/lit_reward.safetensors.

    Args:
        checkpoint_dir: the base model's checkpoint directory (usually the supervised-finetuned model).
        data_dir: pairs prepared by scripts/prepare_preferences.py with this tokenizer.
        out_dir: where training checkpoints (step-*.ckpt) and the final lit_reward.safetensors go.
        precision: a Fabric precision (default bf16-true on GPUs that support it, 32-true on CPU).
        devices: number of devices (data parallel).
        resume: continue from the last step-*.ckpt in out_dir (weights, optimizer, step, data order).
        seed: random seed (data order, head and LoRA initialisation).
        quantize: QLoRA: hold the frozen base linear layers in bitsandbytes 4-bit (nf4 or fp4).
    """

    lora_config = lora.config()

    def save_final(module, out, _):
        path = save_reward_model(module, out / REWARD_FILE, base_dir=checkpoint_dir)
        print(f"saved the reward model to {path}")

    result = train_on_pairs(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, args=train,
                            build=lambda base: build_reward_model(maybe_quantize(base, quantize), lora_config),
                            compute_loss=reward_loss, save_final=save_final, precision=precision, devices=devices,
                            resume=resume, seed=seed)
    if result.get("val"):
        v = result["val"]
        print(f"final validation: loss {v['loss']:.4f}, accuracy {v['accuracy']:.4f}, margin {v['margin']:.4f}")


if __name__ == "__main__":
    run_cli(main)
