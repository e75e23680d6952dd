"""Convert a GGUF file (llama.cpp, `llama` architecture) into a lit_llama checkpoint directory."""

from pathlib import Path
from typing import Optional


from lit_llama.io.gguf import convert_gguf_checkpoint
from lit_llama.utils import run_cli


def main(gguf_path: Path, output_dir: Path, dtype: Optional[str] = None, template: Optional[str] = None) -> None:
    """Dequantize a GGUF model and write its weights, config and tokenizer as a checkpoint directory.

    Args:
        gguf_path: the .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x or K-quant tensors).
        output_dir: the checkpoint directory to write; it appears only once complete.
        dtype: float32, float16 or bfloat16 for the stored weights; default: the file's own
            precision for F16/BF16 files, float32 for quantized ones.
        template: a built-in chat template to record with the checkpoint (chatml, llama-2, alpaca, vicuna,
            baize), for files without tokenizer.chat_template; chat.py and serve.py use it.
    """
    convert_gguf_checkpoint(gguf_path, output_dir, dtype, template=template)


if __name__ == "__main__":
    run_cli(main)
