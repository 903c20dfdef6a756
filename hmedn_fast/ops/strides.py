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


def voxel_stride(t: Tensor) -> int | None:
    """For an (N, C, *spatial) tensor whose channels are innermost (stride 1) and whose voxels, N and the spatial
    axes flattened in order, sit at one stride (channels-last contiguous, or a channel slice of such a tensor): that
    stride; else None."""
    if t.ndim < 3 or t.shape[1] > 1 and t.stride(1) != 1:
        return None
    return flat_spatial_stride(t.movedim(1, -1)[..., 0], 0) if t.shape[1] > 1 else flat_spatial_stride(t, 0)
