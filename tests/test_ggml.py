"""Legacy GGML files in (lit_llama/io/ggml.py): ggml, ggmf v1, ggjt v1, v2 and v3.

The test writes tiny LLaMA files of every version with its own writer, from the layout that
llama.cpp's loader read (llama.cpp before GGUF, 6381d4e11^) and its convert scripts wrote. Quantized
blocks come from the `gguf` package's quantizer, which writes ggjt v3's blocks (GGUF kept them); for
the older versions the test rewrites those blocks the way ggml.c stored them then (float32 scales
before ggjt v3, nibbles of values 2k and 2k+1 in byte k before ggjt v2), so the expected weights are
the gguf package's own dequantization of the v3 blocks, exactly: a misread scale, nibble order or
fifth bit shows up as a wrong weight. Q and K rows are written in Meta's interleaved order by a
permutation written here; the tokenizer is compared with the SentencePiece model it came from."""

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as QT

from lit_llama.io.checkpoint import load_config, load_state_dict
from lit_llama.io.ggml import convert_ggml_checkpoint, is_legacy_ggml, read_ggml
from lit_llama.templates import recorded_template_name
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError

from conftest import run_script
# the same tiny SentencePiece model and rotary permutation as the GGUF tests
from test_convert_gguf import halves_to_interleaved, spm_model, spm_processor  # noqa: F401 (a fixture)

N_LAYER, N_EMBD, N_HEAD, VOCAB = 2, 64, 4, 400  # every row a multiple of 32 (one quant block)
HEAD = N_EMBD // N_HEAD
# name: (key/value heads, n_mult, intermediate size). llama.cpp's n_ff rounds 2/3 * 4 * 64 = 170 up
# to n_mult (192 for 32); for a grouped-query (Llama 2 70B) file it scales by 1.3 first (221 -> 256)
CASES = {"mha": (4, 32, 192), "gqa": (2, 64, 256)}
# version: (magic, version field or None), in the order llama.cpp introduced them
VERSIONS = {"ggml": (0x67676D6C, None), "ggmf1": (0x67676D66, 1), "ggjt1": (0x67676A74, 1),
            "ggjt2": (0x67676A74, 2), "ggjt3": (0x67676A74, 3)}
OLD = ("ggml", "ggmf1", "ggjt1")  # before ggml.c's "remove bit shuffling" (#1405, ggjt v2)
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8}  # ggml.h's ggml_type
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}  # llama.h's llama_ftype
# Q5_0, Q5_1 and Q8_0 were added in April 2023, when llama.cpp wrote ggjt v1
EXISTED = {v: ("F32", "F16", "Q4_0", "Q4_1") + (() if v in ("ggml", "ggmf1") else ("Q5_0", "Q5_1", "Q8_0"))
           for v in VERSIONS}
SAMPLES = ["Hello, world!", "The  quick brown fox\njumps over\n\n the lazy dog.", "café 東京",
           "  leading spaces and trailing ", "def f(x):\n    return x ** 2  # ok?",
           # merged in an order that only the scores (or the ids' order) tell: all-equal scores split these otherwise
           "a statement", "each key object is used as a key into the dictionary to store the"]


# ---------------------------------------------------------------- writing legacy files


def legacy_vocab(spm: bytes, early: bool = False):
    """(token bytes, scores) as llama.cpp's convert-pth-to-ggml.py (from 2a20f48ef) and convert.py
    wrote them: '▁' as a space, byte pieces as the byte, <unk> as ' ⁇ ', control pieces empty.
    `early`: as its first version (26c084662) did, the text of '.' and the piece decoded, less the '.'."""
    sp = spm_processor(spm)
    tokens = []
    for i in range(sp.vocab_size()):
        if early:
            tokens.append(sp.decode([sp.piece_to_id("."), i]).encode()[1:])
        elif sp.is_unknown(i):
            tokens.append(" \u2047 ".encode())
        elif sp.is_control(i):
            tokens.append(b"")
        elif sp.is_byte(i):
            tokens.append(bytes([int(sp.id_to_piece(i)[3:-1], 16)]))
        else:
            tokens.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
    return tokens, [sp.get_score(i) for i in range(sp.vocab_size())]


def source_weights(case: str, seed: int = 0) -> dict:
    """Random float weights by Meta's names, q and k in Meta's interleaved layout."""
    n_kv, _, ffn = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: 0.3 * torch.randn(*shape, generator=g)
    norm = lambda: 1 + 0.3 * torch.randn(N_EMBD, generator=g)
    w = {"tok_embeddings.weight": rnd(VOCAB, N_EMBD), "norm.weight": norm(), "output.weight": rnd(VOCAB, N_EMBD)}
    for i in range(N_LAYER):
        p = f"layers.{i}."
        w.update({p + "attention_norm.weight": norm(), p + "ffn_norm.weight": norm(),
                  p + "attention.wq.weight": halves_to_interleaved(rnd(N_EMBD, N_EMBD), N_HEAD),
                  p + "attention.wk.weight": halves_to_interleaved(rnd(n_kv * HEAD, N_EMBD), n_kv),
                  p + "attention.wv.weight": rnd(n_kv * HEAD, N_EMBD), p + "attention.wo.weight": rnd(N_EMBD, N_EMBD),
                  p + "feed_forward.w1.weight": rnd(ffn, N_EMBD), p + "feed_forward.w2.weight": rnd(N_EMBD, ffn),
                  p + "feed_forward.w3.weight": rnd(ffn, N_EMBD)})
    return {k: v.numpy().astype(np.float32) for k, v in w.items()}


def legacy_blocks(blocks: np.ndarray, qtype: str, version: str) -> np.ndarray:
    """gguf's (= ggjt v3's) blocks of `qtype` rewritten as `version` stored them (ggml.c's block_q*):
    float32 scales for Q4_0, Q4_1 and Q8_0 before ggjt v3 (Q5_x kept float16); before ggjt v2 byte k
    of qs held values 2k (low nibble) and 2k+1 (high) instead of k and k+16."""
    rows = blocks.shape[0]
    b = blocks.reshape(-1, gguf.GGML_QUANT_SIZES[QT[qtype]][1])
    n_scales = 2 if qtype in ("Q4_1", "Q5_1") else 1
    scales, rest = b[:, :2 * n_scales], b[:, 2 * n_scales:]
    if version != "ggjt3" and not qtype.startswith("Q5"):
        scales = np.ascontiguousarray(scales).view("<f2").astype("<f4").view(np.uint8)
    if version in OLD and qtype != "Q8_0":
        qs = rest[:, -16:]
        values = np.concatenate([qs & 15, qs >> 4], axis=1)  # v3: value j < 16 low nibble, j + 16 high
        rest = np.concatenate([rest[:, :-16], values[:, 0::2] | (values[:, 1::2] << 4)], axis=1)
    return np.concatenate([scales, rest], axis=1).reshape(rows, -1)


def encode(a: np.ndarray, qtype: str, version: str):
    """(the bytes `version` stores for `a` as `qtype`, the float32 values they stand for)."""
    if qtype == "F32":
        return a, a
    if qtype == "F16":
        return a.astype(np.float16), a.astype(np.float16).astype(np.float32)
    blocks = gguf.quants.quantize(a, QT[qtype])
    return legacy_blocks(blocks, qtype, version), gguf.quants.dequantize(blocks, QT[qtype])


def write_legacy(path: Path, version: str, tensors, tokens, scores, hparams: dict):
    """A legacy file: magic, [version], 7 int32 hparams, the vocabulary, then per tensor int32 n_dims,
    name length, type, the sizes fastest first, the name, [ggjt: padding to 32 bytes], the data.
    `tensors`: (name, type id, shape in torch order, data). Returns where each tensor header starts."""
    magic, ver = VERSIONS[version]
    out = bytearray(struct.pack("<I", magic) + (struct.pack("<I", ver) if ver is not None else b""))
    out += struct.pack("<7i", *(hparams[k] for k in ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")))
    for tok, score in zip(tokens, scores):
        out += struct.pack("<I", len(tok)) + tok + (struct.pack("<f", score) if version != "ggml" else b"")
    starts = []
    for name, type_id, shape, data in tensors:
        starts.append(len(out))
        out += struct.pack(f"<3i{len(shape)}i", len(shape), len(name), type_id, *reversed(shape)) + name.encode()
        if magic == 0x67676A74:
            out += bytes(-len(out) % 32)
        out += np.ascontiguousarray(data).tobytes()
    path.write_bytes(bytes(out))
    return starts


def build(path: Path, version: str, qtype: str, spm: bytes, case: str = "mha", hparams=None, type_ids=None,
          early_vocab: bool = False, drop=()):
    """Write a legacy file of the case's weights, 2-D tensors as `qtype` and norms as F32 (as llama.cpp's
    quantize did). Returns (the expected float32 values by Meta name, tensor header offsets)."""
    n_kv, n_mult, _ = CASES[case]
    tokens, scores = legacy_vocab(spm, early_vocab)
    hp = {"n_vocab": VOCAB, "n_embd": N_EMBD, "n_mult": n_mult, "n_head": N_HEAD, "n_layer": N_LAYER,
          "n_rot": HEAD, "ftype": FTYPES[qtype], **(hparams or {})}
    tensors, expected = [], {}
    for name, a in source_weights(case).items():
        if name in drop:
            continue
        t = qtype if a.ndim == 2 else "F32"
        raw, expected[name] = encode(a, t, version)
        tensors.append((name, (type_ids or {}).get(t, TYPE_IDS[t]), a.shape, raw))
    return expected, write_legacy(path, version, tensors, tokens, scores, hp)


@pytest.fixture(scope="module")
def convert(spm_model, tmp_path_factory):
    """convert(version, qtype, case) -> (expected values, checkpoint dir), once per module each."""
    done = {}

    def run(version: str, qtype: str, case: str = "mha"):
        if (version, qtype, case) not in done:
            root = tmp_path_factory.mktemp(f"{version}-{qtype}-{case}")
            expected, _ = build(root / "model.bin", version, qtype, spm_model, case)
            convert_ggml_checkpoint(root / "model.bin", root / "lit")
            done[version, qtype, case] = expected, root / "lit"
        return done[version, qtype, case]

    return run


COMBOS = [(v, t) for v in VERSIONS for t in EXISTED[v]]


# ---------------------------------------------------------------- weights and config


def check_weights(sd: dict, expected: dict, n_kv: int) -> None:
    """Our state dict against the file's values, exactly (in the checkpoint's dtype: an F16 file's
    F32 norms become float16): q and k permuted back to Meta's order by the test's own permutation;
    the embedding and head padded to 448 rows with zeros."""
    def same(got: torch.Tensor, want: np.ndarray, name: str):
        torch.testing.assert_close(got, torch.from_numpy(want).to(got.dtype), rtol=0, atol=0, msg=name)

    for i in range(N_LAYER):
        m, p = f"layers.{i}.", f"transformer.h.{i}."
        q, k, v = sd[p + "attn.c_attn.weight"].split([N_EMBD, n_kv * HEAD, n_kv * HEAD])
        pairs = {"attention.wq.weight": halves_to_interleaved(q, N_HEAD), "attention.wk.weight": halves_to_interleaved(k, n_kv),
                 "attention.wv.weight": v, "attention.wo.weight": sd[p + "attn.c_proj.weight"],
                 "feed_forward.w1.weight": sd[p + "mlp.c_fc1.weight"], "feed_forward.w3.weight": sd[p + "mlp.c_fc2.weight"],
                 "feed_forward.w2.weight": sd[p + "mlp.c_proj.weight"], "attention_norm.weight": sd[p + "rms_1.weight"],
                 "ffn_norm.weight": sd[p + "rms_2.weight"]}
        for name, got in pairs.items():
            same(got, expected[m + name], m + name)
    for ours, meta in (("transformer.wte.weight", "tok_embeddings.weight"), ("lm_head.weight", "output.weight")):
        assert sd[ours].shape == (448, N_EMBD)
        assert not sd[ours][VOCAB:].any(), f"{ours}: padding rows not zero"
        same(sd[ours][:VOCAB], expected[meta], ours)
    same(sd["transformer.ln_f.weight"], expected["norm.weight"], "norm.weight")


@pytest.mark.parametrize("version,qtype", COMBOS)
def test_weights_equal_the_files_values(convert, version, qtype):
    expected, out = convert(version, qtype)
    sd = load_state_dict(out)
    assert len(sd) == 3 + 7 * N_LAYER
    # F16 files stay float16 (exactly the file's values); quantized ones dequantize to float32
    assert {t.dtype for t in sd.values()} == {torch.float16 if qtype == "F16" else torch.float32}
    check_weights(sd, expected, CASES["mha"][0])


def test_quantized_values_are_close_to_the_source():
    """Guards the comparison above: the expected values are a real quantization of the weights, and
    reading v1 blocks as v3's (nibble order and scale width) would be far off."""
    a = source_weights("mha")["layers.0.feed_forward.w1.weight"]
    for qtype, bound in (("Q4_0", 0.2), ("Q4_1", 0.1), ("Q5_0", 0.06), ("Q5_1", 0.04), ("Q8_0", 0.01)):
        raw, values = encode(a, qtype, "ggjt3")
        assert np.abs(values - a).max() < bound, qtype
        old = legacy_blocks(raw, qtype, "ggjt1")
        if old.shape == raw.shape:  # Q5_x keep float16 scales: only the nibble order moved
            assert np.abs(gguf.quants.dequantize(old, QT[qtype]) - a).max() > 5 * bound, qtype


def ggml_c_block(block: bytes, qtype: str, version: str) -> list:
    """One block decoded with the formulas of ggml.c's scalar dequantize_row_q* of the version's time
    (b9fd7eee5^ for ggjt v1, b9fd7eee5 for v2), in Python floats."""
    if qtype == "Q8_0":  # float d; int8 qs[32]
        return [struct.unpack_from("<f", block)[0] * q for q in struct.unpack_from("<32b", block, 4)]
    n, fmt = (2 if qtype.endswith("_1") else 1), ("e" if qtype.startswith("Q5") else "f")
    dm, pos = struct.unpack_from(f"<{n}{fmt}", block), n * struct.calcsize(fmt)
    qh = struct.unpack_from("<I", block, pos)[0] if qtype.startswith("Q5") else 0
    qs = block[pos + 4 * qtype.startswith("Q5"):]
    out = []
    for j in range(32):
        # before #1405 value j is nibble j % 2 of byte j // 2; after it, nibble j // 16 of byte j % 16
        nib = qs[j // 2] >> 4 * (j % 2) if version in OLD else qs[j % 16] >> 4 * (j // 16)
        q = (nib & 15) | ((qh >> j) & 1) << 4
        out.append(q * dm[0] + dm[1] if n == 2 else (q - (16 if qtype.startswith("Q5") else 8)) * dm[0])
    return out


@pytest.mark.parametrize("version", ["ggjt1", "ggjt2"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_old_blocks_follow_ggml_c(version, qtype):
    """Guards the writer: the old blocks this test makes from gguf's decode, by ggml.c's formulas of
    their time, to gguf's values of the v3 blocks."""
    a = source_weights("mha")["layers.0.attention.wo.weight"][:4]
    raw, values = encode(a, qtype, version)
    flat, n_blocks = raw.tobytes(), a.size // 32
    size = len(flat) // n_blocks
    got = [v for k in range(n_blocks) for v in ggml_c_block(flat[k * size:(k + 1) * size], qtype, version)]
    np.testing.assert_allclose(np.float32(got), values.reshape(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("version,qtype", [("ggjt3", "Q4_0"), ("ggjt3", "F16"), ("ggjt2", "Q5_1"), ("ggjt1", "Q8_0")])
def test_grouped_query_file(convert, version, qtype):
    """A Llama 2 70B-style file: llama.cpp took n_gqa from its command line; we read the key/value
    heads from wk's rows, and n_ff from w1 (n_mult with llama.cpp's 1.3 factor for the 70B)."""
    expected, out = convert(version, qtype, "gqa")
    c = load_config(out)
    assert (c.n_query_groups, c.intermediate_size, c.norm_eps, c.block_size) == (2, 256, 1e-5, 4096)
    check_weights(load_state_dict(out), expected, 2)


@pytest.mark.parametrize("version", list(VERSIONS))
def test_config_from_hparams_and_shapes(convert, version):
    _, out = convert(version, "F32")
    c = load_config(out)
    assert (c.n_layer, c.n_head, c.n_embd, c.n_query_groups, c.intermediate_size) == (N_LAYER, N_HEAD, N_EMBD, N_HEAD, 192)
    assert (c.vocab_size, c.padded_vocab_size, c.block_size) == (VOCAB, 448, 2048)
    # LLaMA's norm eps (params.json 1e-6, what llama.cpp used for these files) and rotary base
    assert c.norm_eps == 1e-6 and c.rope_base == 10000.0 and not c.tie_embeddings


def test_q8_0_under_its_first_type_id(spm_model, tmp_path):
    """For a day (llama.cpp 7a32fcb3b, ggjt v1) Q8_0 was ggml type 6, later Q5_0's id; such files
    say ftype 7 (mostly Q8_0) in their header."""
    expected, _ = build(tmp_path / "m.bin", "ggjt1", "Q8_0", spm_model, type_ids={"Q8_0": 6})
    convert_ggml_checkpoint(tmp_path / "m.bin", tmp_path / "out")
    check_weights(load_state_dict(tmp_path / "out"), expected, N_HEAD)


@pytest.mark.parametrize("version", list(VERSIONS))
def test_read_ggml_table(spm_model, tmp_path, version):
    """The file's table: version, hparams, vocabulary and each tensor's type, shape and data offset."""
    _, starts = build(tmp_path / "m.bin", version, "Q4_1", spm_model)
    f = read_ggml(tmp_path / "m.bin")
    assert f.version == {"ggml": "ggml", "ggmf1": "ggmf v1"}.get(version, f"ggjt v{version[-1]}")
    assert f.hparams == {"n_vocab": VOCAB, "n_embd": N_EMBD, "n_mult": 32, "n_head": N_HEAD, "n_layer": N_LAYER,
                         "n_rot": HEAD, "ftype": 3}
    tokens, scores = legacy_vocab(spm_model)
    assert f.tokens == tokens
    assert f.scores == (None if version == "ggml" else scores)
    weights = source_weights("mha")
    assert list(f.tensors) == list(weights)
    for (name, t), start in zip(f.tensors.items(), starts):
        assert (t.type, t.shape) == ("Q4_1" if weights[name].ndim == 2 else "F32", weights[name].shape)
        header = start + 12 + 4 * len(t.shape) + len(name)  # 3 int32, the sizes, the name
        assert t.offset == ((header + 31) // 32 * 32 if version.startswith("ggjt") else header)
        # Q4_1 blocks: 32 values in 24 bytes (float32 d, m) before ggjt v3, 20 (float16) from it
        assert t.data.nbytes == weights[name].size * (4 if t.type == "F32" else (20 if version == "ggjt3" else 24) / 32)


def test_dtype_and_template(spm_model, tmp_path):
    build(tmp_path / "m.bin", "ggjt3", "Q5_0", spm_model)
    convert_ggml_checkpoint(tmp_path / "m.bin", tmp_path / "out", dtype="bfloat16", template="alpaca")
    assert {t.dtype for t in load_state_dict(tmp_path / "out").values()} == {torch.bfloat16}
    assert recorded_template_name(tmp_path / "out") == "alpaca"
    for kwargs, word in (({"dtype": "float64"}, "dtype"), ({"template": "nonesuch"}, "template")):
        with pytest.raises(UserError, match=word):
            convert_ggml_checkpoint(tmp_path / "m.bin", tmp_path / "out2", **kwargs)
        assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("version,early", [("ggml", False), ("ggml", True), ("ggmf1", False), ("ggjt3", False)],
                         ids=["ggml", "ggml-early-bytes", "ggmf1", "ggjt3"])
def test_tokenizer_round_trip(spm_model, tmp_path, version, early):
    """The rebuilt SentencePiece model tokenizes like the original, also for unversioned files, which
    keep no scores (the trainer's scores are minus the merge rank, so the order of the ids carries them)."""
    import sentencepiece as spm

    build(tmp_path / "m.bin", version, "F32", spm_model, early_vocab=early)
    convert_ggml_checkpoint(tmp_path / "m.bin", tmp_path / "out")
    original = spm_processor(spm_model)
    rebuilt = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert [rebuilt.id_to_piece(i) for i in range(VOCAB)] == [original.id_to_piece(i) for i in range(VOCAB)]
    assert [rebuilt.is_byte(i) for i in range(VOCAB)] == [original.is_byte(i) for i in range(VOCAB)]
    assert any(original.is_byte(i) for i in original.encode("café 東京"))  # byte fallback is exercised
    ours = Tokenizer(tmp_path / "out")
    for text in SAMPLES:
        ids = original.encode(text)
        assert ours.encode(text, bos=False).tolist() == ids, text
        assert ours.encode(text).tolist() == [1] + ids, text
        assert ours.decode(ids) == text, text
    assert (ours.bos_id, ours.eos_id) == (original.bos_id(), original.eos_id()) == (1, 2)


# ---------------------------------------------------------------- bad input


def assert_user_error(path: Path, out: Path, *words: str) -> str:
    with pytest.raises(UserError) as e:
        convert_ggml_checkpoint(path, out)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w.lower() in message.lower(), message
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return message


def test_magic_detection(spm_model, tmp_path):
    for version in VERSIONS:
        build(tmp_path / f"{version}.bin", version, "F32", spm_model)
        assert is_legacy_ggml(tmp_path / f"{version}.bin"), version
    (tmp_path / "gguf.bin").write_bytes(b"GGUF" + bytes(100))
    (tmp_path / "short").write_bytes(b"tj")
    assert not any(is_legacy_ggml(tmp_path / n) for n in ("gguf.bin", "short", "missing"))


@pytest.mark.parametrize("content", [b"GGUF\x03\x00\x00\x00" + bytes(64), b"hello world, not a model", b""],
                         ids=["gguf", "text", "empty"])
def test_not_a_ggml_file(tmp_path, content):
    (tmp_path / "x.bin").write_bytes(content)
    assert_user_error(tmp_path / "x.bin", tmp_path / "out", "x.bin", "not a GGML file")


def test_missing_file(tmp_path):
    assert_user_error(tmp_path / "none.bin", tmp_path / "out", "none.bin", "does not exist")


@pytest.mark.parametrize("magic,version,name", [(0x67676A74, 4, "ggjt v4"), (0x67676D66, 2, "ggmf v2"),
                                                (0x67676A74, 0, "ggjt v0")])
def test_unknown_version(tmp_path, magic, version, name):
    (tmp_path / "x.bin").write_bytes(struct.pack("<II", magic, version) + bytes(64))
    message = assert_user_error(tmp_path / "x.bin", tmp_path / "out", name, "not supported")
    assert all(v in message for v in ("ggml", "ggmf v1", "ggjt v1", "ggjt v2", "ggjt v3")), message


@pytest.mark.parametrize("version", ["ggml", "ggjt1", "ggjt3"])
def test_truncated_file(spm_model, tmp_path, version):
    _, starts = build(tmp_path / "full.bin", version, "Q4_0", spm_model)
    data = (tmp_path / "full.bin").read_bytes()
    # in the hparams, in the vocabulary, in a tensor header, at fractions of the data, one byte short
    cuts = [20, starts[0] // 2, starts[5] + 7] + [int(len(data) * f) for f in (0.3, 0.6, 0.9)] + [len(data) - 1]
    for cut in cuts:
        (tmp_path / "cut.bin").write_bytes(data[:cut])
        assert_user_error(tmp_path / "cut.bin", tmp_path / "out", "cut.bin", "truncated")


@pytest.mark.parametrize("version,type_id,name", [("ggjt1", 4, "Q4_2"), ("ggjt1", 5, "Q4_3"), ("ggjt3", 10, "Q2_K"),
                                                  ("ggjt3", 14, "Q6_K"), ("ggjt3", 99, "id 99")])
def test_unsupported_type(spm_model, tmp_path, version, type_id, name):
    # every matrix in that type: the first one, tok_embeddings, stops the conversion before any output
    build(tmp_path / "m.bin", version, "Q4_0", spm_model, type_ids={"Q4_0": type_id})
    assert_user_error(tmp_path / "m.bin", tmp_path / "out", name, "tok_embeddings.weight")


@pytest.mark.parametrize("version,qtype", [("ggmf1", "Q5_0"), ("ggml", "Q8_0")])
def test_type_that_did_not_exist_in_the_version(spm_model, tmp_path, version, qtype):
    build(tmp_path / "m.bin", version, qtype, spm_model)
    assert_user_error(tmp_path / "m.bin", tmp_path / "out", qtype, "did not exist", version[:4])


def test_missing_tensor(spm_model, tmp_path):
    build(tmp_path / "m.bin", "ggjt3", "Q8_0", spm_model, drop=("layers.1.feed_forward.w2.weight",))
    assert_user_error(tmp_path / "m.bin", tmp_path / "out", "layers.1.feed_forward.w2.weight", "no tensor")


@pytest.mark.parametrize("hparams,words", [
    ({"n_mult": 256}, ["n_mult 256", "192", "disagree"]),
    ({"n_layer": 3}, ["no tensor", "layers.2."]),
    ({"n_embd": 128}, ["disagree"]),
    ({"n_head": 5}, ["divide"]),
], ids=["n_mult", "n_layer", "n_embd", "n_head"])
def test_hparams_inconsistent_with_the_tensors(spm_model, tmp_path, hparams, words):
    build(tmp_path / "m.bin", "ggjt3", "F16", spm_model, hparams=hparams)
    assert_user_error(tmp_path / "m.bin", tmp_path / "out", *words)


def test_tensor_shape_inconsistent_with_the_hparams(spm_model, tmp_path):
    """One part of an old multi-part model (its matrices split in halves) must not pass."""
    tokens, scores = legacy_vocab(spm_model)
    hp = {"n_vocab": VOCAB, "n_embd": N_EMBD, "n_mult": 32, "n_head": N_HEAD, "n_layer": N_LAYER, "n_rot": HEAD, "ftype": 0}
    weights = source_weights("mha")
    weights["layers.0.attention.wv.weight"] = weights["layers.0.attention.wv.weight"][:32]
    tensors = [(n, 0, a.shape, a) for n, a in weights.items()]
    write_legacy(tmp_path / "m.bin", "ggmf1", tensors, tokens, scores, hp)
    assert_user_error(tmp_path / "m.bin", tmp_path / "out", "layers.0.attention.wv.weight", "(32, 64)", "(64, 64)",
                      "multi-part")


# ---------------------------------------------------------------- the script


def test_script_converts_a_legacy_file(spm_model, tmp_path):
    """scripts/convert_gguf_checkpoint.py tells a GGML file from a GGUF one by its magic."""
    expected, _ = build(tmp_path / "model.bin", "ggjt3", "Q4_0", spm_model)
    r = run_script("scripts/convert_gguf_checkpoint.py", "--gguf_path", tmp_path / "model.bin",
                   "--output_dir", tmp_path / "lit", timeout=300)
    assert r.returncode == 0, r.stderr
    check_weights(load_state_dict(tmp_path / "lit"), expected, CASES["mha"][0])


def test_script_refuses_keep_quantized_for_a_legacy_file(spm_model, tmp_path):
    build(tmp_path / "model.bin", "ggjt3", "Q4_0", spm_model)
    r = run_script("scripts/convert_gguf_checkpoint.py", "--gguf_path", tmp_path / "model.bin",
                   "--output_dir", tmp_path / "lit", "--keep_quantized", "true", timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "legacy GGML" in lines[0] and "--keep_quantized" in lines[0]
    assert not (tmp_path / "lit").exists()
