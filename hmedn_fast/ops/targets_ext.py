"""Compiled (C++ CPU and CUDA) backends of the training targets, called by :mod:`hmedn_fast.targets`.

Thin wrappers over the ops ``torch.ops.hmedn_fast.boundary_map`` and ``torch.ops.hmedn_fast.make_targets``
registered by ``csrc/targets.cpp`` (CPU, CUDA and Meta kernels, so ``torch.compile`` traces them without a
graph break). Definitions: SPEC section 2 and :mod:`hmedn_fast.ops.reference.targets`.

The ops check their inputs themselves (``TypeError`` for a non-integer dtype, ``ValueError`` for shapes,
empty tensors, parameters and labels outside ``[0, num_classes)``). On CUDA the label range is checked
inside the kernel (an error flag); reading the flag back costs one host synchronisation, which
``check_labels=False`` skips (then out-of-range labels give unspecified maps, never a memory error).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from hmedn_fast.ops import _ext


def _ops():
    """``torch.ops.hmedn_fast`` once the extension that registers it is loaded."""
    if _ext.extension() is None:
        raise RuntimeError(f"hmedn_fast C++/CUDA targets ops are unavailable: {_ext.missing_reason()}")
    return torch.ops.hmedn_fast


def unavailable(backend: str, labels: Tensor) -> str | None:
    """Why ``backend`` cannot compute targets of ``labels`` (``None`` when it can).

    Args:
        backend: ``"cpu"`` (C++ kernels, CPU tensors) or ``"cuda"`` (CUDA kernels, CUDA tensors).
        labels: the label tensor the op would receive.
    """
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend must be 'cpu' or 'cuda', got {backend!r}")
    if _ext.extension() is None:
        return _ext.missing_reason()
    if backend == "cuda":
        if not _ext.has_cuda():
            return (
                "hmedn_fast._C was built without its CUDA kernels (torch without CUDA or nvcc not found at "
                "build time); rebuild with `pip install --no-build-isolation -e .` on a CUDA machine"
            )
        if labels.device.type != "cuda":
            return f"labels are on {labels.device}, the cuda backend needs CUDA tensors"
    elif labels.device.type != "cpu":
        return f"labels are on {labels.device}, the cpu backend needs CPU tensors"
    return None


def boundary_map(labels: Tensor, num_classes: int) -> Tensor:
    """Per-class face boundaries ``B_k``, ``k = 1 .. num_classes - 1``.

    Args:
        labels: uint8 / int16 / int32 / int64 ``(N, H, W)`` or ``(N, D, H, W)``, values in ``[0, num_classes)``.
        num_classes: ``K`` (background included), >= 2.
    Returns:
        bool ``(N, K - 1, *spatial)`` on the labels' device.
    """
    return _ops().boundary_map(labels, int(num_classes))


def make_targets(
    labels: Tensor,
    num_classes: int,
    sigma_contour: float,
    sigma_weight: float,
    mu0: float,
    mu: Sequence[float],
    check_labels: bool = True,
) -> tuple[Tensor, Tensor]:
    """Contour target and difficulty weight map (SPEC section 2) in one fused call.

    Args:
        labels: uint8 / int16 / int32 / int64 ``(N, H, W)`` or ``(N, D, H, W)``, values in ``[0, num_classes)``;
            any strides (made contiguous inside).
        num_classes: ``K`` (background included), >= 2.
        sigma_contour: Gaussian sigma of the contour target, > 0 (CUDA: < 32).
        sigma_weight: Gaussian sigma of the weight map, > 0 (CUDA: < 32).
        mu0: base weight.
        mu: ``K - 1`` per-class weights (CUDA: at most 255 classes unless all equal).
        check_labels: CUDA only: verify the label range (one host sync). The CPU kernel always checks.
    Returns:
        ``(contour, weight)``, float32 ``(N, *spatial)`` each on the labels' device: contour in ``[0, 1]``
        (0 for a sample without boundary), weight ``mu0 + G(sum_k mu_k B_k) / max G(sum_k B_k)``.
    """
    contour, weight = _ops().make_targets(
        labels,
        int(num_classes),
        float(sigma_contour),
        float(sigma_weight),
        float(mu0),
        [float(m) for m in mu],
        bool(check_labels),
    )
    return contour, weight


__all__ = ["boundary_map", "make_targets", "unavailable"]
