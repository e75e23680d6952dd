"""Greedy outputs that the speed work must keep: lit_llama against transformers on the embedded model,
eager against compiled lit_llama; and the generation-speed harness itself, on tiny random models.

The compiled check compiles the embedded model's decode step with inductor (needs a C compiler on
CPU); set LIT_LLAMA_SKIP_COMPILE_TESTS=1 to skip it on machines without one."""

import json
import os
import shutil
import sys
import time

import pytest
import torch
import torch._dynamo

from conftest import ROOT, assert_same_greedy, run_script
from lit_llama.io.checkpoint import load_model
from lit_llama.infer.generation import DecodeLinear, compile_decode_step, decode_step, generate
from lit_llama.infer.load import load_for_inference
from lit_llama.tokenizer import Tokenizer

N = 32
TEXT = ("The Eiffel Tower, completed in 1889 for the World's Fair, is a wrought-iron lattice tower on the "
        "Champ de Mars in Paris. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower. Locally nicknamed")


@pytest.fixture(scope="module")
def model(default_checkpoint):
    # what generate.py runs, CPU weight layout included
    _, model, _ = load_for_inference(default_checkpoint, "32-true")
    return model.module


def test_decode_layout_changes_strides_not_results(default_checkpoint, model):
    plain = load_model(default_checkpoint).eval()
    attn, mlp = model.transformer.h[0].attn, model.transformer.h[0].mlp
    # wide matrices column-major, narrow ones (and the plain model's) row-major
    assert attn.c_attn.weight.stride() == (1, attn.c_attn.weight.size(0))
    assert mlp.c_fc1.weight.stride() == (1, mlp.c_fc1.weight.size(0))
    assert model.transformer.wte.weight.stride() == (1, model.transformer.wte.weight.size(0))
    assert mlp.c_proj.weight.is_contiguous() and plain.transformer.h[0].mlp.c_fc1.weight.is_contiguous()
    idx = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(idx), plain(idx), rtol=1e-4, atol=1e-4)


def test_last_position_logits_are_those_of_the_full_pass(model):
    """Generation asks for the last position's logits only (the head over a whole prompt would be a
    fifth of the prefill): the same numbers as the last row of the full pass."""
    from lit_llama.infer.generation import prepare_cache

    idx = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(idx)
        last = model(idx, last=True)
        prepare_cache(model, 64, batch_size=2)
        cached = model(idx, torch.arange(40), last=True)
        model.set_kv_cache(1, 256)
    assert last.shape == (2, 1, full.size(-1))
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, full[:, -1:], rtol=1e-4, atol=1e-4)


needs_compiler = pytest.mark.skipif(
    os.environ.get("LIT_LLAMA_SKIP_COMPILE_TESTS") == "1" or not (shutil.which("gcc") or shutil.which("cc")),
    reason="torch.compile on CPU needs a C compiler")


@needs_compiler
@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 96), (3, 1, 96)])
def test_compiled_decode_linear_is_a_fused_reduction(shape):
    """A single row through DecodeLinear compiles to a reduction kernel, not a BLAS call, and equals
    F.linear; several rows stay a matrix product."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 200, bias=True)
    layer.__class__ = DecodeLinear
    x = torch.randn(shape)
    torch._dynamo.reset()
    with torch.no_grad():
        y, code = run_and_get_code(torch.compile(layer, dynamic=False), x)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    blas = any(name in "".join(code) for name in ("extern_kernels.mm", "extern_kernels.addmm", "mkl"))
    assert blas == (shape[0] > 1), "".join(code)[-2000:]


@pytest.fixture(scope="module")
def prompts(default_checkpoint):
    tok = Tokenizer(default_checkpoint)
    chat = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    return [tok.encode(chat), tok.encode(TEXT)]


@pytest.fixture(scope="module")
def eager_tokens(model, prompts):
    # no stop ids: always N tokens, so that nothing hides behind an early end of text
    return [list(generate(model, p, N, temperature=0.0, step=decode_step)) for p in prompts]


def test_greedy_tokens_match_transformers(default_gguf, model, prompts, eager_tokens):
    """transformers reads the original GGUF itself and runs its own LlamaForCausalLM on SDPA (the
    setting the benchmark times): the first 32 greedy tokens must be ours."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    hf = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    config = GenerationConfig(max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt, ours in zip(prompts, eager_tokens):
        assert len(ours) == N
        with torch.no_grad():
            ref = hf.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), generation_config=config)
        assert_same_greedy(model, prompt, ours, ref[0, prompt.numel():].tolist())


def test_greedy_comparison_forgives_ties_only(model, prompts, eager_tokens):
    """assert_same_greedy fails where two continuations part at a clear choice, passes at a tie."""
    prompt, want = prompts[1], eager_tokens[1]
    other = want[:3] + [(want[3] + 1) % model.config.vocab_size] + want[4:]
    with pytest.raises(AssertionError, match="part at step 3"):
        assert_same_greedy(model, prompt, want, other)
    assert_same_greedy(model, prompt, want, other, bound=1e3)  # everything is a tie within 1e3
    assert_same_greedy(model, prompt, want, list(want))


@needs_compiler
def test_compiled_decode_step_gives_the_same_greedy_tokens(default_checkpoint, model, prompts, eager_tokens):
    """One compiled graph for every position (no recompiles per token), same tokens as eager, with
    the weight layout generate.py --compile loads (row-major, linear layers as DecodeLinear)."""
    import torch._dynamo

    _, compiled_model, _ = load_for_inference(default_checkpoint, "32-true", compile=True)
    compiled_model = compiled_model.module
    fc1 = compiled_model.transformer.h[0].mlp.c_fc1
    assert type(fc1) is DecodeLinear and fc1.weight.is_contiguous()
    assert compiled_model.transformer.wte.weight.is_contiguous()
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step = compile_decode_step(torch.device("cpu"))
    t = time.perf_counter()
    compiled = [list(generate(compiled_model, p, N, temperature=0.0, step=step)) for p in prompts]
    elapsed = time.perf_counter() - t
    for prompt, want, got in zip(prompts, eager_tokens, compiled):
        assert_same_greedy(model, prompt, want, got)
    # compilation happened once for decode (both prompts fit the same cache size), not per token
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    print(f"compiled generation of {len(prompts)} x {N} tokens incl. compilation: {elapsed:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------- the harness


def bench(*args, env=None, timeout=600):
    return run_script("benchmarks/generation_speed.py", "--write_docs", "false", "--repeats", "1",
                      "--prompt_tokens", "16", "--new_tokens", "40", "--batch_sizes", "[1,2]", "--threads", "1",
                      *args, env=env, timeout=timeout)


def test_harness_random_model_path():
    """The GPU mode's path (random model of a named shape, the same weights given to transformers,
    the bandwidth bound) run on CPU with a tiny shape."""
    r = bench("--model", "random:tiny-gqa", "--systems", "[lit_llama,transformers]")
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("| transformers (sdpa, dynamic cache)"))
    assert line.rstrip(" |").endswith("yes"), r.stdout  # the same greedy tokens: the same weights
    assert "Memory-bandwidth bound" in r.stdout and "of the bound" in r.stdout


def test_harness_llama_cpp_runner(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama_cpp (pip install llama-cpp-python) is not installed")
    r = bench("--systems", "[lit_llama,llama_cpp_f32]", env={"LIT_LLAMA_BENCH_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(l for l in r.stdout.splitlines() if l.startswith("| llama.cpp F32"))
    # same weights, float32 KV cache: llama.cpp's greedy tokens are ours
    assert line.rstrip(" |").endswith("yes"), r.stdout
    assert (tmp_path / "model-f32.gguf").is_file()


@pytest.mark.skipif(os.environ.get("LIT_LLAMA_SKIP_COMPILE_TESTS") == "1" or not (shutil.which("gcc") or shutil.which("cc")),
                    reason="torch.compile on CPU needs a C compiler")
def test_generate_script_compiles_before_answering(default_checkpoint):
    """generate.py --compile compiles (and reports it) before the answer, and answers as eager does."""
    args = ["generate.py", "--prompt", "What is the capital of France?", "--chat", "true", "--temperature", "0",
            "--max_new_tokens", "24"]
    eager = run_script(*args)
    compiled = run_script(*args, "--compile", "true")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert "Compiled the decode step in" in compiled.stderr
    assert "Paris" in eager.stdout
    assert compiled.stdout == eager.stdout
