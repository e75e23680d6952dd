"""The CPU half-precision product (lit_llama/csrc/dense_matvec.cpp) against float64 matrix products of
the same values, and an eager bfloat16 model whose layers multiply their memory-mapped row-major
weights with it (decode_layout): same weights, no copy, logits within bfloat16 rounding of
F.linear's."""

import pytest
import torch

from lit_llama import cpu_kernels
from lit_llama.infer.generation import HalfEmbedding, HalfLinear, decode_layout
from lit_llama.infer.load import load_for_inference
from lit_llama.io import checkpoint as ckpt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [64, 100, 4096])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_products_are_the_float64_products(dtype, K, M):
    assert cpu_kernels.available()
    g = torch.Generator().manual_seed(K + M)
    w = (torch.randn(48, K, generator=g) * 0.05).to(dtype)
    x = torch.randn(M, K, generator=g)
    got = torch.ops.lit_llama.dense_matvec(x, w)
    want = x.double() @ w.double().t()
    # float32 accumulation: within a few float32 steps of the sum of the terms' magnitudes
    bound = 1e-6 * (x.double().abs() @ w.double().abs().t()) + 1e-9
    assert got.dtype == torch.float32 and ((got.double() - want).abs() <= bound).all()


def test_a_wrong_weight_is_one_error():
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.lit_llama.dense_matvec(torch.randn(1, 64), torch.randn(4, 64))
    with pytest.raises(RuntimeError, match=r"x \(M, K\)"):
        torch.ops.lit_llama.dense_matvec(torch.randn(1, 32), torch.randn(4, 64).bfloat16())


@torch.no_grad()
def test_bfloat16_model_multiplies_its_mapped_weights_in_place(default_checkpoint, tmp_path):
    """The embedded model saved in bfloat16, loaded for eager decoding in bf16-true: every linear
    layer and the tied head are half-precision kernels over the file's pages (no column-major copy),
    and a decoding step's logits are F.linear's to bfloat16 rounding."""
    from lit_llama.io.checkpoint import load_model, save_checkpoint

    model = load_model(default_checkpoint)
    sd = {k: v.bfloat16() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "bf16", model, tokenizer_dir=default_checkpoint, state_dict=sd)
    _, ours, _ = load_for_inference(tmp_path / "bf16", "bf16-true")
    ours = ours.module if hasattr(ours, "module") else ours
    layers = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(type(m) is HalfLinear for m in layers)
    assert type(ours.transformer.wte) is HalfEmbedding
    assert all(ckpt._file_backed(m.weight.data_ptr()) for m in layers)
    idx = torch.tensor([[1, 530, 2800, 30, 4]])
    ours.set_kv_cache(1, 16)
    ours(idx, torch.arange(5))
    got = ours(torch.tensor([[99]]), torch.tensor([5]))[0, -1].float()
    # the same model with plain F.linear products
    for m in layers:
        m.__class__ = torch.nn.Linear
    ours.transformer.wte.__class__ = torch.nn.Embedding
    ours.set_kv_cache(1, 16)
    ours(idx, torch.arange(5))
    want = ours(torch.tensor([[99]]), torch.tensor([5]))[0, -1].float()
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())
    assert got.argmax() == want.argmax()
