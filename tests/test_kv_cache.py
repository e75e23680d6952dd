"""The KV cache's dtype (--kv_cache_dtype): int8 rows with one scale per head and position against
their definition (codes round(x / s), s = max|x| / 127), the CPU decode kernel reading them against
scaled_dot_product_attention over the same values, and the embedded model's greedy text with an
int8 cache against a float32 one, parting only where the int8 cache's own logit error (measured
teacher-forced) could flip a near-tie."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_greedy, run_script
from lit_llama import cpu_kernels
from lit_llama.infer.generation import generate
from lit_llama.infer.load import load_for_inference
from lit_llama.model import dequantize_kv, quantize_kv


def test_int8_rows_are_their_definition():
    x = torch.randn(2, 3, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    packed = quantize_kv(x)
    assert packed.dtype == torch.int8 and packed.shape == (2, 3, 5, 68)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(packed[..., -4:].contiguous().view(torch.float32), s)
    assert torch.equal(packed[..., :64].float(), torch.round(x / s))
    back = dequantize_kv(packed, torch.float32)
    assert ((back - x).abs() <= s / 2 * (1 + 1e-6)).all()
    assert torch.equal(dequantize_kv(quantize_kv(torch.zeros(1, 4)), torch.float32), torch.zeros(1, 4))


@pytest.mark.parametrize("length", [1, 70, 300])
def test_decode_kernel_reads_int8_rows(length):
    assert cpu_kernels.available()
    g = torch.Generator().manual_seed(length)
    B, H, G, S, D = 2, 8, 2, 320, 64
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = quantize_kv(torch.randn(B, G, S, D, generator=g)), quantize_kv(torch.randn(B, G, S, D, generator=g))
    mask = (torch.arange(S) < length)[None, None, None].expand(B, 1, 1, S).clone()
    mask[1, ..., : length // 2] = False  # rows differ
    got = torch.ops.lit_llama.decode_attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q, dequantize_kv(k, torch.float32), dequantize_kv(v, torch.float32),
                                          attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_embedded_model_greedy_with_an_int8_cache(default_checkpoint):
    _, model, tok = load_for_inference(default_checkpoint, "32-true")
    model = model.module if hasattr(model, "module") else model
    prompt = tok.encode("The three primary colors are red, blue and")
    want = list(generate(model, prompt, 40))
    model.kv_cache_dtype = torch.int8
    model.clear_kv_cache()
    got = list(generate(model, prompt, 40))
    cache = model.transformer.h[0].attn.kv_cache
    assert cache.k.dtype == torch.int8 and cache.k.size(-1) == model.config.head_size + 4
    # the int8 cache's logit error along the float32 text, teacher-forced one token at a time (the
    # cache is read at every step, as in decoding): the bound of what rounding may flip
    ids = torch.cat([prompt, torch.tensor(want)])
    errors = []
    for cache_dtype in (torch.int8, None):
        model.kv_cache_dtype = cache_dtype
        model.set_kv_cache(1, 256)
        logits = [model(ids[None, :1], torch.arange(1), last=True)[0, -1]]
        for t in range(1, len(ids)):
            logits.append(model(ids[None, t: t + 1], torch.tensor([t]), last=True)[0, -1])
        errors.append(torch.stack(logits))
    delta = (errors[0] - errors[1]).abs().max().item()
    scale = errors[1].abs().max().item()
    assert 0 < delta < 0.05 * scale, (delta, scale)  # it changes the logits, by a little
    model.kv_cache_dtype = None
    assert_same_greedy(model, prompt, want, got, bound=delta)


def test_generate_takes_the_flag(default_checkpoint):
    args = ("--checkpoint_dir", default_checkpoint, "--prompt", "Hello", "--max_new_tokens", "5", "--temperature", "0")
    r = run_script("generate.py", *args, "--kv_cache_dtype", "int8", timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = run_script("generate.py", *args, "--kv_cache_dtype", "int3", timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "--kv_cache_dtype" in lines[0], r.stderr


def test_int8_cache_memory(default_checkpoint):
    """Bytes of the cache per position and layer: 2 (k, v) x groups x (head size + 4) for int8, a
    quarter of float32's and about half of bfloat16's."""
    from lit_llama.model import KVCache

    c = 2 * 3 * 64
    sizes = {d: sum(t.numel() * t.element_size() for t in KVCache(1, 3, 100, 64, dtype=d).buffers()) / 100
             for d in (torch.float32, torch.bfloat16, torch.int8)}
    assert sizes == {torch.float32: 4 * c, torch.bfloat16: 2 * c, torch.int8: 2 * 3 * 68}
