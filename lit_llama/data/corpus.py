"""Preparing pretraining data: text files (.txt, JSONL, zstd-compressed JSONL) tokenised in
parallel into the shards `packed.py` reads; RedPajama-style mixes of sources by weight; a small
BPE tokenizer learned from text for tiny models.

Files are cut into tasks of about `TASK_BYTES` and tokenised by a pool of processes, in order, so
the shards do not depend on the number of workers. Every output folder appears only once complete.
"""

import io
import json
import math
import os
import shutil
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from lit_llama.data.packed import MIX_FILE, ShardWriter, check_tokenizer_dir
from lit_llama.data.records import tokenizer_fingerprint
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError, atomic_dir, atomic_file

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst")
TASK_BYTES = 64 << 20  # JSONL files are tokenised in pieces of about this size, in parallel


def find_text_files(source: Path) -> List[Path]:
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"source folder {source} does not exist")
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise UserError(f"no .txt or .jsonl files in {source}")
    return files


def split_tasks(files: Sequence[Path], task_bytes: Optional[int] = None) -> List[Tuple[Path, int, int]]:
    """(file, start, end) byte ranges; large JSONL files are cut at line ends into several."""
    task_bytes = task_bytes or TASK_BYTES
    tasks = []
    for f in files:
        size = f.stat().st_size
        if not f.name.endswith(".jsonl") or size <= task_bytes:
            tasks.append((f, 0, size))
            continue
        with open(f, "rb") as fh:
            start = 0
            while start < size:
                fh.seek(min(size, start + task_bytes))
                fh.readline()  # to the end of the line the cut falls in
                end = min(size, fh.tell()) if start + task_bytes < size else size
                tasks.append((f, start, end))
                start = end
    return tasks


_worker_tokenizer = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the pool is the parallelism
    _worker_tokenizer = Tokenizer(Path(tokenizer_dir))


def _decode(raw: bytes, path: Path, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {offset + e.start}); "
                        f"convert it to UTF-8 or remove it")


def read_documents(path: Path, start: int, end: int) -> Iterator[str]:
    """The documents in a byte range: a .txt file is one document; JSONL has one {"text": ...} per line."""
    if path.name.endswith(".zst"):
        yield from _zst_documents(path)
        return
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    if path.name.endswith(".txt"):
        yield _decode(raw, path, start)
        return
    offset = start
    for line in raw.splitlines(keepends=True):
        yield from _jsonl_text(_decode(line, path, offset), path, offset)
        offset += len(line)


def _jsonl_text(line: str, path: Path, offset: int) -> Iterator[str]:
    if not line.strip():
        return
    try:
        text = json.loads(line)["text"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f'{path}: the line at byte {offset} is not a JSON object with a "text" field')
    if not isinstance(text, str):
        raise UserError(f'{path}: the "text" field of the line at byte {offset} is not a string')
    yield text


def _zst_documents(path: Path) -> Iterator[str]:
    try:
        import zstandard
    except ImportError:
        raise UserError(f"{path} is zstd-compressed: `pip install zstandard` to read it")
    with open(path, "rb") as f:
        reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f))
        offset = 0
        for line in reader:
            yield from _jsonl_text(_decode(line, path, offset), path, offset)
            offset += len(line)


def tokenize_task(task: Tuple[Path, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """(all tokens of the task's documents, each closed by EOS; the documents' lengths)."""
    tok = _worker_tokenizer
    docs = [tok.encode(text, eos=True).numpy().astype(np.uint32) for text in read_documents(*task) if text]
    if not docs:
        return np.empty(0, dtype=np.uint32), np.empty(0, dtype=np.int64)
    return np.concatenate(docs), np.array([len(d) for d in docs], dtype=np.int64)


def prepare_corpus(files: Sequence[Path], tokenizer_dir: Path, out_dir: Path, block_size: int = 2048,
                   blocks_per_shard: int = 8192, val_fraction: float = 0.0, num_workers: Optional[int] = None,
                   desc: str = "tokenizing") -> Dict[str, int]:
    """Tokenise `files` in parallel (in order, so the output does not depend on the number of
    workers) into shards of `blocks_per_shard` windows of `block_size + 1` tokens under
    `out_dir/train` and, with `val_fraction`, `out_dir/val` (every 1/val_fraction-th document).
    Returns the tokens written per split."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if block_size < 1 or blocks_per_shard < 1:
        raise UserError("--block_size and --blocks_per_shard must be positive")
    tokenizer = Tokenizer(tokenizer_dir)
    if tokenizer.eos_id is None:
        raise UserError(f"the tokenizer in {tokenizer_dir} has no EOS token to separate documents with")
    meta = (tokenizer.vocab_size, tokenizer.eos_id, tokenizer_fingerprint(tokenizer_dir))
    shard_tokens = (block_size + 1) * blocks_per_shard
    writers = {split: ShardWriter(Path(out_dir) / split, shard_tokens, *meta, prefix=split)
               for split in ("train", "val")}
    tasks = split_tasks(files)
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(tasks)))
    n_docs = 0
    context = get_context("fork" if hasattr(os, "fork") else "spawn")
    with context.Pool(workers, _init_worker, (str(tokenizer_dir),)) as pool, \
            tqdm(total=sum(e - s for _, s, e in tasks), desc=desc, unit="B", unit_scale=True) as bar:
        for (tokens, lengths), (_, s, e) in zip(pool.imap(tokenize_task, tasks), tasks):
            for doc in np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []:
                # document k goes to validation when floor(k * f) steps up: exactly floor(n * f) of n
                to_val = math.floor((n_docs + 1) * val_fraction) > math.floor(n_docs * val_fraction)
                writers["val" if to_val else "train"].add(doc)
                n_docs += 1
            bar.update(e - s)
    written = {split: w.close() for split, w in writers.items()}
    if written["train"] == 0:
        raise UserError(f"found no text to tokenise in {len(files)} file(s)")
    return written


def prepare_text_folder(source_path: Path, checkpoint_dir: Path, destination_path: Path, block_size: int = 2048,
                        blocks_per_shard: int = 8192, val_fraction: float = 0.01,
                        num_workers: Optional[int] = None) -> Dict[str, int]:
    """Every .txt / .jsonl file under `source_path` into `destination_path/{train,val}`, which
    appears only once complete."""
    check_tokenizer_dir(checkpoint_dir)
    files = find_text_files(source_path)
    with atomic_dir(destination_path) as tmp:
        written = prepare_corpus(files, checkpoint_dir, tmp, block_size, blocks_per_shard, val_fraction, num_workers)
    print(f"wrote {written['train']:,} training and {written['val']:,} validation tokens from {len(files)} "
          f"file(s) to {destination_path}")
    if val_fraction > 0 and written["val"] == 0:
        print(f"note: too few documents for a validation split of {val_fraction}; {destination_path}/val is absent")
    return written


# LLaMA (Touvron et al. 2023), Table 1: sampling proportions of the pretraining sources, in percent
REDPAJAMA_WEIGHTS = {"common_crawl": 67.0, "c4": 15.0, "github": 4.5, "wikipedia": 4.5, "book": 4.5,
                     "arxiv": 2.5, "stackexchange": 2.0}
# RedPajama-Data-1T keeps each source in a folder; its sample names files by source prefix
SOURCE_ALIASES = {"common_crawl": ("common_crawl", "cc"), "wikipedia": ("wikipedia", "wiki"), "book": ("book", "books")}
JSONL_SUFFIXES = (".jsonl", ".jsonl.zst")


def source_files(source_path: Path, name: str) -> List[Path]:
    """The JSONL files of one source: under a folder named after it, or named with its prefix."""
    files = set()
    for alias in SOURCE_ALIASES.get(name, (name,)):
        folder = source_path / alias
        if folder.is_dir():
            files.update(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
        files.update(p for p in source_path.iterdir()
                     if p.is_file() and p.name.startswith(alias) and p.name.endswith(JSONL_SUFFIXES))
    return sorted(files)


def prepare_mix(source_path: Path, checkpoint_dir: Path, destination_path: Path,
                weights: Optional[Dict[str, float]] = None, block_size: int = 2048, blocks_per_shard: int = 8192,
                val_fraction: float = 0.001, num_workers: Optional[int] = None) -> Dict[str, float]:
    """Each source into `destination/{train,val}/<source>/`, and a mix.json with the weights in
    `destination/train` and `destination/val`. Sources are committed one by one: a rerun after an
    interruption skips those already prepared."""
    check_tokenizer_dir(checkpoint_dir)
    source_path, dest = Path(source_path), Path(destination_path)
    if not source_path.is_dir():
        raise UserError(f"source folder {source_path} does not exist")
    weights = dict(weights or REDPAJAMA_WEIGHTS)
    found = {name: source_files(source_path, name) for name in weights}
    if not any(found.values()):
        raise UserError(f"none of the sources {', '.join(weights)} has .jsonl files in {source_path}")
    for name, files in found.items():
        if not files:
            print(f"note: no files for {name} in {source_path}; it is left out of the mix")
            continue
        if (dest / "train" / name).is_dir():
            print(f"{name}: already prepared in {dest / 'train' / name}")
            continue
        staging = dest / ".staging" / name
        with atomic_dir(staging) as tmp:
            prepare_corpus(files, checkpoint_dir, tmp, block_size, blocks_per_shard, val_fraction, num_workers,
                           desc=name)
        # validation first: a present train/<source> means the source is complete
        for split in ("val", "train"):
            if (staging / split).is_dir():
                if (dest / split / name).exists():
                    shutil.rmtree(dest / split / name)
                (dest / split).mkdir(parents=True, exist_ok=True)
                (staging / split).rename(dest / split / name)
        shutil.rmtree(staging)
    shutil.rmtree(dest / ".staging", ignore_errors=True)
    for split in ("train", "val"):
        present = {n: w for n, w in weights.items() if found[n] and (dest / split / n).is_dir()}
        if present:
            with atomic_file(dest / split / MIX_FILE) as tmp:
                tmp.write_text(json.dumps({"weights": present}, indent=2))
    mix = {n: w for n, w in weights.items() if found[n]}
    print(f"prepared {', '.join(mix)} in {dest}; mix weights {mix}")
    return mix


def train_tokenizer(texts: Sequence[str], out_dir: Path, vocab_size: int = 1024, eos: str = "<|endoftext|>") -> Path:
    """A byte-level BPE tokenizer learned from `texts`, written as a tokenizer directory (tokenizer.json
    and tokenizer_config.json) that `Tokenizer` reads: for tiny models, whose time a 50k-token
    vocabulary's output layer would take up."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    with atomic_dir(out_dir) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos, "add_bos_token": False}))
    return Path(out_dir)
