import json
import random

import numpy as np
import pytest
import torch

from conftest import run_script
from lit_llama.data import corpus, packed as pd
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError

WORDS = ["the", "river", "stone", "cloud", "green", "piano", "tiger", "lemon", "runs", "over", "a", "quiet", "hill"]


def make_documents(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A 320-token byte-level BPE tokenizer directory (EOS <|endoftext|>): tiny models stay tiny."""
    return corpus.train_tokenizer(make_documents(200, seed=1), tmp_path_factory.mktemp("tok") / "tokenizer", 320)


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory):
    return corpus.train_tokenizer(make_documents(200, seed=2), tmp_path_factory.mktemp("tok2") / "tokenizer", 300)


def write_corpus(folder, docs):
    """Half the documents as .txt files (one each, one in a subfolder), half as one JSONL file."""
    folder.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for i, d in enumerate(docs[:half]):
        sub = folder / "sub" if i == 0 else folder
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:03d}.txt").write_text(d)
    (folder / "rest.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[half:]))
    return folder


def unique_shards(tmp_path, sizes, vocab=1 << 20):
    """Shards whose tokens are 0, 1, 2, ... across all of them: every token can be traced."""
    shards, start = [], 0
    for i, n in enumerate(sizes):
        path = tmp_path / f"s{i}.bin"
        pd.write_shard(path, np.arange(start, start + n), vocab, 0, "f" * 16)
        shards.append(pd.read_header(path))
        start += n
    return shards


def test_shard_format_uint16_and_uint32(tmp_path):
    pd.write_shard(tmp_path / "a.bin", np.array([1, 2, 65535]), 50000, 2, "0123456789abcdef")
    pd.write_shard(tmp_path / "b.bin", np.array([1, 70000]), 100000, 2, "0123456789abcdef")
    a, b = pd.read_header(tmp_path / "a.bin"), pd.read_header(tmp_path / "b.bin")
    assert (a.itemsize, b.itemsize) == (2, 4)
    assert (tmp_path / "a.bin").stat().st_size == pd.HEADER_BYTES + 3 * 2
    assert np.fromfile(tmp_path / "b.bin", dtype="<u4", offset=pd.HEADER_BYTES).tolist() == [1, 70000]
    assert (a.n_tokens, a.vocab_size, a.eos_id, a.fingerprint) == (3, 50000, 2, "0123456789abcdef")
    (tmp_path / "c.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-1])
    with pytest.raises(UserError, match="truncated"):
        pd.read_header(tmp_path / "c.bin")
    (tmp_path / "d.bin").write_bytes(b"not a shard at all" * 10)
    with pytest.raises(UserError, match="not a packed token shard"):
        pd.read_header(tmp_path / "d.bin")


def collect(rank, world, n_batches, batches, workers, start=0):
    loader = pd.LoaderBatches(batches, rank, world, num_workers=workers)
    try:
        return [loader((start + j) * world + rank) for j in range(n_batches)]
    finally:
        loader.close()


def test_one_epoch_over_two_ranks_and_two_workers_reads_every_token_once(tmp_path):
    block = 7  # windows of 8 tokens; shard sizes in whole windows, the last with a 3-token tail
    shards = unique_shards(tmp_path, [8 * 5, 8 * 3, 8 * 6, 8 * 2 + 3])
    ds = pd.PackedDataset(shards, block, seed=3, shuffle=True, shuffle_group=2)
    assert len(ds) == 16
    batches = pd.PackedBatches(ds, micro_batch_size=2)
    world, per_rank = 2, 16 // (2 * 2)  # one epoch: 8 micro-batches, 4 per rank
    seen = []
    for rank in range(world):
        got = collect(rank, world, per_rank, batches, workers=2)
        for j, (x, y) in enumerate(got):  # the workers' batches are the pure function's, in order
            ex, ey = batches(j * world + rank)
            assert torch.equal(x, ex) and torch.equal(y, ey)
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
            seen += torch.cat([x, y[:, -1:]], dim=1).flatten().tolist()
    all_tokens = sum(s.n_tokens for s in shards)
    assert sorted(seen) == list(range(all_tokens - 3))  # each token once; only the tail is unused
    assert seen != sorted(seen)  # shuffled
    # the next epoch: another order, the same tokens
    nxt = [t for r in range(world) for x, y in collect(r, world, per_rank, batches, 2, start=per_rank)
           for t in torch.cat([x, y[:, -1:]], dim=1).flatten().tolist()]
    assert sorted(nxt) == sorted(seen) and nxt != seen


def test_loader_restarts_at_any_step_and_reads_in_order(tmp_path):
    ds = pd.PackedDataset(unique_shards(tmp_path, [8 * 10]), 7, seed=0, shuffle=False)
    batches = pd.PackedBatches(ds, micro_batch_size=3)
    x, _ = batches(0)
    assert x[0].tolist() == list(range(7)) and x[1, 0] == 8  # unshuffled: windows in file order
    resumed = collect(1, 2, 3, batches, workers=2, start=5)  # e.g. a resume at rank 1's sixth batch
    for j, (x, _) in enumerate(resumed):
        assert torch.equal(x, batches((5 + j) * 2 + 1)[0])
    assert batches(4)[0][0, 0] == ((4 * 3) % 10) * 8  # past the end: the next epoch, from the start


def test_combined_dataset_follows_the_weights(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = pd.PackedDataset(unique_shards(tmp_path / "a", [8 * 80]), 7)
    pd.write_shard(tmp_path / "b" / "s.bin", np.arange(10**6, 10**6 + 8 * 4), 1 << 21, 0, "f" * 16)
    b = pd.PackedDataset([pd.read_header(tmp_path / "b" / "s.bin")], 7)
    mix = pd.CombinedDataset([a, b], [3.0, 1.0], seed=1, round_size=100)
    firsts = [int(mix.window_at(p)[0]) for p in range(400)]
    from_b = [t for t in firsts if t >= 10**6]
    assert len(from_b) == 100  # exactly a quarter
    assert sorted(from_b[:4]) == [10**6 + 8 * k for k in range(4)]  # b's epoch order: each window once
    assert sorted(t for t in firsts[:100] if t < 10**6) == sorted({t for t in firsts[:100] if t < 10**6})
    assert [int(mix.window_at(p)[0]) for p in range(400)] == firsts  # a pure function of the position
    assert pd._apportion([67, 15, 4.5, 4.5, 4.5, 2.5, 2], 1000).tolist() == [670, 150, 45, 45, 45, 25, 20]


def read_split(folder):
    return np.concatenate([np.fromfile(f, dtype="<u2", offset=pd.HEADER_BYTES) for f in sorted(folder.glob("*.bin"))])


def test_prepare_text_files(tmp_path, small_tokenizer, monkeypatch):
    docs = make_documents(40)
    src = write_corpus(tmp_path / "src", docs)
    r = run_script("scripts/prepare_text_files.py", "--source_path", src, "--checkpoint_dir", small_tokenizer,
                   "--destination_path", tmp_path / "out", "--block_size", "15", "--blocks_per_shard", "4",
                   "--val_fraction", "0.1", "--num_workers", "2")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(small_tokenizer)
    train, val = read_split(tmp_path / "out" / "train"), read_split(tmp_path / "out" / "val")
    shards = sorted((tmp_path / "out" / "train").glob("*.bin"))
    assert all(pd.read_header(s).n_tokens == 16 * 4 for s in shards[:-1]) and len(shards) > 2
    assert pd.read_header(shards[0]).itemsize == 2
    texts = [tok.decode(d) for d in np.split(train, np.flatnonzero(train == tok.eos_id) + 1)[:-1]]
    val_texts = [tok.decode(d) for d in np.split(val, np.flatnonzero(val == tok.eos_id) + 1)[:-1]]
    assert len(val_texts) == 4  # every tenth document
    assert sorted(t.removesuffix("<|endoftext|>") for t in texts + val_texts) == sorted(docs)
    # the same shards whatever the number of processes and however the JSONL files are cut
    monkeypatch.setattr(corpus, "TASK_BYTES", 200)
    assert len(corpus.split_tasks([src / "rest.jsonl"])) > 3
    files = corpus.find_text_files(src)
    corpus.prepare_corpus(files, small_tokenizer, tmp_path / "one", 15, 4, 0.1, num_workers=1)
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "one" / split), read_split(tmp_path / "out" / split))


def _one_error_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@pytest.mark.parametrize("case, expected", [
    ("empty", "no .txt or .jsonl files"),
    ("latin1", "not UTF-8 text"),
    ("badjson", 'not a JSON object with a "text" field'),
])
def test_prepare_rejects_bad_input(tmp_path, small_tokenizer, case, expected):
    src = tmp_path / "src"
    src.mkdir()
    if case == "latin1":
        (src / "ok.txt").write_text("fine text")
        (src / "bad.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    elif case == "badjson":
        (src / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    r = run_script("scripts/prepare_text_files.py", "--source_path", src, "--checkpoint_dir", small_tokenizer,
                   "--destination_path", tmp_path / "out")
    assert expected in _one_error_line(r)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_prepare_redpajama_mix(tmp_path, small_tokenizer):
    """Both layouts (a folder per source, files named by source prefix); LLaMA's weights for the
    sources present; a source already prepared is skipped on a rerun."""
    src = tmp_path / "rp"
    (src / "book").mkdir(parents=True)
    sources = {"arxiv": src / "arxiv_sample.jsonl", "book": src / "book" / "part-0.jsonl",
               "common_crawl": src / "cc_2020.jsonl"}
    for i, (name, path) in enumerate(sources.items()):
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(30, seed=10 + i)))
    args = ["scripts/prepare_redpajama.py", "--source_path", src, "--checkpoint_dir", small_tokenizer,
            "--destination_path", tmp_path / "out", "--block_size", "15", "--blocks_per_shard", "8",
            "--val_fraction", "0.1", "--num_workers", "1"]
    r = run_script(*args)
    assert r.returncode == 0, r.stderr
    assert "no files for c4" in r.stdout
    for split in ("train", "val"):
        mix = json.loads((tmp_path / "out" / split / "mix.json").read_text())["weights"]
        assert mix == {"common_crawl": 67.0, "book": 4.5, "arxiv": 2.5}
        assert all(any((tmp_path / "out" / split / name).glob("*.bin")) for name in mix)
    assert not (tmp_path / "out" / ".staging").exists()
    from lit_llama.data.instruction import tokenizer_fingerprint

    ds = pd.open_dataset(tmp_path / "out" / "train", 15, tokenizer_fingerprint(small_tokenizer), small_tokenizer)
    assert isinstance(ds, pd.CombinedDataset) and ds.per_round.tolist() == [9054, 608, 338]
    r = run_script(*args)
    assert r.returncode == 0 and "arxiv: already prepared" in r.stdout
