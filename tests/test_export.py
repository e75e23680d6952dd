"""Export to GGUF and to Hugging Face (lit_llama/io/export.py), checked by loading the export in the other system.

- Hugging Face folders are loaded by transformers' LlamaForCausalLM / AutoTokenizer: same logits, same ids.
- GGUF files are read back by transformers' own GGUF loader (an independent reader: config, q/k
  un-permutation, tied output) and by gguf.GGUFReader, and converted back by our convert_gguf;
  the embedded model's F32 export must hold exactly the original GGUF's (dequantized) tensors and
  tokenizer metadata, since the checkpoint was converted from that file.
- llama.cpp (llama-cpp-python), where installed, runs the F32 export: same tokens, close logits.

Two tiny random models cover what the embedded one does not: a SentencePiece tokenizer.model with
BOS added, untied output, multi-head attention, vocabulary padding rows (500 -> 512) and an MLP
width (176) that is not a whole number of Q8_0 blocks; and a byte-level BPE tokenizer.json that adds
BOS only by the checkpoint's setting, with a user-defined (non-special) added token.
"""

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import gguf

from conftest import run_script, top1_agreement
from isolated import SubprocessCrashed, llama_cpp_run, run_isolated, segfault
from lit_llama.io.checkpoint import load_model, load_state_dict, save_checkpoint
from lit_llama.io.gguf import convert_gguf_checkpoint
from lit_llama.io.export import export_gguf, export_hf, halves_to_interleaved
from lit_llama.io.convert import interleaved_to_halves
from lit_llama.model import LLaMA, Config
from lit_llama.tokenizer import Tokenizer
from lit_llama.utils import UserError
from test_convert_gguf import error_bound

SAMPLES = ["Hello, world!", "The  quick brown fox\njumps over\n\n the lazy dog.", "café 東京 naïve 🙂",
           "  leading spaces and trailing ", "def f(x):\n    return x ** 2  # ok?", "Numbers: 3.14159, 1,000,000."]
# logits of the random models are of order 1-10; fp32 sums in another order differ by ~1e-5
TOL = dict(rtol=1e-4, atol=1e-4)


# found, not imported: even loading llama.cpp's library happens in the subprocesses only
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama_cpp (scripts/install_llama_cpp.sh) is not installed")


def reader_fields(path: Path) -> dict:
    from lit_llama.io.gguf import gguf_metadata

    return gguf_metadata(gguf.GGUFReader(path))


def dequantized(path: Path) -> dict:
    from lit_llama.io.gguf import dequantize

    return {t.name: dequantize(t) for t in gguf.GGUFReader(path).tensors}


# ---------------------------------------------------------------- tiny random checkpoints


def spm_model_bytes(vocab: int) -> bytes:
    import pydoc_data.topics
    import sentencepiece as spm

    lines = [l for text in pydoc_data.topics.topics.values() for l in text.splitlines() if l.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[:3000]), model_writer=out, vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    return out.getvalue()


def bpe_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer.json (GPT-2 style) with <s>, </s> and a non-special added token."""
    import pydoc_data.topics
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 1, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = [l for text in pydoc_data.topics.topics.values() for l in text.splitlines() if l.strip()]
    tok.train_from_iterator(lines[:3000], trainer)
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False)])
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
           "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


# name: (config name, overrides, tokenizer kind)
TINY = {
    "mha-untied-spm": ("tiny", dict(vocab_size=500, rope_base=10000.0, norm_eps=1e-6), "spm"),
    "gqa-tied-bpe": ("tiny-gqa", dict(vocab_size=500, rope_base=500000.0, intermediate_size=192), "bpe"),
}
# rope scaling, with an original context below the test's positions: at head size 16 and base 1e4, llama3
# keeps one frequency, blends two (wavelengths 20 and 63, between 16 and 64) and divides the rest
SCALED_TINY = {
    "llama3-bpe": ("tiny-gqa", dict(vocab_size=500, intermediate_size=192, rope_scaling=dict(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
        "bpe"),
    "linear-spm": ("tiny", dict(vocab_size=500, rope_scaling=dict(type="linear", factor=4.0)), "spm"),
    # YaRN at head size 16, base 1e4, original context 32, llama.cpp's defaults (beta 32/1): one pair
    # kept, one blended, six divided by the factor; cos and sin scaled by 0.1 ln 4 + 1
    "yarn-spm": ("tiny", dict(vocab_size=500, rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32)), "spm"),
}


def random_lit_model(config: Config, seed: int = 0) -> LLaMA:
    torch.manual_seed(seed)
    model = LLaMA(config).eval()
    # larger weights and random norm scales so that rotary layout, norms and grouping all matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "rms" in name or "ln_f" in name else 0.3 * torch.randn_like(p))
        # padding rows are never used by a lit_llama model; random values would show up if exported
        model.transformer.wte.weight[config.vocab_size:] = 7.0
        if model.lm_head is not None:
            model.lm_head.weight[config.vocab_size:] = 7.0
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(case) -> checkpoint dir of a random model with its tokenizer, made once per module."""
    done = {}

    def make(case: str) -> Path:
        if case not in done:
            name, overrides, kind = {**TINY, **SCALED_TINY}[case]
            root = tmp_path_factory.mktemp(case)
            config = Config.from_name(name, **overrides, block_size=128)
            assert config.padded_vocab_size > config.vocab_size
            save_checkpoint(root / "lit", random_lit_model(config))
            if kind == "spm":
                (root / "lit" / "tokenizer.model").write_bytes(spm_model_bytes(400))
            else:
                bpe_tokenizer(root / "lit", 400)
            done[case] = root / "lit"
        return done[case]

    return make


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(checkpoint_dir, to, dtype) -> output path, exported once per module."""
    done = {}

    def run(ckpt: Path, to: str, dtype: str = None) -> Path:
        key = (ckpt, to, dtype)
        if key not in done:
            root = tmp_path_factory.mktemp(f"{ckpt.parent.name}-{to}-{dtype}")
            if to == "hf":
                export_hf(ckpt, root / "hf", dtype)
                done[key] = root / "hf"
            else:
                export_gguf(ckpt, root / f"model-{dtype}.gguf", dtype)
                done[key] = root / f"model-{dtype}.gguf"
        return done[key]

    return run


def ids_for(vocab: int, shape=(2, 20)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(1))


def test_permutation_inverts_the_import():
    w = torch.randn(8 * 16, 24)
    assert torch.equal(interleaved_to_halves(halves_to_interleaved(w, 8), 8), w)
    assert not torch.equal(halves_to_interleaved(w, 8), w)


# ---------------------------------------------------------------- Hugging Face export


@pytest.mark.parametrize("case", list(TINY))
@torch.no_grad()
def test_hf_export_tiny_logits_and_tokenizer(tiny, exported, case):
    from transformers import AutoTokenizer, LlamaForCausalLM

    ckpt = tiny(case)
    out = exported(ckpt, "hf")
    ours = load_model(ckpt).eval()
    ref = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert ref.config.tie_word_embeddings == ours.config.tie_embeddings
    assert ref.model.embed_tokens.weight.shape[0] == ours.config.vocab_size  # padding rows dropped
    idx = ids_for(ours.config.vocab_size)
    expected = ref(idx).logits
    torch.testing.assert_close(ours(idx), expected, **TOL)
    ours.config.rope_base *= 3  # guard: the comparison sees the rotary angles
    assert (ours(idx) - expected).abs().max() > 1e-2

    tok, hf_tok = Tokenizer(ckpt), AutoTokenizer.from_pretrained(out)
    assert tok.add_bos and tok.bos_id is not None
    for text in SAMPLES:
        ids = tok.encode(text).tolist()
        assert ids[0] == tok.bos_id
        assert hf_tok.encode(text) == ids, text
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids[1:]) == text, text
    if case.endswith("bpe"):  # added tokens, special or not, are matched whole in both
        text = "call <tool> after <s>"
        assert hf_tok.encode(text) == tok.encode(text).tolist()
        assert tok.token_to_id("<tool>") in tok.encode(text).tolist()
    assert hf_tok.eos_token_id == tok.eos_id
    if tok.chat_template:
        messages = [{"role": "user", "content": "hi"}]
        assert hf_tok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, add_generation_prompt=False)


def test_hf_export_dtype_and_shards(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    ckpt = tiny("gqa-tied-bpe")
    export_hf(ckpt, tmp_path / "bf16", "bf16", shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "bf16").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "bf16")
    assert ref.dtype == torch.bfloat16
    ours = load_model(ckpt)
    for name, p in ref.state_dict().items():
        if "q_proj" in name:
            i = int(name.split(".")[2])
            want = ours.transformer.h[i].attn.c_attn.weight[: p.size(0)]
            assert torch.equal(p, want.to(torch.bfloat16)), name


@torch.no_grad()
def test_hf_export_embedded_model(default_checkpoint, exported):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = exported(default_checkpoint, "hf")
    ours, tok = load_model(default_checkpoint).eval(), Tokenizer(default_checkpoint)
    ref = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "The Eiffel Tower, completed in 1889 for the World's Fair, is in Paris, désigné <|im_start|>user\nhi"
    ids = tok.encode(text)
    assert hf_tok.encode(text) == ids.tolist()
    for t in SAMPLES:
        assert hf_tok.encode(t) == tok.encode(t).tolist(), t
    torch.testing.assert_close(ours(ids[None]), ref(ids[None]).logits, rtol=1e-4, atol=1e-3)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(messages)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_id and gen["bos_token_id"] == tok.bos_id


# ---------------------------------------------------------------- GGUF export: the embedded model


def test_gguf_f32_export_holds_the_original_gguf(default_checkpoint, default_gguf, exported):
    """The checkpoint was converted from the original Q4_1 GGUF: exporting it as F32 must give back
    that file's tensors (dequantized) exactly, under the same names and in GGUF's q/k order, and its
    architecture and tokenizer metadata."""
    path = exported(default_checkpoint, "gguf", "f32")
    original, ours = reader_fields(default_gguf), reader_fields(path)
    for key, value in original.items():
        if key.startswith(("llama.", "tokenizer.ggml.", "tokenizer.chat_template")) and key not in (
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"):  # not kept in checkpoints
            assert ours.get(key) == value, key
    assert ours["general.architecture"] == "llama" and ours["general.file_type"] == gguf.LlamaFileType.ALL_F32
    want, got = dequantized(default_gguf), dequantized(path)
    assert set(got) == set(want) and "output.weight" not in got
    for name in want:
        assert torch.equal(got[name], want[name]), name
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert set(types.values()) == {gguf.GGMLQuantizationType.F32}


@torch.no_grad()
def test_gguf_f32_export_runs_in_transformers(default_checkpoint, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = exported(default_checkpoint, "gguf", "f32")
    ours, tok = load_model(default_checkpoint).eval(), Tokenizer(default_checkpoint)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    torch.testing.assert_close(ours(ids[None]), ref(ids[None]).logits, rtol=1e-4, atol=1e-3)
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for t in SAMPLES:
        assert hf_tok.encode(t) == tok.encode(t).tolist(), t


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_gguf_export_round_trip_within_rounding(default_checkpoint, exported, tmp_path, dtype):
    path = exported(default_checkpoint, "gguf", dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert all(types[n] == "F32" for n in types if n.endswith("norm.weight"))
    assert all(types[n] == dtype.upper() for n in types if not n.endswith("norm.weight"))
    convert_gguf_checkpoint(path, tmp_path / "back")
    want, got = load_state_dict(default_checkpoint), load_state_dict(tmp_path / "back")
    assert set(want) == set(got)
    for name, w in want.items():
        g = got[name].float()
        fmt = "F32" if w.ndim == 1 else dtype.upper()
        assert ((g - w).abs() <= error_bound(w, fmt)).all(), name


# ---------------------------------------------------------------- GGUF export: tiny models


@pytest.mark.parametrize("case", list(TINY))
@torch.no_grad()
def test_gguf_export_tiny(tiny, exported, tmp_path, case):
    from transformers import AutoModelForCausalLM

    ckpt = tiny(case)
    ours = load_model(ckpt).eval()
    c = ours.config
    path = exported(ckpt, "gguf", "f32")
    meta = reader_fields(path)
    expected = {"llama.block_count": c.n_layer, "llama.context_length": c.block_size, "llama.embedding_length": c.n_embd,
                "llama.feed_forward_length": c.intermediate_size, "llama.attention.head_count": c.n_head,
                "llama.attention.head_count_kv": c.n_query_groups, "llama.rope.dimension_count": c.head_size,
                "llama.vocab_size": c.vocab_size, "tokenizer.ggml.add_bos_token": True}
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.rope.freq_base"] == c.rope_base
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps, rel=1e-6)
    assert len(meta["tokenizer.ggml.tokens"]) == c.vocab_size  # the tokenizer's 400 + unused placeholders
    assert meta["tokenizer.ggml.token_type"][400:] == [5] * (c.vocab_size - 400)
    tok = Tokenizer(ckpt)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)
    if case.endswith("bpe"):
        assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
        types = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]))
        assert (types["<s>"], types["</s>"], types["<tool>"]) == (3, 3, 4)
        assert meta["tokenizer.chat_template"] == tok.chat_template
    else:
        assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.scores"]) == c.vocab_size
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert ("output.weight" in tensors) == (not c.tie_embeddings)
    assert tuple(tensors["token_embd.weight"].shape) == (c.n_embd, c.vocab_size)  # GGML order; no padding rows

    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    idx = ids_for(c.vocab_size)
    torch.testing.assert_close(ours(idx), ref(idx).logits, **TOL)

    # our converter reads it back: F32 exactly; the tokenizer gives the same ids
    convert_gguf_checkpoint(path, tmp_path / "back")
    want, got = load_state_dict(ckpt), load_state_dict(tmp_path / "back")
    for name, w in want.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            w = w[: c.vocab_size]
            assert not got[name][c.vocab_size:].any()
            got[name] = got[name][: c.vocab_size]
        assert torch.equal(got[name], w), name
    back = Tokenizer(tmp_path / "back")
    for text in SAMPLES:
        assert back.encode(text).tolist() == tok.encode(text).tolist(), text


@pytest.mark.parametrize("case", list(TINY))
def test_gguf_q8_0_export_tiny(tiny, exported, tmp_path, case):
    ckpt = tiny(case)
    c = load_model(ckpt).config
    path = exported(ckpt, "gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    # rows of 176 weights are not whole Q8_0 blocks: ffn_down falls back to F16 like llama.cpp's converter
    down = "F16" if c.intermediate_size % 32 else "Q8_0"
    assert types["blk.0.ffn_down.weight"] == down and types["blk.0.attn_q.weight"] == "Q8_0"
    convert_gguf_checkpoint(path, tmp_path / "back")
    want, got = load_state_dict(ckpt), load_state_dict(tmp_path / "back")
    for name, w in want.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            w, got[name] = w[: c.vocab_size], got[name][: c.vocab_size]
        fmt = "F32" if w.ndim == 1 else down if name.endswith("mlp.c_proj.weight") else "Q8_0"
        assert ((got[name] - w).abs() <= error_bound(w, fmt)).all(), name


def test_half_precision_checkpoint_exports_f16_by_default(tiny, tmp_path):
    src = tiny("gqa-tied-bpe")
    model = load_model(src).half()
    save_checkpoint(tmp_path / "half", model, tokenizer_dir=src)
    export_gguf(tmp_path / "half", tmp_path / "half.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "half.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["output_norm.weight"] == "F32"
    export_hf(tmp_path / "half", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float16"


# ---------------------------------------------------------------- llama.cpp
# Every llama.cpp call runs in a subprocess (tests/isolated.py): a native crash fails its test alone.
# Its kernels differ by CPU (AVX2, AVX-512, VNNI), so its roundings do too: the assertions bound
# what the format allows, with greedy agreement where the top two logits are further apart than
# that bound, and a stated agreement rate elsewhere.


def llama_cpp(path: Path, ids=(), n_ctx: int = 64, tokenize=()) -> dict:
    out = run_isolated(llama_cpp_run, path, list(ids), n_ctx, list(tokenize), timeout=300)
    if "logits" in out:
        out["logits"] = torch.from_numpy(out["logits"])
    return out


@needs_llama_cpp
@torch.no_grad()
def test_llama_cpp_runs_the_embedded_f32_export(default_checkpoint, exported):
    path = exported(default_checkpoint, "gguf", "f32")
    ours, tok = load_model(default_checkpoint).eval(), Tokenizer(default_checkpoint)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(text).tolist()
    out = llama_cpp(path, ids, n_ctx=256, tokenize=[(text, False, True)] + [(t, False, False) for t in SAMPLES])
    assert out["tokens"][0] == ids
    for t, got_ids in zip(SAMPLES, out["tokens"][1:]):
        assert got_ids == tok.encode(t).tolist(), t
    assert out["chat_template"] == tok.chat_template
    got, want = out["logits"], ours(torch.tensor([ids]))[0]
    # llama.cpp sums in its own order: logits of up to ~40 agree to ~1e-4 (a wrong q/k order, norm
    # or tied output would be off by whole units; llama.cpp's default float16 KV cache by ~0.04)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    rate, decided = top1_agreement(got, want, bound=1e-3 * (1 + want.abs().max().item()))
    assert decided and rate >= 0.95, rate


@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@torch.no_grad()
def test_llama_cpp_runs_the_embedded_half_and_q8_exports(default_checkpoint, exported, dtype):
    """llama.cpp reads our F16 and Q8_0 blocks: a wrong block layout would give unrelated logits.
    Differences are rounding: of the weights, and llama.cpp also rounds the activations, to 16 bits
    for F16 and to 8 bits for Q8_0. Measured, 57 positions: F16 max 0.09 (AMD, AVX2) and 0.08
    (Intel, AVX-512 build without AMX), every top-1 equal on AVX2 and 56 of 57 on AVX-512 (the
    other's top two lie 0.011 apart); Q8_0 mean 0.26 on both, 92-93% of top-1 equal."""
    path = exported(default_checkpoint, "gguf", dtype)
    ours, tok = load_model(default_checkpoint).eval(), Tokenizer(default_checkpoint)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Explain the "
                                     "history of the city in a few sentences."}]) + "The capital of France is Paris. It has"
    ids = tok.encode(text).tolist()
    got = llama_cpp(path, ids, n_ctx=256)["logits"]
    want = ours(torch.tensor([ids]))[0]
    if dtype == "f16":
        bound = 0.3
        torch.testing.assert_close(got, want, rtol=0, atol=bound)
        rate, decided = top1_agreement(got, want, bound)
        assert decided and rate >= 0.95, rate
    else:
        rate, _ = top1_agreement(got, want, 0.6)
        assert (got - want).abs().mean() < 0.6 and rate >= 0.8, ((got - want).abs().mean(), rate)


@needs_llama_cpp
@pytest.mark.parametrize("case", list(TINY))
@torch.no_grad()
def test_llama_cpp_runs_tiny_f32_exports(tiny, exported, case):
    ckpt = tiny(case)
    path = exported(ckpt, "gguf", "f32")
    ours, tok = load_model(ckpt).eval(), Tokenizer(ckpt)
    ids = ids_for(ours.config.vocab_size, (1, 20))[0].tolist()
    out = llama_cpp(path, ids, tokenize=[(t, True, False) for t in SAMPLES])
    for t, got_ids in zip(SAMPLES, out["tokens"]):
        assert got_ids == tok.encode(t).tolist(), t
    torch.testing.assert_close(out["logits"], ours(torch.tensor([ids]))[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", list(SCALED_TINY))
@torch.no_grad()
def test_rope_scaling_survives_export(tiny, exported, tmp_path, case):
    """transformers reads the scaling from our config.json, and our GGUF converter from our GGUF
    (llama3's as the rope_freqs tensor): both give our logits at positions past the original context."""
    from transformers import LlamaForCausalLM

    ckpt = tiny(case)
    ours = load_model(ckpt).eval()
    idx = ids_for(ours.config.vocab_size, (1, 90))
    want = ours(idx)
    ref = LlamaForCausalLM.from_pretrained(exported(ckpt, "hf"), dtype=torch.float32).eval()
    torch.testing.assert_close(ref(idx).logits, want, **TOL)
    convert_gguf_checkpoint(exported(ckpt, "gguf", "f32"), tmp_path / "back")
    back = load_model(tmp_path / "back").eval()
    assert back.config.rope_scaling == ours.config.rope_scaling
    torch.testing.assert_close(back(idx), want, **TOL)
    ours.config.rope_scaling = None  # guard: the scaling matters here
    assert (ours(idx) - want).abs().max() > 1e-2


@needs_llama_cpp
@pytest.mark.parametrize("case", list(SCALED_TINY))
@torch.no_grad()
def test_llama_cpp_runs_rope_scaled_exports(tiny, exported, case):
    ckpt = tiny(case)
    ours = load_model(ckpt).eval()
    ids = ids_for(ours.config.vocab_size, (1, 90))[0].tolist()
    got = llama_cpp(exported(ckpt, "gguf", "f32"), ids, n_ctx=128)["logits"]
    torch.testing.assert_close(got, ours(torch.tensor([ids]))[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scaling, message", [
    ({"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}, "no dynamic"),
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "mscale": 0.7, "mscale_all_dim": 1.0},
     "YaRN with its defaults only"),
    ({"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "beta_fast": 16.0},
     "YaRN with its defaults only"),
])
def test_rope_scalings_llama_cpp_lacks_are_not_exported_to_gguf(tiny, tmp_path, scaling, message):
    ckpt = tiny("linear-spm")
    config = json.loads((ckpt / "lit_config.json").read_text())
    config["rope_scaling"] = scaling
    scaled = tmp_path / "scaled"
    shutil.copytree(ckpt, scaled)
    (scaled / "lit_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        export_gguf(scaled, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


def test_a_crash_in_the_subprocess_fails_only_the_caller():
    """A segfault in a native call (as llama.cpp's AMX kernels give on Q8_0) is an AssertionError
    naming the signal, in the test that made the call; this process lives on."""
    with pytest.raises(SubprocessCrashed, match="segfault crashed its subprocess \\(killed by SIGSEGV\\)"):
        run_isolated(segfault, timeout=120)
    with pytest.raises(AssertionError, match="FileNotFoundError"):
        run_isolated(Path.read_text, Path("/nonexistent/file"), timeout=120)
    assert run_isolated(sum, [1, 2, 3], timeout=120) == 6


# ---------------------------------------------------------------- bad input: one line, nothing written


def assert_one_line_error(result, out: Path, *words: str) -> None:
    err = result.stderr
    assert result.returncode != 0, err
    assert "Traceback" not in err, err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for w in words:
        assert w.lower() in errors[0].lower(), err
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert not leftovers, leftovers


def export_script(ckpt: Path, to: str, out: Path, *extra):
    return run_script("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", ckpt, "--to", to,
                      "--output_path", out, *extra, timeout=300)


def incomplete_checkpoint(src: Path, tmp: Path) -> Path:
    d = tmp / "incomplete"
    d.mkdir()
    shutil.copyfile(src / "lit_config.json", d / "lit_config.json")
    shutil.copyfile(src / "tokenizer.model", d / "tokenizer.model")
    return d


def unknown_pre_tokenizer(src: Path, tmp: Path) -> Path:
    d = tmp / "odd-pre"
    shutil.copytree(src, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return d


@pytest.mark.parametrize("case", ["bad-to", "bad-dtype", "hf-q8", "missing-dir", "incomplete", "onto-itself",
                                  "onto-another-folder", "unknown-pre-tokenizer"])
def test_script_bad_input_is_one_line(tiny, tmp_path, case):
    spm_ckpt, bpe_ckpt = tiny("mha-untied-spm"), tiny("gqa-tied-bpe")
    out = tmp_path / "out.gguf"
    if case == "bad-to":
        r, words = export_script(spm_ckpt, "onnx", out), ["--to", "onnx"]
    elif case == "bad-dtype":
        r, words = export_script(spm_ckpt, "gguf", out, "--dtype", "q4_9"), ["q4_9", "q8_0"]
    elif case == "hf-q8":
        out = tmp_path / "hf"
        r, words = export_script(spm_ckpt, "hf", out, "--dtype", "q8_0"), ["q8_0"]
    elif case == "missing-dir":
        r, words = export_script(tmp_path / "nothing", "gguf", out), ["nothing", "does not exist"]
    elif case == "incomplete":
        r, words = export_script(incomplete_checkpoint(spm_ckpt, tmp_path), "gguf", out), ["lit_model.safetensors"]
    elif case == "onto-itself":
        out = tmp_path / "copy"
        shutil.copytree(spm_ckpt, out)
        r = export_script(out, "hf", out)
        assert r.returncode != 0 and "Traceback" not in r.stderr and "would replace" in r.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in spm_ckpt.iterdir())
        return
    elif case == "onto-another-folder":  # an export replaces its folder: never a folder of something else
        out = tmp_path / "documents"
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        r = export_script(spm_ckpt, "hf", out)
        assert r.returncode != 0 and "Traceback" not in r.stderr and "refusing to replace" in r.stderr
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
        return
    else:
        r, words = export_script(unknown_pre_tokenizer(bpe_ckpt, tmp_path), "gguf", out), ["pre-tokenizer"]
    assert_one_line_error(r, out, *words)


@pytest.mark.parametrize("to", ["gguf", "hf"])
def test_failure_while_writing_leaves_nothing(tiny, tmp_path, monkeypatch, to):
    """A failure in the middle of the tensors (disk full, a bad tensor) leaves no partial output."""
    import lit_llama.io.export as export

    calls = {"n": 0}

    def failing(t, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return t

    ckpt = tiny("mha-untied-spm")
    if to == "gguf":
        real = export._gguf_array
        monkeypatch.setattr(export, "_gguf_array", lambda t, qt: real(failing(t), qt))
        out = tmp_path / "x.gguf"
        with pytest.raises(OSError):
            export_gguf(ckpt, out, "f32")
    else:
        real_sources = export.source_tensors
        monkeypatch.setattr(export, "source_tensors", lambda c, sd: [
            export.Source(s.role, s.layer, s.shape, (lambda g=s.get: failing(g()))) for s in real_sources(c, sd)])
        out = tmp_path / "hf"
        with pytest.raises(OSError):
            export_hf(ckpt, out)
    assert calls["n"] == 5
    assert list(tmp_path.iterdir()) == []


def test_script_writes_gguf(tiny, tmp_path):
    r = export_script(tiny("mha-untied-spm"), "gguf", tmp_path / "m.gguf", "--dtype", "f16")
    assert r.returncode == 0, r.stderr
    assert reader_fields(tmp_path / "m.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
