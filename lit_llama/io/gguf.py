"""Weights and tokenizer in from GGUF files (llama.cpp) of the `llama` architecture.

Tensors are dequantized one at a time by the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_x, the K-quants, ...) from a memory map; Q and K rows are stored in Meta's interleaved rotary
layout and are permuted like Meta's. The tokenizer in the metadata becomes a `tokenizer.json`
(`gpt2` BPE vocabularies) or a SentencePiece `tokenizer.model` (`llama` vocabularies).
"""

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from lit_llama.io.convert import lit_tensors, parse_dtype, record_template, write_checkpoint
from lit_llama.model import Config
from lit_llama.templates import check_template_name
from lit_llama.utils import UserError

GGUF_NAMES = {
    "wte": "token_embd.weight", "ln_f": "output_norm.weight", "lm_head": "output.weight",
    "q": "blk.{i}.attn_q.weight", "k": "blk.{i}.attn_k.weight", "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight", "gate": "blk.{i}.ffn_gate.weight", "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight", "attn_norm": "blk.{i}.attn_norm.weight", "ffn_norm": "blk.{i}.ffn_norm.weight",
}


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


def gguf_config(meta: Dict[str, Any], has_output: bool, name: str) -> Config:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported, only 'llama'")
    g = lambda k, default=None: meta.get(f"llama.{k}", default)
    if g("rope.scaling.type", "none") not in ("none", None):
        raise UserError(f"GGUF rope scaling {g('rope.scaling.type')!r} is not supported")
    required = ("block_count", "embedding_length", "attention.head_count")
    missing = [f"llama.{k}" for k in required if not isinstance(g(k), int) or g(k) < 1]
    if missing:
        raise UserError(f"GGUF metadata lacks {', '.join(missing)}: incomplete or not a LLaMA model")
    n_embd, n_head = g("embedding_length"), g("attention.head_count")
    if g("rope.dimension_count", n_embd // n_head) != n_embd // n_head:
        raise UserError("GGUF with partial rotary embeddings is not supported")
    eps = float(f"{g('attention.layer_norm_rms_epsilon', 1e-5):.6g}")  # stored as float32: 1e-5 -> 9.99e-6
    tokens = meta.get("tokenizer.ggml.tokens") or []
    try:
        return Config(
            name=name, block_size=g("context_length", 2048), vocab_size=g("vocab_size") or len(tokens),
            n_layer=g("block_count"), n_head=n_head, n_embd=n_embd,
            n_query_groups=g("attention.head_count_kv") or n_head, intermediate_size=g("feed_forward_length"),
            rope_base=float(g("rope.freq_base", 10000.0)), norm_eps=eps, tie_embeddings=not has_output,
        )
    except ValueError as e:  # Config's own consistency checks (heads dividing the width, ...)
        raise UserError(f"GGUF metadata: {e}")


def dequantize(tensor) -> torch.Tensor:
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise UserError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot be dequantized")
    # GGML lists dimensions fastest-first; torch wants them the other way round
    shape = tuple(int(s) for s in reversed(tensor.shape))
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a copy: the map is read-only


def default_dtype(tensors: Dict[str, Any]) -> torch.dtype:
    # keep half-precision files in half precision; anything quantized dequantizes to float32
    t = tensors.get(GGUF_NAMES["q"].format(i=0))
    kind = t.tensor_type.name if t is not None else "F32"
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)


def convert_gguf_checkpoint(gguf_path: Path, output_dir: Path, dtype: Optional[str] = None,
                            template: Optional[str] = None) -> None:
    """The file's chat template (tokenizer.chat_template) goes into tokenizer_config.json; `template`
    records a built-in one's name (lit_template.json) for files that have none."""
    if template is not None:
        check_template_name(template)
    reader = read_gguf(gguf_path)
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(meta, GGUF_NAMES["lm_head"] in tensors, Path(output_dir).name)

    def get(name):
        if name not in tensors:
            raise UserError(f"{gguf_path} has no tensor {name!r}: incomplete or not a LLaMA model")
        return dequantize(tensors[name])

    tensors_out = lit_tensors(config, get, GGUF_NAMES, interleaved_rope=True,
                              dtype=parse_dtype(dtype) or default_dtype(tensors))
    write_checkpoint(output_dir, config, tensors_out,
                     lambda tmp: (write_gguf_tokenizer(meta, tmp), record_template(tmp, template)))


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


def _bpe_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3"):
        # Llama 3's split regex: contractions, letters, 1-3 digit groups, punctuation, spaces
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        return pt.Sequence([pt.Split(Regex(pattern), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, "default", "gpt-2", "gpt2"):
        print(f"warning: GGUF pre-tokenizer {pre!r} is not known; using GPT-2's", file=sys.stderr)
    return byte_level


def _write_bpe_tokenizer(meta, tokens, types, out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
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
