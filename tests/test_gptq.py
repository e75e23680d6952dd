"""GPTQ: the algorithm on single layers (against round-to-nearest and against its own definition),
packed checkpoints written and read back, and quantize/gptq.py as a user runs it."""

import json
import shutil

import pytest
import torch

from conftest import run_script
from quant_helpers import assert_one_error_line, calibration_file, run_main, tiny_checkpoint
from lit_llama.quant.gptq import (DEFAULT_SINK_SHARE, GPTQSettings, Hessian, calibration_inputs, calibration_tokens, gptq,
                            minmax_params, quantize_block, quantize_checkpoint, rtn, sample_windows, sink_weights)
from lit_llama.quant.packed import PackedEmbedding, PackedLinear, load_packed_model
from lit_llama.tokenizer import Tokenizer


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Inputs like a transformer's: most variance in a few directions (fixed by seed 0, shared by
    calibration and test data), a few large-magnitude features, plus noise."""
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(16, cols, generator=g)
    scale = torch.ones(cols)
    scale[torch.randperm(cols, generator=g)[:4]] = 8.0
    g.manual_seed(seed)
    return (torch.randn(n, 16, generator=g) @ basis + 0.3 * torch.randn(n, cols, generator=g)) * scale


def output_error(W: torch.Tensor, Wq: torch.Tensor, X: torch.Tensor) -> float:
    return ((X @ (W - Wq).T) ** 2).mean().item()


# ---------------------------------------------------------------- single layers


@pytest.mark.parametrize("bits,groupsize,act_order", [(4, 128, False), (3, 128, False), (4, -1, False),
                                                       (3, 64, True), (4, 96, True)])
def test_gptq_has_lower_output_error_than_rtn(bits, groupsize, act_order):
    torch.manual_seed(0)
    W = torch.randn(96, 256) * 0.05
    h = Hessian(256)
    for i in range(4):  # added in parts: the running mean must equal the whole
        h.add(correlated_inputs(512, 256, seed=1 + i))
    X_test = correlated_inputs(2048, 256, seed=100)  # held out: not the calibration inputs
    err_gptq = output_error(W, gptq(W, h.H, bits, groupsize, act_order).dequantize(), X_test)
    err_rtn = output_error(W, rtn(W, bits, groupsize).dequantize(), X_test)
    # the paper's point: same grid, same bits, far smaller output error
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)


def test_hessian_is_2_xxt_over_n():
    X = torch.randn(300, 24)
    h = Hessian(24)
    h.add(X[:100])
    h.add(X[100:].view(4, 50, 24))  # batched inputs are flattened to rows
    torch.testing.assert_close(h.H, 2 * X.T @ X / 300, rtol=1e-5, atol=1e-5)


def test_minmax_quantizer_is_asymmetric_and_includes_zero():
    w = torch.tensor([[-0.3, 0.1, 0.9], [0.2, 0.5, 0.6], [0.0, 0.0, 0.0]])
    scale, zero = minmax_params(w, 4)
    torch.testing.assert_close(scale[0], torch.tensor(1.2 / 15).half().float())
    assert zero[0] == round(0.3 / scale[0].item())
    # an all-positive row still has 0 on its grid (zero point 0), an all-zero row a usable scale
    torch.testing.assert_close(scale[1], torch.tensor(0.6 / 15).half().float())
    assert zero[1] == 0 and scale[2] > 0
    q = rtn(w, 4, -1)
    assert q.q.min() >= 0 and q.q.max() <= 15
    torch.testing.assert_close(q.dequantize()[2], torch.zeros(3))


def test_gptq_with_uncorrelated_inputs_is_rtn():
    # H = I: no column's error says anything about another's, so nothing is pushed on
    W = torch.randn(32, 128)
    for groupsize in (32, 100, -1):
        assert torch.equal(gptq(W, torch.eye(128), 4, groupsize).q, rtn(W, 4, groupsize).q)


def test_lazy_batches_give_the_same_result_as_column_by_column():
    torch.manual_seed(0)
    W = torch.randn(40, 200)
    H = Hessian(200)
    H.add(correlated_inputs(1000, 200, seed=1))
    # groups of 48 straddle the batches of 64: a group's parameters must still see every update
    ref = gptq(W, H.H, 3, 48, blocksize=1)
    for blocksize in (64, 128, 256):
        out = gptq(W, H.H, 3, 48, blocksize=blocksize)
        assert (out.q != ref.q).float().mean() < 1e-3  # float summation order may flip a rare tie
        torch.testing.assert_close(out.scales, ref.scales, rtol=1e-3, atol=1e-6)


def test_dead_columns_get_zero_weights():
    W = torch.randn(16, 64)
    X = correlated_inputs(500, 64, seed=1)
    X[:, [3, 40]] = 0  # inputs that never fire
    h = Hessian(64)
    h.add(X)
    out = gptq(W, h.H, 4, 32).dequantize()
    assert torch.all(out[:, [3, 40]] == 0)
    assert torch.isfinite(out).all()


def test_act_order_layer_matches_its_dequantized_weight():
    torch.manual_seed(0)
    W = torch.randn(24, 64)
    h = Hessian(64)
    h.add(correlated_inputs(400, 64, seed=1))
    qw = gptq(W, h.H, 4, 16, act_order=True)
    layer = qw.to_layer()
    assert layer.perm is not None and not torch.equal(layer.perm, torch.arange(64, dtype=torch.int32))
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().T, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- packed checkpoints


@pytest.fixture(scope="module")
def packed(default_checkpoint, tmp_path_factory):
    """(float checkpoint, its 4-bit GPTQ checkpoint with groups of 64 and act-order, the tied
    embedding / head packed at 6 bits)."""
    tmp = tmp_path_factory.mktemp("packed")
    src = tiny_checkpoint(tmp, default_checkpoint)
    out = tmp / "gptq"
    quantize_checkpoint(src, out, GPTQSettings(bits=4, groupsize=64, act_order=True, head_bits=6, down_bits=6),
                        text_file=calibration_file(tmp), nsamples=8, seqlen=64, device="cpu")
    return src, out


def test_packed_checkpoint_round_trips(packed, tmp_path):
    from lit_llama.io.checkpoint import ShardedWriter, copy_tokenizer_files

    src, out = packed
    config = json.loads((out / "lit_config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["method"] == "gptq"
    model = load_packed_model(out).eval()
    layer = model.transformer.h[0].mlp.c_fc1
    assert isinstance(layer, PackedLinear) and layer.qweight.dtype == torch.uint8
    assert layer.qweight.shape == (256, 64) and layer.scales.shape == (256, 2)  # two 4-bit weights a byte
    wte = model.transformer.wte
    assert isinstance(wte, PackedEmbedding) and wte.bits == 6 and wte.perm is not None
    assert wte.qweight.shape == (49152, 128 * 6 // 8)  # four 6-bit weights in three bytes
    assert config["quantization"]["head"] == {"bits": 6, "groupsize": 64, "act_order": True}
    # the down projections at their own 6 bits (tiny config: 256 inputs), the other layers at 4
    assert config["quantization"]["layers"] == {"mlp.c_proj": {"bits": 6}}
    down = model.transformer.h[1].mlp.c_proj
    assert isinstance(down, PackedLinear) and down.bits == 6 and down.qweight.shape == (128, 256 * 6 // 8)
    assert model.transformer.h[1].attn.c_proj.bits == 4
    # write the loaded model again, in several shards: the same tensors and the same logits
    again = tmp_path / "again"
    again.mkdir()
    writer = ShardedWriter(again, shard_bytes=1 << 20)
    for k, v in model.state_dict().items():
        writer.add(k, v.half() if v.dtype == torch.float32 else v)
    writer.close()
    shutil.copyfile(out / "lit_config.json", again / "lit_config.json")
    copy_tokenizer_files(out, again)
    reloaded = load_packed_model(again).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    ids = torch.randint(0, 49152, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))


def test_head_gptq_beats_rtn_on_the_head_outputs(packed):
    """The head's packed weight (tied: the embedding's too) came from GPTQ on the final-norm
    outputs: on such inputs its logits are closer to the float head's than RTN's at 6 bits."""
    from lit_llama.io.checkpoint import load_model

    src, out = packed
    float_model, model = load_model(src).eval(), load_packed_model(out).eval()
    tokens = calibration_tokens(Tokenizer(src), text_file=calibration_file(out.parent), checkpoint_dir=src)
    ids = sample_windows(tokens, 4, 64, seed=3)  # other windows than the calibration's
    with torch.no_grad():
        x = float_model.hidden_states(ids)
    W = float_model.transformer.wte.weight
    X = x.reshape(-1, x.size(-1))
    gptq_err = output_error(W, model.transformer.wte.weight.float(), X)
    rtn_err = output_error(W, rtn(W, 6, 64).dequantize(), X)
    assert gptq_err < 0.9 * rtn_err, (gptq_err, rtn_err)


def test_packed_model_computes_what_its_dequantized_weights_do(packed):
    from lit_llama.io.checkpoint import load_model

    src, out = packed
    model = load_packed_model(out).eval()
    # the same model with each packed layer replaced by a float layer of its dequantized weight
    reference = load_model(src).eval()
    state = reference.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            state[f"{name}.weight"] = m.weight
    state["transformer.wte.weight"] = model.transformer.wte.weight
    for name, p in model.named_parameters():
        state[name] = p
    reference.load_state_dict(state)
    ids = torch.randint(0, 49152, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- quantize/gptq.py


def test_gptq_script_writes_a_checkpoint_that_generates_and_evaluates(packed, tmp_path, default_checkpoint):
    src, _ = packed
    out = tmp_path / "int3"
    text = calibration_file(tmp_path)
    r = run_script("quantize/gptq.py", "--checkpoint_dir", src, "--output_dir", out, "--bits", "3",
                   "--groupsize", "32", "--text_file", text, "--nsamples", "4", "--seqlen", "32")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads((out / "lit_config.json").read_text())["quantization"]["bits"] == 3
    assert (out / "tokenizer.json").is_file()
    # 3-bit: eight weights in three bytes
    layer = load_packed_model(out).transformer.h[0].attn.c_proj
    assert layer.qweight.shape == (128, 128 * 3 // 8)
    r = run_script("generate.py", "--checkpoint_dir", out, "--quantize", "gptq.int3", "--max_new_tokens", "5",
                   "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr and "Traceback" not in r.stderr


def test_untied_head_and_embedding_are_packed_separately(default_checkpoint, tmp_path):
    """An untied model (LLaMA-7B's layout): GPTQ quantizes lm_head on the final-norm outputs, and
    the embedding, a lookup, is rounded to nearest without act-order; the packed model computes
    what a float model holding those dequantized weights computes."""
    from lit_llama.io.checkpoint import load_model

    src = tiny_checkpoint(tmp_path, default_checkpoint, seed=2, tie_embeddings=False)
    out = tmp_path / "untied"
    quantize_checkpoint(src, out, GPTQSettings(bits=4, groupsize=64, act_order=True, head_bits=8),
                        text_file=calibration_file(tmp_path), nsamples=4, seqlen=64, device="cpu")
    model, reference = load_packed_model(out).eval(), load_model(src).eval()
    wte, head = model.transformer.wte, model.lm_head
    assert isinstance(wte, PackedEmbedding) and wte.perm is None and wte.bits == 8
    assert type(head) is PackedLinear and head.perm is not None and head.bits == 8
    float_wte = reference.transformer.wte.weight
    torch.testing.assert_close(wte.weight.float(), rtn(float_wte, 8, 64).dequantize(), rtol=0, atol=1e-3)
    state = reference.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):
            state[f"{name}.weight"] = m.weight
    reference.load_state_dict(state)
    ids = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-4, atol=1e-4)


def test_rtn_with_the_default_flags_loads_and_matches_round_to_nearest(packed, tmp_path):
    """--method rtn with the script's defaults (act-order on, 6-bit head and down projections): no
    calibration, no perm, every weight the nearest level of its group's grid."""
    from lit_llama.io.checkpoint import load_model

    src, _ = packed
    out = tmp_path / "rtn"
    r = run_script("quantize/gptq.py", "--checkpoint_dir", src, "--output_dir", out, "--method", "rtn")
    assert r.returncode == 0, r.stderr
    entry = json.loads((out / "lit_config.json").read_text())["quantization"]
    assert entry["act_order"] is False and entry["head"]["act_order"] is False
    model, float_model = load_packed_model(out), load_model(src)
    layer, W = model.transformer.h[1].mlp.c_proj, float_model.transformer.h[1].mlp.c_proj.weight
    assert layer.perm is None
    torch.testing.assert_close(layer.weight.float(), rtn(W, 6, 128).dequantize(), rtol=0, atol=1e-3)
    layer, W = model.transformer.h[1].attn.c_proj, float_model.transformer.h[1].attn.c_proj.weight
    torch.testing.assert_close(layer.weight.float(), rtn(W, 4, 128).dequantize(), rtol=0, atol=1e-3)
    torch.testing.assert_close(model.transformer.wte.weight.float(),
                               rtn(float_model.transformer.wte.weight, 6, 128).dequantize(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("case", ["short-text", "bits", "head-bits", "groupsize", "method", "already-quantized",
                                  "same-dir"])
def test_bad_quantize_input_is_one_error_line(case, packed, tmp_path, monkeypatch, capsys):
    src, gptq_dir = packed
    short = tmp_path / "short.txt"
    short.write_text("Far too short to calibrate on.")
    out = tmp_path / "out"
    args, words = {
        "short-text": (["--text_file", short, "--seqlen", "64"], ["fewer than one window of 64"]),
        "bits": (["--bits", "5"], ["unsupported --bits 5"]),
        "head-bits": (["--head_bits", "5"], ["unsupported --head_bits 5"]),
        "groupsize": (["--groupsize", "0"], ["unsupported --groupsize 0"]),
        "method": (["--method", "awq"], ["unknown --method 'awq'"]),
        "already-quantized": (["--checkpoint_dir", gptq_dir], ["already quantized"]),
        "same-dir": (["--output_dir", src], ["must differ"]),
    }[case]
    args = ["--checkpoint_dir", src, "--output_dir", out, *args]
    code, err = run_main("quantize/gptq.py", args, monkeypatch, capsys)
    assert_one_error_line(code, err, *words)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]  # nothing written


def test_calibration_from_a_prepared_dataset(default_checkpoint, tmp_path):
    from lit_llama.data.instruction import load_instruction_data, prepare_instruction_data
    from lit_llama.quant.gptq import calibration_tokens, sample_windows
    from lit_llama.tokenizer import Tokenizer

    records = [{"instruction": f"Name a number larger than {i}.", "input": "", "output": str(i + 1)} for i in range(20)]
    prepare_instruction_data(records, default_checkpoint, tmp_path / "data", max_seq_length=64, val_fraction=0.1)
    tokens = calibration_tokens(Tokenizer(default_checkpoint), data_dir=tmp_path / "data",
                                checkpoint_dir=default_checkpoint)
    train, _, _ = load_instruction_data(tmp_path / "data", default_checkpoint)
    assert torch.equal(tokens, torch.cat([e["input_ids"] for e in train]))  # the examples, one after another
    windows = sample_windows(tokens, 6, 32, seed=1)
    assert windows.shape == (6, 32) and torch.equal(windows, sample_windows(tokens, 6, 32, seed=1))


# ---------------------------------------------------------------- calibration on a trained model


def test_weighted_hessian_over_many_tokens_equals_the_direct_sum():
    """300k rows in windows of 2,048 with the sink weight on each first position: the running mean
    loses nothing against 2/n Σ c x xᵀ computed at once in float64."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(150, 2048, 32, generator=g) * torch.linspace(0.1, 10, 32)
    X[:, 0] *= 30  # the first position's activations are massive, as a sink's are
    weights = torch.ones(2048)
    weights[0] = 136.0
    h = Hessian(32)
    for x in X:
        h.add(x[None], weights)
    c = weights.double().repeat(150)[:, None]
    flat = X.reshape(-1, 32).double()
    want = 2 * (flat * c).T @ flat / c.sum()
    torch.testing.assert_close(h.H.double(), want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
    assert h.n == pytest.approx(c.sum().item())


@pytest.mark.parametrize("seqlen", [256, 2048])
def test_sinks_carry_their_share_whatever_the_window_length(seqlen):
    """The first position, and any other whose hidden state is massive, share the sink weight."""
    x = torch.randn(1, seqlen, 16, generator=torch.Generator().manual_seed(0))
    w = sink_weights(x, 1 / 16)
    assert w.shape == (1, seqlen) and w[0, 0] / w.sum() == pytest.approx(1 / 16) and torch.all(w[0, 1:] == 1)
    x[0, 7] *= 100  # a second sink, as when a window starts inside a word
    w = sink_weights(x, 1 / 16)
    assert w[0, 0] == w[0, 7] and (w[0, 0] + w[0, 7]) / w.sum() == pytest.approx(1 / 16)
    assert torch.all(w[0, 1:7] == 1) and torch.all(w[0, 8:] == 1)
    assert sink_weights(x, 0.0) is None


@pytest.mark.parametrize("seqlen", [32, 1024])
@torch.no_grad()
def test_calibration_inputs_are_the_hidden_states_of_a_forward_pass(default_checkpoint, seqlen):
    """What each block is calibrated on equals what it sees in a plain forward pass of the same
    windows (embedding, rotary positions, causal attention), for short and long windows."""
    from lit_llama.io.checkpoint import load_model

    model = load_model(default_checkpoint).eval()
    tokens = Tokenizer(default_checkpoint).encode(calibration_text()[:20000])
    windows = sample_windows(tokens, 2, seqlen, seed=0)
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].clone()))
             for i, b in enumerate(model.transformer.h[:6])]
    model(windows)
    for h in hooks:
        h.remove()
    inputs, rope = calibration_inputs(model, windows, torch.device("cpu"), torch.float32)
    for i, block in enumerate(model.transformer.h[:6]):
        got = torch.cat(inputs)
        torch.testing.assert_close(got, seen[i], rtol=1e-4, atol=1e-3 * seen[i].abs().max().item() * 1e-2)
        inputs = [block(x, *rope) for x in inputs]


def calibration_text() -> str:
    from lit_llama.quant.gptq import default_calibration_text

    return default_calibration_text()


def held_out_text() -> str:
    """Text of other kinds than Python's reference documentation, which every CPython installation
    carries: the license of the running Python (legal English) and IDLE's old change log."""
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join(p.read_text() for p in (stdlib / "LICENSE.txt", stdlib / "idlelib" / "NEWS2x.txt") if p.exists())


@pytest.fixture(scope="module")
def trained(default_checkpoint):
    """The embedded model's float weights, tokenizer, and a function giving the perplexity on the
    held-out text of a copy whose blocks 10-21 (the layers where the attention sink forms) are
    quantized to 4 bits g128 by `settings`, calibrated on windows of Python's documentation."""
    from lit_llama.io.checkpoint import load_model
    from lit_llama.eval.perplexity import perplexity

    tok = Tokenizer(default_checkpoint)
    calib = tok.encode(calibration_text())
    held = tok.encode(held_out_text(), bos=False)
    base = load_model(default_checkpoint).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    layers = range(10, 22)

    done = {}  # the two tests share runs (float32, and the defaults at 16 x 256): each is computed once

    @torch.no_grad()
    def run(settings, nsamples=16, seqlen=256):
        key = (repr(settings), nsamples, seqlen)
        if key not in done:
            done[key] = quantized_perplexity(settings, nsamples, seqlen)
        return done[key]

    def quantized_perplexity(settings, nsamples, seqlen):
        base.load_state_dict(state)
        if settings is not None:
            inputs, rope = calibration_inputs(base, sample_windows(calib, nsamples, seqlen, 0), torch.device("cpu"),
                                              torch.float32)
            for i, block in enumerate(base.transformer.h[:layers.stop]):
                if i in layers:
                    quantize_block(block, inputs, rope, settings)
                inputs = [block(x, *rope) for x in inputs]
        return perplexity(base, held, 1024, torch.device("cpu"))

    return run


def test_gptq_generalizes_beyond_its_calibration_text(trained):
    """On trained weights and text unlike the calibration text, GPTQ with the script's defaults
    (act-order, sink weighting, 6-bit down projections) removes a clear part of round-to-nearest's
    loss, and longer windows of the same number of tokens do not make it worse. Measured here
    (perplexity, blocks 10-21 at 4 bits g128): fp32 23.82, RTN 25.74; GPTQ 16 x 256 24.37, 4 x 1,024
    24.48. With 4-bit down projections 24.78 and 24.80; without the sink weighting too (plain GPTQ)
    25.68 and 26.75, no better than RTN and worse with longer windows."""
    fp32 = trained(None)
    rtn_loss = trained(GPTQSettings(method="rtn")) - fp32
    defaults = GPTQSettings(act_order=True, sink_share=DEFAULT_SINK_SHARE, down_bits=6)
    short = trained(defaults, 16, 256) - fp32
    long = trained(defaults, 4, 1024) - fp32
    print(f"perplexity increase over fp32 {fp32:.3f}: rtn {rtn_loss:.3f} gptq 16x256 {short:.3f} 4x1024 {long:.3f}")
    assert short <= 0.5 * rtn_loss and long <= 0.5 * rtn_loss, (rtn_loss, short, long)
    assert long <= 1.25 * short, (short, long)


def test_the_down_projections_carry_most_of_the_loss_on_new_text(trained):
    """GPTQ's down projections fit the calibration text's kind: at 4 bits they carry much of the
    held-out loss, which 6 bits (the script's default) remove. Measured here: +0.96 perplexity with
    them at 4 bits, +0.55 at 6 (RTN +1.92)."""
    fp32 = trained(None)
    down4 = trained(GPTQSettings(act_order=True, sink_share=DEFAULT_SINK_SHARE)) - fp32
    down6 = trained(GPTQSettings(act_order=True, sink_share=DEFAULT_SINK_SHARE, down_bits=6)) - fp32
    print(f"perplexity increase over fp32 {fp32:.3f}: down projections at 4 bits {down4:.3f}, at 6 bits {down6:.3f}")
    assert down6 <= 0.7 * down4, (down4, down6)
