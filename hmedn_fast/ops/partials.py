"""``sum_partials(part)``: the fixed-order sum over the leading axis of float32 per-program partials (weight
gradients), through :mod:`hmedn_fast.ops.triton.rowsum` where Triton runs (CUDA, or the CPU interpreter), else
``part.sum(0)``. Importable without Triton."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from hmedn_fast.ops.dispatch import triton_unavailable


def sum_partials(part: Tensor, perm: Sequence[int] | None = None) -> Tensor:
    """``part.sum(0)`` of a contiguous float32 (R, ...) tensor (R >= 1), deterministic on every backend; with
    ``perm`` (a permutation of the at most three trailing axes) ``part.sum(0).permute(perm).contiguous()`` in one
    kernel."""
    if triton_unavailable(part) is not None:
        total = part.sum(0)
        return total if perm is None else total.permute(*perm).contiguous()
    from hmedn_fast.ops.triton.rowsum import sum_rows
    return sum_rows(part, perm)
