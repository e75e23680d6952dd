import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lit_llama.peft.adapter import (AdapterAttention, AdapterConfig, add_adapter, adapter_state_dict, load_adapter,
                               save_adapter)
from lit_llama.peft.adapter_v2 import AdapterV2Linear, add_adapter_v2, load_adapter_v2, save_adapter_v2
from lit_llama.io.checkpoint import CheckpointError, save_weights_file
from lit_llama.model import LLaMA, Config, apply_rope, rope_cos_sin
from lit_llama.utils import UserError

ADD = {"v1": add_adapter, "v2": add_adapter_v2}
NAMES = ["tiny", "tiny-gqa"]


def _base(name="tiny", seed=0, **overrides) -> LLaMA:
    torch.manual_seed(seed)
    return LLaMA(Config.from_name(name, n_layer=3, **overrides)).eval()


def _randomize_adapter(model, seed=1):
    """Nonzero gates, biases and scales, so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=g))


def _cached_logits(model, idx, prefill):
    """Logits of `idx` computed by a prefill of `prefill` tokens, then one token at a time."""
    model.set_kv_cache(idx.size(0), 16)
    out = [model(idx[:, :prefill], torch.arange(prefill))]
    for t in range(prefill, idx.size(1)):
        out.append(model(idx[:, t:t + 1], torch.tensor([t])))
    model.clear_kv_cache()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("version", ADD)
@pytest.mark.parametrize("name", NAMES)
def test_fresh_adapter_is_exactly_the_base_model(name, version):
    base = _base(name)
    adapted = ADD[version](copy.deepcopy(base), AdapterConfig(prompt_length=4, start_layer=1))
    assert isinstance(adapted.transformer.h[1].attn, AdapterAttention)
    assert not isinstance(adapted.transformer.h[0].attn, AdapterAttention)
    idx = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        assert torch.equal(adapted(idx), base(idx))
        # prefill + decode steps through the KV cache
        assert torch.equal(_cached_logits(adapted, idx, prefill=5), _cached_logits(base, idx, prefill=5))


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_matches_full_forward_with_active_adapter(name):
    model = add_adapter_v2(_base(name), AdapterConfig(prompt_length=3, start_layer=0))
    _randomize_adapter(model)
    idx = torch.randint(0, 500, (2, 8))
    with torch.no_grad():
        full = model(idx)
        assert not torch.allclose(full, _base(name)(idx), atol=1e-3)  # the adapter is on
        torch.testing.assert_close(_cached_logits(model, idx, prefill=4), full)


def _reference_adapter_attention(attn: AdapterAttention, x, cos, sin):
    """The adapter attention written out with explicit softmaxes, independent of the module's code."""
    c = attn.config
    B, T, _ = x.shape
    hs, nh, ng = c.head_size, c.n_head, c.n_query_groups
    W = attn.c_attn.weight
    Wq, Wk, Wv = W[:nh * hs], W[nh * hs:(nh + ng) * hs], W[(nh + ng) * hs:]

    def heads(t, n):  # (B, L, n*hs) -> (B, nh, L, hs), each group's k/v repeated for its query heads
        t = t.view(t.size(0), t.size(1), n, hs).transpose(1, 2)
        return t.repeat_interleave(nh // n, dim=1)

    q = apply_rope(heads(x @ Wq.T, nh), cos, sin)
    k = apply_rope(heads(x @ Wk.T, ng), cos, sin)
    v = heads(x @ Wv.T, ng)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    y = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v

    P = attn.adapter_wte.weight[None]  # (1, prompt_length, n_embd): no rotary, no mask
    pk, pv = heads(P @ Wk.T, ng), heads(P @ Wv.T, ng)
    yp = (q @ pk.transpose(-1, -2) / math.sqrt(hs)).softmax(-1) @ pv
    y = y + torch.tanh(attn.gating_factor)[None, :, None, None] * yp
    return y.transpose(1, 2).reshape(B, T, nh * hs) @ attn.c_proj.weight.T


@pytest.mark.parametrize("name", NAMES)
def test_adapter_attention_matches_explicit_formula(name):
    model = add_adapter(_base(name), AdapterConfig(prompt_length=5, start_layer=0))
    attn = model.transformer.h[0].attn
    torch.manual_seed(2)
    with torch.no_grad():
        attn.gating_factor.copy_(torch.randn(model.config.n_head))
        attn.adapter_wte.weight.copy_(torch.randn_like(attn.adapter_wte.weight))
    x = torch.randn(2, 7, model.config.n_embd)
    cos, sin = rope_cos_sin(torch.arange(7), model.config, x.dtype)
    with torch.no_grad():
        out = attn(x, cos, sin)
        torch.testing.assert_close(out, _reference_adapter_attention(attn, x, cos, sin))
        # the prompt term matters: with the gates closed the output differs
        attn.gating_factor.zero_()
        assert not torch.allclose(attn(x, cos, sin), out, atol=1e-3)


def _trainable(model):
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def _v1_count(c: Config, a: AdapterConfig) -> int:
    return (a.prompt_length * c.n_embd + c.n_head) * (c.n_layer - a.start_layer)


def _v2_count(c: Config, a: AdapterConfig) -> int:
    hs = c.head_size
    # out_features of c_attn, attn.c_proj, c_fc1, c_fc2, mlp.c_proj; a bias and a scale each
    outs = (c.n_head + 2 * c.n_query_groups) * hs + c.n_embd + 2 * c.intermediate_size + c.n_embd
    norms = (2 * c.n_layer + 1) * c.n_embd  # rms_1, rms_2 per block, ln_f
    return _v1_count(c, a) + 2 * outs * c.n_layer + norms


@pytest.mark.parametrize("name", NAMES)
def test_only_adapter_parameters_train(name):
    a = AdapterConfig(prompt_length=4, start_layer=1)
    v1 = add_adapter(_base(name), a)
    assert set(_trainable(v1)) == {f"transformer.h.{i}.attn.{p}" for i in (1, 2)
                                   for p in ("adapter_wte.weight", "gating_factor")}
    assert sum(_trainable(v1).values()) == _v1_count(v1.config, a)
    assert set(adapter_state_dict(v1)) == set(_trainable(v1))

    v2 = add_adapter_v2(_base(name), a)
    names = set(_trainable(v2))
    assert all(n.endswith(("adapter_wte.weight", "gating_factor", "adapter_bias", "adapter_scale", "rms_1.weight",
                           "rms_2.weight", "ln_f.weight")) for n in names)
    assert sum(_trainable(v2).values()) == _v2_count(v2.config, a)
    # every linear of every block is wrapped, even in layers without a prompt
    assert sum(isinstance(m, AdapterV2Linear) for m in v2.modules()) == 5 * v2.config.n_layer


def test_7b_trainable_counts_on_meta():
    with torch.device("meta"):
        model = LLaMA(Config.from_name("7B"))
    a = AdapterConfig(prompt_length=10, start_layer=2)
    add_adapter(model, a)
    assert model.transformer.h[2].attn.gating_factor.is_meta
    assert sum(_trainable(model).values()) == 1_229_760 == _v1_count(model.config, a)
    with torch.device("meta"):
        model = add_adapter_v2(LLaMA(Config.from_name("7B")), a)
    assert sum(_trainable(model).values()) == _v2_count(model.config, a)


@pytest.mark.parametrize("version", ADD)
def test_a_few_steps_lower_the_loss(version):
    model = ADD[version](_base("tiny-gqa"), AdapterConfig(prompt_length=4, start_layer=1)).train()
    torch.manual_seed(3)
    idx = torch.randint(0, 500, (2, 17))
    # a high lr: the random tiny base passes little signal through its attention, so v1 learns slowly
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-1)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


SAVE_LOAD = {"v1": (add_adapter, save_adapter, load_adapter, "lit_adapter.safetensors"),
             "v2": (add_adapter_v2, save_adapter_v2, load_adapter_v2, "lit_adapter_v2.safetensors")}


@pytest.mark.parametrize("version", SAVE_LOAD)
def test_save_load_roundtrip(tmp_path, version):
    add, save, load, fname = SAVE_LOAD[version]
    model = add(_base("tiny-gqa"), AdapterConfig(prompt_length=3, start_layer=1))
    _randomize_adapter(model)
    assert save(model, tmp_path) == tmp_path / fname
    loaded = load(_base("tiny-gqa"), tmp_path)  # the folder; the file works too
    assert loaded.adapter_config == model.adapter_config
    idx = torch.randint(0, 500, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
        assert torch.equal(load(_base("tiny-gqa"), tmp_path / fname)(idx), model(idx))


def test_load_errors(tmp_path):
    v1 = add_adapter(_base("tiny"), AdapterConfig(prompt_length=3))
    v2 = add_adapter_v2(_base("tiny"), AdapterConfig(prompt_length=3))
    f1, f2 = save_adapter(v1, tmp_path), save_adapter_v2(v2, tmp_path)
    with pytest.raises(CheckpointError, match=r"different base model: n_embd=64 \(model: 128\)"):
        load_adapter(_base("tiny", n_embd=128), f1)
    with pytest.raises(CheckpointError, match="different base model: n_query_groups"):
        load_adapter_v2(_base("tiny-gqa"), f2)
    with pytest.raises(CheckpointError, match="is a LLaMA-Adapter v1 file; load it with load_adapter, not a "
                                              "LLaMA-Adapter v2 file"):
        load_adapter_v2(_base("tiny"), f1)
    with pytest.raises(CheckpointError, match="is a LLaMA-Adapter v2 file; load it with load_adapter_v2"):
        load_adapter(_base("tiny"), f2)
    save_weights_file(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"kind": "lora"})
    with pytest.raises(CheckpointError, match="not an adapter file"):
        load_adapter(_base("tiny"), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_adapter(_base("tiny"), tmp_path / "missing")
    # a failed load leaves the base model untouched
    base = _base("tiny")
    with pytest.raises(CheckpointError):
        load_adapter(base, f2)
    assert getattr(base, "adapter_config", None) is None and not any(
        isinstance(m, AdapterAttention) for m in base.modules())


def test_bad_adapter_config_and_double_add():
    with pytest.raises(UserError, match="start_layer"):
        add_adapter(_base("tiny"), AdapterConfig(start_layer=3))
    with pytest.raises(UserError, match="prompt_length"):
        add_adapter_v2(_base("tiny"), AdapterConfig(prompt_length=0))
    with pytest.raises(UserError, match="already has an adapter"):
        add_adapter_v2(add_adapter(_base("tiny"), AdapterConfig()), AdapterConfig())
