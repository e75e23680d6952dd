"""Answer an instruction with a base model plus finetuned weights: `python generate/finetuned.py
--lora_path out/lora/alpaca --prompt "..."` (or --adapter_path, --adapter_v2_path, --finetuned_path)."""

from lit_llama.infer.cli import instruction_main
from lit_llama.utils import run_cli

main = instruction_main()

if __name__ == "__main__":
    run_cli(main)
