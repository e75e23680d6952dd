"""Meta's Llama 3 `tokenizer.model`, a tiktoken BPE file, as a Hugging Face `tokenizer.json`.

The file lists every token's bytes (base64) and its rank; the rank is the token's id and the order
in which byte-pair encoding merges: tiktoken joins, within each piece that the split pattern cuts,
the adjacent pair whose concatenation has the lowest rank until none is in the vocabulary. A BPE
`tokenizer.json` does the same given one merge per way of writing each token as two lower-ranked
tokens, ordered by the token's rank, and `ignore_merges` (a piece that is a token is that token, as
in tiktoken). The 256 special tokens (`<|begin_of_text|>`, `<|eot_id|>`, ...) follow the ranks.
"""

import base64
import binascii
from pathlib import Path
from typing import Dict, List

from lit_llama.utils import UserError

# Llama 3's split pattern (Meta's tokenizer.py): contractions, letters with one leading non-letter,
# numbers of up to 3 digits, punctuation runs, newlines, other whitespace
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# the special tokens of Llama 3.1 and later, ids 128000.. (3.0 named 128004, 128005, 128008, 128010
# reserved tokens instead; the ones that mean something have the same ids in both)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
# generation stops at the end of text, of a message (tool call) and of a turn
LLAMA3_STOP = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]


def is_tiktoken_file(path: Path) -> bool:
    """Whether `path` starts like a tiktoken BPE file (a SentencePiece model is a binary protobuf)."""
    with open(path, "rb") as f:
        first = f.readline(512)
    parts = first.split()
    return len(parts) == 2 and parts[1].isdigit() and _b64(parts[0]) is not None


def _b64(text: bytes):
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def read_tiktoken_ranks(path: Path) -> Dict[bytes, int]:
    """{token bytes: rank} of a tiktoken file; ranks must be 0..n-1 once each (Llama 3's are)."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            token = _b64(parts[0]) if len(parts) == 2 and parts[1].isdigit() else None
            if token is None:
                raise UserError(f"{path} is not a tiktoken BPE file: line {n} is not '<base64 token> <rank>'")
            ranks[token] = int(parts[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: the ranks of its {len(ranks)} tokens are not 0..{len(ranks) - 1}, once each")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{path} lacks some of the 256 single-byte tokens: not a byte-level BPE file")
    return ranks


def byte_to_unicode() -> Dict[int, str]:
    """GPT-2's printable stand-in for each byte, as byte-level tokenizer.json files spell tokens:
    printable Latin-1 bytes stand for themselves, the others for code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def merges_of(ranks: Dict[bytes, int]) -> List[tuple]:
    """Every (left, right) pair of lower-ranked tokens that joins into a token, ordered by that
    token's rank, then by the ranks of its parts."""
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = [(a, b) for a, b in pairs if ranks.get(a, rank) < rank and ranks.get(b, rank) < rank]
        merges += sorted(((rank, ranks[a], ranks[b]), a, b) for a, b in pairs)
    return [(a, b) for _, a, b in sorted(merges)]


def tokenizer_json(ranks: Dict[bytes, int], special: List[str], pattern: str = LLAMA3_PATTERN) -> dict:
    """A tokenizer.json (as a dict) that encodes as tiktoken with these ranks, pattern and special
    tokens (ids from len(ranks) on) does."""
    u = byte_to_unicode()
    spell = lambda token: "".join(u[b] for b in token)
    first = len(ranks)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": first + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in enumerate(special)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {spell(t): r for t, r in ranks.items()},
                  "merges": [[spell(a), spell(b)] for a, b in merges_of(ranks)]},
    }


def llama3_special_tokens(count: int) -> List[str]:
    """Llama 3's `count` special tokens (256): the named ones, then reserved ones to fill."""
    named = LLAMA3_SPECIAL[:count]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + count - len(named))]
