"""Lit-LLaMA's generate/full.py: generate/finetuned.py with --finetuned_path out/full/alpaca by default
(the weights of finetune/full.py)."""

from pathlib import Path

from lit_llama.infer.cli import instruction_main
from lit_llama.infer.load import FinetunedArgs
from lit_llama.utils import run_cli

main = instruction_main(FinetunedArgs(finetuned_path=Path("out/full/alpaca")))

if __name__ == "__main__":
    run_cli(main)
