"""Instruction data: read JSON/JSONL records, apply the prompt template, tokenise, mask, batch.

A prepared folder holds `train.pt` and `val.pt` (lists of {"input_ids", "labels"} tensors, loaded
with weights_only) and `meta.json`, which records the tokenizer's fingerprint so that training
refuses data prepared with another tokenizer."""

import hashlib
import json
import random
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from lit_llama.templates import instruction_prompt
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError, atomic_dir, atomic_file

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


def read_records(path: Path) -> List[Dict[str, str]]:
    """Records of a JSON list or a JSONL file, normalised to instruction/input/output."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            raw = json.loads(text)
        else:
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not JSON or JSONL ({e})")
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
    from lit_llama.io.checkpoint import validate_checkpoint_dir

    validate_checkpoint_dir(checkpoint_dir)
    path = data_file_path or download(url, Path(destination_path).parent / url.rsplit("/", 1)[-1])
    prepare_instruction_data(read_records(path), checkpoint_dir, destination_path, max_seq_length, mask_inputs,
                             val_fraction, seed)


def tokenizer_fingerprint(checkpoint_dir: Path) -> str:
    d = Path(checkpoint_dir)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model"):
        if (d / name).is_file():
            h.update((d / name).read_bytes())
    return h.hexdigest()[:16]


def prepare_instruction_data(records: List[Dict[str, str]], checkpoint_dir: Path, destination: Path,
                             max_seq_length: int = 256, mask_inputs: bool = False, val_fraction: float = 0.04,
                             seed: int = 42, template: str = "alpaca") -> None:
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2, got {max_seq_length}")
    tokenizer = Tokenizer(checkpoint_dir)
    records = list(records)
    random.Random(seed).shuffle(records)
    n_val = max(1, round(len(records) * val_fraction)) if val_fraction > 0 and len(records) > 1 else 0
    from tqdm import tqdm

    encoded = [encode_example(tokenizer, r, max_seq_length, mask_inputs, template)
               for r in tqdm(records, desc="tokenizing", unit="example")]
    meta = {"tokenizer": tokenizer_fingerprint(checkpoint_dir), "max_seq_length": max_seq_length,
            "mask_inputs": mask_inputs, "template": template, "n_train": len(encoded) - n_val, "n_val": n_val}
    with atomic_dir(destination) as tmp:
        torch.save(encoded[n_val:], tmp / "train.pt")
        torch.save(encoded[:n_val], tmp / "val.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {meta['n_train']} training and {n_val} validation examples to {destination}")


def load_instruction_data(data_dir: Path, checkpoint_dir: Path) -> Tuple[list, list, dict]:
    data_dir = Path(data_dir)
    missing = [f for f in ("train.pt", "val.pt", "meta.json") if not (data_dir / f).is_file()]
    if missing:
        raise UserError(f"data directory {data_dir} lacks {', '.join(missing)} (run a scripts/prepare_*.py first)")
    meta = json.loads((data_dir / "meta.json").read_text())
    if meta.get("tokenizer") != tokenizer_fingerprint(checkpoint_dir):
        raise UserError(f"{data_dir} was prepared with another tokenizer than {checkpoint_dir}'s; prepare it again")
    try:
        train = torch.load(data_dir / "train.pt", weights_only=True)
        val = torch.load(data_dir / "val.pt", weights_only=True)
    except Exception as e:
        raise UserError(f"{data_dir}: cannot read the prepared data ({str(e).splitlines()[0][:200]})")
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
