"""Weights and tokenizer in from llama.cpp's legacy LLaMA files, the formats before GGUF (TheBloke's
`*.ggmlv3.q4_0.bin` and older), checked against github.com/ggerganov/llama.cpp's history.

One frame in every version (llama.cpp's loader, llama.cpp at 6381d4e11^): a uint32 magic, a uint32
version (not in `ggml`), seven int32 hparams (n_vocab, n_embd, n_mult, n_head, n_layer, n_rot,
ftype), n_vocab tokens (uint32 length, the bytes, a float32 score except in `ggml`), then tensors up
to the end of the file: int32 n_dims, name length and type id, n_dims int32 sizes (fastest first),
the name, in `ggjt` zero padding up to a file offset that is a multiple of 32, the data.
  ggml     26c084662 (Mar 10 2023)  no token scores
  ggmf v1  074bea2eb (Mar 20)       token scores
  ggjt v1  78ca9838e (Mar 29)       tensor data aligned to 32 bytes (for mmap)
  ggjt v2  b9fd7eee5 (May 12)       new nibble order in Q4_x, Q5_x (#1405)
  ggjt v3  2d5db4837 (May 19)       float16 scales in Q4_0, Q4_1, Q8_0 (#1508); GGUF kept these blocks
Blocks of 32 values (ggml.c's block_q*): Q4_0 {d, qs[16]} (q-8)*d; Q4_1 {d, m, qs[16]} q*d+m;
Q5_0 {f16 d, u32 qh, qs[16]} (q-16)*d; Q5_1 {f16 d, f16 m, u32 qh, qs[16]} q*d+m; Q8_0 {d, i8 qs[32]}.
d and m of Q4_x and Q8_0 are float32 before ggjt v3. Before ggjt v2 byte k of qs holds values 2k (low
nibble) and 2k+1, from it k and k+16; bit i of qh is value i's fifth bit. Q5_x (type 6, 7) and Q8_0
(8) appeared in ggjt v1's time (April 2023); Q8_0 was type 6 for a day (7a32fcb3b), recognised by
the header's ftype 7. Q4_2 / Q4_3 (ggjt v1) and the K-quants (ggjt v3) are rejected; files quantized
on Mar 10, before 007a8f6f4 put each block's scale beside its nibbles, cannot be told apart.

The files keep no norm eps, context length or key/value heads: n_query_groups comes from wk's rows,
intermediate_size from w1's (checked against n_mult as llama.cpp computed n_ff). eps is 1e-6, what
ggml.c's RMSNorm used for LLaMA (22213a17b until 41c674161 made it a flag), with a 2048 context;
with grouped-query attention (only Llama 2 70B had it then) 1e-5 and 4096. n_rot is ignored, as
llama.cpp did from 70bc0b8b1 on (the first hours' files say 64). Tokens were written as text by
llama.cpp's convert scripts ('▁' as ' ', a byte piece as the byte, <unk> as ' ⁇ ', control pieces
empty; before 2a20f48ef bytes >= 0x80 as U+FFFD) and become SentencePiece pieces again as in
convert-llama-ggml-to-gguf.py (ea2c85d5d).
"""

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import gguf
import numpy as np
import torch

from lit_llama.io.convert import META_NAMES, ROLES, lit_tensors, parse_dtype, record_template, source_shapes, write_checkpoint
from lit_llama.io.gguf import write_gguf_tokenizer
from lit_llama.model import Config
from lit_llama.templates import check_template_name
from lit_llama.utils import UserError

MAGICS = {0x67676D6C: "ggml", 0x67676D66: "ggmf", 0x67676A74: "ggjt"}
VERSIONS = ["ggml", "ggmf v1", "ggjt v1", "ggjt v2", "ggjt v3"]  # oldest first: an index is an era
GGMF_V1, GGJT_V1, GGJT_V2, GGJT_V3 = 1, 2, 3, 4
TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0"}
OTHER_TYPES = {4: "Q4_2", 5: "Q4_3", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K"}


@dataclass
class GGMLTensor:
    name: str
    type: str  # F32, F16, Q4_0, ...
    shape: Tuple[int, ...]  # torch order (rows, columns)
    offset: int  # of the data in the file
    data: np.ndarray  # its bytes: a view into the file's memory map, read only when used
    layout: object  # "plain", "gguf" (today's blocks) or (scale dtype, interleaved nibbles)


@dataclass
class GGMLFile:
    path: Path
    version: str  # one of VERSIONS
    hparams: Dict[str, int]
    tokens: List[bytes]
    scores: Optional[List[float]]  # None in unversioned `ggml` files
    tensors: Dict[str, GGMLTensor] = field(default_factory=dict)


def is_legacy_ggml(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and struct.unpack("<I", head)[0] in MAGICS


def block_layout(era: int, kind: str):
    """How `kind`'s blocks are stored in files of `era`; None where the type did not exist yet."""
    if kind in ("F32", "F16"):
        return "plain"
    if kind in ("Q5_0", "Q5_1", "Q8_0") and era < GGJT_V1:
        return None
    if era == GGJT_V3 or (era == GGJT_V2 and kind.startswith("Q5")):
        return "gguf"
    return ("<f2" if kind.startswith("Q5") else "<f4"), era < GGJT_V2


def _block_dtype(kind: str, scale: str) -> np.dtype:
    if kind == "Q8_0":
        return np.dtype([("d", scale), ("qs", "i1", 32)])
    fields = [("d", scale)] + [("m", scale)] * kind.endswith("_1") + [("qh", "<u4")] * kind.startswith("Q5")
    return np.dtype(fields + [("qs", "u1", 16)])


def _nbytes(kind: str, layout, n: int) -> int:
    if layout == "plain":
        return n * (4 if kind == "F32" else 2)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return n // block * (size if layout == "gguf" else _block_dtype(kind, layout[0]).itemsize)


class _Reader:
    def __init__(self, path: Path):
        self.path, self.pos = path, 0
        self.size = path.stat().st_size
        # a memoryview of the map: slicing it costs nothing and reads nothing
        self.buf = memoryview(np.memmap(path, dtype=np.uint8, mode="r") if self.size else b"")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise UserError(f"{self.path} is truncated: {what} runs past the end of the file ({self.size} bytes)")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def ints(self, n: int, what: str, fmt: str = "i") -> Tuple[int, ...]:
        return struct.unpack(f"<{n}{fmt}", self.take(4 * n, what))


def read_ggml(path: Path) -> GGMLFile:
    """The header, vocabulary and tensor table of a legacy file; tensor data stays on disk."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGML file {path} does not exist")
    r = _Reader(path)
    if r.size < 4 or struct.unpack("<I", r.buf[:4])[0] not in MAGICS:
        raise UserError(f"{path} is not a GGML file (its first bytes are {bytes(r.buf[:4])!r}, not ggml, ggmf or ggjt)")
    magic = MAGICS[r.ints(1, "the magic", "I")[0]]
    version = f"{magic} v{r.ints(1, 'the version', 'I')[0]}" if magic != "ggml" else "ggml"
    if version not in VERSIONS:
        raise UserError(f"{path}: {version} files are not supported (known: {', '.join(VERSIONS)})")
    era = VERSIONS.index(version)
    names = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
    hp = dict(zip(names, r.ints(7, "the hyperparameters")))
    if min(hp[k] for k in names[:5]) < 1 or hp["n_vocab"] > 10_000_000:
        raise UserError(f"{path}: implausible hyperparameters {hp}: damaged or not a LLaMA file")
    tokens, scores = [], ([] if era >= GGMF_V1 else None)
    for i in range(hp["n_vocab"]):
        tokens.append(bytes(r.take(r.ints(1, f"token {i}", "I")[0], f"token {i}")))
        if scores is not None:
            scores.append(r.ints(1, f"token {i}'s score", "f")[0])
    out = GGMLFile(path, version, hp, tokens, scores)
    while r.pos < r.size:
        n_dims, name_len, type_id = r.ints(3, "a tensor header")
        if not 1 <= n_dims <= 2 or not 0 < name_len < 4096:
            raise UserError(f"{path}: a tensor header at byte {r.pos - 12} is damaged ({n_dims} dims, name of {name_len} bytes)")
        dims = r.ints(n_dims, "a tensor header")
        if min(dims) < 1:
            raise UserError(f"{path}: a tensor header at byte {r.pos - 12 - 4 * n_dims} is damaged (sizes {dims})")
        name = bytes(r.take(name_len, "a tensor name")).decode("utf-8", "replace")
        kind = "Q8_0" if (era, type_id, hp["ftype"]) == (GGJT_V1, 6, 7) else TYPES.get(type_id)
        if kind is None:
            raise UserError(f"{path}: tensor {name!r} has type {OTHER_TYPES.get(type_id, f'id {type_id}')}, which "
                            f"cannot be read (supported: {', '.join(TYPES.values())})")
        layout = block_layout(era, kind)
        if layout is None:
            raise UserError(f"{path}: tensor {name!r} has type {kind}, which did not exist in {version} files: damaged file")
        if layout != "plain" and dims[0] % 32:
            raise UserError(f"{path}: tensor {name!r} has rows of {dims[0]}, not a multiple of {kind}'s blocks of 32")
        if era >= GGJT_V1:
            r.take(-r.pos % 32, f"tensor {name!r}'s padding")
        data = np.frombuffer(r.take(_nbytes(kind, layout, math.prod(dims)), f"tensor {name!r}"), np.uint8)
        out.tensors[name] = GGMLTensor(name, kind, tuple(reversed(dims)), r.pos - len(data), data, layout)
    return out


def dequantize(t: GGMLTensor) -> torch.Tensor:
    if t.layout == "plain":
        a = t.data.view(np.float32 if t.type == "F32" else np.float16).astype(np.float32)
    elif t.layout == "gguf":
        a = gguf.quants.dequantize(t.data.reshape(math.prod(t.shape[:-1]), -1), gguf.GGMLQuantizationType[t.type])
    else:
        a = _dequantize_old(t.data, t.type, *t.layout)
    return torch.from_numpy(np.array(a, dtype=np.float32).reshape(t.shape))  # a copy: the map is read-only


def _dequantize_old(raw: np.ndarray, kind: str, scale: str, interleaved: bool) -> np.ndarray:
    blocks = raw.view(_block_dtype(kind, scale))
    out = np.empty((len(blocks), 32), np.float32)
    step = 1 << 16  # blocks at a time: bounds the temporaries of a 65B model's largest tensor
    for s in range(0, len(blocks), step):
        b = blocks[s:s + step]
        d = b["d"].astype(np.float32)[:, None]
        if kind == "Q8_0":
            out[s:s + step] = b["qs"].astype(np.float32) * d
            continue
        lo, hi = b["qs"] & 15, b["qs"] >> 4
        q = (np.stack([lo, hi], -1) if interleaved else np.concatenate([lo, hi], -1)).reshape(-1, 32)
        if kind.startswith("Q5"):
            q = q | (((b["qh"][:, None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
        q = q.astype(np.float32)  # float32 arithmetic throughout, as ggml.c's dequantize_row_q*
        if kind.endswith("_1"):
            out[s:s + step] = q * d + b["m"].astype(np.float32)[:, None]
        else:
            out[s:s + step] = (q - (16 if kind.startswith("Q5") else 8)) * d
    return out


# ---------------------------------------------------------------- config and vocabulary


def ggml_config(f: GGMLFile, name: str) -> Config:
    """The model config from the hparams and the tensors' shapes, each shape checked before any
    weight is read."""
    hp, t = f.hparams, f.tensors
    expected = [META_NAMES[k] for k in ("wte", "ln_f", "lm_head")]
    expected += [META_NAMES[r].format(i=i) for i in range(hp["n_layer"]) for r in ROLES]
    missing = [n for n in expected if n not in t]
    if missing:
        raise UserError(f"{f.path} has no tensor {missing[0]!r} ({len(missing)} missing): incomplete or not a LLaMA model")
    n_embd, n_head, n_mult = hp["n_embd"], hp["n_head"], hp["n_mult"]
    hs = n_embd // n_head
    kv_rows, n_ff = t[META_NAMES["k"].format(i=0)].shape[0], t[META_NAMES["gate"].format(i=0)].shape[0]
    if n_embd % n_head or kv_rows % hs or n_head % max(1, kv_rows // hs) or kv_rows == 0:
        raise UserError(f"{f.path}: n_embd {n_embd}, n_head {n_head} and wk's {kv_rows} rows do not divide each other")
    gqa = kv_rows // hs < n_head  # only Llama 2 70B had grouped-query attention before GGUF
    # llama.cpp's n_ff: 2/3 of 4 * n_embd rounded up to n_mult, for the 70B scaled by 1.3 first
    h = 8 * n_embd // 3
    allowed = {n_mult * math.ceil(m / n_mult) for m in ([h, int(1.3 * h)] if gqa else [h])}
    if n_ff not in allowed:
        raise UserError(f"{f.path}: w1 has {n_ff} rows, but n_embd {n_embd} and n_mult {n_mult} give "
                        f"{' or '.join(map(str, sorted(allowed)))}: hyperparameters and tensors disagree")
    try:
        config = Config(name=name, block_size=4096 if gqa else 2048, vocab_size=hp["n_vocab"], n_layer=hp["n_layer"],
                        n_head=n_head, n_embd=n_embd, n_query_groups=kv_rows // hs, intermediate_size=n_ff,
                        rope_base=10000.0, norm_eps=1e-5 if gqa else 1e-6)
    except ValueError as e:
        raise UserError(f"{f.path}: {e}")
    shapes = {**source_shapes(config), "wte": (hp["n_vocab"], n_embd), "lm_head": (hp["n_vocab"], n_embd)}
    for role, shape in shapes.items():
        for i in range(hp["n_layer"] if role in ROLES else 1):
            name = META_NAMES[role].format(i=i)
            if t[name].shape != shape:
                raise UserError(f"{f.path}: tensor {name!r} has shape {t[name].shape}, the hyperparameters need {shape} "
                                "(a part of a multi-part model, or a damaged file?)")
    return config


def ggml_vocab(f: GGMLFile) -> dict:
    """The vocabulary as GGUF metadata (SentencePiece pieces, scores, piece types) for write_gguf_tokenizer."""
    toks, fffd = f.tokens, "\ufffd".encode()
    # LLaMA's byte pieces <0x00>..<0xFF> are ids 3..258, stored as the byte (or, early on, U+FFFD)
    byte_pieces = len(toks) >= 259 and all(toks[i] == bytes([i - 3]) or (i >= 131 and toks[i] == fffd) for i in range(3, 259))
    pieces, types = [], []
    for i, tok in enumerate(toks):
        if i < 3:
            piece, kind = ("<unk>", "<s>", "</s>")[i], (2, 3, 3)[i]
        elif byte_pieces and i < 259:
            piece, kind = f"<0x{i - 3:02X}>", 6
        elif not tok:
            piece, kind = f"<control_{i}>", 3  # SentencePiece wants no empty piece
        else:
            try:
                piece, kind = tok.decode("utf-8").replace(" ", "\u2581"), 1
            except UnicodeDecodeError:
                raise UserError(f"{f.path}: token {i} ({tok!r}) is not UTF-8 text")
        pieces.append(piece)
        types.append(kind)
    if len(set(pieces)) != len(pieces):
        raise UserError(f"{f.path}: the vocabulary has the token {next(p for p in pieces if pieces.count(p) > 1)!r} twice")
    # unversioned files keep no scores; SentencePiece's BPE trainer numbers pieces in merge order
    # and scores them minus their rank, so -id restores the order of the merges
    scores = f.scores if f.scores is not None else [-float(i) for i in range(len(toks))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def convert_ggml_checkpoint(ggml_path: Path, output_dir: Path, dtype: Optional[str] = None,
                            template: Optional[str] = None) -> None:
    """A legacy GGML file (ggml, ggmf v1, ggjt v1-v3) into a checkpoint directory; the files carry no
    chat template: `template` records a built-in one's name (lit_template.json)."""
    if template is not None:
        check_template_name(template)
    torch_dtype = parse_dtype(dtype)
    f = read_ggml(ggml_path)
    config = ggml_config(f, Path(output_dir).name)
    meta = ggml_vocab(f)
    # keep half-precision files in half precision; quantized ones dequantize to float32
    default = torch.float16 if f.tensors[META_NAMES["q"].format(i=0)].type == "F16" else torch.float32
    tensors = lit_tensors(config, lambda name: dequantize(f.tensors[name]), META_NAMES, interleaved_rope=True,
                          dtype=torch_dtype or default)
    write_checkpoint(output_dir, config, tensors,
                     lambda tmp: (write_gguf_tokenizer(meta, tmp), record_template(tmp, template)))
