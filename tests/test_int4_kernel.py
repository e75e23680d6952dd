"""The CPU int4 kernel (lit_llama/csrc/int4_matmul.cpp) against the formula w = q s + m written out
here in torch: its AVX-512 code, and the same source built again for AVX2 alone and for no vector
instructions (each a separate operator namespace), products of 1 to 5 rows and the dequantized
weight, float16 and float32 scales, groups of 32, 64 and 128."""

from pathlib import Path

import pytest
import torch

from lit_llama import cpu_kernels
from lit_llama.quant.weight_only import int4_tiles

SOURCE = Path(cpu_kernels.__file__).parent / "csrc" / "int4_matmul.cpp"
BUILDS = {"native": (), "avx2": ("-mno-avx512f",), "scalar": ("-mno-avx2", "-mno-avx512f")}


@pytest.fixture(scope="module", params=list(BUILDS))
def ops(request):
    assert cpu_kernels.available(), "the kernels must build where a C++ compiler is present"
    if request.param == "native":
        return torch.ops.lit_llama
    name = f"lit_llama_{request.param}"
    if not hasattr(torch.ops, name) or not hasattr(getattr(torch.ops, name), "int4_matmul"):
        cpu_kernels.build(f"lit_llama_int4_{request.param}", [SOURCE], [f"-DLIT_LLAMA_OPS={name}", *BUILDS[request.param]])
    return getattr(torch.ops, name)


def case(out, cols, groupsize, seed, exact_half=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, cols), generator=g)
    s = torch.rand(out, cols // groupsize, generator=g) * 0.02 + 1e-3
    m = -torch.rand(out, cols // groupsize, generator=g) * 0.1
    if exact_half:
        s, m = s.half().float(), m.half().float()
    w = (q.view(out, -1, groupsize) * s[..., None] + m[..., None]).view(out, cols)
    return q, s, m, w


@pytest.mark.parametrize("groupsize", [32, 64, 128])
@pytest.mark.parametrize("exact_half", [True, False], ids=["float16", "float32"])
def test_products_and_weight_are_the_formula(ops, groupsize, exact_half):
    q, s, m, w = case(48, 384, groupsize, seed=groupsize, exact_half=exact_half)
    codes, sm = int4_tiles(q, s, m)
    assert sm.dtype == (torch.float16 if exact_half else torch.float32)
    assert codes.shape == (3, 48, 64) and sm.shape == (3, 384 // groupsize, 2, 16)
    torch.testing.assert_close(ops.int4_dequantize(codes, sm, groupsize), w.t(), rtol=1e-6, atol=1e-7)
    for rows in (1, 2, 5):
        x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows))
        torch.testing.assert_close(ops.int4_matmul(x, codes, sm, groupsize), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_every_code_and_lane_lands_in_its_place(ops):
    """One nonzero code at a time: a lane or nibble mixed up would move it to another output or input."""
    out, cols = 32, 64
    for r, c, v in ((0, 0, 1), (17, 1, 15), (5, 62, 7), (31, 63, 9), (16, 33, 3)):
        q = torch.zeros(out, cols, dtype=torch.long)
        q[r, c] = v
        s, m = torch.ones(out, 2), torch.zeros(out, 2)
        codes, sm = int4_tiles(q, s, m)
        x = torch.zeros(1, cols)
        x[0, c] = 1.0
        y = ops.int4_matmul(x, codes, sm, 32)
        assert y[0, r] == v and y.count_nonzero() == 1, (r, c)
        w = ops.int4_dequantize(codes, sm, 32)
        assert w[c, r] == v and w.count_nonzero() == 1, (r, c)


def test_activations_of_other_dtypes_are_multiplied_in_float32(ops):
    q, s, m, w = case(16, 64, 32, seed=3)
    codes, sm = int4_tiles(q, s, m)
    x = torch.randn(2, 64).bfloat16()
    y = ops.int4_matmul(x, codes, sm, 32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.float() @ w.t(), rtol=1e-5, atol=1e-5)


def test_a_wrong_layout_is_one_error():
    assert cpu_kernels.available()
    q, s, m, _ = case(16, 64, 32, seed=4)
    codes, sm = int4_tiles(q, s, m)
    with pytest.raises(RuntimeError, match="groups of 32, 64 or 128"):
        torch.ops.lit_llama.int4_matmul(torch.randn(1, 64), codes, sm, 48)
    with pytest.raises(RuntimeError, match=r"x must be \(M, K\)"):
        torch.ops.lit_llama.int4_matmul(torch.randn(1, 32), codes, sm, 32)
    with pytest.raises(RuntimeError, match="float16 or float32"):
        torch.ops.lit_llama.int4_matmul(torch.randn(1, 64), codes, sm.bfloat16(), 32)
