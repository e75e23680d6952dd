"""Packed token datasets for pretraining: corpora tokenised into fixed-size binary shards, read back
by memory map as training sequences.

A shard is a 64-byte header (magic, format version, bytes per token, token count, vocabulary size,
EOS id, tokenizer fingerprint) followed by the raw little-endian tokens: uint16 when every id fits,
else uint32. Documents follow one another, each closed by EOS. Training reads windows of
`block_size + 1` consecutive tokens (inputs and their next-token targets); a shard's tokens after
its last whole window are not used, which `corpus.prepare_corpus` avoids by sizing shards in windows.

Reading is random access: window `p` of the infinite, epoch-after-epoch stream is a pure function
of `p` and the seed. Micro-batch `i` holds windows `[i*B, (i+1)*B)`, rank `r` of `W` takes the
micro-batches `i = j*W + r`, and a data-loader worker `w` of `K` the rank's batches `j = w, w+K, ...`;
so each window is read exactly once per epoch over the whole job, and a resumed run continues at
exactly the batch a step number names (no loader state to save).
"""

import bisect
import json
import struct
from collections import OrderedDict
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from lit_llama.io.checkpoint import DEFAULT_CHECKPOINT_DIR, TOKENIZER_FILES
from lit_llama.utils import UserError

MAGIC = b"LLPACKED"
VERSION = 1
HEADER = struct.Struct("<8sIIQQq16s")  # magic, version, itemsize, n_tokens, vocab_size, eos_id, fingerprint
HEADER_BYTES = 64  # the struct padded, so the tokens start aligned
MIX_FILE = "mix.json"  # a folder of datasets mixed by weight: {"weights": {"subfolder": weight, ...}}


# ---------------------------------------------------------------- shard files


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    itemsize: int
    n_tokens: int
    vocab_size: int
    eos_id: int
    fingerprint: str

    @property
    def dtype(self):
        return np.dtype("<u2") if self.itemsize == 2 else np.dtype("<u4")


def token_itemsize(vocab_size: int) -> int:
    return 2 if vocab_size <= 1 << 16 else 4


def read_header(path: Path) -> ShardInfo:
    """The shard's header, checked against the file's size so a truncated shard is reported."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or raw[:8] != MAGIC:
        raise UserError(f"{path} is not a packed token shard (written by scripts/prepare_*.py)")
    magic, version, itemsize, n_tokens, vocab_size, eos_id, fp = HEADER.unpack(raw[: HEADER.size])
    if version != VERSION or itemsize not in (2, 4):
        raise UserError(f"{path} has an unsupported shard format (version {version}, {itemsize} bytes per token)")
    size = path.stat().st_size
    if size != HEADER_BYTES + n_tokens * itemsize:
        raise UserError(f"{path} is truncated or corrupted: its header promises {n_tokens} tokens, "
                        f"the file holds {(size - HEADER_BYTES) // itemsize}")
    return ShardInfo(path, itemsize, n_tokens, vocab_size, eos_id, fp.decode("ascii", "replace"))


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int, eos_id: Optional[int], fingerprint: str) -> None:
    itemsize = token_itemsize(vocab_size)
    header = HEADER.pack(MAGIC, VERSION, itemsize, len(tokens), vocab_size, -1 if eos_id is None else eos_id,
                         fingerprint.encode("ascii")[:16].ljust(16))
    with open(path, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.write(np.ascontiguousarray(tokens, dtype=np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")).tobytes())


class ShardWriter:
    """Appends documents to shards of exactly `shard_tokens` tokens (the last one may be shorter),
    named `{prefix}-000000.bin`, ... in `out_dir`."""

    def __init__(self, out_dir: Path, shard_tokens: int, vocab_size: int, eos_id: Optional[int], fingerprint: str,
                 prefix: str = "shard"):
        self.out_dir, self.shard_tokens, self.prefix = Path(out_dir), shard_tokens, prefix
        self.meta = (vocab_size, eos_id, fingerprint)
        self.buffer = np.empty(shard_tokens, dtype=np.uint32)
        self.filled = self.n_shards = self.n_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled: self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self.filled == 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_shard(self.out_dir / f"{self.prefix}-{self.n_shards:06d}.bin", self.buffer[: self.filled], *self.meta)
        self.n_shards += 1
        self.n_tokens += self.filled
        self.filled = 0

    def close(self) -> int:
        self._flush()
        return self.n_tokens


# ---------------------------------------------------------------- reading: windows by index


class PackedDataset:
    """Windows of `block_size + 1` tokens from a list of shards, by index over endless epochs.

    With `shuffle`, each epoch takes the shards in a new seeded order and, within consecutive
    groups of `shuffle_group` shards, the windows in a seeded random order: the reads stay local to
    a few files (page cache, network file systems) while a batch mixes windows of several files."""

    def __init__(self, shards: Sequence[ShardInfo], block_size: int, seed: int = 1337, shuffle: bool = True,
                 shuffle_group: int = 8, max_open: int = 64):
        self.shards, self.block_size, self.seed, self.shuffle = list(shards), block_size, seed, shuffle
        self.window = block_size + 1
        self.counts = [s.n_tokens // self.window for s in self.shards]
        self.cum = np.cumsum(self.counts).tolist()  # in file order, for reading without shuffling
        self.length = sum(self.counts)
        self.group = max(1, shuffle_group)
        self.max_open = max_open
        self._maps: "OrderedDict[int, np.ndarray]" = OrderedDict()
        self._epoch: Tuple[int, Optional[tuple]] = (-1, None)
        self._group_perm: Tuple[tuple, Optional[tuple]] = ((), None)

    def __len__(self) -> int:
        """Windows per epoch."""
        return self.length

    def __getstate__(self):
        # data-loader workers reopen the maps themselves: a memory map does not travel to a process
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def _tokens(self, shard: int) -> np.ndarray:
        # at most `max_open` maps at a time: each one holds a file descriptor
        if shard in self._maps:
            self._maps.move_to_end(shard)
        else:
            s = self.shards[shard]
            self._maps[shard] = np.memmap(s.path, dtype=s.dtype, mode="r", offset=HEADER_BYTES, shape=(s.n_tokens,))
            if len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        return self._maps[shard]

    def _epoch_groups(self, epoch: int) -> tuple:
        """(first window of each group in the epoch, [(shard ids, their cumulative window counts)])."""
        if self._epoch[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
            starts, groups, start = [], [], 0
            for g in range(0, len(order), self.group):
                ids = [i for i in order[g: g + self.group] if self.counts[i]]
                if ids:
                    cum = np.cumsum([self.counts[i] for i in ids]).tolist()
                    starts.append(start)
                    groups.append((ids, cum))
                    start += cum[-1]
            self._epoch = (epoch, (starts, groups))
        return self._epoch[1]

    def _locate(self, p: int) -> Tuple[int, int]:
        """(shard, window in shard) of the p-th window of the stream."""
        epoch, q = divmod(p, self.length)
        if not self.shuffle:
            s = bisect.bisect_right(self.cum, q)
            return s, q - (self.cum[s - 1] if s else 0)
        starts, groups = self._epoch_groups(epoch)
        g = bisect.bisect_right(starts, q) - 1
        ids, cum = groups[g]
        if self._group_perm[0] != (epoch, g):
            self._group_perm = ((epoch, g), np.random.default_rng([self.seed, epoch, g, 1]).permutation(cum[-1]))
        k = int(self._group_perm[1][q - starts[g]])
        i = bisect.bisect_right(cum, k)
        return ids[i], k - (cum[i - 1] if i else 0)

    def window_at(self, p: int) -> np.ndarray:
        shard, w = self._locate(p)
        return self._tokens(shard)[w * self.window: (w + 1) * self.window]


class CombinedDataset:
    """Several datasets mixed by weight, by index: the stream is cut into rounds of `round_size`
    windows in which dataset d gets its share of `weights` exactly (largest remainder), in a seeded
    order. Each dataset is read in its own epoch order, so a small one is repeated more often
    (LLaMA's Wikipedia and Books: more than two epochs)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], seed: int = 1337, round_size: int = 10000):
        if len(datasets) != len(weights) or not datasets or min(weights) < 0 or sum(weights) <= 0:
            raise UserError("a dataset mix needs one non-negative weight per dataset, summing above zero")
        self.datasets, self.seed, self.round_size = list(datasets), seed, round_size
        self.block_size = datasets[0].block_size
        self.per_round = _apportion(weights, round_size)
        self._round: Tuple[int, Optional[tuple]] = (-1, None)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def _schedule(self, r: int):
        """(dataset of each slot in round r, index of that slot among its dataset's slots)."""
        if self._round[0] != r:
            slots = np.repeat(np.arange(len(self.datasets)), self.per_round)
            slots = slots[np.random.default_rng([self.seed, r, 2]).permutation(len(slots))]
            nth = np.zeros(len(slots), dtype=np.int64)
            for d in range(len(self.datasets)):
                mask = slots == d
                nth[mask] = np.arange(mask.sum())
            self._round = (r, (slots, nth))
        return self._round[1]

    def window_at(self, p: int) -> np.ndarray:
        r, o = divmod(p, self.round_size)
        slots, nth = self._schedule(r)
        d = int(slots[o])
        return self.datasets[d].window_at(r * int(self.per_round[d]) + int(nth[o]))


def _apportion(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `weights` (largest remainder method)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts


# ---------------------------------------------------------------- batches, ranks and workers


class PackedBatches:
    """Micro-batch `i` as a pure function of `i`: windows `[i*B, (i+1)*B)` of the stream, as
    (inputs, targets) of shape (B, block_size)."""

    def __init__(self, dataset, micro_batch_size: int):
        self.dataset, self.micro_batch_size = dataset, micro_batch_size

    def __call__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        B = self.micro_batch_size
        rows = np.stack([self.dataset.window_at(p) for p in range(i * B, (i + 1) * B)]).astype(np.int64)
        batch = torch.from_numpy(rows)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class RankStream(torch.utils.data.IterableDataset):
    """The micro-batches of one rank, from its `start`-th on, split over data-loader workers.

    The loader takes batches from its workers in turn (worker 0 first), so worker w producing the
    rank's batches start+w, start+w+K, ... hands them over in order, whatever K is."""

    def __init__(self, batches: PackedBatches, rank: int, world_size: int, start: int = 0):
        self.batches, self.rank, self.world_size, self.start = batches, rank, world_size, start

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j in count(self.start + worker, workers):
            yield self.batches(j * self.world_size + self.rank)


class LoaderBatches:
    """`PackedBatches` read ahead by data-loader workers, called like it (by global micro-batch
    index). Calls are expected in the order a training loop makes them; any other index restarts
    the workers there, so the answer is always the same as `PackedBatches`'."""

    def __init__(self, batches: PackedBatches, rank: int, world_size: int, num_workers: int,
                 pin_memory: bool = False):
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._iter, self._next = None, None

    def __call__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        j, r = divmod(i, self.world_size)
        if r != self.rank or self.num_workers == 0:
            return self.batches(i)
        if self._iter is None or j != self._next:
            loader = torch.utils.data.DataLoader(RankStream(self.batches, self.rank, self.world_size, start=j),
                                                 batch_size=None, num_workers=self.num_workers,
                                                 pin_memory=self.pin_memory)
            self._iter = iter(loader)
        self._next = j + 1
        return next(self._iter)

    def close(self) -> None:
        self._iter = None  # the loader's iterator stops its workers when it goes


# ---------------------------------------------------------------- opening a prepared folder


def open_dataset(path: Path, block_size: int, fingerprint: str, tokenizer_dir: Path, seed: int = 1337,
                 shuffle: bool = True):
    """A PackedDataset of the `*.bin` shards in `path`, or a CombinedDataset where `path` holds a
    mix.json; every shard is checked against the tokenizer the model is trained with."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"data directory {path} does not exist (prepare it with scripts/prepare_text_files.py "
                        f"or scripts/prepare_redpajama.py)")
    if (path / MIX_FILE).is_file():
        weights = read_mix(path)
        parts = [open_dataset(path / name, block_size, fingerprint, tokenizer_dir, seed + k, shuffle)
                 for k, name in enumerate(weights)]
        return CombinedDataset(parts, list(weights.values()), seed=seed)
    files = sorted(path.glob("*.bin"))
    if not files:
        raise UserError(f"data directory {path} holds no .bin shards (prepare it with scripts/prepare_text_files.py)")
    shards = [read_header(f) for f in files]
    for s in shards:
        if s.fingerprint != fingerprint:
            raise UserError(f"{s.path} was written with another tokenizer than {tokenizer_dir}'s; "
                            f"prepare the data again with --checkpoint_dir {tokenizer_dir}")
    dataset = PackedDataset(shards, block_size, seed=seed, shuffle=shuffle)
    if len(dataset) == 0:
        n = sum(s.n_tokens for s in shards)
        raise UserError(f"{path} holds {n} tokens, fewer than one training sequence of {block_size + 1} "
                        f"(block_size + 1); use a shorter --block_size or more data")
    return dataset


def read_mix(path: Path) -> Dict[str, float]:
    f = Path(path) / MIX_FILE
    try:
        weights = json.loads(f.read_text())["weights"]
        weights = {str(k): float(v) for k, v in weights.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f'{f} is not a dataset mix ({{"weights": {{"subfolder": weight, ...}}}})')
    if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise UserError(f"{f}: weights must be non-negative and sum above zero")
    return weights


# ---------------------------------------------------------------- checks shared by the preparing scripts


def check_tokenizer_dir(tokenizer_dir: Path) -> None:
    """A folder with a tokenizer file in it, or one clear error naming what is missing."""
    d = Path(tokenizer_dir)
    if not d.is_dir():
        hint = " (run `make model` to create it)" if d == DEFAULT_CHECKPOINT_DIR else ""
        raise UserError(f"tokenizer directory {d} does not exist{hint}")
    if not any((d / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{d} holds no {' or '.join(TOKENIZER_FILES)}")
