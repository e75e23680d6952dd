"""Merge a LoRA into its base model and write an ordinary checkpoint directory."""

from pathlib import Path

from lit_llama.io.checkpoint import load_model, save_checkpoint
from lit_llama.peft.lora import load_lora, merge_lora
from lit_llama.templates import recorded_template_name, save_template_name
from lit_llama.utils import run_cli


def main(checkpoint_dir: Path, lora_path: Path, output_dir: Path) -> None:
    """Fold the LoRA weights into the base weights (W + alpha/r * B A); the result loads and runs
    like any checkpoint, with no LoRA code and no extra cost per token.

    Args:
        checkpoint_dir: the base model's checkpoint directory, the one the LoRA was trained on.
        lora_path: the LoRA file (lit_lora.safetensors) or the folder that holds it.
        output_dir: the checkpoint directory to create (weights, config, the base's tokenizer).
    """
    import torch

    model = load_model(checkpoint_dir)
    load_lora(model, lora_path)
    with torch.no_grad():
        merge_lora(model)
    save_checkpoint(output_dir, model, tokenizer_dir=checkpoint_dir)
    template = recorded_template_name(Path(lora_path))  # the format the LoRA was trained on
    if template:
        save_template_name(output_dir, template)
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    run_cli(main)
