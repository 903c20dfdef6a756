"""Column sums of per-program partials: ``part.sum(0)`` for a contiguous float32 ``(R, M)`` tensor in a fixed order.

The weight-gradient kernels (3x3x3 CUDA and Triton, the 1x1 fusion) leave one float32 partial per program or block
and sum them afterwards (deterministic, no atomics). torch's reduction over the leading dimension of such tensors
took 8-10 us a call on the H200 for 2-10 MB (2.5-4x their read time; stop 32 profile, ``docs/decisions/blocks.md``):
here each program owns BLOCK_M columns and walks the rows in BLOCK_R-row tiles, all loads coalesced.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from hmedn_fast.ops.triton.launch import FastLauncher, cdiv

BLOCK_M = 64
BLOCK_R = 64


@triton.jit
def _sum_rows_kernel(src_ptr, dst_ptr, R, M, B, C, stride_a, stride_b, stride_c,
                     BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cm = cols < M
    acc = tl.zeros([BLOCK_R, BLOCK_M], tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(src_ptr + rows[:, None] * M + cols[None, :], mask=(rows < R)[:, None] & cm[None, :], other=0.0)
    # column (a, b, c) of the (A, B, C) trailing shape goes to its place in the (permuted) output
    dst = (cols // (B * C)) * stride_a + (cols // C % B) * stride_b + (cols % C) * stride_c
    tl.store(dst_ptr + dst, tl.sum(acc, axis=0), mask=cm)


_SUM_ROWS = FastLauncher(_sum_rows_kernel)


def sum_rows(part: Tensor, perm: Sequence[int] | None = None) -> Tensor:
    """``part.sum(0)`` (float32, shape ``part.shape[1:]``) of a contiguous float32 tensor with at least one row, the
    same order of additions on every call of one shape. With ``perm`` (a permutation of the at most three trailing
    axes): ``part.sum(0).permute(perm).contiguous()``, written in place by the same kernel (no copy)."""
    if part.dtype != torch.float32 or not part.is_contiguous() or part.ndim < 1 or part.shape[0] < 1:
        raise ValueError(f"part must be a contiguous float32 tensor with at least one row, got dtype {part.dtype}, "
                         f"shape {tuple(part.shape)}")
    r = part.shape[0]
    m = part.numel() // r
    trailing = tuple(part.shape[1:])
    if perm is None:
        out = torch.empty(trailing, device=part.device, dtype=torch.float32)
        sizes, strides = (1, 1, m), (0, 0, 1)
    else:
        perm = tuple(int(p) for p in perm)
        if len(trailing) > 3 or sorted(perm) != list(range(len(trailing))):
            raise ValueError(f"perm must be a permutation of part's at most 3 trailing axes {trailing}, got {perm}")
        out = torch.empty([trailing[p] for p in perm], device=part.device, dtype=torch.float32)
        target = out.permute([perm.index(i) for i in range(len(perm))])  # trailing's shape, out's memory
        pad = 3 - len(trailing)
        sizes, strides = (1,) * pad + trailing, (0,) * pad + target.stride()
    _SUM_ROWS((cdiv(m, BLOCK_M),), part, out, r, m, sizes[1], sizes[2], *strides, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M,
              num_warps=4)
    return out
