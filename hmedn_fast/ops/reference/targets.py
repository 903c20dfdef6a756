"""Pure-PyTorch reference of the training targets (SPEC section 2).

This is the truth the fast ``cpu`` / ``cuda`` kernels of :mod:`hmedn_fast.ops.targets_ext` are tested
against, and itself tested against ``scipy.ndimage``. It runs on any device.

- Boundary ``B_k`` of class ``k``: voxels of ``labels == k`` with a face neighbour (4-neighbour in 2D,
  6-neighbour in 3D) of another label; outside the image counts as inside the mask, i.e.
  ``mask ^ binary_erosion(mask, border_value=1)`` with face connectivity.
- Gaussian ``G_s``: ``scipy.ndimage.gaussian_filter(x, s, mode="reflect", truncate=4.0)`` written as
  separable 1D correlations. scipy's ``reflect`` is the half-sample symmetric extension
  (``d c b a | a b c d | d c b a``), repeated as often as the radius needs; ``torch.nn.functional.pad``'s
  ``reflect`` is scipy's ``mirror``, so the padding indices are built here.
- Contour ``C = G_sc(B_all) / max G_sc(B_all)``; weight ``W = mu0 + G_sw(sum_k mu_k B_k) / max G_sw(sum_k B_k)``
  (the Gaussian is linear, so this equals ``mu0 + sum_k mu_k S_k / max(sum_k S_k)`` with ``S_k = G_sw(B_k)``).
  Maxima are taken per sample over its spatial extent; a sample without any boundary gets ``C = 0`` and
  ``W = mu0``.
- Precision: the smoothing runs in float64 and the maps are returned in float32. Accumulating in float32
  is not enough for the weight map: with ``mu = 25`` it drifts up to ~1.2e-5 from scipy's float64 result.

Inputs are assumed valid here; :mod:`hmedn_fast.targets` checks them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

TRUNCATE = 4.0


def label_edges(labels: Tensor) -> Tensor:
    """Voxels with at least one face neighbour of a different label (the image edge is not one).

    Args:
        labels: integer ``(N, *spatial)``, 2 or 3 spatial dims.
    Returns:
        bool ``(N, *spatial)``; ``edges & (labels == k)`` is the boundary ``B_k`` of class ``k``.
    """
    edges = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for dim in range(1, labels.ndim):
        n = labels.shape[dim]
        if n < 2:
            continue
        differs = labels.narrow(dim, 1, n - 1) != labels.narrow(dim, 0, n - 1)
        edges.narrow(dim, 1, n - 1).logical_or_(differs)
        edges.narrow(dim, 0, n - 1).logical_or_(differs)
    return edges


def boundary_map(labels: Tensor, num_classes: int) -> Tensor:
    """Per-class face boundaries ``B_k``, ``k = 1 .. num_classes - 1``.

    Args:
        labels: integer ``(N, *spatial)`` with values in ``[0, num_classes)``.
        num_classes: ``K``, background included.
    Returns:
        bool ``(N, K - 1, *spatial)`` on the labels' device.
    """
    classes = torch.arange(1, num_classes, device=labels.device, dtype=labels.dtype)
    classes = classes.view(1, -1, *([1] * (labels.ndim - 1)))
    return label_edges(labels).unsqueeze(1) & (labels.unsqueeze(1) == classes)


def _reflect_index(n: int, radius: int, device: torch.device) -> Tensor:
    """Indices of scipy's ``reflect`` extension of a length-``n`` axis by ``radius`` on both sides."""
    i = torch.arange(-radius, n + radius, device=device).remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE) -> Tensor:
    """scipy's normalised 1D Gaussian weights (float64, length ``2 * int(truncate * sigma + 0.5) + 1``)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 / float(sigma) ** 2 * x * x)
    return w / w.sum()


def gaussian_filter(x: Tensor, sigma: float, spatial_dims: int, truncate: float = TRUNCATE) -> Tensor:
    """``scipy.ndimage.gaussian_filter(mode="reflect")`` over the last ``spatial_dims`` dims of ``x``.

    Args:
        x: floating ``(..., *spatial)``; leading dims are batch dims and are not smoothed.
        sigma: standard deviation in voxels, the same on every spatial axis.
        spatial_dims: how many trailing dims are spatial.
    Returns:
        tensor of ``x``'s shape, dtype and device (computed in ``x``'s dtype).
    """
    weights = gaussian_kernel1d(sigma, truncate).to(device=x.device, dtype=x.dtype)
    radius = (weights.numel() - 1) // 2
    kernel = weights.view(1, 1, -1)
    out = x
    for dim in range(x.ndim - spatial_dims, x.ndim):
        n = out.shape[dim]
        padded = out.index_select(dim, _reflect_index(n, radius, x.device)).movedim(dim, -1)
        lead = padded.shape[:-1]
        smoothed = F.conv1d(padded.reshape(-1, 1, n + 2 * radius), kernel)
        out = smoothed.reshape(*lead, n).movedim(-1, dim)
    return out


def _normalise_per_sample(x: Tensor, spatial_dims: int) -> Tensor:
    """``x / max(x)`` over the trailing ``spatial_dims`` dims; samples whose maximum is 0 stay 0."""
    peak = x.amax(dim=tuple(range(x.ndim - spatial_dims, x.ndim)), keepdim=True)
    return x / torch.where(peak > 0, peak, torch.ones_like(peak))


def contour_from_boundaries(boundaries: Tensor, sigma: float) -> Tensor:
    """Contour target from per-class boundaries.

    Args:
        boundaries: bool ``(N, K - 1, *spatial)``.
        sigma: Gaussian sigma in voxels.
    Returns:
        float32 ``(N, *spatial)`` in ``[0, 1]``: ``G(B_all) / max G(B_all)`` per sample, 0 without boundary.
    """
    spatial_dims = boundaries.ndim - 2
    union = boundaries.any(dim=1).to(torch.float64)
    return _normalise_per_sample(gaussian_filter(union, sigma, spatial_dims), spatial_dims).to(torch.float32)


def weight_from_boundaries(boundaries: Tensor, sigma: float, mu0: float, mu: Sequence[float]) -> Tensor:
    """Difficulty weight map from per-class boundaries.

    Args:
        boundaries: bool ``(N, K - 1, *spatial)``.
        sigma: Gaussian sigma in voxels.
        mu0: base weight.
        mu: ``K - 1`` per-class weights.
    Returns:
        float32 ``(N, *spatial)``: ``mu0 + sum_k mu_k S_k / max(sum_k S_k)``, ``mu0`` without boundary.
    """
    spatial_dims = boundaries.ndim - 2
    b = boundaries.to(torch.float64)
    mu_t = torch.tensor([float(m) for m in mu], dtype=torch.float64, device=b.device)
    mu_t = mu_t.view(1, -1, *([1] * spatial_dims))
    # channel 0: sum_k B_k (the normaliser's source), channel 1: sum_k mu_k B_k
    stacked = torch.stack((b.sum(dim=1), (b * mu_t).sum(dim=1)), dim=1)
    smooth = gaussian_filter(stacked, sigma, spatial_dims)
    peak = smooth[:, :1].amax(dim=tuple(range(2, smooth.ndim)), keepdim=True)
    ratio = smooth[:, 1:] / torch.where(peak > 0, peak, torch.ones_like(peak))
    return (ratio + float(mu0)).squeeze(1).to(torch.float32)


def make_targets(
    labels: Tensor,
    num_classes: int,
    sigma_contour: float,
    sigma_weight: float,
    mu0: float,
    mu: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """Contour target and difficulty weight map of a label map (same contract as the fast kernels).

    Args:
        labels: integer ``(N, *spatial)`` with values in ``[0, num_classes)``, 2 or 3 spatial dims.
        num_classes: ``K``, background included.
        sigma_contour: Gaussian sigma of the contour target (voxels).
        sigma_weight: Gaussian sigma of the weight map (voxels).
        mu0: base weight.
        mu: ``K - 1`` per-class weights.
    Returns:
        ``(contour, weight)``, each float32 ``(N, *spatial)`` on the labels' device.
    """
    boundaries = boundary_map(labels, num_classes)
    return (
        contour_from_boundaries(boundaries, sigma_contour),
        weight_from_boundaries(boundaries, sigma_weight, mu0, mu),
    )


__all__ = [
    "boundary_map",
    "contour_from_boundaries",
    "gaussian_filter",
    "gaussian_kernel1d",
    "label_edges",
    "make_targets",
    "weight_from_boundaries",
]
