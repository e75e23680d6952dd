"""Lit-LLaMA's evaluate/adapter_v2.py: evaluate/perplexity.py with --adapter_path out/adapter_v2/alpaca by default
(LLaMA-Adapter v2 weights from finetune/adapter_v2.py; the file says which adapter)."""

from pathlib import Path

from lit_llama.eval.perplexity import perplexity_main
from lit_llama.infer.load import FinetunedArgs
from lit_llama.utils import run_cli

main = perplexity_main(FinetunedArgs(adapter_path=Path("out/adapter_v2/alpaca")))

if __name__ == "__main__":
    run_cli(main)
