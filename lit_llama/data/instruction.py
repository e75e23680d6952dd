"""Instruction data: read JSON/JSONL records, apply the prompt template, tokenise, mask, batch.

The prepared folder (lit_llama/data/records.py's format) holds lists of {"input_ids", "labels"}."""

import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from lit_llama.data.records import (check_val_fraction, load_prepared, read_records, save_prepared, shuffled,
                                    tokenizer_fingerprint, val_size)
from lit_llama.io.checkpoint import validate_checkpoint_dir
from lit_llama.templates import instruction_prompt
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError, atomic_file

IGNORE_INDEX = -100  # labels the loss skips: masked prompt tokens and padding

# field names of the supported sources, mapped onto Alpaca's (instruction, input, output)
FIELD_SETS = [("instruction", "input", "output"), ("instruction", "context", "response")]


def download(url: str, path: Path) -> Path:
    """Download `url` to `path` (atomically) unless it is already there."""
    path = Path(path)
    if path.is_file():
        return path
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, atomic_file(path) as tmp:
            tmp.write_bytes(r.read())
    except OSError as e:
        raise UserError(f"cannot download {url}: {e}; pass --data_file_path with a local copy")
    return path


def read_instructions(path: Path) -> List[Dict[str, str]]:
    """Records of a JSON list or a JSONL file (gzip or not), normalised to instruction/input/output."""
    raw = read_records(path)
    if not raw:
        raise UserError(f"{path} holds no records")
    return [normalise(r, path, i) for i, r in enumerate(raw)]


def normalise(record, path: Path, i: int) -> Dict[str, str]:
    if isinstance(record, dict):
        for instruction, input, output in FIELD_SETS:
            if instruction in record and output in record:
                return {"instruction": str(record[instruction]), "input": str(record.get(input) or ""),
                        "output": str(record[output])}
    raise UserError(f"{path}: record {i} lacks the fields instruction and output "
                    f"(or Dolly's instruction and response)")


def encode_example(tokenizer: Tokenizer, record: Dict[str, str], max_seq_length: int, mask_inputs: bool,
                   template: str = "alpaca") -> Dict[str, torch.Tensor]:
    prompt = instruction_prompt(record["instruction"], record["input"], template)
    prompt_ids = tokenizer.encode(prompt)
    full_ids = tokenizer.encode(prompt + record["output"], eos=True)[:max_seq_length]
    labels = full_ids.clone()
    if mask_inputs:
        labels[: len(prompt_ids)] = IGNORE_INDEX
    return {"input_ids": full_ids, "labels": labels}


def prepare_source(checkpoint_dir: Path, destination_path: Path, data_file_path: Optional[Path], url: str,
                   max_seq_length: int, mask_inputs: bool, val_fraction: float, seed: int) -> None:
    """What the prepare_* scripts do: take the local file, or download `url` next to the destination."""
    validate_checkpoint_dir(checkpoint_dir)
    path = data_file_path or download(url, Path(destination_path).parent / url.rsplit("/", 1)[-1])
    prepare_instruction_data(read_instructions(path), checkpoint_dir, destination_path, max_seq_length, mask_inputs,
                             val_fraction, seed)


def prepare_instruction_data(records: List[Dict[str, str]], checkpoint_dir: Path, destination: Path,
                             max_seq_length: int = 256, mask_inputs: bool = False, val_fraction: float = 0.04,
                             seed: int = 42, template: str = "alpaca") -> None:
    check_val_fraction(val_fraction)
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    tokenizer = Tokenizer(checkpoint_dir)
    records = shuffled(records, seed)
    n_val = val_size(len(records), val_fraction)
    encoded = [encode_example(tokenizer, r, max_seq_length, mask_inputs, template)
               for r in tqdm(records, desc="tokenizing", unit="example")]
    meta = save_prepared(destination, encoded, n_val, {
        "tokenizer": tokenizer_fingerprint(checkpoint_dir), "max_seq_length": max_seq_length,
        "mask_inputs": mask_inputs, "template": template})
    print(f"wrote {meta['n_train']} training and {n_val} validation examples to {destination}")


def load_instruction_data(data_dir: Path, checkpoint_dir: Path) -> Tuple[list, list, dict]:
    """(train, val, meta) of a folder made by a scripts/prepare_*.py (instruction or chat data)."""
    train, val, meta = load_prepared(data_dir, checkpoint_dir)
    if not train:
        raise UserError(f"{data_dir} has no training examples")
    return train, val, meta


class InstructionBatches:
    """Micro-batches as a pure function of the micro-step: each epoch is a seeded permutation, so a
    resumed run sees exactly the batches the interrupted one would have."""

    def __init__(self, examples: list, micro_batch_size: int, seed: int = 1337, pad_id: int = 0):
        self.examples, self.micro_batch_size, self.seed, self.pad_id = examples, micro_batch_size, seed, pad_id
        self._perm: Tuple[int, Optional[List[int]]] = (-1, None)

    def _order(self, epoch: int) -> List[int]:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.examples), generator=g).tolist())
        return self._perm[1]

    def __call__(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        n = len(self.examples)
        picks = []
        for k in range(step * self.micro_batch_size, (step + 1) * self.micro_batch_size):
            picks.append(self.examples[self._order(k // n)[k % n]])
        return collate(picks, self.pad_id)


def collate(examples: list, pad_id: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example; the model input drops the last token, the target the first."""
    T = max(len(e["input_ids"]) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        x[i, :n] = e["input_ids"]
        y[i, :n] = e["labels"]
    return x[:, :-1].contiguous(), y[:, 1:].contiguous()
