"""Quantized layers against their dequantized reference (packed 4/3-bit, bitsandbytes int8, the
Triton kernel where Triton is installed), int8 and int4 generation end to end, and every way of
pointing --quantize at the wrong checkpoint: one `error:` line each."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script
from lit_llama.quant.bnb import quantize_linears
from lit_llama.quant.packed import PackedEmbedding, PackedLinear, pack_int, unpack_int
from lit_llama.quant.quantization import dequantize_weight
from lit_llama.utils import UserError
from quant_helpers import assert_one_error_line, calibration_file, run_main, tiny_checkpoint


def reference_weight(q, scales, zeros, groupsize, perm=None):
    """w[o, perm[j]] = scale[o, j // groupsize] * (q[o, j] - zero[o, j // groupsize]), written out
    column by column, independently of the layer's vectorized dequantization."""
    out, cols = q.shape
    w = torch.empty(out, cols)
    for j in range(cols):
        g = j // groupsize
        w[:, j if perm is None else perm[j]] = scales[:, g].float() * (q[:, j].float() - zeros[:, g].float())
    return w


def random_packed(out, cols, bits, groupsize, act_order=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = -(-cols // groupsize)
    q = torch.randint(0, 2 ** bits, (out, cols), generator=g)
    scales = (torch.rand(out, groups, generator=g) * 0.05 + 0.001).half()
    zeros = torch.randint(0, 2 ** bits, (out, groups), generator=g).to(torch.uint8)
    perm = torch.randperm(cols, generator=g) if act_order else None
    return q, scales, zeros, perm


def test_pack_layout_is_a_little_endian_bit_stream():
    # 4-bit: two weights a byte, the first in the low nibble
    assert pack_int(torch.tensor([[1, 2, 15, 0]]), 4).tolist() == [[0x21, 0x0F]]
    # 3-bit: eight weights in three bytes; 0..7 -> bits 000 001 010 011 100 101 110 111 from the lowest
    word = sum(v << (3 * i) for i, v in enumerate(range(8)))
    assert pack_int(torch.arange(8)[None], 3).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]
    # 6-bit: four weights in three bytes; 8-bit: one a byte
    assert pack_int(torch.tensor([[1, 2, 3, 63]]), 6).tolist() == [[1 | 2 << 6, (2 >> 2) | 3 << 4, 63 << 2]]
    assert pack_int(torch.tensor([[7, 255]]), 8).tolist() == [[7, 255]]
    for bits, cols in ((4, 6), (3, 24), (6, 12), (8, 5)):
        q = torch.randint(0, 2 ** bits, (7, cols))
        packed = pack_int(q, bits)
        assert packed.dtype == torch.uint8 and packed.shape == (7, cols * bits // 8)
        assert torch.equal(unpack_int(packed, bits, cols), q.int())


@pytest.mark.parametrize("bits,cols,groupsize,act_order", [(4, 256, 128, False), (3, 256, 64, True),
                                                           (4, 576, 128, False), (3, 80, -1, False)])
def test_packed_layer_matches_its_dequantized_reference(bits, cols, groupsize, act_order):
    # 576 in groups of 128: the last group has 64 inputs
    q, scales, zeros, perm = random_packed(48, cols, bits, cols if groupsize == -1 else groupsize, act_order)
    layer = PackedLinear.from_ints(q, scales, zeros, bits, groupsize, perm)
    ref = reference_weight(q, scales, zeros, cols if groupsize == -1 else groupsize, perm)
    # float16 scales give a float16 weight: the reference rounded to float16
    torch.testing.assert_close(layer.weight, ref.half(), rtol=1e-3, atol=1e-6)
    layer.scales = layer.scales.float()  # as loaded for float32 inference: exact
    torch.testing.assert_close(layer.weight, ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(dequantize_weight(layer), ref, rtol=0, atol=1e-7)
    x = torch.randn(2, 5, cols)
    torch.testing.assert_close(layer(x), x @ ref.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,groupsize,act_order", [(4, 32, True), (6, 64, False), (8, 128, True)])
def test_packed_embedding_looks_up_its_dequantized_rows(bits, groupsize, act_order):
    """A lookup unpacks only the rows it reads; they are the rows of the reference weight, and the
    tied head (`weight`) is the whole reference."""
    q, scales, zeros, perm = random_packed(300, 96, bits, groupsize, act_order, seed=bits)
    emb = PackedEmbedding.from_ints(q, scales.float(), zeros, bits, groupsize, perm)
    ref = reference_weight(q, scales, zeros, groupsize, perm)
    idx = torch.tensor([[0, 299, 5], [5, 17, 123]])
    torch.testing.assert_close(emb(idx), ref[idx], rtol=0, atol=1e-7)
    torch.testing.assert_close(emb.weight, ref, rtol=0, atol=1e-7)


@pytest.mark.skipif(not (shutil.which("gcc") or shutil.which("cc")), reason="torch.compile on CPU needs a C compiler")
def test_compiled_packed_layer_matches_its_dequantized_reference():
    """Inside a compiled decode step a packed layer is one fused reduction over its packed bytes."""
    import torch._dynamo

    q, scales, zeros, perm = random_packed(64, 192, 4, 128, act_order=True, seed=3)
    layer = PackedLinear.from_ints(q, scales.float(), zeros, 4, 128, perm)
    ref = reference_weight(q, scales, zeros, 128, perm)
    x = torch.randn(1, 1, 192)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, dynamic=False)(x), x @ ref.T, rtol=1e-5, atol=1e-5)


def test_packed_layer_state_dict_round_trips():
    q, scales, zeros, perm = random_packed(16, 64, 4, 32, act_order=True)
    layer = PackedLinear.from_ints(q, scales, zeros, 4, 32, perm)
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "zeros", "perm"}  # no float weight anywhere
    fresh = PackedLinear(64, 16, 4, 32, act_order=True)
    fresh.load_state_dict(state)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_matches_the_dequantized_reference():
    # Triton's interpreter runs the kernel on the CPU with NumPy: the same indexing, masks and
    # unpacking as on a GPU, checked here without one
    code = """
import torch
from lit_llama.quant.kernels import packed_matmul
from lit_llama.quant.packed import dequantize_ints, pack_int
torch.manual_seed(0)
for bits, K, N, gs, M in [(4, 192, 70, 64, 1), (3, 200, 33, 48, 5), (4, 576, 96, 128, 20)]:
    q = torch.randint(0, 2 ** bits, (N, K))
    s = torch.rand(N, -(-K // gs)) * 0.1 + 0.01
    z = torch.randint(0, 2 ** bits, (N, -(-K // gs))).to(torch.uint8)
    x = torch.randn(M, K)
    y = packed_matmul(x, pack_int(q, bits), s, z, bits, gs)
    torch.testing.assert_close(y, x @ dequantize_ints(q, s, z, gs, torch.float32).T, rtol=1e-5, atol=1e-4)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_cpu_path_never_imports_triton():
    code = ("import sys, torch\nfrom lit_llama.quant.packed import PackedLinear\n"
            "PackedLinear(64, 8, 4, 32)(torch.randn(1, 64))\n"
            "assert 'triton' not in sys.modules and 'lit_llama.quant.kernels' not in sys.modules\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_int8_layer_matches_its_dequantized_reference():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=False)
    model = torch.nn.Module()
    model.transformer = torch.nn.Module()
    model.transformer.h = torch.nn.ModuleList([torch.nn.Sequential(linear)])
    quantize_linears(model, "llm.int8")
    layer = model.transformer.h[0][0]
    assert type(layer).__name__ == "Linear8bitLt" and layer.weight.dtype == torch.int8
    ref = dequantize_weight(layer)
    # int8 rows with an absmax scale each: within half a step of the float weight (plus the
    # float16 rounding bitsandbytes quantizes from)
    step = linear.weight.abs().amax(1, keepdim=True) / 127
    assert torch.all((ref - linear.weight).abs() <= 0.55 * step)
    x = torch.randn(4, 256)
    x[:, 7] = 40.0  # an outlier feature: multiplied in 16-bit, not squeezed into the int8 range
    with torch.no_grad():
        y = layer(x)
    exact = x @ ref.T
    assert (y - exact).abs().max() < 0.02 * exact.abs().max()


def rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only")
def test_released_mapped_pages_leave_memory_but_not_the_data(tmp_path):
    # what keeps llm.int8 loading near the int8 size: each float weight's pages go once quantized
    from safetensors.torch import save_file

    from lit_llama.io.checkpoint import load_safetensors
    from lit_llama.io.checkpoint import release_mapped_pages

    t = torch.randn(10_000_000)  # 40 MB
    save_file({"a": t, "b": t[:1000] * 2}, str(tmp_path / "w.safetensors"))
    loaded = load_safetensors(tmp_path / "w.safetensors")
    before = rss_file_mb()
    assert torch.equal(loaded["a"], t)  # reads every page
    touched = rss_file_mb()
    release_mapped_pages(loaded["a"])
    assert touched - before > 30 and touched - rss_file_mb() > 30, (before, touched, rss_file_mb())
    # read again from the file: the same data; the neighbour is untouched
    assert torch.equal(loaded["a"], t) and torch.equal(loaded["b"], t[:1000] * 2)
    anonymous = t.clone()  # not a file mapping: left alone
    release_mapped_pages(anonymous)
    assert torch.equal(anonymous, t)


def test_unknown_quantization_modes_are_refused(tmp_path):
    from lit_llama.quant.quantization import check_quantize_mode

    with pytest.raises(UserError, match="unknown --quantize 'int2'"):
        check_quantize_mode(tmp_path, "int2", None)


# ---------------------------------------------------------------- generate.py end to end


@pytest.fixture(scope="module")
def checkpoints(default_checkpoint, tmp_path_factory):
    """A tiny random float checkpoint with the embedded tokenizer, and its 4-bit GPTQ version."""
    from lit_llama.quant.gptq import GPTQSettings, quantize_checkpoint

    tmp = tmp_path_factory.mktemp("quant")
    src = tiny_checkpoint(tmp, default_checkpoint, seed=1)
    out = tmp / "gptq4"
    quantize_checkpoint(src, out, GPTQSettings(bits=4, groupsize=128), text_file=calibration_file(tmp),
                        nsamples=4, seqlen=64, device="cpu")
    return src, out, tmp


def another_model(gptq_dir: Path, tmp: Path) -> Path:
    """The packed weights with the config of another model (a wider MLP)."""
    d = tmp / "other"
    d.mkdir(exist_ok=True)
    for f in gptq_dir.iterdir():
        if f.name != "lit_config.json":
            (d / f.name).symlink_to(f)
    config = json.loads((gptq_dir / "lit_config.json").read_text())
    (d / "lit_config.json").write_text(json.dumps({**config, "intermediate_size": 512}))
    return d


def broken_bitsandbytes(tmp: Path) -> dict:
    # a bitsandbytes whose native library cannot load, found before the real one
    pkg = tmp / "fake_site" / "bitsandbytes"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('libbitsandbytes_cpu.so: cannot open shared object file')\n")
    return {"PYTHONPATH": str(pkg.parent)}


GEN = ["--max_new_tokens", "3", "--temperature", "0"]


@pytest.fixture(scope="module")
def runs(checkpoints, default_checkpoint):
    """generate.py as a user runs it, two runs at a time in the background (most of each is
    importing torch): int4 and int8 answers, and llm.int8 where bitsandbytes cannot load."""
    from concurrent.futures import ThreadPoolExecutor

    src, out, tmp = checkpoints
    jobs = {"int4": (["--checkpoint_dir", out, "--quantize", "gptq.int4", "--prompt", "Hello", *GEN], None),
            "int8": (["--checkpoint_dir", default_checkpoint, "--quantize", "llm.int8", "--chat", "true",
                      "--prompt", "What is the capital of France?", "--max_new_tokens", "8", "--temperature", "0"],
                     None),
            "no-bitsandbytes": (["--checkpoint_dir", src, "--quantize", "llm.int8", *GEN], broken_bitsandbytes(tmp))}
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(run_script, "generate.py", *args, env=env, timeout=600)
               for name, (args, env) in jobs.items()}


def test_int4_generation_runs_end_to_end(runs):
    r = runs["int4"].result()
    assert r.returncode == 0, r.stderr
    assert "3 tokens" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_int8_generation_answers_like_the_float_model(runs):
    # the float model answers "Paris" (tests/test_real_model.py); int8 weights must not change that
    r = runs["int8"].result()
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout
    assert "tokens/s" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_int8_where_bitsandbytes_cannot_load_is_one_error_line(runs):
    r = runs["no-bitsandbytes"].result()
    assert_one_error_line(r.returncode, r.stderr, "llm.int8", "bitsandbytes", "cannot be loaded", "libbitsandbytes")


# name: (generate.py arguments given (float dir, gptq dir, tmp), words of the error line)
BAD = {
    "gptq-without-quantize": (lambda f, g, t: ["--checkpoint_dir", g], ["4-bit", "--quantize gptq.int4"]),
    "gptq-as-int8": (lambda f, g, t: ["--checkpoint_dir", g, "--quantize", "llm.int8"],
                     ["--quantize gptq.int4", "not llm.int8"]),
    "gptq-int4-as-int3": (lambda f, g, t: ["--checkpoint_dir", g, "--quantize", "gptq.int3"], ["4-bit", "not gptq.int3"]),
    "float-as-gptq": (lambda f, g, t: ["--checkpoint_dir", f, "--quantize", "gptq.int4"],
                      ["not a GPTQ checkpoint", "quantize/gptq.py"]),
    "unknown-mode": (lambda f, g, t: ["--checkpoint_dir", f, "--quantize", "int2"], ["unknown --quantize 'int2'"]),
    "gptq-onto-another-model": (lambda f, g, t: ["--checkpoint_dir", another_model(g, t), "--quantize", "gptq.int4"],
                                ["c_fc1", "the config needs"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_wrong_quantize_mode_or_checkpoint_is_one_error_line(case, checkpoints, monkeypatch, capsys):
    src, out, tmp = checkpoints
    args, words = BAD[case]
    code, err = run_main("generate.py", [*args(src, out, tmp), *GEN], monkeypatch, capsys)
    assert_one_error_line(code, err, *words)


@pytest.mark.parametrize("script", ["generate/lora.py", "generate/full.py"])
def test_generate_scripts_check_the_mode_too(script, checkpoints, monkeypatch, capsys):
    src, out, tmp = checkpoints
    if script == "generate/full.py":
        # GPTQ needs the finetuned weights quantized themselves, not float weights on a packed base
        args, words = ["--checkpoint_dir", out, "--finetuned_path", src, "--quantize", "gptq.int4"], ["quantize/gptq.py"]
    else:
        args, words = ["--checkpoint_dir", out, "--lora_path", tmp / "none", "--quantize", "llm.int8"], ["gptq.int4"]
    code, err = run_main(script, [*args, *GEN], monkeypatch, capsys)
    assert_one_error_line(code, err, *words)
