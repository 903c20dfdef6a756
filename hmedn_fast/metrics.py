"""Evaluation metrics (SPEC section 5): Dice, ASSD, Hausdorff / HD95, instance F1, object Dice and Hausdorff.

Inputs are numpy arrays or torch tensors (any device; copied to CPU numpy) of one image or volume, no batch
dimension: ``pred`` and ``ref`` have the same shape, any number of spatial dims (2D and 3D in practice),
and a bool or integer dtype (float masks raise: threshold them first).

Semantic metrics (:func:`dice`, :func:`assd`, :func:`hausdorff`) work on
- binary masks (``num_classes`` and ``labels`` left ``None``; values must be 0/1) -> a Python float;
- label maps, with ``num_classes=K`` (classes ``1 .. K-1``) or ``labels=[...]`` (any class ids, background
  included if listed) -> a float64 numpy array with one value per class, in that order.

Surfaces follow MONAI and medpy: ``mask ^ binary_erosion(mask)`` with face connectivity and voxels outside
the image counted as background (so a mask touching the image edge has surface there). Distances are
Euclidean in the units of ``spacing`` (one number per axis, or one for all; default 1), computed with
``scipy.ndimage.distance_transform_edt(sampling=spacing)``.

Empty masks (the behaviour of a perfect or a missed prediction of an absent structure):
- pred and ref both empty: Dice 1.0, ASSD and Hausdorff 0.0 (MONAI returns NaN there, medpy raises);
- exactly one empty: Dice 0.0, ASSD and Hausdorff ``inf`` (MONAI: inf, NaN for a percentile; medpy raises).
Use ``np.isfinite`` / ``np.nanmean`` style aggregation accordingly.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import numpy as np
import scipy.ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

# ---------------------------------------------------------------------------------------------- inputs
def _as_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        arr = x
    elif type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        arr = x.detach().cpu().numpy()
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must have a bool or integer dtype, got {arr.dtype} (threshold float masks first)")
    return arr


def _pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    p, r = _as_numpy(pred, "pred"), _as_numpy(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape, got {p.shape} and {r.shape}")
    if p.ndim == 0 or p.size == 0:
        raise ValueError(f"pred and ref must be non-empty arrays with at least one dim, got shape {p.shape}")
    for name, a in (("pred", p), ("ref", r)):
        if a.dtype != np.bool_ and a.min() < 0:
            raise ValueError(f"{name} must not contain negative values, got minimum {a.min()}")
    return p, r


def _classes(p: np.ndarray, r: np.ndarray, num_classes: int | None, labels: Sequence[int] | None) -> list[int] | None:
    """Class ids to evaluate, or None for binary masks."""
    if labels is not None:
        if num_classes is not None:
            raise ValueError("pass num_classes or labels, not both")
        ids = list(labels)
        if not ids or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0 for k in ids):
            raise ValueError(f"labels must be a non-empty sequence of non-negative ints, got {labels!r}")
        return [int(k) for k in ids]
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
        for name, a in (("pred", p), ("ref", r)):
            if a.max() >= num_classes:
                raise ValueError(f"{name} must lie in [0, num_classes={num_classes}), got maximum {a.max()}")
        return list(range(1, int(num_classes)))
    for name, a in (("pred", p), ("ref", r)):
        if a.max() > 1:
            raise ValueError(
                f"{name} has values above 1: pass num_classes=K or labels=[...] for label maps (binary masks hold 0/1)"
            )
    return None


def _spacing(spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    values = [spacing] * ndim if isinstance(spacing, Real) else list(np.asarray(spacing, dtype=object).ravel())
    if len(values) != ndim or not all(
        isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values
    ):
        raise ValueError(
            f"spacing must be a positive number or {ndim} positive numbers (one per axis), got {spacing!r}"
        )
    return np.asarray(values, dtype=np.float64)


def _per_class(fn, p: np.ndarray, r: np.ndarray, classes: list[int] | None):
    if classes is None:
        return float(fn(p.astype(bool), r.astype(bool)))
    return np.array([fn(p == k, r == k) for k in classes], dtype=np.float64)


# ------------------------------------------------------------------------------------ semantic metrics
def _dice(p: np.ndarray, r: np.ndarray) -> float:
    total = int(p.sum()) + int(r.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total


def _surface_distances(p: np.ndarray, r: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Distances pred-surface -> ref-surface and back; None when exactly one mask is empty."""
    union = p | r
    if not union.any():
        return np.zeros(0), np.zeros(0)
    if not p.any() or not r.any():
        return None
    # cropping to the union's bounding box changes nothing: outside it both masks are background
    box = ndi.find_objects(union.astype(np.uint8))[0]
    p, r = p[box], r[box]
    structure = ndi.generate_binary_structure(p.ndim, 1)
    sp = p ^ ndi.binary_erosion(p, structure, border_value=0)
    sr = r ^ ndi.binary_erosion(r, structure, border_value=0)
    d_pr = ndi.distance_transform_edt(~sr, sampling=spacing)[sp]
    d_rp = ndi.distance_transform_edt(~sp, sampling=spacing)[sr]
    return d_pr, d_rp


def dice(pred, ref, num_classes: int | None = None, labels: Sequence[int] | None = None) -> float | np.ndarray:
    """Dice coefficient ``2 |P & R| / (|P| + |R|)``.

    Args:
        pred, ref: same-shape bool/integer arrays or tensors (binary masks or label maps).
        num_classes: ``K`` for label maps: scores of classes ``1 .. K-1``.
        labels: explicit class ids instead of ``num_classes``.
    Returns:
        float for binary masks, else float64 ``(n_classes,)``. 1.0 when both are empty, 0.0 when one is.
    """
    p, r = _pair(pred, ref)
    return _per_class(_dice, p, r, _classes(p, r, num_classes, labels))


def assd(
    pred, ref, spacing=None, num_classes: int | None = None, labels: Sequence[int] | None = None
) -> float | np.ndarray:
    """Average symmetric surface distance: mean of both directions' surface distances pooled together.

    Equals ``monai.metrics.compute_average_surface_distance(symmetric=True)`` and medpy 0.5.2
    ``medpy.metric.binary.assd``.

    Args:
        pred, ref: same-shape bool/integer arrays or tensors (binary masks or label maps).
        spacing: voxel size per axis (or one number); default 1.
        num_classes, labels: class selection as in :func:`dice`.
    Returns:
        float for binary masks, else float64 ``(n_classes,)``. 0.0 when both are empty, ``inf`` when one is.
    """
    p, r = _pair(pred, ref)
    classes = _classes(p, r, num_classes, labels)
    sampling = _spacing(spacing, p.ndim)

    def one(pm: np.ndarray, rm: np.ndarray) -> float:
        d = _surface_distances(pm, rm, sampling)
        if d is None:
            return math.inf
        pooled = np.concatenate(d)
        return float(pooled.mean()) if pooled.size else 0.0

    return _per_class(one, p, r, classes)


def hausdorff(
    pred,
    ref,
    spacing=None,
    percentile: float | None = None,
    pooled: bool = False,
    num_classes: int | None = None,
    labels: Sequence[int] | None = None,
) -> float | np.ndarray:
    """Hausdorff distance between the surfaces, or a percentile of it (HD95 with ``percentile=95``).

    ``percentile=None``: the larger of the two directed maxima (MONAI ``compute_hausdorff_distance``,
    medpy ``hd``). With a percentile and ``pooled=False`` (default, SPEC and MONAI): the larger of the two
    directions' percentiles. ``pooled=True``: the percentile of both directions' distances pooled together
    (medpy ``hd95``). Percentiles interpolate linearly (``np.percentile`` / ``torch.quantile``).

    Args:
        pred, ref: same-shape bool/integer arrays or tensors (binary masks or label maps).
        spacing: voxel size per axis (or one number); default 1.
        percentile: ``None`` or a number in ``[0, 100]``.
        pooled: how the two directions combine under a percentile (ignored without one).
        num_classes, labels: class selection as in :func:`dice`.
    Returns:
        float for binary masks, else float64 ``(n_classes,)``. 0.0 when both are empty, ``inf`` when one is.
    """
    if percentile is not None and (
        isinstance(percentile, bool) or not isinstance(percentile, Real) or not 0 <= percentile <= 100
    ):
        raise ValueError(f"percentile must be None or a number in [0, 100], got {percentile!r}")
    p, r = _pair(pred, ref)
    classes = _classes(p, r, num_classes, labels)
    sampling = _spacing(spacing, p.ndim)

    def one(pm: np.ndarray, rm: np.ndarray) -> float:
        d = _surface_distances(pm, rm, sampling)
        if d is None:
            return math.inf
        if not d[0].size:
            return 0.0
        if percentile is None:
            return float(max(d[0].max(), d[1].max()))
        if pooled:
            return float(np.percentile(np.concatenate(d), percentile))
        return float(max(np.percentile(d[0], percentile), np.percentile(d[1], percentile)))

    return _per_class(one, p, r, classes)


# ------------------------------------------------------------------------------------ instance metrics
class _Instances:
    """Objects of two instance-id maps (0 = background, any positive ids) and their overlaps."""

    def __init__(self, pred, ref):
        p, r = _pair(pred, ref)
        self.shape = p.shape
        self.index_p, self.n_p = self._index(p)
        self.index_r, self.n_r = self._index(r)
        flat = self.index_p.ravel().astype(np.int64) * (self.n_r + 1) + self.index_r.ravel()
        table = np.bincount(flat, minlength=(self.n_p + 1) * (self.n_r + 1)).reshape(self.n_p + 1, self.n_r + 1)
        self.inter = table[1:, 1:]
        self.area_p = table[1:].sum(axis=1)
        self.area_r = table[:, 1:].sum(axis=0)

    @staticmethod
    def _index(a: np.ndarray) -> tuple[np.ndarray, int]:
        """Objects renumbered 1..n in increasing id order."""
        fg = a > 0
        ids = np.unique(a[fg])
        index = np.zeros(a.shape, dtype=np.int64)
        index[fg] = np.searchsorted(ids, a[fg]) + 1
        return index, len(ids)

    def iou(self) -> np.ndarray:
        union = self.area_p[:, None] + self.area_r[None, :] - self.inter
        return self.inter / np.maximum(union, 1)


def instance_f1(pred, ref, iou: float = 0.5) -> float:
    """F1 score of object detection: ``2 TP / (n_pred + n_ref)``.

    A true positive is a pair (predicted object, reference object) with IoU >= ``iou``, matched one to one:
    the matching has the most pairs possible, ties broken by the largest total IoU (Hungarian algorithm;
    for ``iou > 0.5`` every object has at most one candidate, so this is plain thresholding).

    Args:
        pred, ref: same-shape instance-id maps (0 background, each positive id one object; label a binary
            mask with ``scipy.ndimage.label`` first), arrays or tensors.
        iou: matching threshold in ``(0, 1]``.
    Returns:
        float in ``[0, 1]``; 1.0 when neither map has an object, 0.0 when exactly one has none.
    """
    if isinstance(iou, bool) or not isinstance(iou, Real) or not 0 < iou <= 1:
        raise ValueError(f"iou must be a number in (0, 1], got {iou!r}")
    inst = _Instances(pred, ref)
    if inst.n_p + inst.n_r == 0:
        return 1.0
    overlap = inst.iou()
    candidate = (overlap >= iou) & (inst.inter > 0)
    if not candidate.any():
        return 0.0
    # each candidate pair weighs 1 + IoU / (2 m) with m = min(n_p, n_r): k + 1 pairs always outweigh k pairs
    weight = np.where(candidate, 1.0 + overlap / (2 * min(inst.n_p, inst.n_r)), 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    tp = int(candidate[rows, cols].sum())
    return 2.0 * tp / (inst.n_p + inst.n_r)


def _best_overlap(inter: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the row of largest overlap (lowest index on ties) and whether it overlaps at all."""
    best = inter.argmax(axis=0)
    return best, inter[best, np.arange(inter.shape[1])] > 0


def object_dice(pred, ref) -> float:
    """Object-level Dice of the GlaS challenge (Sirinukunwattana et al., 2017).

    ``0.5 * (sum_i g_i Dice(G_i, S*(G_i)) + sum_j s_j Dice(G*(S_j), S_j))`` with ``g_i = |G_i| / sum |G|``,
    ``s_j = |S_j| / sum |S|``; ``S*(G_i)`` is the predicted object overlapping ``G_i`` most (Dice 0 when
    none overlaps), ``G*(S_j)`` likewise; ties go to the lowest id.

    Args:
        pred, ref: same-shape instance-id maps (see :func:`instance_f1`).
    Returns:
        float in ``[0, 1]``; 1.0 when neither map has an object, 0.0 when exactly one has none.
    """
    inst = _Instances(pred, ref)
    if inst.n_p + inst.n_r == 0:
        return 1.0
    if inst.n_p == 0 or inst.n_r == 0:
        return 0.0

    def side(inter: np.ndarray, area_other: np.ndarray, area_self: np.ndarray) -> float:
        best, hit = _best_overlap(inter)
        scores = np.where(hit, 2.0 * inter[best, np.arange(len(area_self))] / (area_other[best] + area_self), 0.0)
        return float((area_self / area_self.sum() * scores).sum())

    return 0.5 * (side(inst.inter, inst.area_p, inst.area_r) + side(inst.inter.T, inst.area_r, inst.area_p))


def object_hausdorff(pred, ref, spacing=None) -> float:
    """Object-level Hausdorff distance of the GlaS challenge (Sirinukunwattana et al., 2017).

    ``0.5 * (sum_i g_i H(G_i, S*(G_i)) + sum_j s_j H(G*(S_j), S_j))``, weights as in :func:`object_dice`.
    ``S*(G_i)`` is the predicted object overlapping ``G_i`` most or, when none overlaps, the one at the
    smallest Hausdorff distance. ``H`` is the Hausdorff distance between the objects' voxel sets (all
    voxels, not surfaces), in ``spacing`` units.

    Args:
        pred, ref: same-shape instance-id maps (see :func:`instance_f1`).
        spacing: voxel size per axis (or one number); default 1.
    Returns:
        float; 0.0 when neither map has an object, ``inf`` when exactly one has none.
    """
    inst = _Instances(pred, ref)
    sampling = _spacing(spacing, len(inst.shape))
    if inst.n_p + inst.n_r == 0:
        return 0.0
    if inst.n_p == 0 or inst.n_r == 0:
        return math.inf

    def objects(index: np.ndarray, n: int) -> list[tuple[np.ndarray, cKDTree]]:
        """Per object 1..n: its voxel coordinates (in spacing units) and their KD-tree."""
        coords = np.argwhere(index > 0)
        ids = index[tuple(coords.T)]
        order = np.argsort(ids, kind="stable")
        ends = np.cumsum(np.bincount(ids, minlength=n + 1)[1:])
        groups = np.split(coords[order] * sampling, ends[:-1])
        return [(g, cKDTree(g)) for g in groups]

    obj_p, obj_r = objects(inst.index_p, inst.n_p), objects(inst.index_r, inst.n_r)

    def h(a: tuple[np.ndarray, cKDTree], b: tuple[np.ndarray, cKDTree]) -> float:
        return float(max(b[1].query(a[0])[0].max(), a[1].query(b[0])[0].max()))

    def side(inter: np.ndarray, own: list, other: list, area: np.ndarray) -> float:
        best, hit = _best_overlap(inter)
        total = 0.0
        for i, obj in enumerate(own):
            dist = h(obj, other[best[i]]) if hit[i] else min(h(obj, o) for o in other)
            total += area[i] / area.sum() * dist
        return total

    return 0.5 * (side(inst.inter, obj_r, obj_p, inst.area_r) + side(inst.inter.T, obj_p, obj_r, inst.area_p))


__all__ = ["assd", "dice", "hausdorff", "instance_f1", "object_dice", "object_hausdorff"]
