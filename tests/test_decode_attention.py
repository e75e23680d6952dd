"""The CPU decode attention kernel (lit_llama/csrc/decode_attention.cpp) against torch's
scaled_dot_product_attention, and its use in decoding: DecodeAttention in the decode layout, eager
and compiled, and the compiled step's guards (a KV cache of a new size compiles again)."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from lit_llama import cpu_kernels
from lit_llama.infer.generation import (DecodeAttention, _decode_guards, compile_decode_step, decode_layout,
                                        decode_step, generate, prepare_cache)
from lit_llama.model import CausalSelfAttention, Config, LLaMA

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="the kernel is built with a C++ compiler")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert cpu_kernels.available(), "the kernel must build where a C++ compiler is present"


def reference(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=q.size(1) != k.size(1))


# (heads, groups, head size): MHA, GQA as SmolLM2's (9/3, 64), MQA, a head size of 128 and one with
# no specialised loop (48)
SHAPES = [(4, 4, 64), (9, 3, 64), (8, 1, 128), (6, 2, 48)]


@pytest.mark.parametrize("heads,groups,hs", SHAPES)
@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
def test_kernel_equals_sdpa_over_a_cache_prefix(heads, groups, hs, length):
    """The new token at position length-1 of a 200-slot cache: keys 0..length-1 attend (the mask the
    model builds), chunk edges included; the cache is a slice of a larger buffer (its strides)."""
    torch.manual_seed(length)
    q = torch.randn(1, heads, 1, hs)
    cache_k, cache_v = torch.randn(1, groups, 256, hs), torch.randn(1, groups, 256, hs)
    k, v = cache_k[:, :, :200], cache_v[:, :, :200]
    mask = (torch.arange(200) < length)[None, :]
    got = torch.ops.lit_llama.decode_attention(q, k, v, mask)
    torch.testing.assert_close(got, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_kernel_rows_with_their_own_masks():
    """A batch whose rows see different keys (left padding, a hole), as the batched engine's rows
    do; a row that sees nothing gives zeros, as SDPA does."""
    torch.manual_seed(0)
    B, S = 4, 150
    q, k, v = torch.randn(B, 9, 1, 64), torch.randn(B, 3, S, 64), torch.randn(B, 3, S, 64)
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., :150] = True
    mask[1, ..., 40:101] = True
    mask[2, ..., ::7] = True
    got = torch.ops.lit_llama.decode_attention(q, k, v, mask)
    torch.testing.assert_close(got, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[3], torch.zeros_like(got[3]))


def test_kernel_reads_a_bfloat16_cache():
    torch.manual_seed(1)
    q = torch.randn(2, 9, 1, 64, dtype=torch.bfloat16)
    k, v = torch.randn(2, 3, 300, 64).bfloat16(), torch.randn(2, 3, 300, 64).bfloat16()
    mask = (torch.arange(300) < 257)[None, :]
    got = torch.ops.lit_llama.decode_attention(q, k, v, mask)
    assert got.dtype == torch.bfloat16
    want = reference(q.float(), k, v, mask)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_kernel_skips_masked_keys():
    """Keys the mask excludes are never read: NaN there changes nothing (SDPA's kernel reads them)."""
    q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 128, 64), torch.randn(1, 3, 128, 64)
    mask = (torch.arange(128) < 70)[None, :]
    want = torch.ops.lit_llama.decode_attention(q, k, v, mask)
    k[:, :, 70:], v[:, :, 70:] = float("nan"), float("nan")
    assert torch.equal(torch.ops.lit_llama.decode_attention(q, k, v, mask), want)


def tiny(**kw):
    config = Config(block_size=512, vocab_size=100, padded_vocab_size=128, n_layer=2, n_head=6, n_embd=96,
                    n_query_groups=2, intermediate_size=160, **kw)
    torch.manual_seed(0)
    return LLaMA(config).eval()


def test_decode_layout_uses_the_kernel_and_decodes_as_sdpa():
    """The decode layout swaps plain attention for DecodeAttention; greedy tokens and every step's
    logits equal those of the model on SDPA."""
    plain = tiny()
    fast = decode_layout(tiny())
    assert all(type(b.attn) is DecodeAttention for b in fast.transformer.h)
    assert all(type(b.attn) is CausalSelfAttention for b in plain.transformer.h)
    prompt = torch.tensor([5, 17, 3, 99, 42, 8])
    with torch.inference_mode():
        assert list(generate(fast, prompt, 40, temperature=0.0)) == list(generate(plain, prompt, 40, temperature=0.0))
        for m in (plain, fast):
            prepare_cache(m, 64)
            m(prompt[None], torch.arange(6))
        for i in range(6, 30):
            x, pos = torch.tensor([[i]]), torch.tensor([i])
            torch.testing.assert_close(decode_step(fast, x, pos), decode_step(plain, x, pos), rtol=1e-5, atol=1e-5)


def test_compiled_step_recompiles_for_a_new_cache_size():
    """The compiled step checks tensors only (not the module tree): a cache of another size, or a
    batch of two, compiles again rather than running the first graph; each equals eager."""
    fast = decode_layout(tiny(), compiled=True)
    plain = tiny()
    step = compile_decode_step(torch.device("cpu"))
    with torch.inference_mode():
        for batch, length in ((1, 64), (1, 320), (2, 320)):
            prompt = torch.randint(0, 100, (batch, 10))
            for m in (fast, plain):
                m.set_kv_cache(batch, length)
                m(prompt, torch.arange(10))
            x, pos = torch.randint(0, 100, (batch, 1)), torch.tensor([10])
            torch.testing.assert_close(step(fast, x, pos), decode_step(plain, x, pos), rtol=1e-4, atol=1e-4)
            assert fast.transformer.h[0].attn.kv_cache.k.size(2) == length


def test_compiled_steps_each_serve_their_own_model():
    """Two models of one config, one float and one int8 (other layers, other tensors): each compiled
    step, used in turn, gives its own model's logits (each step holds its own graphs), and a step
    given the other model compiles again rather than running its graph."""
    from lit_llama.quant.weight_only import quantize_weight_only

    plain = decode_layout(tiny(), compiled=True)
    int8 = decode_layout(quantize_weight_only(tiny(), "int8"), compiled=True)
    steps = {id(m): compile_decode_step(torch.device("cpu")) for m in (plain, int8)}
    with torch.inference_mode():
        for m in (plain, int8):
            m.set_kv_cache(1, 64)
            m(torch.tensor([[5, 17, 3]]), torch.arange(3))
        for i in range(3, 6):
            x, pos = torch.tensor([[i]]), torch.tensor([i])
            for m in (plain, int8, plain):
                torch.testing.assert_close(steps[id(m)](m, x, pos), decode_step(m, x, pos), rtol=1e-4, atol=1e-4)
        # a step given the other model: the guards on its first block and head compile it again
        x, pos = torch.tensor([[7]]), torch.tensor([6])
        torch.testing.assert_close(steps[id(plain)](int8, x, pos), decode_step(int8, x, pos), rtol=1e-4, atol=1e-4)


def test_guard_filter_keeps_the_cache_and_drops_the_module_tree():
    class Guard:
        def __init__(self, name, guard_type):
            self.name, self.guard_type = name, guard_type

    block = "model._modules['transformer']._modules['h']._modules['{}']._modules"
    guards = {  # guard: kept
        Guard("x", "TENSOR_MATCH"): True, Guard("G['torch']", "MODULE_MATCH"): True, Guard("", "GRAD_MODE"): True,
        Guard(block.format(3) + "['attn']._modules['kv_cache']._buffers['k']", "TENSOR_MATCH"): True,
        Guard(block.format(0) + "['mlp']._modules['c_fc1']._buffers['qweight']", "TENSOR_MATCH"): True,
        Guard("model._modules['lm_head']._parameters['weight']", "TENSOR_MATCH"): True,
        Guard("model.config.n_head", "EQUALS_MATCH"): True,
        Guard(block.format(3) + "['mlp']._modules['c_fc1']._buffers['qweight']", "TENSOR_MATCH"): False,
        Guard(block.format(10) + "['mlp']._modules['c_fc1']._buffers['qweight']", "TENSOR_MATCH"): False,
        Guard(block.format(0) + "['mlp']._modules['c_fc1'].groupsize", "EQUALS_MATCH"): False,
        Guard("model._forward_hooks", "EMPTY_NN_MODULE_HOOKS_DICT"): False,
        Guard("model._modules['h']", "TYPE_MATCH"): False,
    }
    assert _decode_guards(list(guards)) == list(guards.values())