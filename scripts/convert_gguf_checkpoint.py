"""Convert a GGUF file (llama.cpp, `llama` architecture), or one of llama.cpp's legacy LLaMA files
(`ggml`, `ggmf` v1, `ggjt` v1-v3: TheBloke's `*.ggmlv3.q4_0.bin` and older), into a lit_llama
checkpoint directory."""

from pathlib import Path
from typing import Optional

from lit_llama.io.ggml import convert_ggml_checkpoint, is_legacy_ggml
from lit_llama.io.gguf import convert_gguf_checkpoint
from lit_llama.utils import UserError, run_cli


def main(gguf_path: Path, output_dir: Path, dtype: Optional[str] = None, template: Optional[str] = None,
         keep_quantized: bool = False) -> None:
    """Convert a GGUF model's weights, config and tokenizer into a checkpoint directory.

    Args:
        gguf_path: the .gguf file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x or K-quant tensors), or a
            legacy GGML file (F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), told apart by its magic.
        output_dir: the checkpoint directory to write; it appears only once complete.
        dtype: float32, float16 or bfloat16 for the stored float weights; default: the file's own
            precision for F16/BF16 files, float32 for quantized ones.
        template: a built-in chat template to record with the checkpoint (chatml, llama-2, alpaca, vicuna,
            baize), for files without tokenizer.chat_template; chat.py and serve.py use it.
        keep_quantized: keep Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K and Q8_0 tensors as their
            integers, which the inference scripts multiply as they are (about the GGUF's size in
            memory; logits equal the dequantized checkpoint's); other quantized types are
            dequantized with a warning. Default: dequantize everything to float. GGUF files only.
    """
    if is_legacy_ggml(gguf_path):
        if keep_quantized:
            raise UserError(f"{gguf_path} is a legacy GGML file: --keep_quantized reads GGUF files only "
                            "(convert it to float without the flag, or to GGUF with llama.cpp's "
                            "convert_llama_ggml_to_gguf.py)")
        convert_ggml_checkpoint(gguf_path, output_dir, dtype, template=template)
        return
    convert_gguf_checkpoint(gguf_path, output_dir, dtype, template=template, keep_quantized=keep_quantized)


if __name__ == "__main__":
    run_cli(main)
