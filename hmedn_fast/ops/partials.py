"""``sum_partials(part)``: the fixed-order sum over the leading axis of float32 per-program partials (weight
gradients), through :mod:`hmedn_fast.ops.triton.rowsum` where Triton runs (CUDA, or the CPU interpreter), else
``part.sum(0)``. Importable without Triton."""
from __future__ import annotations

from torch import Tensor

from hmedn_fast.ops.dispatch import triton_unavailable


def sum_partials(part: Tensor) -> Tensor:
    """``part.sum(0)`` of a contiguous float32 (R, ...) tensor (R >= 1), deterministic on every backend."""
    if triton_unavailable(part) is not None:
        return part.sum(0)
    from hmedn_fast.ops.triton.rowsum import sum_rows
    return sum_rows(part)
