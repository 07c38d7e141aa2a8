"""Triton block-scaled FP8 GEMM (DeepSeek-V3 recipe) for CUDA GPUs with FP8 tensor cores (sm89+); imported lazily.

C[m, n] = sum over 128-wide K blocks of dot(A_q[m, kb], B_q[n, kb]) * a_scale[m, kb] * b_scale[n // 128, kb],
accumulated in fp32: the per-block promotion of the paper (section 3.3.2) and of the official kernel.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
    for bm, bn, stages, warps in [
        (128, 128, 3, 8),
        (128, 128, 4, 8),
        (128, 128, 4, 4),
        (64, 128, 4, 4),
        (64, 128, 5, 4),
        (128, 64, 4, 4),
        (64, 64, 4, 4),
        (32, 64, 5, 4),
        (16, 64, 5, 4),
    ]
]


@triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_s_ptr,
    b_s_ptr,
    M,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each column tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

    k_blocks = tl.cdiv(K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    a_s_ptrs = a_s_ptr + offs_m * k_blocks
    b_s_ptrs = b_s_ptr + (offs_n // BLOCK_K) * k_blocks

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_blocks):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :] & (offs_k[:, None] < k_left), other=0.0)
        a_s = tl.load(a_s_ptrs + kb, mask=mask_m, other=0.0)
        b_s = tl.load(b_s_ptrs + kb, mask=mask_n, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def triton_fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale_inv: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """a [M, K] e4m3 with scales [M, ceil(K/128)], b [N, K] e4m3 with scale_inv [ceil(N/128), ceil(K/128)] -> [M, N]."""
    a, b = a.contiguous(), b.contiguous()
    a_scale, b_scale_inv = a_scale.float().contiguous(), b_scale_inv.float().contiguous()
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](a, b, c, a_scale, b_scale_inv, m, n, k, BLOCK_K=128)
    return c
