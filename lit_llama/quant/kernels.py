"""Triton kernel for PackedLinear on CUDA: y = x Wᵀ with W's integers unpacked and scaled inside
the kernel, so the weight travels from memory packed (4 or 3 bits a weight). Decoding one token at
a time is bound by reading the weights, so that is where the speed comes from.

Imported only when a CUDA input meets an installed Triton (see PackedLinear.forward); the layout
is pack_int's: per output row a little-endian bit stream, value k at bits [k*BITS, (k+1)*BITS).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _packed_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K,
                          stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
                          BITS: tl.constexpr, GROUPSIZE: tl.constexpr, IEEE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    row_bytes = K * BITS // 8
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = n_ok[:, None] & k_ok[None, :]
        bit = rk * BITS
        byte = bit // 8
        word = tl.load(q_ptr + rn[:, None] * stride_qn + byte[None, :], mask=w_ok, other=0).to(tl.int32)
        if BITS % 4 != 0:  # a 3-bit value may straddle two bytes
            nxt_ok = w_ok & (byte[None, :] + 1 < row_bytes)
            nxt = tl.load(q_ptr + rn[:, None] * stride_qn + byte[None, :] + 1, mask=nxt_ok, other=0).to(tl.int32)
            word = word | (nxt << 8)
        q = (word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
        g = rk // GROUPSIZE
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * stride_zn + g[None, :], mask=w_ok, other=0).to(tl.float32)
        w = ((q.to(tl.float32) - z) * s).to(x.dtype)  # (BLOCK_N, BLOCK_K), in the input's dtype
        if IEEE:  # float32 inputs: full precision, as torch's own float32 matmul, not TF32
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  bits: int, groupsize: int) -> torch.Tensor:
    """x (..., K) times the packed weight (N, K*bits/8) transposed: (..., N) in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    M, K = x2.shape
    N = qweight.size(0)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    # decoding (M = 1) still needs 16 rows for tl.dot; the extra rows are masked
    block_m = 16 if M <= 16 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _packed_matmul_kernel[grid](x2, qweight, scales, zeros, y, M, N, K,
                                x2.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
                                BITS=bits, GROUPSIZE=groupsize, IEEE=x.dtype == torch.float32,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.view(*shape[:-1], N)
