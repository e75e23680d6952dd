"""The CPU low-bit kernel (lit_llama/csrc/lowbit_matmul.cpp) against the formula w = q s + m written
out here in torch: its AVX-512 code, and the same source built again for AVX2 alone and for no
vector instructions (each a separate operator namespace), 4- and 8-bit codes, products of 1 to 5
rows and the dequantized weight, float16 and float32 scales, groups of 16 (GGUF's Q6_K), 32, 64 and
128; the layout's rows padded to whole tiles and read back (untile); and the
layer's row lookups (a tied embedding's) from the kernel's layout."""

from pathlib import Path

import pytest
import torch

from lit_llama import cpu_kernels
from lit_llama.quant.weight_only import LowBitLinear, lowbit_tiles

SOURCE = Path(cpu_kernels.__file__).parent / "csrc" / "lowbit_matmul.cpp"
BUILDS = {"native": (), "avx2": ("-mno-avx512f",), "scalar": ("-mno-avx2", "-mno-avx512f")}


@pytest.fixture(scope="module", params=list(BUILDS))
def ops(request):
    assert cpu_kernels.available(), "the kernels must build where a C++ compiler is present"
    if request.param == "native":
        return torch.ops.lit_llama
    name = f"lit_llama_{request.param}"
    if not hasattr(getattr(torch.ops, name), "lowbit_matmul"):
        cpu_kernels.build(f"lit_llama_lowbit_{request.param}", [SOURCE], [f"-DLIT_LLAMA_OPS={name}", *BUILDS[request.param]])
    return getattr(torch.ops, name)


def case(out, cols, groupsize, bits, seed, exact_half=True, symmetric=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2 ** bits, (out, cols), generator=g)
    s = torch.rand(out, cols // groupsize, generator=g) * 0.02 + 1e-3
    m = -(2 ** (bits - 1)) * s if symmetric else -torch.rand(out, cols // groupsize, generator=g) * 0.1
    if exact_half:
        s, m = s.half().float(), m.half().float()
    w = (q.view(out, -1, groupsize) * s[..., None] + m[..., None]).view(out, cols)
    return q, s, m, w


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("groupsize", [16, 32, 64, 128])
@pytest.mark.parametrize("exact_half", [True, False], ids=["float16", "float32"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["offsets", "symmetric"])
def test_products_and_weight_are_the_formula(ops, bits, groupsize, exact_half, symmetric):
    """Symmetric weights (m = -2^(bits-1) s, GGUF's Q4_0/Q8_0/Q6_K) are stored without their offsets."""
    q, s, m, w = case(48, 384, groupsize, bits, seed=groupsize + bits, exact_half=exact_half, symmetric=symmetric)
    codes, sm = lowbit_tiles(q, s, m, bits)
    assert sm.dtype == (torch.float16 if exact_half else torch.float32)
    assert codes.shape == (3, 384 * bits // 32, 64) and sm.shape == (3, 384 // groupsize, 1 if symmetric else 2, 16)
    # within float32 rounding of the terms q s (up to ~5): the kernel may fuse q s + m into one rounding
    torch.testing.assert_close(ops.lowbit_dequantize(codes, sm, groupsize, bits), w, rtol=1e-6, atol=1e-6)
    for rows in (1, 2, 5):
        x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(ops.lowbit_matmul(x, codes, sm, groupsize, bits), x @ w.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_every_code_and_lane_lands_in_its_place(ops, bits):
    """One nonzero code at a time: a lane or a code's position mixed up would move it elsewhere."""
    out, cols = 32, 64
    for r, c, v in ((0, 0, 1), (17, 1, 15), (5, 62, 7), (31, 63, 9), (16, 33, 3), (3, 6, 2 ** bits - 1)):
        q = torch.zeros(out, cols, dtype=torch.long)
        q[r, c] = v
        codes, sm = lowbit_tiles(q, torch.ones(out, 2), torch.zeros(out, 2), bits)
        x = torch.zeros(1, cols)
        x[0, c] = 1.0
        y = ops.lowbit_matmul(x, codes, sm, 32, bits)
        assert y[0, r] == v and y.count_nonzero() == 1, (r, c)
        w = ops.lowbit_dequantize(codes, sm, 32, bits)
        assert w[r, c] == v and w.count_nonzero() == 1, (r, c)


def test_activations_of_other_dtypes_are_multiplied_in_float32(ops):
    q, s, m, w = case(16, 64, 32, 4, seed=3)
    codes, sm = lowbit_tiles(q, s, m, 4)
    x = torch.randn(2, 64).bfloat16()
    y = ops.lowbit_matmul(x, codes, sm, 32, 4)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.float() @ w.t(), rtol=1e-5, atol=1e-5)


def test_a_wrong_layout_is_one_error():
    assert cpu_kernels.available()
    q, s, m, _ = case(16, 64, 32, 4, seed=4)
    codes, sm = lowbit_tiles(q, s, m, 4)
    matmul = torch.ops.lit_llama.lowbit_matmul
    with pytest.raises(RuntimeError, match="groups of 16, 32, 64 or 128"):
        matmul(torch.randn(1, 64), codes, sm, 48, 4)
    with pytest.raises(RuntimeError, match="codes of 4 or 8 bits"):
        matmul(torch.randn(1, 64), codes, sm, 32, 3)
    with pytest.raises(RuntimeError, match=r"x must be \(M, K\)"):
        matmul(torch.randn(1, 32), codes, sm, 32, 4)
    with pytest.raises(RuntimeError, match="float16 or float32"):
        matmul(torch.randn(1, 64), codes, sm.bfloat16(), 32, 4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "no-kernel"])
def test_row_lookups_are_the_weight_rows(bits, kernel, monkeypatch):
    """A tied embedding looks up the head's rows (Int8Embedding): from the kernel's tiles and from
    the packed bytes, for a tensor of token ids of any shape."""
    assert cpu_kernels.available()
    if not kernel:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2 ** bits, (64, 128), generator=g)
    s, z = torch.rand(64, 4, generator=g).half().float(), torch.randn(64, 4, generator=g).half().float()
    layer = LowBitLinear(q, s, z, 32, torch.float32, bits=bits)
    assert layer.kernel == kernel
    w = ((q.view(64, 4, 32) - 2 ** (bits - 1)) * s[..., None] + z[..., None]).view(64, 128)
    torch.testing.assert_close(layer.weight, w, rtol=1e-6, atol=1e-6)
    idx = torch.tensor([[0, 17, 63], [31, 16, 5]])
    torch.testing.assert_close(layer.rows(idx, torch.float32), w[idx], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rows_padded_to_whole_tiles_and_read_back(bits, symmetric):
    """40 rows fill three tiles, the last one padded: the layer's product, weight and row lookups
    have 40 rows, and untile gives back the codes, scales and offsets."""
    from lit_llama.io.checkpoint import untile

    q, s, m, w = case(40, 128, 32, bits, seed=7, symmetric=symmetric)
    codes, sm = lowbit_tiles(q, s, m, bits)
    assert codes.shape[0] == 3 and sm.shape[0] == 3
    got_q, got_s, got_m = untile(codes, sm, bits, 40)
    assert torch.equal(got_q.long(), q) and torch.equal(got_s, s) and torch.equal(got_m, m)
    layer = LowBitLinear.from_tiles(codes, sm, 32, bits, 40, torch.float32)
    torch.testing.assert_close(layer.weight, w, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=1e-5, atol=1e-4)
    idx = torch.tensor([[0, 39], [17, 16]])
    torch.testing.assert_close(layer.rows(idx, torch.float32), w[idx], rtol=1e-6, atol=1e-7)
