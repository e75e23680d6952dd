"""Extending a checkpoint's vocabulary for a new language, as Chinese-LLaMA (Cui et al. 2023) does
before continued pretraining: N tokens learned from a corpus get the ids after the old ones, and the
embedding (and an untied output head) grow by N rows.

Every old id is kept, and text that does not contain a new token's string encodes to the same ids:
- a byte-level BPE `tokenizer.json` (GPT-2, SmolLM2, Llama 3) gets N new merges appended after the
  old ones, learned on the old tokenizer's output. Merges apply lowest rank first, so every old merge
  runs before any new one, and a new merge only joins two tokens whose text is the new token's.
- a SentencePiece `tokenizer.model` gets the N best new pieces of a SentencePiece model trained on
  the corpus, appended to the protobuf with score 0, as Chinese-LLaMA's merge_tokenizers.py does: a
  piece can only be formed where its text occurs.
A checkpoint with both files (Hugging Face's LLaMA folders) has its SentencePiece model extended and
the tokenizer.json left out of the output, so the extended model is the one every reader uses.
"""

import heapq
import json
import math
import os
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from tqdm import tqdm

from lit_llama.data.corpus import find_text_files, read_documents, TEXT_SUFFIXES
from lit_llama.io.checkpoint import (copy_tokenizer_files, load_state_dict, read_checkpoint_config,
                                     save_checkpoint, validate_checkpoint_dir)
from lit_llama.model import LLaMA, Config
from lit_llama.utils import UserError

MIN_PAIR_COUNT = 2  # a pair seen once in the corpus saves nothing worth a row of the embedding


@dataclass
class Extension:
    """What `extend_checkpoint` did: the new tokens' text (as the tokenizer stores it), their first
    id, and the old tokens each one's row was initialised from."""

    new_tokens: List[str]
    first_id: int
    pieces: List[List[int]]
    config: Config


# ---------------------------------------------------------------- the corpus


def corpus_texts(corpus: Path) -> List[str]:
    """The documents of a .txt / .jsonl file or of every such file under a folder."""
    corpus = Path(corpus)
    if corpus.is_file():
        if not corpus.name.endswith(TEXT_SUFFIXES):
            raise UserError(f"--corpus {corpus} is not a .txt or .jsonl file")
        files = [corpus]
    elif corpus.is_dir():
        files = find_text_files(corpus)
    else:
        raise UserError(f"--corpus {corpus} does not exist")
    texts = [t for f in files for t in read_documents(f, 0, f.stat().st_size) if t]
    if not texts:
        raise UserError(f"--corpus {corpus} holds no text")
    return texts


# ---------------------------------------------------------------- BPE merges, learned incrementally


def learn_merges(words: Dict[Tuple[str, ...], int], n: int, exists) -> List[Tuple[str, str]]:
    """Up to `n` merges continuing BPE training (Sennrich et al. 2016) on `words` (a word as its
    current tokens -> how often it occurs): each step joins the most frequent adjacent pair (ties:
    the smallest pair, so the result is deterministic) seen at least MIN_PAIR_COUNT times whose
    joined text is not already a token (`exists`)."""
    seqs = [list(w) for w in words]
    freq = list(words.values())
    counts: Dict[Tuple[str, str], int] = defaultdict(int)
    where: Dict[Tuple[str, str], set] = defaultdict(set)
    for i, s in enumerate(seqs):
        for pair in zip(s, s[1:]):
            counts[pair] += freq[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges, banned = [], set()
    bar = tqdm(total=n, desc="learning merges", unit="merge", leave=False)
    while len(merges) < n and heap:
        c, pair = heapq.heappop(heap)
        if -c != counts.get(pair, 0) or pair in banned:
            continue  # a stale entry: the pair's count changed since it was pushed
        if -c < MIN_PAIR_COUNT:
            break
        if exists(pair[0] + pair[1]):
            banned.add(pair)  # its text is an old token the old merges never build here: leave it alone
            continue
        merges.append(pair)
        bar.update()
        joined, changed = pair[0] + pair[1], {}
        for i in list(where[pair]):
            s, out, j = seqs[i], [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == pair:
                    out.append(joined)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            for p in zip(s, s[1:]):
                counts[p] -= freq[i]
                changed[p] = None
                where[p].discard(i)
            for p in zip(out, out[1:]):
                counts[p] += freq[i]
                changed[p] = None
                where[p].add(i)
            seqs[i] = out
        for p in changed:
            if counts[p] > 0 and p not in banned:
                heapq.heappush(heap, (-counts[p], p))
    bar.close()
    return merges


# ---------------------------------------------------------------- tokenizer.json


def _json_size(path: Path) -> int:
    """The number of ids of a tokenizer.json: one past the largest of its vocabulary and added tokens."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        ids = [*data["model"]["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{path} is not a tokenizer.json with a vocabulary")
    return max(ids) + 1


def _hf_words(tok, texts: Iterable[str]) -> Counter:
    """The corpus's words as the tokenizer's normalizer and pre-tokenizer cut them, counted."""
    words = Counter()
    for text in tqdm(texts, desc="reading the corpus", unit="doc", leave=False):
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        pieces = tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer is not None else [(text, None)]
        words.update(p for p, _ in pieces)
    return words


def extend_tokenizer_json(path: Path, texts: Sequence[str], n: int) -> Tuple[dict, List[str], List[List[int]]]:
    """(the extended tokenizer.json, the new tokens' text, the old ids each one's text encodes to)."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("dropout"):
        raise UserError(f"{path}: only a byte-level BPE tokenizer.json (GPT-2, SmolLM2, Llama 3 style) can be "
                        f"extended; this one is a {model.get('type')} model with other options")
    tok = HFTokenizer.from_file(str(path))
    vocab: Dict[str, int] = model["vocab"]
    words = {}
    for word, count in _hf_words(tok, texts).items():
        key = tuple(t.value for t in tok.model.tokenize(word))
        words[key] = words.get(key, 0) + count
    merges = learn_merges(words, n, lambda s: s in vocab)
    if len(merges) < n:
        raise UserError(f"the corpus yields only {len(merges)} new token(s) (pairs seen at least {MIN_PAIR_COUNT} "
                        f"times), fewer than --num_new_tokens {n}: use a larger corpus or fewer new tokens")
    first = _json_size(path)
    new_tokens = [a + b for a, b in merges]
    # the old tokens of each new token's text: with old merges only, before the new ids exist
    pieces = [[t.id for t in tok.model.tokenize(s)] for s in new_tokens]
    for i, s in enumerate(new_tokens):
        vocab[s] = first + i
    pair_as_list = bool(model["merges"]) and isinstance(model["merges"][0], list)
    model["merges"] = model["merges"] + [[a, b] if pair_as_list else f"{a} {b}" for a, b in merges]
    return data, new_tokens, pieces


# ---------------------------------------------------------------- SentencePiece tokenizer.model


def _sample(lines: Sequence[str], chars: int = 20_000_000) -> Iterable[str]:
    """The first lines of the corpus, up to `chars` characters: enough to rank pieces by use."""
    total = 0
    for line in lines:
        if total > chars:
            return
        total += len(line)
        yield line


def _sp_proto(raw: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(raw)
    return proto


def extend_sentencepiece(path: Path, texts: Sequence[str], n: int) -> Tuple[bytes, List[str], List[List[int]]]:
    """(the extended tokenizer.model, the new pieces, the old ids each one's text encodes to)."""
    import io

    import sentencepiece as spm

    raw = Path(path).read_bytes()
    proto = _sp_proto(raw)
    old = {p.piece for p in proto.pieces}
    spec = proto.trainer_spec
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    # train on the corpus with the old model's algorithm and whitespace handling; more pieces than
    # asked, as some of them the old vocabulary already has
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=2 * n + 300, hard_vocab_limit=False,
            model_type={1: "unigram", 2: "bpe"}.get(spec.model_type, "bpe"), character_coverage=0.9995,
            split_by_whitespace=spec.split_by_whitespace, split_digits=spec.split_digits,
            max_sentence_length=1 << 16, num_threads=1, minloglevel=2,
            add_dummy_prefix=proto.normalizer_spec.add_dummy_prefix)
    except RuntimeError as e:
        raise UserError(f"SentencePiece cannot learn pieces from the corpus: {str(e).splitlines()[0][:200]}")
    learned = _sp_proto(out.getvalue())
    # the old tokens of each piece's text: the old model without the dummy prefix, spaces kept
    plain = _sp_proto(raw)
    plain.normalizer_spec.add_dummy_prefix = False
    plain.normalizer_spec.remove_extra_whitespaces = False
    old_sp = spm.SentencePieceProcessor(model_proto=plain.SerializeToString())
    normal = 1  # ModelProto.SentencePiece.NORMAL
    candidates = [p.piece for p in learned.pieces if p.type == normal and p.piece not in old]
    if len(candidates) < n:
        raise UserError(f"the corpus yields only {len(candidates)} new piece(s), fewer than --num_new_tokens {n}: "
                        f"use a larger corpus or fewer new tokens")
    # the n that save the most tokens: how often the learned model uses each (on a sample of the
    # corpus) times the old tokens it replaces less one. A BPE model lists its merges by frequency
    # and its characters last, yet a character the old model spells in 3 bytes saves the most.
    learned_sp = spm.SentencePieceProcessor(model_proto=out.getvalue())
    used = Counter(p for line in _sample(lines) for p in learned_sp.encode(line, out_type=str))
    split = {s: old_sp.encode(s.replace("\u2581", " ")) for s in candidates}
    order = sorted(range(len(candidates)),
                   key=lambda i: (-used[candidates[i]] * (len(split[candidates[i]]) - 1), i))
    new = [candidates[i] for i in sorted(order[:n])]
    pieces = [split[s] for s in new]
    for s in new:
        piece = proto.pieces.add()
        piece.piece, piece.score = s, 0.0  # Chinese-LLaMA's merge_tokenizers.py: new pieces score 0
    return proto.SerializeToString(), new, pieces


# ---------------------------------------------------------------- the embedding


def grow_embeddings(state_dict: Dict[str, torch.Tensor], config: Config, first: int,
                    pieces: List[List[int]]) -> Tuple[Dict[str, torch.Tensor], Config]:
    """The weights and config with len(pieces) new rows from row `first` on, the vocabulary padded
    to the config's multiple again; every other row as it was.

    A new row is the mean of the rows of the old tokens its text was split into. The model then
    reads a new token as roughly what it read for its pieces, and (through the head) gives it about
    the pieces' average logit: neither a token it ignores nor one that takes over the softmax, as a
    random row (or, for a tied head, the mean of all rows, which says nothing about the text) could."""
    vocab = first + len(pieces)
    m = config.padding_multiple
    padded = max(config.padded_vocab_size, m * math.ceil(vocab / m))
    new_config = replace(config, vocab_size=vocab, padded_vocab_size=padded)
    out = dict(state_dict)
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key not in state_dict:
            continue
        w = state_dict[key]
        grown = torch.zeros(padded, w.shape[1], dtype=w.dtype)
        grown[: w.shape[0]] = w
        for i, ids in enumerate(pieces):
            rows = w[ids] if ids else w[:first]  # (no pieces: a text the old tokenizer drops; all rows' mean)
            grown[first + i] = rows.float().mean(0).to(w.dtype)
        out[key] = grown
    return out, new_config


# ---------------------------------------------------------------- a checkpoint directory


def check_extension_input(checkpoint_dir: Path, num_new_tokens: int, output_dir: Path) -> None:
    if num_new_tokens <= 0:
        raise UserError(f"--num_new_tokens must be at least 1, got {num_new_tokens}")
    validate_checkpoint_dir(checkpoint_dir)
    if Path(output_dir).exists():
        raise UserError(f"--output_dir {output_dir} already exists; name a new folder (the base stays as it is)")


def extend_checkpoint(checkpoint_dir: Path, corpus: Path, num_new_tokens: int, output_dir: Path) -> Extension:
    """Write `output_dir`, an ordinary checkpoint directory (atomically: nothing appears on an
    error), whose tokenizer and embedding have `num_new_tokens` tokens learned from `corpus` added."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    check_extension_input(checkpoint_dir, num_new_tokens, output_dir)
    config, quantization = read_checkpoint_config(checkpoint_dir)
    if quantization is not None:
        raise UserError(f"{checkpoint_dir} holds quantized weights; extend the float checkpoint it was made from")
    sentencepiece = (checkpoint_dir / "tokenizer.model").is_file()
    if sentencepiece:
        first = len(_sp_proto((checkpoint_dir / "tokenizer.model").read_bytes()).pieces)
    else:
        first = _json_size(checkpoint_dir / "tokenizer.json")
    if first != config.vocab_size:
        # rows past the tokenizer's last id (reserved tokens) would be given to new tokens; ids past
        # the model's rows have no embedding
        raise UserError(f"the tokenizer of {checkpoint_dir} has {first} tokens, the model {config.vocab_size} "
                        f"vocabulary rows: only a tokenizer and model of one size can be extended")
    texts = corpus_texts(corpus)
    if sentencepiece:
        new_file, new_tokens, pieces = extend_sentencepiece(checkpoint_dir / "tokenizer.model", texts, num_new_tokens)
        name, drop = "tokenizer.model", "tokenizer.json"
    else:
        data, new_tokens, pieces = extend_tokenizer_json(checkpoint_dir / "tokenizer.json", texts, num_new_tokens)
        new_file = json.dumps(data, ensure_ascii=False, indent=1).encode("utf-8")
        name, drop = "tokenizer.json", "tokenizer.model"
    state_dict, new_config = grow_embeddings(load_state_dict(checkpoint_dir), config, first, pieces)
    with torch.device("meta"):
        shell = LLaMA(new_config)  # only its config is written: the weights are `state_dict`
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.tokenizer-", dir=output_dir.parent) as tmp:
        tmp = Path(tmp)
        copy_tokenizer_files(checkpoint_dir, tmp)
        if (tmp / drop).exists():
            os.remove(tmp / drop)
        (tmp / name).write_bytes(new_file)
        save_checkpoint(output_dir, shell, tmp, state_dict=state_dict)
    return Extension(new_tokens, first, pieces, new_config)
