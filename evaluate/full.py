"""Lit-LLaMA's evaluate/full.py: evaluate/perplexity.py (a checkpoint, or with --finetuned_path
finetune/full.py's weights on it)."""

from lit_llama.eval.perplexity import perplexity_main
from lit_llama.utils import run_cli

main = perplexity_main()

if __name__ == "__main__":
    run_cli(main)
