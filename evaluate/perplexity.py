"""Perplexity of a checkpoint, or of finetuned weights on it, on a text: `python evaluate/perplexity.py
--text_file test.txt [--lora_path out/lora/alpaca | --adapter_path ... | --finetuned_path ...]`."""

from lit_llama.eval.perplexity import perplexity_main
from lit_llama.utils import run_cli

main = perplexity_main()

if __name__ == "__main__":
    run_cli(main)
