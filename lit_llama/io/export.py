"""Weights out: a lit_llama checkpoint directory as a GGUF file (llama.cpp) or a Hugging Face folder.

The inverse of `convert.py` / `convert_gguf.py`. Both exports stream: the checkpoint is memory-mapped,
every output tensor is made and written one at a time (GGUF through the `gguf` writer's tensor-info-
first mode, safetensors by a small writer here that writes the header from the known shapes, then the
data), so peak memory is about one tensor. The output appears only when complete (temporary name,
then rename).

GGUF: `llama` architecture with the llama.* metadata; q/k rows (and bias entries) permuted back to
Meta's interleaved rotary order; `output.weight` left out when the embeddings are tied; vocabulary
padding rows dropped; norms and biases F32; the tokenizer (`gpt2` BPE from `tokenizer.json`, or
`llama` SentencePiece from `tokenizer.model`), BOS/EOS, add-BOS and the chat template in the metadata.

Hugging Face: a `LlamaForCausalLM` folder (config.json, model.safetensors, or shards with an index)
plus tokenizer files and generation_config.json, loadable by `from_pretrained`.

Why one file: both exports walk the same `source_tensors` list and write the same way; the GGUF and
Hugging Face halves are sections below.
"""

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from lit_llama.io.checkpoint import load_model
from lit_llama.io.convert import HF_NAMES, bias_name, bias_roles, hf_rope_keys
from lit_llama.io.gguf import GGUF_NAMES, ROPE_FREQS, rope_factors
from lit_llama.io.tiktoken_file import LLAMA3_PATTERN
from lit_llama.model import Config
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError, atomic_dir, atomic_file

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our (and Hugging Face's) rotate-halves q/k rows (or bias entries) to Meta's and GGUF's
    adjacent pairs: the inverse of `convert.interleaved_to_halves`."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- the checkpoint, role by role


@dataclass
class Source:
    """One exported tensor: its role (convert.ROLES, or wte/ln_f/lm_head), layer, shape, and how
    to get it (in our layout: q/k rotate halves, no vocabulary padding); `bias`: the role's bias."""
    role: str
    layer: Optional[int]
    shape: Tuple[int, ...]
    get: Callable[[], torch.Tensor]
    bias: bool = False

    def name(self, names: Dict[str, str]) -> str:
        """Its name among a format's weight `names` (convert.HF_NAMES, gguf.GGUF_NAMES)."""
        name = names[self.role].format(i=self.layer)
        return bias_name(name) if self.bias else name


def source_tensors(config: Config, sd: Dict[str, torch.Tensor]) -> List[Source]:
    """The model's tensors in export order, cheaply: slices of the memory-mapped checkpoint."""
    e, hs, V = config.n_embd, config.head_size, config.vocab_size
    q, kv, i_ = config.n_head * hs, config.n_query_groups * hs, config.intermediate_size
    out = [Source("wte", None, (V, e), lambda: sd["transformer.wte.weight"][:V])]
    # each bias (where the config has them) as entries a:b of one of our layers' biases: q, k and v fused
    bias_entries = {"q": ("attn.c_attn", 0, q), "k": ("attn.c_attn", q, q + kv),
                    "v": ("attn.c_attn", q + kv, q + 2 * kv), "o": ("attn.c_proj", 0, e),
                    "gate": ("mlp.c_fc1", 0, i_), "up": ("mlp.c_fc2", 0, i_), "down": ("mlp.c_proj", 0, e)}
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        qkv = lambda p=p: sd[p + "attn.c_attn.weight"]
        out += [
            Source("attn_norm", i, (e,), lambda p=p: sd[p + "rms_1.weight"]),
            Source("q", i, (q, e), lambda qkv=qkv: qkv()[:q]),
            Source("k", i, (kv, e), lambda qkv=qkv: qkv()[q:q + kv]),
            Source("v", i, (kv, e), lambda qkv=qkv: qkv()[q + kv:]),
            Source("o", i, (e, q), lambda p=p: sd[p + "attn.c_proj.weight"]),
            Source("ffn_norm", i, (e,), lambda p=p: sd[p + "rms_2.weight"]),
            Source("gate", i, (i_, e), lambda p=p: sd[p + "mlp.c_fc1.weight"]),
            Source("up", i, (i_, e), lambda p=p: sd[p + "mlp.c_fc2.weight"]),
            Source("down", i, (e, i_), lambda p=p: sd[p + "mlp.c_proj.weight"]),
        ]
        for role in bias_roles(config):
            layer, a, b = bias_entries[role]
            out.append(Source(role, i, (b - a,), lambda p=p, layer=layer, a=a, b=b: sd[p + layer + ".bias"][a:b],
                              bias=True))
    out.append(Source("ln_f", None, (e,), lambda: sd["transformer.ln_f.weight"]))
    if not config.tie_embeddings:
        out.append(Source("lm_head", None, (V, e), lambda: sd["lm_head.weight"][:V]))
    return out


def load_checkpoint(checkpoint_dir: Path):
    """(config, state dict, tokenizer) of a checkpoint directory, checked, weights memory-mapped."""
    model = load_model(checkpoint_dir)  # names every missing file, wrong shape, truncated weights
    tokenizer = Tokenizer(checkpoint_dir)
    return model.config, model.state_dict(), tokenizer


def check_output_path(checkpoint_dir: Path, output_path: Path, is_file: bool) -> None:
    """Refuse, before any work, an output that would replace the checkpoint or a folder holding it."""
    out, src = Path(output_path).resolve(), Path(checkpoint_dir).resolve()
    if out == src or out in src.parents:
        raise UserError(f"--output_path {output_path} would replace the checkpoint directory {checkpoint_dir}")
    if is_file and out.is_dir():
        raise UserError(f"--output_path {output_path} is a directory; give the .gguf file to write")
    if not is_file and out.exists() and not out.is_dir():
        raise UserError(f"--output_path {output_path} is a file; give the folder to write")
    if not is_file and out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        # the folder is replaced as a whole: only an earlier export (or an empty folder) may be
        raise UserError(f"--output_path {output_path} is a folder that is not a Hugging Face model; "
                        "refusing to replace it")


# ---------------------------------------------------------------- GGUF


@dataclass
class GGUFVocab:
    model: str  # "gpt2" or "llama"
    tokens: List[str]
    types: List[int]
    pre: Optional[str] = None
    merges: List[str] = field(default_factory=list)
    scores: Optional[List[float]] = None
    unk: Optional[int] = None
    pad: Optional[int] = None
    add_space_prefix: Optional[bool] = None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})")


def _bpe_pre_name(tj: dict, path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json: the split rules
    llama.cpp applies before BPE must be the ones the tokenizer was trained with."""
    def byte_level(p, regex):
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex
                and not p.get("add_prefix_space", False))

    pre = tj.get("pre_tokenizer") or {}
    if byte_level(pre, True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") \
            and byte_level(parts[1], True):
        return "smollm"  # GPT-2's split after single digits (SmolLM, StarCoder)
    if len(parts) == 2 and parts[0].get("type") == "Split" and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_PATTERN \
            and parts[0].get("behavior", "Isolated").lower() == "isolated" and byte_level(parts[1], False):
        return "llama-bpe"
    raise UserError(f"{path}: its pre-tokenizer ({json.dumps(pre)[:200]}) has no llama.cpp equivalent known to "
                    "this exporter (GPT-2, SmolLM/StarCoder digits, Llama 3)")


def _vocab_from_tokenizer_json(path: Path, vocab_size: int) -> GGUFVocab:
    tj = _read_json(path)
    model = tj.get("model") or {}
    decoder = tj.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or model.get("byte_fallback"):
        raise UserError(f"{path} is not a byte-level BPE tokenizer (model {model.get('type')}, decoder "
                        f"{decoder.get('type')}): GGUF export supports byte-level BPE tokenizer.json or a "
                        "SentencePiece tokenizer.model")
    if tj.get("normalizer"):
        raise UserError(f"{path} has a normalizer ({tj['normalizer'].get('type')}), which llama.cpp's gpt2 "
                        "tokenizer does not apply")
    pre = _bpe_pre_name(tj, path)
    by_id: Dict[int, Tuple[str, int]] = {i: (t, 1) for t, i in model.get("vocab", {}).items()}
    for a in tj.get("added_tokens") or []:
        # llama.cpp matches control (special) and user-defined (other added) tokens whole, before BPE
        by_id[a["id"]] = (a["content"], 3 if a.get("special") else 4)
    n = max(by_id, default=-1) + 1
    if n > vocab_size:
        raise UserError(f"{path} has {n} tokens, more than the model's vocab_size ({vocab_size})")
    # ids the tokenizer does not use (and the model's extra rows) become unused placeholders
    tokens = [by_id.get(i, (f"[PAD{i}]", 5))[0] for i in range(vocab_size)]
    types = [by_id.get(i, (None, 5))[1] for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GGUFVocab("gpt2", tokens, types, pre=pre, merges=merges, add_space_prefix=False)


def _vocab_from_sentencepiece(path: Path, vocab_size: int) -> GGUFVocab:
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    try:
        m.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise UserError(f"{path} is not a valid SentencePiece model ({e})")
    if not m.pieces:
        raise UserError(f"{path} is not a valid SentencePiece model (no pieces)")
    if len(m.pieces) > vocab_size:
        raise UserError(f"{path} has {len(m.pieces)} pieces, more than the model's vocab_size ({vocab_size})")
    # GGUF's token types are SentencePiece's piece types (1 normal, 2 unknown, 3 control, 4 user, 5 unused, 6 byte)
    tokens = [p.piece for p in m.pieces] + [f"[PAD{i}]" for i in range(len(m.pieces), vocab_size)]
    types = [int(p.type) for p in m.pieces] + [5] * (vocab_size - len(m.pieces))
    scores = [float(p.score) for p in m.pieces] + [-1000.0] * (vocab_size - len(m.pieces))
    ns = m.normalizer_spec
    if ns.precompiled_charsmap or ns.remove_extra_whitespaces:
        import sys

        print(f"warning: {path} normalizes text (rule {ns.name!r}), which llama.cpp does not do: tokens may "
              "differ for text that normalization would change", file=sys.stderr)
    ts = m.trainer_spec
    return GGUFVocab("llama", tokens, types, scores=scores, unk=ts.unk_id if ts.unk_id >= 0 else None,
                     pad=ts.pad_id if ts.pad_id >= 0 else None,
                     add_space_prefix=bool(m.normalizer_spec.add_dummy_prefix))


def gguf_vocab(checkpoint_dir: Path, tokenizer, vocab_size: int) -> GGUFVocab:
    """The vocabulary as GGUF keeps it, from the file our Tokenizer reads (tokenizer.json first)."""
    d = Path(checkpoint_dir)
    if tokenizer.backend == "huggingface":
        return _vocab_from_tokenizer_json(d / "tokenizer.json", vocab_size)
    return _vocab_from_sentencepiece(d / "tokenizer.model", vocab_size)


def gguf_tensor_type(role_shape: Tuple[int, ...], dtype: str):
    """F32 for norms (as llama.cpp keeps them), else `dtype`; Q8_0 only where rows are whole
    blocks of 32 (llama.cpp's converter falls back to F16 the same way)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

    if len(role_shape) == 1:
        return QT.F32
    qt = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}[dtype]
    if role_shape[-1] % GGML_QUANT_SIZES[qt][0]:
        return QT.F16
    return qt


def _gguf_nbytes(shape: Tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = 1
    for s in shape:
        n *= s
    return n // block * size


def _gguf_array(t: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    a = t.detach().to(torch.float32).contiguous().numpy()
    return gguf.quants.quantize(a, qtype)


def add_gguf_metadata(writer, config: Config, name: str, dtype: str, vocab: GGUFVocab, tokenizer) -> None:
    import gguf

    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_query_groups)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_dimension_count(config.head_size)
    if config.head_size * config.n_head != config.n_embd:  # llama.cpp assumes n_embd / n_head otherwise
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    scaling = config.rope_scaling or {}
    if scaling.get("type") == "linear":  # llama3's travels as the rope_freqs tensor
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    writer.add_vocab_size(config.vocab_size)
    ft = gguf.LlamaFileType
    writer.add_file_type({"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0}[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if tokenizer.bos_id is not None:
        writer.add_bos_token_id(tokenizer.bos_id)
    if tokenizer.eos_id is not None:
        writer.add_eos_token_id(tokenizer.eos_id)
    if vocab.unk is not None:
        writer.add_unk_token_id(vocab.unk)
    if vocab.pad is not None:
        writer.add_pad_token_id(vocab.pad)
    writer.add_add_bos_token(bool(tokenizer.add_bos))
    writer.add_add_eos_token(False)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def yarn_defaults(scaling: dict) -> bool:
    """Whether a YaRN scaling has the settings llama.cpp applies to a LLaMA model (it reads only the
    factor and the original context from the file; measured with llama-cpp-python 0.3.36)."""
    return (scaling.get("beta_fast") in (None, 32) and scaling.get("beta_slow") in (None, 1)
            and all(scaling.get(k) is None for k in ("attention_factor", "mscale", "mscale_all_dim"))
            and scaling.get("truncate", True) is not False)


def export_gguf(checkpoint_dir: Path, output_path: Path, dtype: Optional[str] = None) -> None:
    """Write the checkpoint as one GGUF file of `dtype` (f32, f16, bf16, q8_0; default f16 for a
    half-precision checkpoint, f32 otherwise)."""
    import gguf
    from tqdm import tqdm

    checkpoint_dir, output_path = Path(checkpoint_dir), Path(output_path)
    dtype = dtype.lower() if dtype else None
    if dtype is not None and dtype not in GGUF_DTYPES:
        raise UserError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    check_output_path(checkpoint_dir, output_path, is_file=True)
    config, sd, tokenizer = load_checkpoint(checkpoint_dir)
    if dtype is None:
        dtype = "f16" if sd["transformer.wte.weight"].dtype in (torch.float16, torch.bfloat16) else "f32"
    kind = (config.rope_scaling or {}).get("type")
    if kind == "dynamic":
        raise UserError("llama.cpp has no dynamic (NTK) rope scaling: this checkpoint cannot be exported to GGUF")
    if kind == "yarn" and not yarn_defaults(config.rope_scaling):
        raise UserError("llama.cpp runs YaRN with its defaults only (beta_fast 32, beta_slow 1, the default "
                        "attention factor, a truncated ramp): this checkpoint's YaRN cannot be exported to GGUF")
    vocab = gguf_vocab(checkpoint_dir, tokenizer, config.vocab_size)
    plan = []
    for s in source_tensors(config, sd):
        plan.append((s.name(GGUF_NAMES), s, gguf_tensor_type(s.shape, dtype)))
    if kind == "llama3":
        factors = rope_factors(config)
        source = Source("rope_freqs", None, tuple(factors.shape), lambda: factors)
        plan.insert(0, (ROPE_FREQS, source, gguf_tensor_type(source.shape, dtype)))
    with atomic_file(output_path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        add_gguf_metadata(writer, config, config.name or checkpoint_dir.name, dtype, vocab, tokenizer)
        # tensor infos first (the shapes are known from the config), then the data one tensor at a time
        for name, s, qt in plan:
            writer.add_tensor_info(name, s.shape, np.dtype(np.float32), _gguf_nbytes(s.shape, qt), raw_dtype=qt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            for name, s, qt in tqdm(plan, desc="exporting", unit="tensor"):
                t = s.get()
                if s.role in ("q", "k"):  # weight rows and bias entries alike, as llama.cpp's converter
                    t = halves_to_interleaved(t, config.n_head if s.role == "q" else config.n_query_groups)
                writer.write_tensor_data(_gguf_array(t, qt))
        finally:
            writer.close()
    print(f"wrote {output_path}")


# ---------------------------------------------------------------- Hugging Face


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path: Path, items: List[Tuple[str, Tuple[int, ...], Callable[[], torch.Tensor]]],
                      dtype: torch.dtype) -> None:
    """A safetensors file written one tensor at a time: the header from the known shapes, then the
    data of each `get()` cast to `dtype`. Same format as safetensors' own writer (8-aligned header)."""
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape, _ in items:
        n = size
        for s in shape:
            n *= s
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, get in items:
            t = get().detach().to("cpu", dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise UserError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def hf_config_dict(config: Config, dtype: torch.dtype, tokenizer) -> dict:
    """config.json of a LlamaForCausalLM: the keys of transformers 4.x and 5.x (rope_theta and
    rope_parameters, torch_dtype and dtype) so either reads it."""
    dtype_name = str(dtype).replace("torch.", "")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.n_embd, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups, "head_dim": config.head_size,
        "hidden_act": "silu", "rms_norm_eps": config.norm_eps, **hf_rope_keys(config),
        "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.attention_bias, "attention_dropout": 0.0, "mlp_bias": config.mlp_bias,
        "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
        "torch_dtype": dtype_name, "dtype": dtype_name,
    }


def _hf_tokenizer_files(checkpoint_dir: Path, out: Path, config: Config, tokenizer) -> None:
    """tokenizer.json or tokenizer.model, tokenizer_config.json and generation_config.json, so that
    AutoTokenizer gives our ids: the checkpoint's own config keys are kept, ours override them."""
    src = Path(checkpoint_dir)
    cfg = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    for name in ("special_tokens_map.json",):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    token = lambda i: None if i is None else (tokenizer.processor.id_to_token(i) if tokenizer.backend == "huggingface"
                                               else tokenizer.processor.id_to_piece(i))
    if tokenizer.backend == "huggingface":
        _write_hf_tokenizer_json(src / "tokenizer.json", out / "tokenizer.json", tokenizer)
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    else:
        shutil.copyfile(src / "tokenizer.model", out / "tokenizer.model")
        unk = tokenizer.processor.unk_id()
        if unk >= 0:
            cfg.setdefault("unk_token", token(unk))
        if _sentencepiece_tokenizer_json(src / "tokenizer.model", out / "tokenizer.json", tokenizer):
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        else:
            # transformers converts tokenizer.model itself (it may differ from SentencePiece on leading spaces)
            cfg.setdefault("tokenizer_class", "LlamaTokenizer")
            cfg.setdefault("legacy", True)
    cfg.update({"bos_token": token(tokenizer.bos_id), "eos_token": token(tokenizer.eos_id),
                "add_bos_token": bool(tokenizer.add_bos), "add_eos_token": False})
    cfg.setdefault("clean_up_tokenization_spaces", False)
    cfg.setdefault("model_max_length", config.block_size)
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    gen = _read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    gen.setdefault("bos_token_id", tokenizer.bos_id)
    if len(tokenizer.stop_ids) > 1 or "eos_token_id" not in gen:
        gen["eos_token_id"] = tokenizer.stop_ids if len(tokenizer.stop_ids) > 1 else tokenizer.eos_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _sentencepiece_tokenizer_json(src: Path, dst: Path, tokenizer) -> bool:
    """A tokenizer.json that encodes exactly as the SentencePiece BPE model `src` does (like the
    Llama 2 tokenizer.json on the Hub: prepend and replace spaces with U+2581, BPE with byte
    fallback, merges ranked by the score of the merged piece). Written only for models without
    normalization rules (LLaMA's); False when it cannot be exact."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, processors

    m = pb.ModelProto()
    m.ParseFromString(src.read_bytes())
    ns = m.normalizer_spec
    if m.trainer_spec.model_type != pb.TrainerSpec.BPE or ns.precompiled_charsmap or ns.remove_extra_whitespaces:
        return False
    NORMAL, UNKNOWN, CONTROL, USER = 1, 2, 3, 4
    pieces = list(m.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == NORMAL}
    # SentencePiece merges the pair whose merged piece has the best score: rank merges that way
    merges = []
    for i, p in enumerate(pieces):
        if p.type != NORMAL:
            continue
        local = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))
                 if p.piece[:k] in normal and p.piece[k:] in normal]
        merges += [(-p.score, i, vocab[a], vocab[b], a, b) for a, b in local]
    merges = [(a, b) for *_, a, b in sorted(merges)]
    unk = next((p.piece for p in pieces if p.type == UNKNOWN), None)
    t = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=m.trainer_spec.byte_fallback))
    t.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if ns.add_dummy_prefix else [])
                                        + [normalizers.Replace(" ", "\u2581")])
    t.pre_tokenizer = None
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                  + ([decoders.Strip(" ", 1, 0)] if ns.add_dummy_prefix else []))
    t.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in pieces
                          if p.type in (UNKNOWN, CONTROL)])
    t.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == USER])
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        b = pieces[tokenizer.bos_id].piece
        t.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B:1",
                                                         special_tokens=[(b, tokenizer.bos_id)])
    t.save(str(dst))
    return True


def _write_hf_tokenizer_json(src: Path, dst: Path, tokenizer) -> None:
    """Copy tokenizer.json; if what its post-processor does about BOS disagrees with the checkpoint's
    add_bos_token (which is what our Tokenizer follows), make the post-processor agree, since
    transformers' fast tokenizers take BOS from the post-processor."""
    from tokenizers import Tokenizer as HFTokenizer, processors

    tok = tokenizer.processor
    bos = tokenizer.bos_id
    ids = tok.encode("a", add_special_tokens=True).ids if bos is not None else []
    adds_bos = bool(ids) and ids[0] == bos
    if bos is None or adds_bos == bool(tokenizer.add_bos):
        shutil.copyfile(src, dst)
        return
    t = HFTokenizer.from_file(str(src))
    if tokenizer.add_bos:
        b = tok.id_to_token(bos)
        t.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B:1",
                                                         special_tokens=[(b, bos)])
    else:
        t.post_processor = None
    t.save(str(dst))


def export_hf(checkpoint_dir: Path, output_path: Path, dtype: Optional[str] = None,
              shard_bytes: int = 5 * 10**9) -> None:
    """Write the checkpoint as a Hugging Face LlamaForCausalLM folder (weights in `dtype`: f32,
    f16 or bf16; default the checkpoint's own)."""
    from tqdm import tqdm

    checkpoint_dir, output_path = Path(checkpoint_dir), Path(output_path)
    dtype = dtype.lower() if dtype else None
    if dtype is not None and dtype not in HF_DTYPES:
        raise UserError(f"unknown dtype {dtype!r} for Hugging Face export; choose one of {', '.join(HF_DTYPES)}")
    check_output_path(checkpoint_dir, output_path, is_file=False)
    config, sd, tokenizer = load_checkpoint(checkpoint_dir)
    tdtype = HF_DTYPES[dtype] if dtype else sd["transformer.wte.weight"].dtype
    if tdtype not in SAFETENSORS_DTYPES:
        raise UserError(f"checkpoint dtype {tdtype} cannot be exported; pass --dtype f32, f16 or bf16")
    size = torch.empty((), dtype=tdtype).element_size()
    items = [(s.name(HF_NAMES), s.shape, s.get) for s in source_tensors(config, sd)]
    # shards of at most shard_bytes (one if the model fits), each written tensor by tensor
    shards, current, current_bytes = [], [], 0
    for item in items:
        n = size * int(np.prod(item[1]))
        if current and current_bytes + n > shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(item)
        current_bytes += n
    shards.append(current)
    with atomic_dir(output_path) as tmp:
        bar = tqdm(total=len(items), desc="exporting", unit="tensor")
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for fname, shard in zip(names, shards):
            counted = [(n, s, (lambda g=g: (bar.update(1), g())[1])) for n, s, g in shard]
            write_safetensors(tmp / fname, counted, tdtype)
        bar.close()
        if len(shards) > 1:
            total = sum(size * int(np.prod(s)) for _, s, _ in items)
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, shard in zip(names, shards) for n, _, _ in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(config, tdtype, tokenizer), indent=2))
        _hf_tokenizer_files(checkpoint_dir, tmp, config, tokenizer)
    print(f"wrote {output_path}")


def export_checkpoint(checkpoint_dir: Path, to: str, output_path: Path, dtype: Optional[str] = None) -> None:
    if to == "gguf":
        export_gguf(checkpoint_dir, output_path, dtype)
    elif to == "hf":
        export_hf(checkpoint_dir, output_path, dtype)
    else:
        raise UserError(f"--to must be gguf or hf, got {to!r}")
