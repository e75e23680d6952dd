"""Weight-only int8 / int4 (lit_llama/quant/weight_only.py): the quantizers against their formulas
written out here, the layers (torch's kernels, eager and compiled, and the path for CPUs without
native bfloat16) against products with those weights, the embedded model's perplexity within the
issue's bounds of float32's, LoRA on top, and bad group sizes as one error line."""

import math

import pytest
import torch

from conftest import ROOT
from lit_llama.eval.perplexity import perplexity, weights_bytes
from lit_llama.infer.load import load_for_inference
from lit_llama.io.checkpoint import save_checkpoint
from lit_llama.model import Config, LLaMA
from lit_llama.peft.lora import LoRAConfig, add_lora, save_lora
from lit_llama import cpu_kernels
from lit_llama.quant import weight_only
from lit_llama.quant.weight_only import LowBitLinear, Int8Embedding, Int8Linear, quantize_weight_only
from lit_llama.utils import UserError
from quant_helpers import assert_one_error_line, run_main

# bfloat16 activations and scales (on CPUs that have it) round each product's inputs to 8 bits
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def int8_reference(w):
    """Per output row: s = max|w| / 127 rounded to float16, q = round(w / s) within [-127, 127];
    returns the dequantized q * s."""
    out = torch.empty_like(w)
    for r in range(w.size(0)):
        s = (w[r].abs().max() / 127).half().float()
        out[r] = torch.round(w[r] / s).clamp(-127, 127) * s
    return out


def int4_reference(w, groupsize):
    """Per group of `groupsize` inputs in a row: 16 levels from its minimum to its maximum, the
    minimum and the step rounded to float16 (as GGUF's Q4_1 stores them)."""
    out = torch.empty_like(w)
    for r in range(w.size(0)):
        for g0 in range(0, w.size(1), groupsize):
            g = w[r, g0:g0 + groupsize]
            lo = g.min().half().float()
            step = ((g.max() - lo) / 15).half().float()
            out[r, g0:g0 + groupsize] = torch.round((g - lo) / step).clamp(0, 15) * step + lo
    return out


def weights(out, inp, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-bf16"])
def cpu_kind(request, monkeypatch):
    """Both kernel paths on this machine: the native-bfloat16 one only where the CPU has it."""
    if request.param and not weight_only.fast_bf16_cpu():
        pytest.skip("this CPU has no AVX512-BF16 / AMX")
    monkeypatch.setattr(weight_only, "fast_bf16_cpu", lambda: request.param)
    return request.param


def test_int8_layer_is_the_per_row_formula(cpu_kind):
    w = weights(96, 64)
    layer = Int8Linear.from_float(w)
    want = int8_reference(w)
    tol = BF16_TOL if cpu_kind else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.float(), want, **tol)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() == 127
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), x @ want.t(), **tol)
    assert layer(x).dtype == torch.float32


@pytest.fixture(params=["kernel", "no-kernel"])
def int4_path(request, monkeypatch):
    """The CPU int4 kernel (lit_llama/csrc/int4_matmul.cpp) and the path without it (the integers
    dequantized for each product)."""
    assert cpu_kernels.available(), "the kernels must build where a C++ compiler is present"
    if request.param == "no-kernel":
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("groupsize", [32, 64, 128])
def test_int4_layer_is_the_per_group_formula(groupsize, int4_path):
    w = weights(48, 256, seed=groupsize)
    layer = LowBitLinear.from_float(w, groupsize)
    assert layer.kernel == (int4_path == "kernel")
    want = int4_reference(w, groupsize)
    exact = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.float(), want, **exact)
    assert layer.qweight.numel() == w.numel() // 2
    # a few rows (decoding): the kernel, float32 throughout
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ want.t(), **exact)
    # a prompt's rows: the dequantized weight, multiplied in bfloat16 where the CPU has it natively
    x = torch.randn(2, weight_only.KERNEL_ROWS, 256)
    bf16 = int4_path == "kernel" and weight_only.fast_bf16_cpu()
    torch.testing.assert_close(layer(x), x @ want.t(), **(BF16_TOL if bf16 else exact))


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_layers_equal_eager(bits, cpu_kind):
    torch._dynamo.reset()  # the other kernel path may be cached for the same code
    w = weights(64, 128, seed=bits)
    layer = Int8Linear.from_float(w) if bits == 8 else LowBitLinear.from_float(w, 32)
    x = torch.randn(1, 128)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)(x)
        if bits == 8:  # one row, compiled: the integers cast into a float32 reduction, the exact formula
            torch.testing.assert_close(compiled, x @ layer.weight.float().t(), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(compiled, layer(x), rtol=1e-2 if cpu_kind else 1e-5,
                                       atol=1e-3 if cpu_kind else 1e-5)


def test_quantize_model_replaces_every_linear_and_the_tied_head(int4_path):
    torch.manual_seed(0)
    model = LLaMA(Config(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_embd=64, n_query_groups=2,
                         intermediate_size=128, tie_embeddings=True)).eval()
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        want = model(idx)
    wte = model.transformer.wte.weight.detach().clone()
    quantize_weight_only(model, "int4")
    kinds = {type(m) for b in model.transformer.h for m in b.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {LowBitLinear}
    # the head: the int8 codes, on the CPU kernel where it runs; the embedding looks up its rows
    head = model.lm_head
    kernel = int4_path == "kernel"
    assert isinstance(head, LowBitLinear if kernel else Int8Linear) and isinstance(model.transformer.wte, Int8Embedding)
    assert model.transformer.wte.head[0] is head and (not kernel or head.bits == 8)
    torch.testing.assert_close(head.weight.float(), int8_reference(wte), **BF16_TOL)
    torch.testing.assert_close(model.transformer.wte(idx).float(), int8_reference(wte)[idx], **BF16_TOL)
    with torch.no_grad():
        got = model(idx)
    # 4-bit weights move the logits; they must stay close to the float model's
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.98


def test_bad_group_size_changes_nothing():
    model = LLaMA(Config(block_size=64, vocab_size=512, n_layer=1, n_head=4, n_embd=96, n_query_groups=2,
                         intermediate_size=128))
    with pytest.raises(UserError, match="divisible by 64; transformer.h.0.attn.c_attn has 96 inputs.*int4-g32"):
        quantize_weight_only(model, "int4-g64")
    assert all(type(m) is torch.nn.Linear for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(UserError, match="unknown weight-only mode 'int4-g48'"):
        quantize_weight_only(model, "int4-g48")


@pytest.fixture(scope="module")
def eval_tokens(default_checkpoint):
    import pydoc_data.topics

    from lit_llama.tokenizer import Tokenizer

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[100_000:130_000]
    return Tokenizer(default_checkpoint).encode(text)[: 4 * 512]


@pytest.fixture(scope="module")
def float_perplexity(default_checkpoint, eval_tokens):
    fabric, model, _ = load_for_inference(default_checkpoint, "32-true")
    return perplexity(model, eval_tokens, 512, fabric.device), weights_bytes(model)


@pytest.mark.parametrize("mode, bound", [("int8", 0.01), ("int4", 0.10)])
def test_embedded_model_perplexity_stays_within_bounds(mode, bound, default_checkpoint, eval_tokens, float_perplexity):
    """The issue's quality goals on the real model: int8 within 1% of float32, int4 (groups of 32)
    within 10%; and the weights held are about a quarter (int8) or less of float32's (int4: 18% of
    it, 24% where the int4 kernel runs the tied head and a second copy of its codes is looked up)."""
    ppl32, bytes32 = float_perplexity
    fabric, model, _ = load_for_inference(default_checkpoint, "32-true", quantize=mode)
    ppl = perplexity(model, eval_tokens, 512, fabric.device)
    assert math.isfinite(ppl) and abs(ppl / ppl32 - 1) < bound, (mode, ppl, ppl32)
    assert weights_bytes(model) < (0.3 if mode == "int8" else 0.25) * bytes32, (weights_bytes(model), bytes32)


def test_lora_on_int8_base(tmp_path, default_checkpoint):
    """LoRA wraps the float layers, whose bases are then quantized: the result is the quantized base
    plus the float LoRA branch."""
    torch.manual_seed(0)
    config = Config(name="tiny", block_size=64, vocab_size=49152, n_layer=2, n_head=4, n_embd=64,
                    n_query_groups=2, intermediate_size=128, tie_embeddings=True)
    save_checkpoint(tmp_path / "ckpt", LLaMA(config), tokenizer_dir=default_checkpoint)
    lora = add_lora(LLaMA(config), LoRAConfig(r=4, alpha=8, query=True, value=True, mlp=True))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking, non-zero branch
    save_lora(lora, tmp_path / "lora")
    idx = torch.randint(0, 49152, (1, 12))
    outs = {}
    for mode in (None, "int8"):
        _, model, _ = load_for_inference(tmp_path / "ckpt", "32-true", quantize=mode, lora_path=tmp_path / "lora")
        with torch.no_grad():
            outs[mode] = model(idx)
        if mode:
            bases = [m.base for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base")]
            # int8 codes: on the CPU kernel where it is built, torch's int8 kernel elsewhere
            int8 = LowBitLinear if cpu_kernels.available() else Int8Linear
            assert bases and all(isinstance(b, int8) and getattr(b, "bits", 8) == 8 for b in bases)
    torch.testing.assert_close(outs["int8"], outs[None], rtol=0.05, atol=0.05)
    assert (outs["int8"] - outs[None]).abs().max() > 0  # quantized: not the same numbers


def test_generate_with_bad_group_size_is_one_error_line(tmp_path, default_checkpoint, monkeypatch, capsys):
    config = Config(name="tiny", block_size=64, vocab_size=49152, n_layer=1, n_head=4, n_embd=96,
                    n_query_groups=2, intermediate_size=128, tie_embeddings=True)
    save_checkpoint(tmp_path / "ckpt", LLaMA(config), tokenizer_dir=default_checkpoint)
    code, err = run_main("generate.py", ["--checkpoint_dir", tmp_path / "ckpt", "--quantize", "int4-g128",
                                         "--prompt", "Hi", "--max_new_tokens", "2"], monkeypatch, capsys)
    assert_one_error_line(code, err, "divisible by 128", "96 inputs", "int4-g32")
    assert not (ROOT / "out" / "partial").exists()


@pytest.mark.parametrize("bits, act_order", [(4, False), (4, True), (3, True)])
def test_packed_gptq_layers_run_on_the_int4_kernel_with_the_same_weights(bits, act_order, int4_path):
    """A PackedLinear (w = s (q - zero), GPTQ's layout) and the LowBitLinear it becomes:
    same weights, same products, act-order's column permutation included."""
    from lit_llama.quant.packed import PackedLinear

    g = torch.Generator().manual_seed(bits)
    out, cols, groupsize = 48, 128, 32
    q = torch.randint(0, 2 ** bits, (out, cols), generator=g)
    scales = torch.rand(out, cols // groupsize, generator=g) * 0.05 + 0.001
    zeros = torch.randint(0, 2 ** bits, (out, cols // groupsize), generator=g)
    perm = torch.randperm(cols, generator=g) if act_order else None
    packed = PackedLinear.from_ints(q, scales, zeros, bits, groupsize, perm)
    parent = torch.nn.Sequential(packed)
    assert weight_only.use_int4_kernels(parent, torch.float32) == 1
    fast = parent[0]
    assert isinstance(fast, LowBitLinear) and fast.kernel == (int4_path == "kernel")
    torch.testing.assert_close(fast.weight.float(), packed.weight.float(), rtol=1e-5, atol=1e-6)
    x = torch.randn(3, cols)
    torch.testing.assert_close(fast(x), packed(x), rtol=1e-5, atol=1e-5)


def test_packed_layers_the_kernel_cannot_take_stay_packed():
    from lit_llama.quant.packed import PackedLinear

    q = torch.randint(0, 16, (48, 96))
    # groups of 64 over 96 inputs: the last is shorter; 6 bits: not an int4 code
    short = PackedLinear.from_ints(q, torch.rand(48, 2), torch.zeros(48, 2), 4, 64)
    six = PackedLinear.from_ints(torch.randint(0, 64, (48, 96)), torch.rand(48, 3), torch.zeros(48, 3), 6, 32)
    parent = torch.nn.Sequential(short, six)
    assert weight_only.use_int4_kernels(parent, torch.float32) == 0
    assert parent[0] is short and parent[1] is six
