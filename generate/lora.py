"""Lit-LLaMA's generate/lora.py: generate/finetuned.py with --lora_path out/lora/alpaca by default
(LoRA weights from finetune/lora.py)."""

from pathlib import Path

from lit_llama.infer.cli import instruction_main
from lit_llama.infer.load import FinetunedArgs
from lit_llama.utils import run_cli

main = instruction_main(FinetunedArgs(lora_path=Path("out/lora/alpaca")))

if __name__ == "__main__":
    run_cli(main)
