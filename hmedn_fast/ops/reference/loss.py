"""Reference (pure PyTorch) difficulty-guided loss of HMEDN (SPEC section 3, paper eq. 2-6).

The truth the Triton backend is tested against. Inputs are assumed to be checked already by the public
:func:`hmedn_fast.ops.difficulty_guided_loss`; see its docstring for the full contract.
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(logits: Tensor) -> torch.dtype:
    """float64 for float64 logits, float32 otherwise (fp16/bf16 logits are upcast)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def upsample_nearest(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """Nearest upsampling of ``x`` (N, C, *spatial) to ``size`` by integer factors per dimension.

    Full-resolution index ``i`` reads low-resolution index ``i // factor`` (the same as
    ``F.interpolate(mode="nearest")`` for integer factors). Backward sums the gradients of each block.
    """
    for dim, full in enumerate(size, start=2):
        factor = full // x.shape[dim]
        if factor != 1:
            x = x.repeat_interleave(factor, dim=dim)
    return x


def _per_voxel_map(t: Tensor | None, ndim: int) -> Tensor | None:
    """(N, *spatial) view of a map given as (N, *spatial) or (N, 1, *spatial)."""
    if t is None or t.ndim == ndim:
        return t
    return t.squeeze(1)


def difficulty_guided_loss(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    contour_logits: Tensor | None = None,
    contour_target: Tensor | None = None,
    alpha: float = 1.0,
    class_weight: Tensor | None = None,
    ignore_index: int | None = None,
    reduction: str = "mean",
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """``L = L_s + alpha L_r`` computed with PyTorch ops in float32 (float64 for float64 logits).

    Per voxel ``v`` of the labels' grid (``y_v`` its label, ``z_v`` the logits of the voxel's block when
    the logits are at an integer fraction of the label resolution):
    ``s_v = W_v nu_{y_v} (logsumexp(z_v) - z_v[y_v])`` and ``r_v = (sigmoid(c_v) - C_v)^2``, both 0
    where ``y_v == ignore_index``. ``mean`` divides the sums by the number of non-ignored voxels
    (at least 1), ``sum`` does not, ``none`` returns ``s_v + alpha r_v`` as (N, *label spatial).

    Returns:
        The loss (0-dim for mean/sum), or ``(L, L_s, L_r)`` with ``return_parts`` (mean/sum only).
    """
    dtype = compute_dtype(logits)
    size = tuple(labels.shape[1:])
    ndim = labels.ndim
    valid = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    target = torch.where(valid, labels, torch.zeros_like(labels)).long()

    log_p = torch.log_softmax(upsample_nearest(logits.to(dtype), size), dim=1)
    nll = -log_p.gather(1, target.unsqueeze(1)).squeeze(1)
    w = torch.ones((), dtype=dtype, device=logits.device)
    if weight is not None:
        w = w * _per_voxel_map(weight, ndim).to(dtype)
    if class_weight is not None:
        w = w * class_weight.to(dtype)[target]
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    seg = torch.where(valid, w * nll, zero)
    if contour_logits is not None:
        c = upsample_nearest(contour_logits.to(dtype).reshape(logits.shape[0], 1, *logits.shape[2:]), size)
        diff = torch.sigmoid(c.squeeze(1)) - _per_voxel_map(contour_target, ndim).to(dtype)
        ctr = torch.where(valid, diff * diff, zero)
    else:
        ctr = torch.zeros_like(seg)

    if reduction == "none":
        return seg + alpha * ctr
    if reduction == "mean":
        count = valid.sum().clamp(min=1).to(dtype)
        seg_term, ctr_term = seg.sum() / count, ctr.sum() / count
    else:
        seg_term, ctr_term = seg.sum(), ctr.sum()
    total = seg_term + alpha * ctr_term
    return (total, seg_term, ctr_term) if return_parts else total
