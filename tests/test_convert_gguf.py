"""GGUF files in (lit_llama/io/gguf.py), checked against the float weights they were made from.

The test writes tiny `llama` GGUF files with the `gguf` package's own writer and quantizers, from
random float weights in our (Hugging Face "rotate halves") layout; GGUF stores Q and K rows in
Meta's interleaved-pair order, so a wrong un-permutation, a wrong row/column order, a misread
quantization block or a wrong vocabulary padding shows up as a weight off by far more than the
format's rounding. Logits are compared with transformers' GGUF loader, an independent reader, and
the SentencePiece tokenizer rebuilt from the metadata with the original SentencePiece model."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as QT

from conftest import run_script
from lit_llama.io.checkpoint import load_config, load_model, load_state_dict
from lit_llama.io.gguf import convert_gguf_checkpoint
from lit_llama.tokenizer import Tokenizer

N_LAYER, N_EMBD, N_HEAD, FFN, CTX, EPS = 2, 64, 4, 96, 64, 1e-5  # every row a multiple of 32 (one quant block)
HEAD = N_EMBD // N_HEAD
VOCAB = 400  # SentencePiece with byte fallback needs 259 pieces + the characters; padded to 448
# name: (key/value heads, tied embeddings, rope base)
CASES = {"untied-mha": (4, False, 10000.0), "tied-gqa": (2, True, 500000.0)}
TYPES = ("F32", "F16", "Q8_0", "Q4_0")
SAMPLES = ["Hello, world!", "The  quick brown fox\njumps over\n\n the lazy dog.", "café 東京",
           "  leading spaces and trailing ", "def f(x):\n    return x ** 2  # ok?"]


# ---------------------------------------------------------------- building GGUF files


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    """A tiny SentencePiece BPE model with byte fallback, trained like LLaMA's: no normalization
    and whitespace kept as is (GGUF keeps no normalizer, so llama.cpp tokenizes this way too)."""
    import pydoc_data.topics
    import sentencepiece as spm

    lines = [l for text in pydoc_data.topics.topics.values() for l in text.splitlines() if l.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[:3000]), model_writer=out, vocab_size=VOCAB,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    return out.getvalue()


def spm_processor(model: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Our rotate-halves q/k rows to Meta's (and GGUF's) adjacent pairs: the inverse of Hugging
    Face's permutation w.view(n, hd//2, 2, dim).transpose(1, 2)."""
    out, dim = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


def source_weights(n_kv: int, tied: bool, seed: int = 0) -> dict:
    """Random float weights by GGUF tensor name, q and k in our halves layout. Large weights and
    random norm scales, so that attention depends on positions and every norm matters."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: 0.3 * torch.randn(*shape, generator=g)
    norm = lambda: 1 + 0.3 * torch.randn(N_EMBD, generator=g)
    w = {"token_embd.weight": rnd(VOCAB, N_EMBD), "output_norm.weight": norm()}
    if not tied:
        w["output.weight"] = rnd(VOCAB, N_EMBD)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.update({p + "attn_norm.weight": norm(), p + "ffn_norm.weight": norm(),
                  p + "attn_q.weight": rnd(N_HEAD * HEAD, N_EMBD), p + "attn_k.weight": rnd(n_kv * HEAD, N_EMBD),
                  p + "attn_v.weight": rnd(n_kv * HEAD, N_EMBD), p + "attn_output.weight": rnd(N_EMBD, N_HEAD * HEAD),
                  p + "ffn_gate.weight": rnd(FFN, N_EMBD), p + "ffn_up.weight": rnd(FFN, N_EMBD),
                  p + "ffn_down.weight": rnd(N_EMBD, FFN)})
    return w


def llama_metadata(n_kv: int, theta: float) -> dict:
    """The llama.* keys, typed as llama.cpp writes them (uint32 sizes, float32 eps and base)."""
    return {"llama.block_count": N_LAYER, "llama.context_length": CTX, "llama.embedding_length": N_EMBD,
            "llama.feed_forward_length": FFN, "llama.attention.head_count": N_HEAD,
            "llama.attention.head_count_kv": n_kv, "llama.attention.layer_norm_rms_epsilon": EPS,
            "llama.rope.freq_base": theta, "llama.rope.dimension_count": HEAD, "llama.vocab_size": VOCAB}


def add_llama_metadata(writer, n_kv: int, theta: float, spm: bytes, overrides: dict = None) -> None:
    """llama.* keys (`overrides` replaces values; None drops a key) and the SentencePiece vocabulary."""
    for key, value in {**llama_metadata(n_kv, theta), **(overrides or {})}.items():
        if value is not None:
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    sp = spm_processor(spm)
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(sp.vocab_size())]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())


def write_gguf(path: Path, weights: dict, n_kv: int, theta: float, qtype: str, spm: bytes,
               raw_overrides: dict = None, metadata: dict = None) -> Path:
    """A llama GGUF of `weights`: 2-D tensors as `qtype`, norms in F32 (as llama.cpp keeps them).
    `raw_overrides` {name: (array, raw_dtype)} replaces tensors with arbitrary raw data;
    `metadata` overrides llama.* keys (None: left out)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    add_llama_metadata(writer, n_kv, theta, spm, metadata)
    for name, t in weights.items():
        if raw_overrides and name in raw_overrides:
            data, raw = raw_overrides[name]
            writer.add_tensor(name, data, raw_dtype=raw)
            continue
        if name.endswith("attn_q.weight"):
            t = halves_to_interleaved(t, N_HEAD)
        elif name.endswith("attn_k.weight"):
            t = halves_to_interleaved(t, n_kv)
        a = t.numpy().astype(np.float32)
        if a.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, a)
        elif qtype == "F16":
            writer.add_tensor(name, a.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(a, QT[qtype]), raw_dtype=QT[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def convert(spm_model, tmp_path_factory):
    """convert(case, qtype) -> (source weights, GGUF path, checkpoint dir): a GGUF of the case's
    random weights, converted by the real converter; once per module for each (case, qtype)."""
    done = {}

    def run(case: str, qtype: str):
        if (case, qtype) not in done:
            n_kv, tied, theta = CASES[case]
            root = tmp_path_factory.mktemp(f"{case}-{qtype}")
            weights = source_weights(n_kv, tied)
            path = write_gguf(root / f"tiny-{qtype}.gguf", weights, n_kv, theta, qtype, spm_model)
            convert_gguf_checkpoint(path, root / "lit")
            done[case, qtype] = weights, path, root / "lit"
        return done[case, qtype]

    return run


ALL = pytest.mark.parametrize("case,qtype", [(c, t) for c in CASES for t in TYPES])


# ---------------------------------------------------------------- weights


def error_bound(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """The most each element of `w` may move when stored as `qtype` and read back. Quantized
    types round each block of 32 consecutive weights of a row to multiples of a step d kept in
    float16 (relative error <= 2^-11):
      Q8_0: d = absmax/127, q = round(w/d) in [-127, 127]: error <= d/2 + 127 * d * 2^-11;
      Q4_0: d = absmax/8, q = trunc(w/d + 8.5) clipped to 15: error <= d (the largest weight of
            the block, +8d, clips to 7d) + 8 * d * 2^-11."""
    if qtype == "F32":
        return torch.zeros_like(w)
    if qtype == "F16":
        return w.abs() * 2.0 ** -11 + 2.0 ** -24
    blocks = w.reshape(-1, 32)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    if qtype == "Q8_0":
        d = amax / 127
        bound = d * (0.5 + 127 * 2.0 ** -11)
    elif qtype == "Q4_0":
        d = amax / 8
        bound = d * (1 + 8 * 2.0 ** -11)
    else:
        raise ValueError(qtype)
    return (bound * (1 + 1e-5) + 1e-7).expand_as(blocks).reshape(w.shape)


def expected_tensors(weights: dict, n_kv: int, tied: bool) -> dict:
    """Our state dict from the source weights, by the model's layout (see LLaMA in model.py); the
    rows past the vocabulary are checked separately."""
    out = {"transformer.wte.weight": weights["token_embd.weight"], "transformer.ln_f.weight": weights["output_norm.weight"]}
    if not tied:
        out["lm_head.weight"] = weights["output.weight"]
    for i in range(N_LAYER):
        b, p = f"blk.{i}.", f"transformer.h.{i}."
        out.update({
            p + "rms_1.weight": weights[b + "attn_norm.weight"], p + "rms_2.weight": weights[b + "ffn_norm.weight"],
            p + "attn.c_attn.weight": torch.cat([weights[b + "attn_q.weight"], weights[b + "attn_k.weight"],
                                                 weights[b + "attn_v.weight"]]),
            p + "attn.c_proj.weight": weights[b + "attn_output.weight"],
            p + "mlp.c_fc1.weight": weights[b + "ffn_gate.weight"], p + "mlp.c_fc2.weight": weights[b + "ffn_up.weight"],
            p + "mlp.c_proj.weight": weights[b + "ffn_down.weight"],
        })
    return out


@ALL
def test_config_from_metadata(convert, case, qtype):
    _, _, out = convert(case, qtype)
    n_kv, tied, theta = CASES[case]
    c = load_config(out)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_query_groups, c.intermediate_size) == (N_LAYER, N_EMBD, N_HEAD, n_kv, FFN)
    assert (c.block_size, c.vocab_size, c.padded_vocab_size) == (CTX, VOCAB, 448)
    assert c.rope_base == theta and c.norm_eps == EPS and c.tie_embeddings is tied


@ALL
def test_weights_match_source_within_format_rounding(convert, case, qtype):
    weights, _, out = convert(case, qtype)
    n_kv, tied, _ = CASES[case]
    sd = load_state_dict(out)
    expected = expected_tensors(weights, n_kv, tied)
    assert set(sd) == set(expected)
    # F16 files stay float16 (exactly the file's values); quantized ones dequantize to float32
    assert {t.dtype for t in sd.values()} == {torch.float16 if qtype == "F16" else torch.float32}
    for name, want in expected.items():
        got = sd[name].float()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            assert got.shape == (448, N_EMBD)
            assert torch.equal(got[VOCAB:], torch.zeros(448 - VOCAB, N_EMBD)), f"{name}: padding rows not zero"
            got = got[:VOCAB]
        assert got.shape == want.shape, name
        # norms are F32 in every file; an F16 file's checkpoint is float16 throughout
        fmt = qtype if want.ndim == 2 else ("F16" if qtype == "F16" else "F32")
        err, bound = (got - want).abs(), error_bound(want, fmt)
        worst = (err - bound).argmax()
        within = bool((err <= bound).all())
        assert within, (f"{name} ({fmt}): error {err.flatten()[worst]:.3g} > bound "
                                      f"{bound.flatten()[worst]:.3g} at {np.unravel_index(worst.item(), err.shape)}")
        if fmt in ("Q8_0", "Q4_0"):
            # the bound is not loose: the rounding uses a good part of it
            assert err.max() > 0.3 * bound.max(), name


def test_error_bound_catches_a_row_permutation():
    """Guards the check above: q rows left in GGUF's interleaved order exceed even Q4_0's bound."""
    w = source_weights(4, False)["blk.0.attn_q.weight"]
    wrong = halves_to_interleaved(w, N_HEAD)
    assert ((wrong - w).abs() > error_bound(w, "Q4_0")).any()


# ---------------------------------------------------------------- logits against transformers


@pytest.mark.parametrize("case,qtype", [(c, t) for c in CASES for t in ("F32", "Q8_0")])
@torch.no_grad()
def test_logits_match_transformers_gguf_loader(convert, case, qtype):
    """transformers reads the same GGUF file on its own (config, un-permutation of q/k, tied
    output) and must compute the same logits as our converted checkpoint."""
    from transformers import AutoModelForCausalLM

    _, path, out = convert(case, qtype)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert ref.config.tie_word_embeddings == CASES[case][1]
    ours = load_model(out).float().eval()
    idx = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = ref(idx).logits
    torch.testing.assert_close(ours(idx), expected, rtol=1e-4, atol=1e-4)
    # guard: the logits depend on every position's rotary angle, so a layout error could not hide
    base = ours.config.rope_base
    ours.config.rope_base = base * 3
    assert (ours(idx) - expected).abs().max() > 1e-2


# ---------------------------------------------------------------- tokenizer


def test_sentencepiece_tokenizer_from_metadata(spm_model, convert):
    import sentencepiece as spm

    _, _, out = convert("untied-mha", "F32")
    original = spm_processor(spm_model)
    rebuilt = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert rebuilt.vocab_size() == original.vocab_size() == VOCAB
    assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.unk_id()) == (original.bos_id(), original.eos_id(), original.unk_id())
    # the samples exercise byte fallback (not in the training text) and merges
    assert any(original.is_byte(i) for i in original.encode("café 東京"))
    assert any(len(p) > 2 for text in SAMPLES for p in original.encode(text, out_type=str))
    ours = Tokenizer(out)
    for text in SAMPLES:
        ids = original.encode(text)
        assert rebuilt.encode(text) == ids, text
        assert rebuilt.encode(text, out_type=str) == original.encode(text, out_type=str), text
        assert rebuilt.decode(ids) == original.decode(ids) == text, text
        assert ours.encode(text, bos=False).tolist() == ids, text
        assert ours.encode(text).tolist() == [original.bos_id()] + ids, text  # LLaMA prepends BOS
        assert ours.decode(ids) == text, text
    assert ours.eos_id == original.eos_id() and ours.stop_ids == [original.eos_id()]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("metadata,message", [
    ({"llama.embedding_length": None, "llama.attention.head_count": None},
     "lacks llama.embedding_length, llama.attention.head_count"),
    ({"llama.block_count": None}, "lacks llama.block_count"),
    ({"llama.attention.head_count": 5, "llama.rope.dimension_count": None}, "must divide"),
], ids=["no-width-and-heads", "no-layers", "heads-not-dividing-width"])
def test_incomplete_or_inconsistent_metadata_is_a_user_error(tmp_path, spm_model, metadata, message):
    """One clear error (a UserError, printed by the scripts as one line) instead of a TypeError or
    ValueError traceback from deep in the config."""
    from lit_llama.utils import UserError

    path = write_gguf(tmp_path / "bad.gguf", source_weights(2, True), 2, 10000.0, "F32", spm_model, metadata=metadata)
    with pytest.raises(UserError, match=message):
        convert_gguf_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- bad input through the script


def assert_one_line_error(result, out_dir: Path, *words: str) -> None:
    err = result.stderr
    assert result.returncode != 0, err
    assert "Traceback" not in err, err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for w in words:
        assert w.lower() in errors[0].lower(), err
    assert not out_dir.exists()
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]
    assert not leftovers, leftovers


def convert_script(gguf_path: Path, out_dir: Path):
    return run_script("scripts/convert_gguf_checkpoint.py", "--gguf_path", gguf_path, "--output_dir", out_dir, timeout=120)


def test_script_rejects_another_architecture(tmp_path, spm_model):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_context_length(CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_tensor("token_embd.weight", np.ones((VOCAB, N_EMBD), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(convert_script(path, tmp_path / "out"), tmp_path / "out", "gpt2", "architecture")


def test_script_rejects_a_tensor_type_it_cannot_dequantize(tmp_path, spm_model):
    # a tensor late in the file, so that the failure comes in the middle of writing the output
    bad = np.zeros((N_EMBD, FFN), dtype=np.int32)
    path = write_gguf(tmp_path / "i32.gguf", source_weights(2, True), 2, 10000.0, "Q8_0", spm_model,
                      raw_overrides={"blk.1.ffn_down.weight": (bad, QT.I32)})
    assert_one_line_error(convert_script(path, tmp_path / "out"), tmp_path / "out", "blk.1.ffn_down.weight", "I32")


@pytest.mark.parametrize("fraction", [0.5, 0.01], ids=["in-the-tensors", "in-the-metadata"])
def test_script_rejects_a_truncated_file(tmp_path, spm_model, fraction):
    path = write_gguf(tmp_path / "full.gguf", source_weights(2, True), 2, 10000.0, "F32", spm_model)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    assert_one_line_error(convert_script(cut, tmp_path / "out"), tmp_path / "out", "cut.gguf")


def test_script_rejects_a_missing_file(tmp_path):
    assert_one_line_error(convert_script(tmp_path / "nothing.gguf", tmp_path / "out"), tmp_path / "out",
                          "nothing.gguf", "does not exist")
