"""Prepare multi-turn chat data (self_chat.py's dialogues, say) for finetuning, with the loss on the
assistant's turns only:

    python scripts/prepare_chat.py --data_file_path data/self_chat.jsonl --destination_path data/chat
    python finetune/lora.py --data_dir data/chat --out_dir out/lora/chat --lora_query true --lora_key true \\
        --lora_value true --lora_projection true --lora_mlp true     # Baize: LoRA on every linear layer
    python chat.py --lora_path out/lora/chat                         # uses the template recorded here
"""

from pathlib import Path

from lit_llama.data.chat import prepare_chat_data, read_dialogues
from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR, validate_checkpoint_dir
from lit_llama.templates import check_template_name
from lit_llama.utils import run_cli


def main(
    data_file_path: Path,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    destination_path: Path = Path("data/chat"),
    template: str = "baize",
    max_seq_length: int = 512,
    val_fraction: float = 0.04,
    seed: int = 42,
) -> None:
    """Render each dialogue with a chat template and tokenise it; every token of the system text, the
    user turns and the template's own text is masked (IGNORE_INDEX), every token of an assistant turn
    and its end marker is trained. Writes train.pt, val.pt and meta.json (as scripts/prepare_alpaca.py
    does, with the template's name, which finetuning records for chat.py).

    Args:
        data_file_path: a JSON or JSONL file of dialogues: {"dialogue" or "messages": [{"role", "content"},
            ...]} (an optional system message, then user and assistant alternating, ending with the
            assistant), ShareGPT's {"conversations": [{"from", "value"}]}, Alpaca's instruction/input/output,
            or Baize's released data ({"input": "[|Human|] ... [|AI|] ..."}).
        checkpoint_dir: the checkpoint whose tokenizer is used (the model you will finetune).
        destination_path: folder to write train.pt, val.pt and meta.json into.
        template: the chat template: baize (Baize's [|Human|]/[|AI|], default), chatml, llama-2, llama-3, alpaca,
            vicuna, or checkpoint (the checkpoint's own Jinja template).
        max_seq_length: a longer dialogue keeps the leading exchanges that fit (Baize: 512).
        val_fraction: fraction of dialogues held out for validation.
        seed: seed of the shuffle before the split.
    """
    check_template_name(template)
    validate_checkpoint_dir(checkpoint_dir)
    prepare_chat_data(read_dialogues(data_file_path), checkpoint_dir, destination_path, template, max_seq_length,
                      val_fraction, seed)


if __name__ == "__main__":
    run_cli(main)
