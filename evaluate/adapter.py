"""Lit-LLaMA's evaluate/adapter.py: evaluate/perplexity.py with --adapter_path out/adapter/alpaca by default
(LLaMA-Adapter weights from finetune/adapter.py)."""

from pathlib import Path

from lit_llama.eval.perplexity import perplexity_main
from lit_llama.infer.load import FinetunedArgs
from lit_llama.utils import run_cli

main = perplexity_main(FinetunedArgs(adapter_path=Path("out/adapter/alpaca")))

if __name__ == "__main__":
    run_cli(main)
