"""Records in, prepared folders out: the one reader of JSON / JSONL data files (gzip or not) and the
one format of a prepared-data folder, for instruction, chat and preference data alike.

A prepared folder holds `train.pt` and `val.pt` (lists of dicts of tensors, loaded with
weights_only: no code runs) and `meta.json`, which records the tokenizer's fingerprint (training
refuses data prepared with another tokenizer) and, optionally, the kind of data it holds."""

import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from lit_llama.utils import UserError, atomic_dir

PREPARED_FILES = ("train.pt", "val.pt", "meta.json")


def read_records(path: Path, what: str = "data file") -> list:
    """The records of `path`: a JSON file holding a list, or JSON Lines (one value a line, blank
    lines skipped), either of them gzip-compressed (known by its first bytes). A missing file, text
    that is not UTF-8 or not JSON is one UserError naming the file and, for JSON Lines, the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    data = path.read_bytes()
    try:
        text = (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not UTF-8 JSON or JSONL ({e})")
    if text.lstrip().startswith("[") or (path.name.removesuffix(".gz").endswith(".json") and text.strip()):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not JSON (line {e.lineno}, column {e.colno}: {e.msg})")
        if not isinstance(raw, list):
            raise UserError(f"{path} must hold a JSON list of records (or JSON Lines: one record a line)")
        return raw
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n} is not JSON ({e.msg}, column {e.colno})")
    return records


# ---------------------------------------------------------------- prepared folders


def check_val_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")


def shuffled(rows: Sequence, seed: int) -> list:
    """The rows in a seeded random order (the split into training and validation data follows it)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def val_size(n: int, val_fraction: float) -> int:
    """How many of n examples go to validation: at least one when any is asked for, never all."""
    return max(1, round(n * val_fraction)) if val_fraction > 0 and n > 1 else 0


def tokenizer_fingerprint(checkpoint_dir: Path) -> str:
    """A hash of the tokenizer files: data prepared with one tokenizer must be trained with it."""
    d = Path(checkpoint_dir)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model"):
        if (d / name).is_file():
            h.update((d / name).read_bytes())
    return h.hexdigest()[:16]


def save_prepared(destination: Path, encoded: list, n_val: int, meta: dict) -> dict:
    """Write a prepared folder, atomically (nothing appears on an error): the first `n_val` encoded
    examples are the validation set; `meta` gets the counts. Returns it."""
    meta = {**meta, "n_train": len(encoded) - n_val, "n_val": n_val}
    with atomic_dir(destination) as tmp:
        torch.save(encoded[n_val:], tmp / "train.pt")
        torch.save(encoded[:n_val], tmp / "val.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_prepared(data_dir: Path, checkpoint_dir: Path, kind: Optional[str] = None,
                  how: str = "run a scripts/prepare_*.py first", what: str = "") -> Tuple[list, list, dict]:
    """(train, val, meta) of a prepared folder, checked: its files, `kind` (meta's "kind", None for
    instruction and chat data, which have none; `what` names it in the error), the tokenizer; every
    failure one UserError."""
    data_dir = Path(data_dir)
    missing = [f for f in PREPARED_FILES if not (data_dir / f).is_file()]
    if missing:
        raise UserError(f"data directory {data_dir} lacks {', '.join(missing)} ({how})")
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{data_dir / 'meta.json'} is not valid JSON")
    if kind is not None and meta.get("kind") != kind:
        raise UserError(f"{data_dir} holds no {what or kind} ({how})")
    if meta.get("tokenizer") != tokenizer_fingerprint(checkpoint_dir):
        raise UserError(f"{data_dir} was prepared with another tokenizer than {checkpoint_dir}'s; prepare it again")
    try:
        train = torch.load(data_dir / "train.pt", weights_only=True)
        val = torch.load(data_dir / "val.pt", weights_only=True)
    except Exception as e:
        raise UserError(f"{data_dir}: cannot read the prepared data ({str(e).splitlines()[0][:200]})")
    return train, val, meta

