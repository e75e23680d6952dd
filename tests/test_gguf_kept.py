"""GGUF tensors kept quantized (scripts/convert_gguf_checkpoint.py --keep_quantized): the block
decoders of lit_llama/io/gguf.py against the `gguf` package's own dequantization, and the model
that multiplies the kept integers against the dequantized checkpoint of the same file.

Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks come from the gguf package's quantizer; it cannot quantize
the K-quants, so their blocks are random bytes with sane float16 scale fields (every code, scale
and minimum pattern occurs), dequantized by the same package. The kept model's weights and logits
must equal the dequantized checkpoint's: within float32 rounding where the kernels run in float32,
within bfloat16 rounding where this CPU runs them in bfloat16 (AVX512-BF16 / AMX)."""

import types
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as QT

from conftest import run_script, top1_agreement
from lit_llama.infer.load import load_for_inference
from lit_llama.io.checkpoint import CheckpointError, QuantizedRows, load_model, load_state_dict, read_quantization
from lit_llama.io.gguf import KEPT_TYPES, convert_gguf_checkpoint, quantized_rows
from lit_llama.quant import weight_only
from lit_llama.quant.weight_only import LowBitLinear, Int8Embedding
from lit_llama.utils import UserError
from test_convert_gguf import add_llama_metadata, halves_to_interleaved, spm_model  # noqa: F401 (a fixture)

# K-quant blocks hold 256 values: every input width is a multiple of it
N_LAYER, N_EMBD, N_HEAD, FFN, VOCAB = 2, 256, 4, 512, 400
HEAD = N_EMBD // N_HEAD
SIMPLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # the gguf package quantizes these
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
# where each K-quant block keeps its float16 super-block scale(s), by byte offset
F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# every kept type somewhere; q, k and v of one layer of different types (stacked into one layer)
MIXED = {"token_embd": "Q8_0", "output": "Q6_K", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0",
         "attn_output": "Q5_0", "ffn_gate": "Q5_1", "ffn_up": "Q4_K", "ffn_down": "Q5_K"}
# name: (key/value heads, tied, tensor types by role)
CASES = {"tied-q4_1": (1, True, {r: "Q4_1" for r in MIXED} | {"token_embd": "Q8_0"}),  # the embedded model's kinds
         "untied-mixed": (4, False, MIXED),
         "tied-k": (2, True, {r: t for r, t in zip(MIXED, ["Q6_K", "", "Q4_K", "Q4_K", "Q4_K", "Q6_K", "Q5_K", "Q4_K", "Q6_K"])})}


def random_blocks(qtype: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes of (rows, cols) values of a K-quant type with float16 scales of about 1e-3."""
    block, nbytes = gguf.GGML_QUANT_SIZES[QT[qtype]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.uniform(2e-4, 2e-3, size=len(raw)).astype(np.float16)
        raw[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def encode(a: np.ndarray, qtype: str, seed: int) -> np.ndarray:
    """`a` (rows, cols) float32 as `qtype` blocks: quantized, or random blocks for a K-quant."""
    if qtype in SIMPLE:
        return gguf.quants.quantize(a, QT[qtype])
    return random_blocks(qtype, *a.shape, seed)


def as_tensor(raw: np.ndarray, qtype: str, rows: int, cols: int):
    """What gguf.GGUFReader gives for a tensor: its type, its shape fastest first, its bytes."""
    return types.SimpleNamespace(tensor_type=QT[qtype], shape=np.array([cols, rows]), data=raw, name="t")


# ---------------------------------------------------------------- decoders


@pytest.mark.parametrize("qtype", list(KEPT_TYPES))
def test_decoders_equal_the_gguf_package(qtype):
    rows, cols = 32, 512
    a = np.random.default_rng(0).normal(size=(rows, cols)).astype(np.float32)
    raw = encode(a, qtype, seed=1)
    want = torch.from_numpy(gguf.quants.dequantize(raw, QT[qtype]).reshape(rows, cols).astype(np.float32))
    rows_ = quantized_rows(as_tensor(raw, qtype, rows, cols))
    _, bits, groupsize, _ = KEPT_TYPES[qtype]
    assert (rows_.bits, rows_.groupsize, rows_.shape) == (bits, groupsize, (rows, cols))
    lo, hi = (0, 15) if bits == 4 else (-128, 127)
    assert lo <= rows_.q.min() and rows_.q.max() <= hi
    assert rows_.q.unique().numel() > (8 if bits == 4 else 24)  # the codes vary: a misread would show
    torch.testing.assert_close(rows_.dequantize(), want, rtol=1e-6, atol=1e-7)
    # the guard: the same codes with the nibbles of each byte swapped are other weights
    swapped = rows_.map_rows(lambda t: t)
    swapped.q = swapped.q.view(rows, -1, 2).flip(-1).reshape(rows, cols)
    assert (swapped.dequantize() - want).abs().max() > 1e-3


# ---------------------------------------------------------------- tiny files, converted both ways


def source_weights(n_kv: int, tied: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: 0.05 * torch.randn(*shape, generator=g)
    norm = lambda: 1 + 0.3 * torch.randn(N_EMBD, generator=g)
    w = {"token_embd.weight": rnd(VOCAB, N_EMBD), "output_norm.weight": norm()}
    if not tied:
        w["output.weight"] = rnd(VOCAB, N_EMBD)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.update({p + "attn_norm.weight": norm(), p + "ffn_norm.weight": norm(),
                  p + "attn_q.weight": rnd(N_EMBD, N_EMBD), p + "attn_k.weight": rnd(n_kv * HEAD, N_EMBD),
                  p + "attn_v.weight": rnd(n_kv * HEAD, N_EMBD), p + "attn_output.weight": rnd(N_EMBD, N_EMBD),
                  p + "ffn_gate.weight": rnd(FFN, N_EMBD), p + "ffn_up.weight": rnd(FFN, N_EMBD),
                  p + "ffn_down.weight": rnd(N_EMBD, FFN)})
    return w


def write_file(path: Path, n_kv: int, tied: bool, kinds: dict, spm: bytes) -> Path:
    """A llama GGUF of random weights, each 2-D tensor of its role's type (norms F32)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    add_llama_metadata(writer, n_kv, 10000.0, spm, {"llama.embedding_length": N_EMBD, "llama.feed_forward_length": FFN,
                                                     "llama.rope.dimension_count": HEAD})
    for i, (name, t) in enumerate(source_weights(n_kv, tied).items()):
        if t.ndim == 1:
            writer.add_tensor(name, t.numpy())
            continue
        if name.endswith("attn_q.weight") or name.endswith("attn_k.weight"):
            t = halves_to_interleaved(t, N_HEAD if "attn_q" in name else n_kv)
        qtype = kinds[name.split(".")[-2]]
        writer.add_tensor(name, encode(t.numpy().astype(np.float32), qtype, seed=i), raw_dtype=QT[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def converted(spm_model, tmp_path_factory):
    """converted(case) -> (GGUF path, kept checkpoint, dequantized checkpoint), once per case."""
    done = {}

    def run(case: str):
        if case not in done:
            n_kv, tied, kinds = CASES[case]
            root = tmp_path_factory.mktemp(case)
            path = write_file(root / "tiny.gguf", n_kv, tied, kinds, spm_model)
            convert_gguf_checkpoint(path, root / "kept", keep_quantized=True)
            convert_gguf_checkpoint(path, root / "float")
            done[case] = path, root / "kept", root / "float"
        return done[case]

    return run


def weights_size(checkpoint_dir: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint_dir.glob("*.safetensors"))


def bf16_kernels() -> bool:
    return weight_only.kernel_dtype(torch.device("cpu"), torch.float32) == torch.bfloat16


@pytest.fixture(params=["float32", "bfloat16"])
def kernels(request, monkeypatch):
    """Both kernel paths: float32 (exact to float32 rounding) everywhere, bfloat16 where the CPU has it."""
    if request.param == "bfloat16" and not weight_only.fast_bf16_cpu():
        pytest.skip("this CPU has no AVX512-BF16 / AMX")
    monkeypatch.setattr(weight_only, "fast_bf16_cpu", lambda: request.param == "bfloat16")
    return request.param


def assert_same_weights(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Equal within float32 rounding, or within bfloat16's (scales, offsets and the read-back product
    each rounded to 8 significant bits: a few 2^-9 of the row's largest weight; an 8-bit code off by
    one would be 1/127 of it, which the float32 path's bound catches)."""
    got, want = got.float(), want.float()
    rel = 2.0 ** -6 if bf16_kernels() else 1e-6
    bound = rel * want.abs().amax(dim=1, keepdim=True) + 1e-9
    err = (got - want).abs()
    assert (err <= bound).all(), f"{name}: error {(err / bound).max().item():.3g} x the bound"


def assert_same_product(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """x @ w.T within the rounding of its terms: a few 2^-9 (bfloat16) or 2^-23 (float32) of the
    sum of their magnitudes |x| @ |w|.T."""
    rel = 2.0 ** -6 if bf16_kernels() else 1e-5
    bound = rel * (x.abs() @ w.abs().t()) + 1e-7
    err = (got.float() - x @ w.t()).abs()
    assert (err <= bound).all(), f"error {(err / bound).max().item():.3g} x the bound"


def tolerance():
    # products in bfloat16 round the activations and the scales to 8 bits
    if weight_only.kernel_dtype(torch.device("cpu"), torch.float32) == torch.bfloat16:
        return dict(rtol=2e-2, atol=2e-2)
    return dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_entry_and_size(converted, case):
    path, kept, dequantized = converted(case)
    entry = read_quantization(kept)
    assert entry["method"] == "gguf"
    _, tied, kinds = CASES[case]
    layers = entry["layers"]
    assert layers["transformer.wte"]["type"] == kinds["token_embd"]
    assert ("lm_head" in layers) is not tied
    assert layers["transformer.h.0.mlp.c_fc2"]["type"] == kinds["ffn_up"]
    sd = load_state_dict(kept)
    # no float copy of any matrix: the float tensors of more than one dimension are the groups'
    # scales and offsets, in the kernel's layout
    floats = {k for k, t in sd.items() if t.is_floating_point() and t.dim() > 1}
    assert floats and all(k.endswith(".sm") for k in floats), floats
    # about the GGUF's size where the codes are 4-bit (vocabulary padding adds a little); 5- and 6-bit
    # codes, and q, k and v of different types stacked, are held in 8 bits (with float32 scales where
    # the K-quants' products of two scales are not float16): up to 1.7x. The float checkpoint: >3x
    bound = 1.15 if case == "tied-q4_1" else 1.7
    assert weights_size(kept) < bound * path.stat().st_size, weights_size(kept) / path.stat().st_size
    assert weights_size(dequantized) > 3 * path.stat().st_size


def float_layers(model):
    """The linear layers, the embedding's own int8 table (checked apart) left out."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "transformer.wte.table"}


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_kept_model_equals_the_dequantized_checkpoint(converted, case, kernels):
    _, kept, dequantized = converted(case)
    _, ours, _ = load_for_inference(kept)
    _, ref, _ = load_for_inference(dequantized)
    ours, ref = ours.module if hasattr(ours, "module") else ours, ref.module if hasattr(ref, "module") else ref
    kinds = {type(m) for m in float_layers(ours).values()}
    assert kinds == {LowBitLinear}, kinds  # every kept type on the kernel, Q6_K's groups of 16 included
    assert isinstance(ours.transformer.wte, Int8Embedding)
    # every layer's weight (read back through its kernel) is the dequantized checkpoint's
    theirs = float_layers(ref)
    if ref.lm_head is None:  # tied: the float model's head is its embedding
        theirs["lm_head"] = ref.transformer.wte
    for name, layer in float_layers(ours).items():
        assert_same_weights(layer.weight, theirs[name].weight, name)
    torch.testing.assert_close(ours.transformer.wte.weight.float(), ref.transformer.wte.weight.float(), rtol=1e-6, atol=1e-7)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    got, want = ours(idx).float(), ref(idx).float()
    scale = want.abs().max().item()
    tol = tolerance()
    assert (got - want).abs().max().item() <= tol["atol"] * 10 * scale + tol["atol"], (got - want).abs().max()
    agreement, decided = top1_agreement(got, want, bound=tol["atol"] * 10 * scale)
    assert decided and agreement > 0.9


@pytest.mark.parametrize("groupsize", [16, 32])
def test_int8_rows_layer_is_the_8_bit_weight(kernels, groupsize):
    """Signed 8-bit codes with a scale and offset per group (Q8_0, and Q6_K's groups of 16) multiply as the 8-bit weight."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (48, 128), generator=g)
    s, z = torch.rand(48, 128 // groupsize, generator=g) * 1e-2, torch.randn(48, 128 // groupsize, generator=g) * 1e-2
    want = (q.view(48, -1, groupsize) * s[..., None] + z[..., None]).view(48, 128)
    layer = weight_only.lowbit_layer(QuantizedRows(q, s, z, groupsize, 8, "t"), "cpu", torch.float32)
    assert_same_weights(layer.weight, want, "split")
    x = torch.randn(3, 128, generator=g)
    assert_same_product(layer(x), x, want)


def test_generate_runs_the_kept_checkpoint(converted):
    _, kept, dequantized = converted("tied-q4_1")
    args = ("--prompt", "Hello", "--max_new_tokens", "8", "--temperature", "0")
    ours = run_script("generate.py", "--checkpoint_dir", kept, *args, timeout=300)
    assert ours.returncode == 0, ours.stderr
    ref = run_script("generate.py", "--checkpoint_dir", dequantized, *args, timeout=300)
    assert ref.returncode == 0 and ours.stdout.strip(), (ours.stdout, ref.stderr)
    if not bf16_kernels():  # float32 kernels: greedy text equal (random weights: no near ties in 8 steps)
        assert ours.stdout == ref.stdout


# ---------------------------------------------------------------- what cannot be kept, and bad use


def test_unkeepable_types_are_dequantized_with_a_warning(spm_model, tmp_path, capfd):
    kinds = {r: "Q4_0" for r in MIXED} | {"ffn_down": "Q2_K", "ffn_up": "Q3_K"}
    path = write_file(tmp_path / "k23.gguf", 2, True, kinds, spm_model)
    convert_gguf_checkpoint(path, tmp_path / "kept", keep_quantized=True)
    err = [l for l in capfd.readouterr().err.splitlines() if l.strip() and not l.startswith("converting:")]
    assert len(err) == 1 and err[0].startswith("warning: ") and "Q2_K, Q3_K" in err[0], err
    layers = read_quantization(tmp_path / "kept")["layers"]
    assert "transformer.h.0.mlp.c_proj" not in layers and "transformer.h.0.attn.c_attn" in layers
    convert_gguf_checkpoint(path, tmp_path / "float")
    kept_sd, float_sd = load_state_dict(tmp_path / "kept"), load_state_dict(tmp_path / "float")
    for name in ("transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_fc2.weight"):
        assert torch.equal(kept_sd[name], float_sd[name]), name


def test_kept_checkpoint_refuses_quantize_and_load_model(converted):
    _, kept, _ = converted("tied-q4_1")
    with pytest.raises(UserError, match="without --quantize"):
        load_for_inference(kept, quantize="int8")
    with pytest.raises(CheckpointError, match="keep_quantized"):
        load_model(kept)
    r = run_script("generate.py", "--checkpoint_dir", kept, "--prompt", "Hi", "--quantize", "int4", timeout=300)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr


# ---------------------------------------------------------------- the embedded model, as shipped


@torch.no_grad()
def test_embedded_model_kept_as_shipped(default_gguf, default_checkpoint, tmp_path, kernels):
    """SmolLM2's Q4_1 file (Q8_0 embedding): 6x smaller in memory than its float checkpoint, the
    same logits."""
    convert_gguf_checkpoint(default_gguf, tmp_path / "kept", keep_quantized=True)
    assert weights_size(tmp_path / "kept") < 1.1 * default_gguf.stat().st_size
    _, ours, tok = load_for_inference(tmp_path / "kept")
    _, ref, _ = load_for_inference(default_checkpoint)
    idx = tok.encode("The capital of France is Paris, and the capital of Italy is").unsqueeze(0)
    got, want = ours(idx).float(), ref(idx).float()
    tol = tolerance()
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= tol["atol"] * 10 * scale + tol["atol"], (got - want).abs().max()
    agreement, decided = top1_agreement(got, want, bound=tol["atol"] * 10 * scale)
    assert decided and agreement > 0.9
