"""Training targets of HMEDN (SPEC section 2): boundary maps, contour target, difficulty weight map.

For an integer label map ``Y`` (0 = background, ``1 .. K-1`` = structures) and each foreground class ``k``:

- ``B_k`` (``method="face"``, default): voxels of ``Y == k`` with a face neighbour (4 in 2D, 6 in 3D) of
  another label. The image (patch) edge is not a boundary, as ``scipy.ndimage.binary_erosion`` with
  ``border_value=1``. ``method="canny"`` (2D only, paper fidelity) runs ``skimage.feature.canny`` on each
  class mask with ``sigma=1.0``, scikit-image's default thresholds and ``mode="nearest"`` (so the image
  edge is not an edge either); its edges may lie on either side of a transition and it never marks the
  outermost pixel ring (scikit-image excludes it).
- ``G_s``: ``scipy.ndimage.gaussian_filter(x, s, mode="reflect", truncate=4.0)``.
- contour ``C = G_sc(B_all) / max G_sc(B_all)`` (``B_all`` = union of the ``B_k``), 0 without boundary.
- weight ``W = mu0 + sum_k mu_k S_k / max(sum_k S_k)`` with ``S_k = G_sw(B_k)``: the normaliser is the
  maximum of the *unweighted* sum, so ``W`` lies in ``[mu0, mu0 + max_k mu_k]``; ``W = mu0`` without boundary.

Maxima are per sample, over its spatial extent. Backends (``backend=None`` picks the first available):
``"cuda"`` and ``"cpu"`` (compiled kernels of :mod:`hmedn_fast.ops.targets_ext`), then ``"reference"``
(pure PyTorch, any device). ``HMEDN_BACKEND_TARGETS`` / ``HMEDN_BACKEND`` set the default. Results are on
the labels' device.
"""
from __future__ import annotations

import importlib
import math
from types import ModuleType
from numbers import Real
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from hmedn_fast.ops.dispatch import choose_backend
from hmedn_fast.ops.reference import targets as reference

LABEL_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
METHODS = ("face", "canny")


class Targets(NamedTuple):
    """Contour target and difficulty weight map, each float32 ``(N, *spatial)``."""

    contour: Tensor
    weight: Tensor


# ----------------------------------------------------------------------------------------------- checks
def _check_labels(labels: Tensor, num_classes: int, values: bool = True) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"labels must have an integer dtype {[str(d) for d in LABEL_DTYPES]}, got {labels.dtype}"
        )
    if labels.ndim not in (3, 4):
        raise ValueError(
            f"labels must be (N, H, W) or (N, D, H, W), got {labels.ndim} dims with shape {tuple(labels.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError(f"labels must be non-empty (N >= 1 and every spatial size >= 1), got {tuple(labels.shape)}")
    if values:
        _check_label_values(labels, num_classes)


def _check_label_values(labels: Tensor, num_classes: int) -> None:
    low, high = (int(v) for v in torch.aminmax(labels))  # one host synchronisation
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got values in [{low}, {high}]")


def _check_sigma(name: str, sigma: float) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, Real) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def _check_mu(mu0: float, mu: float | Sequence[float], num_classes: int) -> tuple[float, tuple[float, ...]]:
    def finite(x) -> bool:
        return not isinstance(x, bool) and isinstance(x, Real) and math.isfinite(x)

    if not finite(mu0):
        raise ValueError(f"mu0 must be a finite number, got {mu0!r}")
    if finite(mu):
        values = (float(mu),) * (num_classes - 1)
    else:
        try:
            values = tuple(mu)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"mu must be a number or a sequence of num_classes - 1 numbers, got {mu!r}") from None
        if len(values) != num_classes - 1 or not all(finite(v) for v in values):
            raise ValueError(
                f"mu must be a number or a sequence of num_classes - 1 = {num_classes - 1} finite numbers, got {mu!r}"
            )
        values = tuple(float(v) for v in values)
    return float(mu0), values


def _check_method(method: str, labels: Tensor, backend: str | None) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "canny":
        if labels.ndim != 3:
            raise ValueError(f"method='canny' is 2D only: labels must be (N, H, W), got shape {tuple(labels.shape)}")
        if backend not in (None, "reference"):
            raise ValueError(f"method='canny' runs on the 'reference' backend only, got backend={backend!r}")


# --------------------------------------------------------------------------------------------- dispatch
def _ext() -> ModuleType:
    """The compiled backends' module (looked up in ``sys.modules`` first, so tests can stand one in)."""
    return importlib.import_module("hmedn_fast.ops.targets_ext")


def _ext_unavailable(backend: str, labels: Tensor) -> str | None:
    try:
        ext = _ext()
    except ImportError as exc:
        return f"hmedn_fast.ops.targets_ext could not be imported ({exc})"
    return ext.unavailable(backend, labels)


def _backend(labels: Tensor, backend: str | None, method: str) -> str:
    if method == "canny":
        return "reference"
    return choose_backend(
        "targets",
        backend,
        [
            ("cuda", lambda: _ext_unavailable("cuda", labels)),
            ("cpu", lambda: _ext_unavailable("cpu", labels)),
            ("reference", lambda: None),
        ],
    )


def _canny_boundaries(labels: Tensor, num_classes: int) -> Tensor:
    from skimage.feature import canny

    masks = labels.cpu().numpy()
    out = np.zeros((masks.shape[0], num_classes - 1, *masks.shape[1:]), dtype=bool)
    for n in range(masks.shape[0]):
        for k in range(1, num_classes):
            out[n, k - 1] = canny((masks[n] == k).astype(np.float64), sigma=1.0, mode="nearest")
    return torch.from_numpy(out).to(labels.device)


def _reference_boundaries(labels: Tensor, num_classes: int, method: str) -> Tensor:
    if method == "canny":
        return _canny_boundaries(labels, num_classes)
    return reference.boundary_map(labels, num_classes)


def _ext_targets(
    labels: Tensor, num_classes: int, sigma_contour: float, sigma_weight: float, mu0: float, mu: tuple[float, ...]
) -> Targets:
    """The compiled op on labels that :func:`_check_labels` checked (or that the caller vouched for): the op's
    own check, a second host synchronisation on CUDA, is skipped."""
    contour, weight = _ext().make_targets(labels, num_classes, sigma_contour, sigma_weight, mu0, mu,
                                          check_labels=False)
    return Targets(contour.to(labels.device), weight.to(labels.device))


# ----------------------------------------------------------------------------------------------- public
def boundary_map(labels: Tensor, num_classes: int, method: str = "face", backend: str | None = None) -> Tensor:
    """Per-class boundary maps ``B_k`` for ``k = 1 .. num_classes - 1``.

    Args:
        labels: integer (uint8/int16/int32/int64) ``(N, H, W)`` or ``(N, D, H, W)``, values in
            ``[0, num_classes)``; CPU or CUDA.
        num_classes: ``K`` >= 2, background included.
        method: ``"face"`` (face-neighbour boundary, default) or ``"canny"`` (2D, scikit-image, reference only).
        backend: ``None`` (automatic), ``"cuda"``, ``"cpu"`` or ``"reference"``.
    Returns:
        bool ``(N, K - 1, *spatial)`` on the labels' device; channel ``k - 1`` is class ``k``.
    """
    _check_labels(labels, num_classes)
    _check_method(method, labels, backend)
    chosen = _backend(labels, backend, method)
    if chosen == "reference":
        return _reference_boundaries(labels, num_classes, method)
    return _ext().boundary_map(labels, num_classes).to(labels.device)


def make_targets(
    labels: Tensor,
    num_classes: int,
    sigma_contour: float = 2.0,
    sigma_weight: float = 8.0,
    mu0: float = 1.0,
    mu: float | Sequence[float] = 25.0,
    method: str = "face",
    backend: str | None = None,
    check_labels: bool = True,
) -> Targets:
    """Contour target and difficulty weight map of a batch of label maps.

    Args:
        labels: integer (uint8/int16/int32/int64) ``(N, H, W)`` or ``(N, D, H, W)``, values in
            ``[0, num_classes)``; CPU or CUDA.
        num_classes: ``K`` >= 2, background included.
        sigma_contour: Gaussian sigma (voxels) of the contour target, paper 2.
        sigma_weight: Gaussian sigma (voxels) of the weight map, paper 8.
        mu0: base weight of every voxel, paper 1.
        mu: weight of the boundary term, one number or ``K - 1`` per-class numbers, paper 25.
        method: ``"face"`` or ``"canny"`` (2D, reference backend), see :func:`boundary_map`.
        backend: ``None`` (automatic), ``"cuda"``, ``"cpu"`` or ``"reference"``.
        check_labels: check that every label lies in ``[0, num_classes)`` (ValueError otherwise). On CUDA this
            reads a value back: one host synchronisation, which stalls the host until the GPU has run all
            queued work (e.g. a training step's forward pass) and is not allowed while a CUDA graph is
            captured. ``False`` skips it on the ``"cuda"`` backend (for labels checked elsewhere, e.g. by the data loader):
            out-of-range labels then give unspecified maps, never an out-of-bounds access. CPU labels, and CUDA
            labels on the reference backend, are always checked.
    Returns:
        :class:`Targets` ``(contour, weight)``, each float32 ``(N, *spatial)`` on the labels' device.
    """
    _check_labels(labels, num_classes, values=False)
    _check_method(method, labels, backend)
    sigma_contour = _check_sigma("sigma_contour", sigma_contour)
    sigma_weight = _check_sigma("sigma_weight", sigma_weight)
    mu0, mu_k = _check_mu(mu0, mu, num_classes)
    chosen = _backend(labels, backend, method)
    # the C++ op checks every CPU label in its boundary pass (same ValueError), so only the others read them here
    if chosen == "reference" or (chosen == "cuda" and check_labels):
        _check_label_values(labels, num_classes)
    if chosen == "reference":
        b = _reference_boundaries(labels, num_classes, method)
        return Targets(
            reference.contour_from_boundaries(b, sigma_contour),
            reference.weight_from_boundaries(b, sigma_weight, mu0, mu_k),
        )
    return _ext_targets(labels, num_classes, sigma_contour, sigma_weight, mu0, mu_k)


def contour_map(
    labels: Tensor, num_classes: int, sigma: float = 2.0, method: str = "face", backend: str | None = None
) -> Tensor:
    """Contour regression target ``C = G_sigma(B_all) / max G_sigma(B_all)`` (0 without boundary).

    Arguments as :func:`make_targets`. The compiled backends compute both maps in one pass; call
    :func:`make_targets` when both are needed.

    Returns:
        float32 ``(N, *spatial)`` in ``[0, 1]`` on the labels' device.
    """
    _check_labels(labels, num_classes)
    _check_method(method, labels, backend)
    sigma = _check_sigma("sigma", sigma)
    if _backend(labels, backend, method) == "reference":
        return reference.contour_from_boundaries(_reference_boundaries(labels, num_classes, method), sigma)
    return _ext_targets(labels, num_classes, sigma, sigma, 1.0, (1.0,) * (num_classes - 1)).contour


def weight_map(
    labels: Tensor,
    num_classes: int,
    sigma: float = 8.0,
    mu0: float = 1.0,
    mu: float | Sequence[float] = 25.0,
    method: str = "face",
    backend: str | None = None,
) -> Tensor:
    """Difficulty-guided weight map ``W = mu0 + sum_k mu_k S_k / max(sum_k S_k)``, ``S_k = G_sigma(B_k)``.

    Arguments as :func:`make_targets`. The compiled backends compute both maps in one pass; call
    :func:`make_targets` when both are needed.

    Returns:
        float32 ``(N, *spatial)`` on the labels' device, ``mu0`` where a sample has no boundary.
    """
    _check_labels(labels, num_classes)
    _check_method(method, labels, backend)
    sigma = _check_sigma("sigma", sigma)
    mu0, mu_k = _check_mu(mu0, mu, num_classes)
    if _backend(labels, backend, method) == "reference":
        return reference.weight_from_boundaries(_reference_boundaries(labels, num_classes, method), sigma, mu0, mu_k)
    return _ext_targets(labels, num_classes, sigma, sigma, mu0, mu_k).weight


__all__ = ["Targets", "boundary_map", "contour_map", "make_targets", "weight_map"]
