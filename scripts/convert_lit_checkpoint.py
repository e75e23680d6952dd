"""Export a lit_llama checkpoint directory to GGUF (llama.cpp) or to a Hugging Face folder.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir D --to gguf --output_path OUT.gguf --dtype f16
    python scripts/convert_lit_checkpoint.py --checkpoint_dir D --to hf --output_path OUT_DIR
"""

from pathlib import Path
from typing import Optional


from lit_llama.io.export import export_checkpoint
from lit_llama.utils import run_cli


def main(checkpoint_dir: Path, to: str, output_path: Path, dtype: Optional[str] = None) -> None:
    """Write the checkpoint's weights, config and tokenizer (chat template included) in another format.

    Args:
        checkpoint_dir: a lit_llama checkpoint directory (lit_config.json, weights, tokenizer).
        to: `gguf` (one .gguf file for llama.cpp, `llama` architecture) or `hf` (a Hugging Face
            LlamaForCausalLM folder for `from_pretrained`).
        output_path: the .gguf file or the folder to write; it appears only once complete.
        dtype: GGUF: f32, f16, bf16 or q8_0 (norms stay f32); Hugging Face: f32, f16 or bf16.
            Default: the checkpoint's precision (f16 GGUF for a half-precision checkpoint).
    """
    export_checkpoint(checkpoint_dir, to, output_path, dtype)


if __name__ == "__main__":
    run_cli(main)
