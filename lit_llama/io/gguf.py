"""Weights and tokenizer in from GGUF files (llama.cpp) of the `llama` architecture.

Tensors are dequantized one at a time by the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_x, the K-quants, ...) from a memory map; Q and K rows (and their biases' entries) are stored in
Meta's interleaved rotary layout and are permuted like Meta's. Linear biases (blk.N.attn_q.bias, ...,
ffn_down.bias) are optional one by one, as llama.cpp loads them. The tokenizer in the metadata
becomes a `tokenizer.json` (`gpt2` BPE vocabularies) or a SentencePiece `tokenizer.model` (`llama`
vocabularies).

With `keep_quantized`, the blocks of Q4_0, Q4_1, Q4_K (4-bit codes in groups of 32), Q8_0, Q5_0,
Q5_1, Q5_K (8-bit codes, groups of 32) and Q6_K (8-bit codes, groups of 16) are decoded into
integer codes with a scale and an offset per group, w = q * scale + offset: the same numbers as
their dequantization, which the model multiplies as integers (lit_llama/quant/weight_only.py).
Other types (Q2_K, Q3_K, the IQ formats) are dequantized to float, with one warning line.
"""

import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch

from lit_llama.io.checkpoint import QuantizedRows, release_mapped_pages
from lit_llama.io.convert import (ATTN_BIAS, MLP_BIAS, bias_name, lit_tensors, parse_dtype, record_template,
                                  write_checkpoint)
from lit_llama.io.tiktoken_file import LLAMA3_PATTERN
from lit_llama.model import Config, llama3_scaling, rope_frequencies
from lit_llama.templates import check_template_name
from lit_llama.utils import UserError, check_disk

GGUF_NAMES = {
    "wte": "token_embd.weight", "ln_f": "output_norm.weight", "lm_head": "output.weight",
    "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight", "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight", "attn_norm": "blk.{i}.attn_norm.weight", "ffn_norm": "blk.{i}.ffn_norm.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 on: the rope scaling as one divisor per frequency


def read_gguf(path: Path):
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct errors, ... on damaged files
        raise UserError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:200]})")


def gguf_metadata(reader) -> Dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:
            continue
    return out


def rope_factors(config: Config) -> torch.Tensor:
    """llama.cpp's `rope_freqs` tensor for a config's rope scaling: the divisor of each pair's
    frequency, theta_i = base^(-2i/d) / factor_i (how GGUF files of Llama 3.1 on carry "llama3")."""
    pos = torch.zeros(1)
    return rope_frequencies(pos, replace(config, rope_scaling=None)) / rope_frequencies(pos, config)


def scaling_from_factors(factors: torch.Tensor, config: Config) -> dict:
    """The "llama3" scaling that gives `factors` (a rope_freqs tensor), which is all GGUF keeps of it.
    The largest factor is the scaling factor f; between, 1 / factor = (1 - s) / f + s with
    s = (L0 / wavelength - low) / (high - low), linear in the frequency: two such factors fix it (low
    taken as 1; any low with the same line gives the same model). With fewer, Meta's constants (low 1,
    high 4, L0 8192, those of every published Llama 3.x) must reproduce the factors."""
    factors = factors.float()
    f = float(factors.max())
    candidates = [llama3_scaling(f)]
    between = (factors > 1 + 1e-6) & (factors < f * (1 - 1e-6))
    if int(between.sum()) >= 2:
        periods = rope_frequencies(torch.zeros(1), replace(config, rope_scaling=None))[between] / (2 * math.pi)
        s = (1 / factors[between] - 1 / f) / (1 - 1 / f)
        slope, offset = torch.linalg.lstsq(torch.stack((periods, -torch.ones_like(periods)), 1).double(),
                                           s.double()[:, None]).solution.flatten().tolist()
        nice = lambda x: float(f"{x:.6g}")
        candidates.append({**llama3_scaling(f), "high_freq_factor": nice(1 + 1 / offset),
                           "original_max_position_embeddings": nice(slope / offset)})
    for scaling in candidates:
        if torch.allclose(rope_factors(replace(config, rope_scaling=scaling)), factors, rtol=1e-4):
            return scaling
    raise UserError("GGUF rope_freqs tensor does not follow Llama 3's rope scaling (frequencies kept, divided by "
                    "a factor, or blended between): not supported")


def gguf_scaling(g) -> Optional[dict]:
    """Config.rope_scaling from the llama.rope.scaling.* keys (llama.cpp writes linear and yarn)."""
    kind = g("rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(g("rope.scaling.factor", 1.0))}
    if kind == "yarn":  # llama.cpp's YaRN: transformers' with its default attention factor
        if g("rope.scaling.attn_factor", 1.0) != 1.0 or g("rope.scaling.yarn_log_multiplier", 0.0):
            raise UserError("GGUF YaRN with a non-default attention factor is not supported")
        factor, original = g("rope.scaling.factor"), g("rope.scaling.original_context_length")
        if factor is None or original is None:
            raise UserError("GGUF YaRN scaling lacks rope.scaling.factor or rope.scaling.original_context_length")
        if g("rope.scaling.yarn_beta_fast", 32.0) != 32.0 or g("rope.scaling.yarn_beta_slow", 1.0) != 1.0:
            raise UserError("GGUF YaRN with beta_fast / beta_slow other than 32 / 1 is not supported")
        return {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(original)}
    raise UserError(f"GGUF rope scaling {kind!r} is not supported (linear and yarn are, and Llama 3's rope_freqs)")


def gguf_config(meta: Dict[str, Any], has_output: bool, name: str, rope_freqs: Optional[torch.Tensor] = None,
                tensor_names: Iterable[str] = ()) -> Config:
    """The Config of a file's metadata; `tensor_names` say whether it has attention or MLP biases
    (llama.cpp loads each of blk.N.attn_q.bias, ... ffn_down.bias where present)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported, only 'llama'")
    g = lambda k, default=None: meta.get(f"llama.{k}", default)
    required = ("block_count", "embedding_length", "attention.head_count")
    missing = [f"llama.{k}" for k in required if not isinstance(g(k), int) or g(k) < 1]
    if missing:
        raise UserError(f"GGUF metadata lacks {', '.join(missing)}: incomplete or not a LLaMA model")
    n_embd, n_head = g("embedding_length"), g("attention.head_count")
    head_size = g("attention.key_length")  # present where heads are not n_embd / n_head wide
    if g("attention.value_length", head_size) != head_size:
        raise UserError("GGUF with keys and values of different widths is not supported")
    head_size = head_size or (n_embd // n_head if n_embd % n_head == 0 else None)
    if g("rope.dimension_count", head_size) != head_size:
        raise UserError("GGUF with partial rotary embeddings is not supported")
    eps = float(f"{g('attention.layer_norm_rms_epsilon', 1e-5):.6g}")  # stored as float32: 1e-5 -> 9.99e-6
    tokens = meta.get("tokenizer.ggml.tokens") or []
    try:
        config = Config(
            name=name, block_size=g("context_length", 2048), vocab_size=g("vocab_size") or len(tokens),
            n_layer=g("block_count"), n_head=n_head, n_embd=n_embd, head_size=head_size,
            n_query_groups=g("attention.head_count_kv") or n_head, intermediate_size=g("feed_forward_length"),
            rope_base=float(g("rope.freq_base", 10000.0)), rope_scaling=gguf_scaling(g),
            norm_eps=eps, tie_embeddings=not has_output, attention_bias=has_bias(tensor_names, ATTN_BIAS),
            mlp_bias=has_bias(tensor_names, MLP_BIAS),
        )
    except ValueError as e:  # Config's own consistency checks (heads dividing the width, ...)
        raise UserError(f"GGUF metadata: {e}")
    if rope_freqs is not None:
        if config.rope_scaling is not None:
            raise UserError("GGUF has both rope_freqs and llama.rope.scaling.type: not supported")
        config.rope_scaling = scaling_from_factors(rope_freqs, config)
    return config


def has_bias(tensor_names: Iterable[str], roles) -> bool:
    biases = {bias_name(GGUF_NAMES[r]) for r in roles}
    return any(re.sub(r"^blk\.\d+\.", "blk.{i}.", n) in biases for n in tensor_names)


def dequantize(tensor) -> torch.Tensor:
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot be dequantized")
    # GGML lists dimensions fastest-first; torch wants them the other way round
    shape = tuple(int(s) for s in reversed(tensor.shape))
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the map is read-only


# ---------------------------------------------------------------- blocks kept as integers
# Block layouts as in ggml's ggml-common.h; each decoder takes the blocks as a (blocks, bytes) uint8
# array and returns codes (blocks, values), scales and offsets (blocks, groups) with w = q * s + z.


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # 16 bytes hold 32 values: the low nibbles are values 0..15, the high nibbles 16..31
    return np.concatenate((qs & 0xF, qs >> 4), axis=-1).astype(np.int32)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    # 4 bytes, one little-endian 32-bit word: bit j is value j's fifth bit
    word = np.ascontiguousarray(qh).view("<u4").astype(np.int64)
    return ((word >> np.arange(32)) & 1).astype(np.int32)


def _k_scales(sc: np.ndarray):
    """The 8 six-bit scales and mins packed into the 12 bytes of a Q4_K/Q5_K block."""
    sc = sc.astype(np.int32)
    lo_s, lo_m = sc[:, 0:4] & 63, sc[:, 4:8] & 63
    hi_s = (sc[:, 8:12] & 0xF) | ((sc[:, 0:4] >> 6) << 4)
    hi_m = (sc[:, 8:12] >> 4) | ((sc[:, 4:8] >> 6) << 4)
    return np.concatenate((lo_s, hi_s), 1).astype(np.float32), np.concatenate((lo_m, hi_m), 1).astype(np.float32)


def _q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:18]), d, -8 * d  # d (q - 8)


def _q4_1(b):
    return _nibbles(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4])  # d q + m


def _q5_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 6:22]) | (_fifth_bits(b[:, 2:6]) << 4), d, -16 * d


def _q5_1(b):
    return _nibbles(b[:, 8:24]) | (_fifth_bits(b[:, 4:8]) << 4), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q8_0(b):
    d = _f16(b[:, 0:2])
    return np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.int32), d, np.zeros_like(d)


def _k4_codes(qs: np.ndarray) -> np.ndarray:
    # 4 runs of 32 bytes; run r holds values 64r..64r+31 in its low nibbles, 64r+32.. in its high ones
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate((qs & 0xF, qs >> 4), axis=2).reshape(-1, 256).astype(np.int32)


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    return _k4_codes(b[:, 16:144]), d * sc, -dmin * m  # (d sc) q - (dmin m) per 32 values


def _q5_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    # the fifth bits: byte l of qh holds value 32k + l's in its bit k
    qh = b[:, 16:48].astype(np.int32)
    high = ((qh[:, None, :] >> np.arange(8)[None, :, None]) & 1).reshape(-1, 256)
    return _k4_codes(b[:, 48:176]) | (high << 4), d * sc, -dmin * m


def _q6_k(b):
    ql, qh = b[:, 0:128].astype(np.int32), b[:, 128:192].astype(np.int32)
    sc, d = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    # two halves of 128 values; in each, 64 bytes of low nibbles and 32 bytes of 2-bit high parts:
    # values 32k + l (k = 0..3) take nibble (k // 2) of ql byte l + 32 (k % 2) and bits 2k of qh byte l
    ql, qh = ql.reshape(-1, 2, 2, 32), qh.reshape(-1, 2, 1, 32)
    low = np.stack((ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4), axis=2)
    high = (qh >> (2 * np.arange(4))[None, None, :, None]) & 3
    q = (low | (high << 4)).reshape(-1, 256) - 32
    return q, d * sc, np.zeros_like(sc)  # d sc (q - 32) per 16 values


# type name: (decoder, bits of the kept codes, values per group, values per block)
KEPT_TYPES = {
    "Q4_0": (_q4_0, 4, 32, 32), "Q4_1": (_q4_1, 4, 32, 32), "Q4_K": (_q4_k, 4, 32, 256),
    "Q8_0": (_q8_0, 8, 32, 32), "Q5_0": (_q5_0, 8, 32, 32), "Q5_1": (_q5_1, 8, 32, 32),
    "Q5_K": (_q5_k, 8, 32, 256), "Q6_K": (_q6_k, 8, 16, 256),
}


def quantized_rows(tensor, chunk_values: int = 1 << 24) -> QuantizedRows:
    """A GGUF tensor of a KEPT_TYPES type as integer codes (one byte each: uint8 at 4 bits, int8 at
    8) with a scale and an offset per group, decoded `chunk_values` at a time: the decoders'
    wide temporaries stay small even for a large vocabulary's head."""
    decode, bits, groupsize, block = KEPT_TYPES[tensor.tensor_type.name]
    cols, rows = int(tensor.shape[0]), int(np.prod([int(s) for s in tensor.shape[1:]]))
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1)
    q = torch.empty(rows, cols, dtype=torch.uint8 if bits == 4 else torch.int8)
    s, z = torch.empty(rows, cols // groupsize), torch.empty(rows, cols // groupsize)
    step = max(1, chunk_values // cols)
    for r in range(0, rows, step):
        part = raw[r: r + step]
        cq, cs, cz = decode(part.reshape(part.shape[0] * cols // block, -1))
        n = part.shape[0]
        q[r: r + n] = torch.from_numpy(np.ascontiguousarray(cq)).reshape(n, cols)
        s[r: r + n] = torch.from_numpy(np.ascontiguousarray(cs, dtype=np.float32)).reshape(n, -1)
        z[r: r + n] = torch.from_numpy(np.ascontiguousarray(cz, dtype=np.float32)).reshape(n, -1)
    return QuantizedRows(q, s, z, groupsize, bits, tensor.tensor_type.name)


def default_dtype(tensors: Dict[str, Any]) -> torch.dtype:
    # keep half-precision files in half precision; anything quantized dequantizes to float32
    t = tensors.get(GGUF_NAMES["q"].format(i=0))
    kind = t.tensor_type.name if t is not None else "F32"
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)


def output_bytes(tensors, dtype: torch.dtype, keep_quantized: bool) -> int:
    """About the size of the converted checkpoint: kept tensors as their blocks (plus the 8-bit
    codes of 5- and 6-bit types), the others in `dtype`."""
    total = 0
    for t in tensors:
        if keep_quantized and t.tensor_type.name in KEPT_TYPES and len(t.shape) == 2:
            total += int(t.n_elements) if KEPT_TYPES[t.tensor_type.name][1] == 8 else int(t.n_bytes)
        else:
            total += int(t.n_elements) * dtype.itemsize
    return total


def convert_gguf_checkpoint(gguf_path: Path, output_dir: Path, dtype: Optional[str] = None,
                            template: Optional[str] = None, keep_quantized: bool = False) -> None:
    """The file's chat template (tokenizer.chat_template) goes into tokenizer_config.json; `template`
    records a built-in one's name (lit_template.json) for files that have none. `keep_quantized`:
    the KEPT_TYPES tensors stay integers (a checkpoint that the inference scripts load), the others
    are dequantized, with one warning line naming their types."""
    if template is not None:
        check_template_name(template)
    reader = read_gguf(gguf_path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    rope_freqs = dequantize(tensors[ROPE_FREQS]) if ROPE_FREQS in tensors else None
    config = gguf_config(meta, GGUF_NAMES["lm_head"] in tensors, Path(output_dir).name, rope_freqs, tensors)

    floated = set()

    def get(name):
        if name not in tensors and name.endswith(".bias"):
            return None  # llama.cpp's biases are optional one by one: an absent one is zero
        if name not in tensors:
            raise UserError(f"{gguf_path} has no tensor {name!r}: incomplete or not a LLaMA model")
        t = tensors[name]
        if keep_quantized and t.tensor_type.name in KEPT_TYPES and len(t.shape) == 2:
            out = quantized_rows(t)
        else:
            if keep_quantized and t.tensor_type.name not in ("F32", "F16", "BF16") and len(t.shape) == 2:
                floated.add(t.tensor_type.name)
            out = dequantize(t)
        release_mapped_pages(t.data)  # read once: the file's pages need not stay in this process's memory
        return out

    out_dtype = parse_dtype(dtype) or default_dtype(tensors)
    check_disk(output_dir, output_bytes(reader.tensors, out_dtype, keep_quantized))
    tensors_out = lit_tensors(config, get, GGUF_NAMES, interleaved_rope=True, dtype=out_dtype)
    def finish(tmp: Path) -> None:
        write_gguf_tokenizer(meta, tmp)
        record_template(tmp, template)
        if floated:
            print(f"warning: {', '.join(sorted(floated))} tensors cannot be kept quantized "
                  f"(kept: {', '.join(KEPT_TYPES)}); they were dequantized to float", file=sys.stderr)

    write_checkpoint(output_dir, config, tensors_out, finish)


# ---------------------------------------------------------------- tokenizer


def write_gguf_tokenizer(meta: Dict[str, Any], out_dir: Path) -> None:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError("the GGUF file has no tokenizer (tokenizer.ggml.tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        _write_bpe_tokenizer(meta, tokens, types, out_dir)
        add_bos_default = False
    elif kind == "llama":
        _write_sentencepiece_tokenizer(meta, tokens, types, out_dir)
        add_bos_default = True
    else:
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' and 'llama')")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    cfg = {
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
    }
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    # generation stops at the end of text and, where the file names them, of a turn or a message
    stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    stops = [i for i in dict.fromkeys(stops) if i is not None]
    if stops:  # one id as a number, several as a list, as transformers writes them
        gen = {"eos_token_id": stops if len(stops) > 1 else stops[0]}
        (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _bpe_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3"):
        return pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, "default", "gpt-2", "gpt2"):
        print(f"warning: GGUF pre-tokenizer {pre!r} is not known; using GPT-2's", file=sys.stderr)
    return byte_level


def _write_bpe_tokenizer(meta, tokens, types, out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    # llama.cpp's Llama 3 vocabulary (as tiktoken): a piece that is a token is that token, whatever the merges
    llama3 = meta.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=llama3))
    tok.pre_tokenizer = _bpe_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) and user-defined ones (type 4) are matched whole, before BPE
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    tok.save(str(out_dir / "tokenizer.json"))


def _write_sentencepiece_tokenizer(meta, tokens, types, out_dir: Path) -> None:
    """Rebuild a SentencePiece BPE model from the pieces, scores and types that GGUF keeps; GGUF's
    token types are SentencePiece's piece types (1 normal, 2 unknown, 3 control, 4 user, 6 byte)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    m = pb.ModelProto()
    for t, s, ty in zip(tokens, scores, types):
        m.pieces.add(piece=t, score=float(s), type=int(ty) if int(ty) in (1, 2, 3, 4, 5, 6) else 1)
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = any(int(ty) == 6 for ty in types)
    ts.unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    ts.bos_id = meta.get("tokenizer.ggml.bos_token_id", -1)
    ts.eos_id = meta.get("tokenizer.ggml.eos_token_id", -1)
    pad = meta.get("tokenizer.ggml.padding_token_id", -1)
    ts.pad_id = pad if pad not in (ts.unk_id, ts.bos_id, ts.eos_id) else -1  # SentencePiece wants distinct ids
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    (out_dir / "tokenizer.model").write_bytes(m.SerializeToString())
