"""Weights in from Meta's original checkpoints and Hugging Face folders, tensor by tensor.

Every source is described by the same few roles (embedding, q/k/v, MLP, norms) under its own
names; `lit_tensors` turns any of them into our layout one tensor at a time, so peak memory is a
layer, not a model. GGUF files reuse the same path (`lit_llama/io/gguf.py`), and may give some
weights as `QuantizedRows` (integers kept as they are) instead of float tensors.
"""

import json
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from lit_llama.io.checkpoint import (KEPT_METHOD, QuantizedRows, ShardedWriter, copy_tokenizer_files, load_safetensors,
                                     tile_entry, tile_tensors, torch_load, write_config)
from lit_llama.io.tiktoken_file import (LLAMA3_STOP, is_tiktoken_file, llama3_special_tokens, read_tiktoken_ranks,
                                       tokenizer_json)
from lit_llama.model import ROPE_SCALING_KEYS, YARN_OPTIONAL_KEYS, Config, check_rope_scaling, llama3_scaling
from lit_llama.templates import check_template_name, save_template_name
from lit_llama.utils import UserError, atomic_dir

ROLES = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "ffn_norm")
# the roles with a bias where the config has them (transformers' attention_bias and mlp_bias); a
# bias is named as its weight is, with `.bias` for `.weight` (HF, GGUF)
ATTN_BIAS, MLP_BIAS = ("q", "k", "v", "o"), ("gate", "up", "down")

HF_NAMES = {
    "wte": "model.embed_tokens.weight", "ln_f": "model.norm.weight", "lm_head": "lm_head.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight", "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight", "o": "model.layers.{i}.self_attn.o_proj.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight", "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
}
META_NAMES = {
    "wte": "tok_embeddings.weight", "ln_f": "norm.weight", "lm_head": "output.weight",
    "q": "layers.{i}.attention.wq.weight", "k": "layers.{i}.attention.wk.weight",
    "v": "layers.{i}.attention.wv.weight", "o": "layers.{i}.attention.wo.weight",
    "gate": "layers.{i}.feed_forward.w1.weight", "up": "layers.{i}.feed_forward.w3.weight",
    "down": "layers.{i}.feed_forward.w2.weight",
    "attn_norm": "layers.{i}.attention_norm.weight", "ffn_norm": "layers.{i}.ffn_norm.weight",
}
# Meta's model-parallel shards split these along dim 1; the norms are replicated; the rest along dim 0
META_SPLIT_DIM1 = ("tok_embeddings.", ".attention.wo.", ".feed_forward.w2.")


Weight = Union[torch.Tensor, QuantizedRows]


def stack_rows(parts: List[Weight]) -> Weight:
    """The rows of `parts` one after the other (q, k, v into one attention matrix). Integers stay
    integers where every part has them: at 4 bits with one group size, else at 8 bits with the
    smallest group size (mixed GGUF files store v at more bits than q and k); any float part makes
    the whole float."""
    if not all(isinstance(p, QuantizedRows) for p in parts):
        return torch.cat([p.dequantize() if isinstance(p, QuantizedRows) else p for p in parts])
    groupsize = min(p.groupsize for p in parts)
    if len({(p.bits, p.groupsize) for p in parts}) > 1:
        parts = [p.regroup(groupsize) for p in parts]
    qtypes = sorted({p.qtype for p in parts})
    return QuantizedRows(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]),
                         torch.cat([p.zeros for p in parts]), groupsize, parts[0].bits, "+".join(qtypes))


def interleaved_to_halves(w: Weight, n_heads: int) -> Weight:
    """Reorder q/k rows (of a weight, or the entries of a bias) from Meta's rotary layout (adjacent
    pairs rotate together) to ours (the two halves of each head rotate together), the same
    permutation Hugging Face's converter does."""
    if isinstance(w, QuantizedRows):
        return w.map_rows(lambda t: interleaved_to_halves(t, n_heads))
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def bias_roles(config: Config) -> Tuple[str, ...]:
    return (ATTN_BIAS if config.attention_bias else ()) + (MLP_BIAS if config.mlp_bias else ())


def bias_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".bias"


def source_shapes(config: Config) -> Dict[str, Tuple[int, ...]]:
    """The shape each role's source tensor must have under `config`."""
    e, i, hs = config.n_embd, config.intermediate_size, config.head_size
    q, kv = config.n_head * hs, config.n_query_groups * hs
    return {"q": (q, e), "k": (kv, e), "v": (kv, e), "o": (e, q), "gate": (i, e), "up": (i, e),
            "down": (e, i), "attn_norm": (e,), "ffn_norm": (e,), "ln_f": (e,)}


def check_shape(name: str, w: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    # a config that disagrees with the weights would otherwise fail deep in a view/cat with a
    # traceback, or write a checkpoint that only fails when loaded
    if tuple(w.shape) != tuple(shape):
        raise UserError(f"tensor {name!r} has shape {tuple(w.shape)}, the model config needs {tuple(shape)}")
    return w


def pad_vocab(w: Weight, config: Config) -> Weight:
    if len(w.shape) != 2 or w.shape[1] != config.n_embd or not config.vocab_size <= w.shape[0] <= config.padded_vocab_size:
        raise UserError(f"embedding/output of shape {tuple(w.shape)} does not fit vocab_size {config.vocab_size} "
                        f"and n_embd {config.n_embd}")
    if w.shape[0] == config.padded_vocab_size:
        return w
    # zero rows: zero codes, scales and offsets are a zero weight too
    pad = lambda t: torch.cat([t, t.new_zeros(config.padded_vocab_size - t.size(0), t.size(1))])
    return w.map_rows(pad) if isinstance(w, QuantizedRows) else pad(w)


def lit_tensors(config: Config, get: Callable[[str], Weight], names: Dict[str, str],
                interleaved_rope: bool, dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, Weight]]:
    """Yield (name, tensor) of our state dict from a source's `get(name)`, one tensor at a time;
    a weight `get` gives as QuantizedRows comes out as QuantizedRows. Biases (where the config has
    them) are float; a bias `get` gives as None is zero (GGUF's are optional one by one)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    cast_float = lambda t: t if isinstance(t, QuantizedRows) else cast(t)
    shapes = source_shapes(config)
    yield "transformer.wte.weight", cast_float(pad_vocab(get(names["wte"]), config))
    for i in range(config.n_layer):
        w = {r: check_shape(names[r].format(i=i), get(names[r].format(i=i)), shapes[r]) for r in ROLES}
        b = {}
        for r in bias_roles(config):
            name = bias_name(names[r].format(i=i))
            t = get(name)
            b[r] = check_shape(name, torch.zeros(shapes[r][0]) if t is None else t, shapes[r][:1])
        if interleaved_rope:  # the rotary permutation reorders the bias entries as the weight's rows
            for r, heads in (("q", config.n_head), ("k", config.n_query_groups)):
                w[r] = interleaved_to_halves(w[r], heads)
                if r in b:
                    b[r] = interleaved_to_halves(b[r], heads)
        p = f"transformer.h.{i}."
        yield p + "rms_1.weight", cast(w["attn_norm"])
        yield p + "attn.c_attn.weight", cast_float(stack_rows([w["q"], w["k"], w["v"]]))
        yield p + "attn.c_proj.weight", cast_float(w["o"])
        yield p + "rms_2.weight", cast(w["ffn_norm"])
        yield p + "mlp.c_fc1.weight", cast_float(w["gate"])
        yield p + "mlp.c_fc2.weight", cast_float(w["up"])
        yield p + "mlp.c_proj.weight", cast_float(w["down"])
        if config.attention_bias:  # fused as the weights are
            yield p + "attn.c_attn.bias", cast(torch.cat([b["q"], b["k"], b["v"]]))
            yield p + "attn.c_proj.bias", cast(b["o"])
        if config.mlp_bias:
            yield p + "mlp.c_fc1.bias", cast(b["gate"])
            yield p + "mlp.c_fc2.bias", cast(b["up"])
            yield p + "mlp.c_proj.bias", cast(b["down"])
    yield "transformer.ln_f.weight", cast(check_shape(names["ln_f"], get(names["ln_f"]), shapes["ln_f"]))
    if not config.tie_embeddings:
        yield "lm_head.weight", cast_float(pad_vocab(get(names["lm_head"]), config))


def write_checkpoint(output_dir: Path, config: Config, tensors: Iterator[Tuple[str, torch.Tensor]],
                     finish: Callable[[Path], None], total: Optional[int] = None) -> None:
    """Stream `tensors` into a new checkpoint directory; `finish(tmp_dir)` adds the tokenizer files.
    Nothing appears at `output_dir` unless every step succeeds."""
    from tqdm import tqdm

    biases = (2 if config.attention_bias else 0) + (3 if config.mlp_bias else 0)
    total = total or 2 + (7 + biases) * config.n_layer + (0 if config.tie_embeddings else 1)
    kept = {}  # layer name -> how its integers are stored (the config's quantization entry)
    with atomic_dir(output_dir) as tmp:
        writer = ShardedWriter(tmp)
        for name, tensor in tqdm(tensors, total=total, desc="converting", unit="tensor"):
            if isinstance(tensor, QuantizedRows):
                layer = name.removesuffix(".weight")
                for key, t in tile_tensors(tensor).items():
                    writer.add(f"{layer}.{key}", t)
                kept[layer] = tile_entry(tensor)
            else:
                writer.add(name, tensor)
        writer.close()
        write_config(tmp, config, {"method": KEPT_METHOD, "layers": kept} if kept else None)
        finish(tmp)
    print(f"wrote {output_dir}")


def parse_dtype(dtype: Optional[str]) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(choices)}")
    return choices[dtype]


def missing_tensor(name: str, where: Path):
    return UserError(f"{where} has no tensor {name!r}: not a LLaMA checkpoint, or incomplete")


# ---------------------------------------------------------------- Hugging Face


def hf_rope(c: dict, path: Path) -> Tuple[float, Optional[dict], int]:
    """(rope base, Config.rope_scaling, context length) of a config.json: transformers 4.x writes
    rope_theta and rope_scaling, 5.x one rope_parameters dict with both."""
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or params
    base = float(c.get("rope_theta") or params.get("rope_theta") or 10000.0)
    context = c.get("max_position_embeddings", 2048)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return base, None, context
    ours = {"type": kind, **{k: scaling[k] for k in ROPE_SCALING_KEYS.get(kind, ()) if k in scaling}}
    if kind == "yarn":  # as transformers 5 reads it: the original context defaults to the context, the
        # factor to their ratio; the optional keys travel as they are
        ours.setdefault("original_max_position_embeddings", context)
        if scaling.get("factor") is None:
            ours["factor"] = context / ours["original_max_position_embeddings"]
        ours.update({k: scaling[k] for k in YARN_OPTIONAL_KEYS if scaling.get(k) is not None})
    if kind == "dynamic":  # transformers stretches from max_position_embeddings: the context grows by the factor
        ours["original_max_position_embeddings"] = context
        context = int(context * scaling.get("factor", 1))
    try:
        check_rope_scaling(ours)
    except ValueError as e:
        raise UserError(f"{path}: {e}")
    return base, ours, context


def hf_rope_keys(config: Config) -> dict:
    """hf_rope's inverse: the rope keys of a config.json for `config`, in 4.x's and 5.x's spelling."""
    scaling = dict(config.rope_scaling or {"type": "default"})
    kind = scaling.pop("type")
    context = scaling.pop("original_max_position_embeddings") if kind == "dynamic" else config.block_size
    return {"max_position_embeddings": context, "rope_theta": config.rope_base,
            "rope_scaling": None if kind == "default" else {"rope_type": kind, **scaling},
            "rope_parameters": {"rope_type": kind, "rope_theta": config.rope_base, **scaling}}


def hf_config(checkpoint_dir: Path, name: str = "") -> Config:
    path = checkpoint_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{checkpoint_dir} has no config.json: not a Hugging Face model folder")
    try:
        c = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})")
    kind = (c.get("model_type", "llama"), (c.get("architectures") or ["LlamaForCausalLM"])[0])
    if kind == ("mistral", "MistralForCausalLM") and c.get("sliding_window"):
        raise UserError(f"{path}: MistralForCausalLM with sliding-window attention ({c['sliding_window']} "
                        f"tokens) is not supported; without one (sliding_window null) it is a LLaMA")
    if kind not in (("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM")):
        raise UserError(f"{path}: {kind[1]} (model_type {kind[0]!r}) is not supported, only LlamaForCausalLM "
                        f"(LLaMA, Llama 2 and 3, Code Llama, TinyLlama, SmolLM2, ...)")
    if c.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act {c['hidden_act']!r} is not supported, only silu (SwiGLU)")
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                           "intermediate_size") if k not in c]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not a LLaMA config")
    rope_base, rope_scaling, context = hf_rope(c, path)
    return Config(
        name=name or checkpoint_dir.name, block_size=context, vocab_size=c["vocab_size"],
        n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
        n_query_groups=c.get("num_key_value_heads") or c["num_attention_heads"], head_size=c.get("head_dim"),
        intermediate_size=c["intermediate_size"], rope_base=rope_base, rope_scaling=rope_scaling,
        norm_eps=c.get("rms_norm_eps", 1e-6), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        attention_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)),
    )


def hf_weights(checkpoint_dir: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a Hugging Face folder, lazily: safetensors are memory-mapped and `.bin`
    files loaded with weights_only and mmap; single file or sharded with an index."""
    files = sorted(checkpoint_dir.glob("*.safetensors")) or sorted(checkpoint_dir.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{checkpoint_dir} has no *.safetensors or pytorch_model*.bin weights")
    for index in checkpoint_dir.glob("*.index.json"):
        expected = set(json.loads(index.read_text()).get("weight_map", {}).values())
        absent = sorted(f for f in expected if not (checkpoint_dir / f).is_file())
        if absent:
            raise UserError(f"{checkpoint_dir} is incomplete: missing {', '.join(absent)}")
    weights = {}
    for f in files:
        weights.update(load_safetensors(f) if f.suffix == ".safetensors" else torch_load(f))
    return weights


def record_template(tmp: Path, template: Optional[str]) -> None:
    """Write the chat template's name into the new checkpoint (lit_template.json), if one is given."""
    if template is not None:
        save_template_name(tmp, template)


def convert_hf_checkpoint(checkpoint_dir: Path, output_dir: Path, dtype: Optional[str] = None,
                          template: Optional[str] = None) -> None:
    """The chat template travels in tokenizer_config.json / chat_template.jinja; `template` records a
    built-in one's name instead (for models whose folder has none)."""
    if template is not None:
        check_template_name(template)
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir} is not a directory")
    try:
        config = hf_config(checkpoint_dir)
    except ValueError as e:  # Config's own consistency checks (heads dividing the width, ...)
        raise UserError(f"{checkpoint_dir / 'config.json'}: {e}")
    if not any((checkpoint_dir / t).is_file() for t in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{checkpoint_dir} has no tokenizer.json or tokenizer.model")
    weights = hf_weights(checkpoint_dir)
    if not config.tie_embeddings and HF_NAMES["lm_head"] not in weights:
        config.tie_embeddings = True  # some exports drop lm_head when it equals the embedding

    def get(name):
        if name not in weights:
            raise missing_tensor(name, checkpoint_dir)
        return weights[name]

    tensors = lit_tensors(config, get, HF_NAMES, interleaved_rope=False, dtype=parse_dtype(dtype))
    write_checkpoint(output_dir, config, tensors,
                     lambda tmp: (copy_tokenizer_files(checkpoint_dir, tmp), record_template(tmp, template)))


# ---------------------------------------------------------------- Meta's original format


def meta_config(params: dict, vocab_size: int, name: str, block_size: Optional[int]) -> Config:
    # params.json has no context length: Llama 3 files (rope_theta 5e5) had 8192, 131072 with the
    # scaled rope of 3.1 on; Llama 2 files (eps 1e-5 or n_kv_heads) 4096; LLaMA 2048
    llama2 = params.get("norm_eps") == 1e-5 or "n_kv_heads" in params
    llama3 = params.get("rope_theta") == 500000.0
    scaled = params.get("use_scaled_rope", False)
    context = 131072 if scaled else 8192 if llama3 else 4096 if llama2 else 2048
    return Config(
        name=name, block_size=block_size or context, vocab_size=vocab_size,
        n_layer=params["n_layers"], n_head=params["n_heads"], n_embd=params["dim"],
        n_query_groups=params.get("n_kv_heads") or params["n_heads"],
        multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        rope_base=float(params.get("rope_theta", 10000.0)), norm_eps=params.get("norm_eps", 1e-6),
        # params.json gives no factor: Meta's code uses 32 for Llama 3.2's 1B and 3B (widths 2048 and
        # 3072), 8 for the rest, as transformers' config.json files of those models say
        rope_scaling=llama3_scaling(params.get("rope_scaling_factor") or (32.0 if params["dim"] <= 3072 else 8.0))
        if scaled else None,
    )


def write_llama3_tokenizer(tmp: Path, ranks: Dict[bytes, int], vocab_size: int, chat: bool) -> None:
    """tokenizer.json and the configs that make our Tokenizer (and transformers) encode as Meta's
    tiktoken tokenizer: BOS prepended, generation stopping at the end of text, message or turn."""
    special = llama3_special_tokens(vocab_size - len(ranks))
    ids = {t: len(ranks) + i for i, t in enumerate(special)}
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json(ranks, special), ensure_ascii=False))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>" if chat else "<|end_of_text|>",
        "add_bos_token": True, "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    (tmp / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|begin_of_text|>"], "eos_token_id": [ids[t] for t in LLAMA3_STOP if t in ids]}, indent=1))


def convert_meta_checkpoint(checkpoint_dir: Path, output_dir: Path, tokenizer_path: Optional[Path] = None,
                            dtype: Optional[str] = None, block_size: Optional[int] = None,
                            template: Optional[str] = None) -> None:
    """Meta's folders carry no chat template: `template` records one (lit_template.json); by default a
    Llama 2 chat folder (its name has "chat", as Meta names them: llama-2-7b-chat) gets "llama-2"."""
    if template is not None:
        check_template_name(template)
    checkpoint_dir = Path(checkpoint_dir)
    params_path = checkpoint_dir / "params.json"
    if not params_path.is_file():
        raise UserError(f"{checkpoint_dir} has no params.json: not a Meta LLaMA checkpoint directory")
    shards = sorted(checkpoint_dir.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"{checkpoint_dir} has no consolidated.*.pth files")
    expected = [checkpoint_dir / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        raise UserError(f"{checkpoint_dir}: model-parallel shards are not numbered 00..{len(shards) - 1:02d}")
    candidates = [tokenizer_path] if tokenizer_path else [checkpoint_dir / "tokenizer.model", checkpoint_dir.parent / "tokenizer.model"]
    tokenizer = next((Path(p) for p in candidates if p and Path(p).is_file()), None)
    if tokenizer is None:
        raise UserError(f"tokenizer.model not found (looked at {', '.join(map(str, candidates))}); pass --tokenizer_path")
    try:
        params = json.loads(params_path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{params_path} is not valid JSON")
    vocab_size = params.get("vocab_size", -1)
    ranks = read_tiktoken_ranks(tokenizer) if is_tiktoken_file(tokenizer) else None  # Llama 3
    if ranks is not None:
        vocab_size = vocab_size if vocab_size > 0 else len(ranks) + 256
        if vocab_size < len(ranks):
            raise UserError(f"{params_path}: vocab_size {vocab_size} is below the {len(ranks)} tokens of {tokenizer}")
    elif vocab_size <= 0:
        import sentencepiece as spm

        try:
            vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
        except (RuntimeError, OSError) as e:
            raise UserError(f"{tokenizer} is not a valid sentencepiece model ({str(e).strip()[:200]})")
    try:
        config = meta_config(params, vocab_size, checkpoint_dir.name, block_size)
    except KeyError as e:
        raise UserError(f"{params_path} lacks the entry {e}")
    except ValueError as e:  # Config's own consistency checks (heads dividing the width, ...)
        raise UserError(f"{params_path}: {e}")
    parts = [torch_load(s) for s in shards]

    def get(name):
        if any(name not in p for p in parts):
            raise missing_tensor(name, checkpoint_dir)
        if len(parts) == 1 or name.endswith("norm.weight"):
            return parts[0][name]
        return torch.cat([p[name] for p in parts], dim=1 if any(s in name for s in META_SPLIT_DIM1) else 0)

    def finish(tmp: Path):
        import shutil

        chat = any(w in checkpoint_dir.name.lower() for w in ("chat", "instruct"))
        if ranks is not None:
            write_llama3_tokenizer(tmp, ranks, vocab_size, chat)
            record_template(tmp, template or ("llama-3" if chat else None))
            return
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        llama2 = params.get("norm_eps") == 1e-5 or "n_kv_heads" in params
        record_template(tmp, template or ("llama-2" if llama2 and chat else None))

    tensors = lit_tensors(config, get, META_NAMES, interleaved_rope=True, dtype=parse_dtype(dtype))
    write_checkpoint(output_dir, config, tensors, finish)
