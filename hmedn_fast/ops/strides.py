"""Stride arithmetic shared by the fused kernels' launchers (torch only: importable without Triton)."""
from __future__ import annotations

from torch import Tensor


def flat_spatial_stride(t: Tensor, first: int) -> int | None:
    """Stride of dims ``first:`` flattened to one index, or None when they do not flatten (size-1 dims skipped;
    1 when all are size 1)."""
    if t.is_contiguous():  # the common NC* case, without the per-dimension Python loop
        return 1
    dims = [d for d in range(first, t.ndim) if t.shape[d] != 1]
    for a, b in zip(dims, dims[1:]):
        if t.stride(a) != t.stride(b) * t.shape[b]:
            return None
    return t.stride(dims[-1]) if dims else 1
