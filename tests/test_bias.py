"""Linear biases (transformers' `attention_bias` on q, k, v and o, `mlp_bias` on gate, up and down)
through every path: Hugging Face folders in (the real converter) and out, GGUF in and out (llama.cpp
reads the export; a GGUF laid out as llama.cpp's own converter writes it is read back), KV-cache
decoding, LoRA and its merge, adapters, weight-only int8/int4, GGUF integers kept as they are, and
GPTQ's packed checkpoints.

The references are transformers' LlamaForCausalLM, llama.cpp, and llama.cpp's convert_hf_to_gguf.py
layout written out here (its names and its LlamaModel.permute of q_proj/k_proj rows, which it applies
to `.bias` as to `.weight`). The models' biases are random and as large as their weights, so a
dropped, misplaced or unpermuted bias moves the logits by whole units; guards check that it does."""

import copy
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf

from conftest import top1_agreement
from isolated import llama_cpp_run, run_isolated
from lit_llama.io.checkpoint import load_model, load_state_dict, read_checkpoint_config, save_checkpoint
from lit_llama.io.convert import convert_hf_checkpoint
from lit_llama.io.export import export_gguf, export_hf
from lit_llama.io.gguf import convert_gguf_checkpoint, dequantize
from lit_llama.model import Config, LLaMA
from test_convert_gguf import add_llama_metadata, spm_model  # noqa: F401 (a fixture)
from test_model_hf import TOL, tiny_hf_model, tokens
from test_weight_only import cpu_kind, int4_reference, int8_reference  # noqa: F401 (a fixture)

VOCAB = 400  # test_convert_gguf's SentencePiece model and metadata: 2 layers, width 64, 4 heads, MLP 96
# name: (key/value heads, tied embeddings, head_dim (None: 64 / 4), attention_bias, mlp_bias)
CASES = {
    "mha-untied-both": (4, False, None, True, True),
    "gqa-tied-head_dim-both": (2, True, 32, True, True),  # q is 128 rows wide, the model 64
    "gqa-attention-only": (2, False, None, True, False),
    "mqa-tied-mlp-only": (1, True, None, False, True),
}

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama_cpp (scripts/install_llama_cpp.sh) is not installed")


def biased_hf_model(case: str, **overrides):
    n_kv, tied, head_dim, attention_bias, mlp_bias = CASES[case]
    extra = {} if head_dim is None else {"head_dim": head_dim}
    return tiny_hf_model(n_kv, tied, 10000.0, VOCAB, attention_bias=attention_bias, mlp_bias=mlp_bias,
                         **extra, **overrides)


def save_folder(hf, folder: Path, spm: bytes) -> Path:
    hf.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(spm)  # GGUF export takes SentencePiece or byte-level BPE
    return folder


@pytest.fixture(scope="module")
def converted(spm_model, tmp_path_factory):
    """converted(case) -> (transformers model, our checkpoint dir converted from its saved folder)."""
    done = {}

    def make(case: str):
        if case not in done:
            hf = biased_hf_model(case)
            root = tmp_path_factory.mktemp(case)
            convert_hf_checkpoint(save_folder(hf, root / "hf", spm_model), root / "lit")
            done[case] = hf, root / "lit"
        return done[case]

    return make


def without_biases(hf):
    """A copy of a transformers model with every bias zero: what a converter dropping them gives."""
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    return hf


def bias_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}


# ---------------------------------------------------------------- Hugging Face in


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_logits_match_transformers(converted, case):
    hf, ckpt = converted(case)
    ours = load_model(ckpt).eval()
    c = hf.config
    assert (ours.config.attention_bias, ours.config.mlp_bias) == (c.attention_bias, c.mlp_bias)
    assert ours.config.head_size == c.head_dim and ours.config.n_query_groups == c.num_key_value_heads
    config_file = json.loads((ckpt / "lit_config.json").read_text())
    assert (config_file["attention_bias"], config_file["mlp_bias"]) == (c.attention_bias, c.mlp_bias)
    # the layers that have a bias, exactly: q/k/v fused and o with attention_bias, the MLP's with mlp_bias
    want = {f"transformer.h.{i}.{layer}" for i in range(c.num_hidden_layers)
            for layer in (("attn.c_attn", "attn.c_proj") if c.attention_bias else ())
            + (("mlp.c_fc1", "mlp.c_fc2", "mlp.c_proj") if c.mlp_bias else ())}
    assert set(bias_layers(ours)) == want
    idx = tokens(VOCAB)
    expected = hf(idx).logits
    torch.testing.assert_close(ours(idx), expected, **TOL)
    # guard: the biases move these logits by far more than the tolerance
    assert (without_biases(hf)(idx).logits - expected).abs().max().item() > 0.5


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_kv_cache_decoding_matches_full_forward(converted, case):
    hf, ckpt = converted(case)
    ours = load_model(ckpt).eval()
    idx = tokens(VOCAB)
    expected = hf(idx).logits
    ours.set_kv_cache(batch_size=idx.size(0), max_seq_length=16)
    try:
        steps = [ours(idx[:, :5], input_pos=torch.arange(5)), ours(idx[:, 5:8], input_pos=torch.arange(5, 8))]
        steps += [ours(idx[:, t:t + 1], input_pos=torch.tensor([t])) for t in range(8, idx.size(1))]
    finally:
        ours.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, **TOL)


def test_checkpoints_without_bias_keys_stay_bias_free(tmp_path):
    """lit_config.json files written before the fields existed load as the bias-free model they are."""
    config = Config.from_name("tiny")
    assert not config.attention_bias and not config.mlp_bias
    model = LLaMA(config)
    assert not any(k.endswith(".bias") for k in model.state_dict())
    save_checkpoint(tmp_path / "old", model)
    fields = json.loads((tmp_path / "old" / "lit_config.json").read_text())
    del fields["attention_bias"], fields["mlp_bias"]
    (tmp_path / "old" / "lit_config.json").write_text(json.dumps(fields))
    loaded, _ = read_checkpoint_config(tmp_path / "old")
    assert loaded == config


# ---------------------------------------------------------------- Hugging Face out


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_hf_export_is_the_original_folder(converted, case, tmp_path):
    from transformers import LlamaForCausalLM

    hf, ckpt = converted(case)
    export_hf(ckpt, tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (c["attention_bias"], c["mlp_bias"]) == (hf.config.attention_bias, hf.config.mlp_bias)
    back = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    want, got = hf.state_dict(), back.state_dict()
    assert set(got) == set(want) and any(k.endswith(".bias") for k in got)
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    idx = tokens(VOCAB)
    torch.testing.assert_close(back(idx).logits, hf(idx).logits, **TOL)


# ---------------------------------------------------------------- GGUF out and in

GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py's LlamaModel.permute, which it applies to q_proj/k_proj weights and biases
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_tensors(hf, skip=()) -> dict:
    """The F32 tensors llama.cpp's converter writes for a LlamaForCausalLM (`skip`: GGUF names left out)."""
    c = hf.config
    out = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            out[GLOBAL_NAMES[name]] = t
            continue
        i, layer, kind = m.groups()
        if layer == "self_attn.q_proj":
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif layer == "self_attn.k_proj":
            t = llama_cpp_permute(t, c.num_key_value_heads)
        out[f"blk.{i}.{LAYER_NAMES[layer]}.{kind}"] = t
    return {k: v.detach().float() for k, v in out.items() if k not in skip}


def add_metadata(writer, hf, spm: bytes) -> None:
    c = hf.config  # heads of another width than n_embd / n_head: their width, as llama.cpp's converter
    wide = {k: c.head_dim for k in ("llama.attention.key_length", "llama.attention.value_length",
                                    "llama.rope.dimension_count")} if c.head_dim * c.num_attention_heads != 64 else {}
    add_llama_metadata(writer, c.num_key_value_heads, 10000.0, spm, wide)


def write_llama_cpp_gguf(path: Path, hf, spm: bytes, skip=()) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    add_metadata(writer, hf, spm)
    for name, t in llama_cpp_tensors(hf, skip).items():
        writer.add_tensor(name, t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensors(path: Path) -> dict:
    return {t.name: dequantize(t) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    """exported(case) -> our F32 GGUF export of the converted checkpoint, made once per module."""
    done = {}

    def make(case: str) -> Path:
        if case not in done:
            _, ckpt = converted(case)
            done[case] = tmp_path_factory.mktemp(f"{case}-gguf") / "model.gguf"
            export_gguf(ckpt, done[case], "f32")
        return done[case]

    return make


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_export_is_llama_cpp_converters_layout(converted, exported, case):
    """Every tensor, biases included, named and permuted as llama.cpp's own converter writes it."""
    hf, _ = converted(case)
    got, want = gguf_tensors(exported(case)), llama_cpp_tensors(hf)
    assert set(got) == set(want)
    assert any(k.endswith(".bias") for k in got)
    for name, w in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], w), name


@needs_llama_cpp
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_llama_cpp_runs_the_biased_export(converted, exported, case):
    hf, _ = converted(case)
    ids = tokens(VOCAB, (1, 20))
    got = torch.from_numpy(run_isolated(llama_cpp_run, exported(case), ids[0].tolist(), 64, [], timeout=300)["logits"])
    want = hf(ids).logits[0]
    # llama.cpp sums in its own order: logits of order 10 agree to ~1e-4
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    rate, decided = top1_agreement(got, want, bound=1e-3 * (1 + want.abs().max().item()))
    assert decided and rate >= 0.95, rate
    # guard: llama.cpp does read the biases (without them it would compute these logits)
    assert (got - without_biases(hf)(ids).logits[0]).abs().max().item() > 0.5


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_gguf_in_matches_transformers(converted, exported, spm_model, case, tmp_path):
    """A GGUF in llama.cpp's converter's layout converts to transformers' logits, and our own export
    converts back to the checkpoint it came from, exactly."""
    hf, ckpt = converted(case)
    path = write_llama_cpp_gguf(tmp_path / "llama_cpp.gguf", hf, spm_model)
    convert_gguf_checkpoint(path, tmp_path / "in")
    ours = load_model(tmp_path / "in").eval()
    assert (ours.config.attention_bias, ours.config.mlp_bias) == (hf.config.attention_bias, hf.config.mlp_bias)
    idx = tokens(VOCAB)
    torch.testing.assert_close(ours(idx), hf(idx).logits, **TOL)

    convert_gguf_checkpoint(exported(case), tmp_path / "back")
    want, got = load_state_dict(ckpt), load_state_dict(tmp_path / "back")
    assert set(got) == set(want)
    for name, w in want.items():
        assert torch.equal(got[name], w), name


@torch.no_grad()
def test_gguf_biases_are_optional_one_by_one(spm_model, tmp_path):
    """llama.cpp loads each bias where the file has one: a file with q, k and v biases only (no
    attn_output or ffn biases) is the model whose o_proj bias is zero."""
    hf = biased_hf_model("gqa-attention-only")
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    skip = [f"blk.{i}.attn_output.bias" for i in range(hf.config.num_hidden_layers)]
    path = write_llama_cpp_gguf(tmp_path / "qkv.gguf", hf, spm_model, skip)
    convert_gguf_checkpoint(path, tmp_path / "lit")
    ours = load_model(tmp_path / "lit").eval()
    assert ours.config.attention_bias and not ours.config.mlp_bias
    assert not ours.transformer.h[0].attn.c_proj.bias.any() and ours.transformer.h[0].attn.c_attn.bias.any()
    idx = tokens(VOCAB)
    torch.testing.assert_close(ours(idx), hf(idx).logits, **TOL)


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_gguf_integers_kept_with_float_biases(converted, spm_model, case, tmp_path):
    """A Q8_0 GGUF kept as integers (--keep_quantized): each integer layer adds its F32 bias, so the
    model equals the same file dequantized."""
    from lit_llama.infer.load import load_for_inference
    from lit_llama.quant.weight_only import kernel_dtype

    hf, _ = converted(case)
    writer = gguf.GGUFWriter(str(tmp_path / "q8.gguf"), "llama")
    add_metadata(writer, hf, spm_model)
    for name, t in llama_cpp_tensors(hf).items():
        a = t.numpy().astype(np.float32)
        if a.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    convert_gguf_checkpoint(tmp_path / "q8.gguf", tmp_path / "kept", keep_quantized=True)
    convert_gguf_checkpoint(tmp_path / "q8.gguf", tmp_path / "float")
    _, kept, _ = load_for_inference(tmp_path / "kept")
    _, ref, _ = load_for_inference(tmp_path / "float")
    kept, ref = (m.module if hasattr(m, "module") else m for m in (kept, ref))
    layers = bias_layers(kept)
    assert layers and set(layers) == set(bias_layers(ref))
    assert all(type(m) is not torch.nn.Linear for m in layers.values())  # integer layers, with biases
    idx = tokens(VOCAB)
    got, want = kept(idx).float(), ref(idx).float()
    bf16 = kernel_dtype(torch.device("cpu"), torch.float32) == torch.bfloat16
    # products in bfloat16 round the activations to 8 bits: measured on logits of ~10 (AVX512-BF16),
    # a mean difference of 0.03-0.04 and a largest of 0.3-0.6; float32 products agree to ~1e-5
    scale = 1 + want.abs().max().item()
    mean_bound, max_bound = (0.01 * scale, 0.1 * scale) if bf16 else (1e-4 * scale, 1e-3 * scale)
    assert (got - want).abs().mean().item() <= mean_bound and (got - want).abs().max().item() <= max_bound
    # guard: without the biases the mean difference is 0.5-1.1
    for m in layers.values():
        m.bias = torch.nn.Parameter(torch.zeros(m.bias.shape, dtype=m.bias.dtype), requires_grad=False)
    assert (kept(idx).float() - want).abs().mean().item() > 3 * mean_bound


# ---------------------------------------------------------------- LoRA and adapters


@pytest.mark.parametrize("case", ["mha-untied-both", "gqa-tied-head_dim-both"])
@torch.no_grad()
def test_lora_on_biased_model_and_merge(converted, case):
    from lit_llama.peft.lora import LoRAConfig, add_lora, merge_lora

    hf, ckpt = converted(case)
    idx = tokens(VOCAB)
    expected = hf(idx).logits
    model = add_lora(load_model(ckpt), LoRAConfig(r=4, alpha=8, dropout=0.0, query=True, key=True, value=True,
                                                  projection=True, mlp=True)).eval()
    torch.testing.assert_close(model(idx), expected, **TOL)  # B = 0: the base, biases included
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    unmerged = model(idx)
    assert (unmerged - expected).abs().max().item() > 0.1  # guard: the updates matter
    merged = merge_lora(model)
    assert set(merged.state_dict()) == set(load_state_dict(ckpt))  # plain layers, biases kept
    torch.testing.assert_close(merged(idx), unmerged, **TOL)


@pytest.mark.parametrize("version", ["v1", "v2"])
@torch.no_grad()
def test_adapters_at_init_are_the_biased_base(converted, version):
    from lit_llama.peft.adapter import AdapterConfig, add_adapter
    from lit_llama.peft.adapter_v2 import add_adapter_v2

    hf, ckpt = converted("mha-untied-both")
    model = (add_adapter if version == "v1" else add_adapter_v2)(load_model(ckpt), AdapterConfig(start_layer=0)).eval()
    idx = tokens(VOCAB)
    torch.testing.assert_close(model(idx), hf(idx).logits, **TOL)


# ---------------------------------------------------------------- quantized layers


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("case", ["mha-untied-both", "gqa-tied-head_dim-both"])
@torch.no_grad()
def test_weight_only_layers_add_the_float_bias(converted, case, mode, cpu_kind):
    """The quantized model equals a float one whose weights are the quantization formulas' (written
    out in test_weight_only.py) and whose biases are the original ones; at int8 it is close to the
    float model (int4 moves these large random weights too far for that to say much)."""
    from lit_llama.quant.weight_only import quantize_weight_only

    hf, ckpt = converted(case)
    ref = load_model(ckpt).eval()
    V = ref.config.vocab_size
    for name, m in ref.named_modules():
        if name.startswith("transformer.h.") and isinstance(m, torch.nn.Linear):
            m.weight = torch.nn.Parameter(int8_reference(m.weight) if mode == "int8" else int4_reference(m.weight, 32))
    # the head stays at int8 rows; tied, the embedding is the head; untied, the embedding stays float
    head = ref.transformer.wte if ref.lm_head is None else ref.lm_head
    w = head.weight.detach().clone()
    w[:V] = int8_reference(w[:V])
    head.weight = torch.nn.Parameter(w)
    model = quantize_weight_only(load_model(ckpt).eval(), mode)
    layers = bias_layers(model)
    assert len(layers) == 2 * 5 and all(type(m) is not torch.nn.Linear for m in layers.values())
    idx = tokens(VOCAB)
    got, want = model(idx), ref(idx)
    if cpu_kind:  # bfloat16 products round activations and scales to 8 bits: measured up to 1.05 here
        assert (got - want).abs().max().item() <= 0.2 * (1 + want.abs().max().item())
    else:  # float32 throughout, sums in another order (a prompt's product by blocks of the weight's rows)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * (1 + want.abs().max().item()))
    if mode == "int8":  # measured: 5% of the logits' norm, 88-92% of the top tokens kept
        f = hf(idx).logits
        assert (got - f).norm() / f.norm() < 0.1
        assert top1_agreement(got, f, bound=0.0)[0] >= 0.75


@torch.no_grad()
def test_gptq_packed_checkpoint_keeps_the_biases(converted, tmp_path):
    """quantize/gptq.py's checkpoint (round to nearest here: no calibration) stores each block
    layer's bias beside its integers, and the packed layers add it."""
    from lit_llama.quant.gptq import GPTQSettings, quantize_checkpoint
    from lit_llama.quant.packed import PackedLinear, load_packed_model

    _, ckpt = converted("gqa-tied-head_dim-both")
    quantize_checkpoint(ckpt, tmp_path / "rtn", GPTQSettings(method="rtn", bits=4, groupsize=32))
    packed = load_packed_model(tmp_path / "rtn").eval()
    layers = bias_layers(packed)
    assert len(layers) == 2 * 5 and all(isinstance(m, PackedLinear) for m in layers.values())
    # the reference: the float model stored in float16 (as the packed checkpoint stores its floats),
    # with the packed integers' weights and the original biases
    ref = load_model(ckpt).eval()
    for p in ref.parameters():
        p.data = p.data.half().float()
    for name, m in layers.items():
        orig = ref.get_submodule(name)
        orig.weight = torch.nn.Parameter(m.weight.float())
        torch.testing.assert_close(m.bias, orig.bias, rtol=0, atol=0)
    idx = tokens(VOCAB)
    torch.testing.assert_close(packed(idx), ref(idx), rtol=1e-3, atol=1e-3)
