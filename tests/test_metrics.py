"""Metrics against MONAI and medpy 0.5.2 (semantic) and brute-force GlaS definitions (instances)."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from scipy.spatial.distance import directed_hausdorff

from hmedn_fast import metrics as M

SHAPES_SPACINGS = [((46, 58), (0.7, 1.3)), ((18, 22, 15), (2.5, 0.8, 1.1))]


def blob_field(rng: np.random.Generator, shape, blur=2.0) -> np.ndarray:
    return ndi.gaussian_filter(rng.normal(size=shape), blur)


def mask_pair(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    """A blobby reference and a prediction that differs from it by smooth noise; both touch the border."""
    field = blob_field(rng, shape)
    ref = field > 0.05
    pred = field + 0.08 * blob_field(rng, shape, 1.0) / blob_field(rng, shape, 1.0).std() > 0.05
    ref[(0,) * len(shape)] = pred[(0,) * len(shape)] = True
    assert ref.any() and pred.any() and (ref != pred).any()
    return pred, ref


def label_pair(rng: np.random.Generator, shape, k: int) -> tuple[np.ndarray, np.ndarray]:
    fields = np.stack([blob_field(rng, shape) for _ in range(k)])
    ref = fields.argmax(0)
    pred = (fields + 0.1 * np.stack([blob_field(rng, shape, 1.0) for _ in range(k)])).argmax(0)
    return pred, ref


def monai_metrics(pred_onehot, ref_onehot, spacing, include_background):
    monai_metrics = pytest.importorskip("monai.metrics")
    y_pred, y = (torch.from_numpy(a[None].astype(np.float32)) for a in (pred_onehot, ref_onehot))
    kw = {"include_background": include_background, "spacing": list(spacing)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "assd": monai_metrics.compute_average_surface_distance(y_pred, y, symmetric=True, **kw)[0].numpy(),
            "hd": monai_metrics.compute_hausdorff_distance(y_pred, y, **kw)[0].numpy(),
            "hd95": monai_metrics.compute_hausdorff_distance(y_pred, y, percentile=95, **kw)[0].numpy(),
        }


@pytest.mark.parametrize("shape,spacing", SHAPES_SPACINGS)
def test_binary_distances_match_monai_and_medpy(shape, spacing):
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(len(shape))
    for _ in range(3):
        pred, ref = mask_pair(rng, shape)
        mon = monai_metrics(pred[None], ref[None], spacing, include_background=True)
        ours_assd = M.assd(pred, ref, spacing)
        ours_hd = M.hausdorff(pred, ref, spacing)
        ours_hd95 = M.hausdorff(pred, ref, spacing, percentile=95)
        assert isinstance(ours_assd, float) and ours_hd > ours_hd95 > 0
        np.testing.assert_allclose(ours_assd, binary.assd(pred, ref, voxelspacing=spacing), rtol=1e-12)
        np.testing.assert_allclose(ours_hd, binary.hd(pred, ref, voxelspacing=spacing), rtol=1e-12)
        np.testing.assert_allclose(
            M.hausdorff(pred, ref, spacing, percentile=95, pooled=True),
            binary.hd95(pred, ref, voxelspacing=spacing),
            rtol=1e-12,
        )
        np.testing.assert_allclose(ours_assd, mon["assd"][0], rtol=1e-5)
        np.testing.assert_allclose(ours_hd, mon["hd"][0], rtol=1e-5)
        np.testing.assert_allclose(ours_hd95, mon["hd95"][0], rtol=1e-5)
        np.testing.assert_allclose(M.dice(pred, ref), binary.dc(pred, ref), rtol=1e-12)


@pytest.mark.parametrize("shape,spacing", SHAPES_SPACINGS)
def test_label_maps_per_class_match_monai(shape, spacing):
    rng = np.random.default_rng(10 + len(shape))
    k = 4
    pred, ref = label_pair(rng, shape, k)
    ref[ref == 2] = 0  # class 2 absent from the reference: inf distances, Dice 0
    assert (pred == 2).any()
    onehot = lambda a: np.stack([a == c for c in range(k)])  # noqa: E731
    mon = monai_metrics(onehot(pred), onehot(ref), spacing, include_background=False)
    a = M.assd(pred, ref, spacing, num_classes=k)
    h = M.hausdorff(pred, ref, spacing, num_classes=k)
    h95 = M.hausdorff(torch.from_numpy(pred), torch.from_numpy(ref), spacing, percentile=95, num_classes=k)
    assert a.shape == h.shape == h95.shape == (k - 1,) and a.dtype == np.float64
    for ours, key in ((a, "assd"), (h, "hd"), (h95, "hd95")):
        np.testing.assert_allclose(ours[[0, 2]], mon[key][[0, 2]], rtol=1e-5)
        assert ours[1] == np.inf and not np.isfinite(mon[key][1])  # MONAI: inf, or NaN for percentiles
    d = M.dice(pred, ref, num_classes=k)
    expected = [2 * ((pred == c) & (ref == c)).sum() / ((pred == c).sum() + (ref == c).sum()) for c in (1, 2, 3)]
    np.testing.assert_allclose(d, expected, rtol=1e-12)
    assert d[1] == 0.0 and 0.5 < d[0] < 1
    np.testing.assert_allclose(M.dice(pred, ref, labels=[3, 0, 1]), [d[2], M.dice(pred == 0, ref == 0), d[0]])
    np.testing.assert_allclose(M.assd(pred, ref, spacing, labels=[3]), a[2:])


def test_tensor_inputs_equal_numpy_inputs():
    pred, ref = mask_pair(np.random.default_rng(3), (30, 34))
    pt, rt = torch.from_numpy(pred), torch.from_numpy(ref).to(torch.uint8)
    assert M.dice(pt, rt) == M.dice(pred, ref)
    assert M.assd(pt, rt, 0.5) == M.assd(pred, ref, (0.5, 0.5))
    assert M.hausdorff(pt, rt, percentile=95) == M.hausdorff(pred, ref, percentile=95)


def test_empty_masks_follow_the_documented_convention():
    rng = np.random.default_rng(4)
    empty = np.zeros((20, 24), dtype=bool)
    _, mask = mask_pair(rng, (20, 24))
    assert M.dice(empty, empty) == 1.0 and M.dice(empty, mask) == 0.0 and M.dice(mask, empty) == 0.0
    for fn in (M.assd, M.hausdorff):
        assert fn(empty, empty, (1.0, 2.0)) == 0.0
        assert fn(empty, mask) == np.inf and fn(mask, empty) == np.inf
    assert M.hausdorff(empty, empty, percentile=95) == 0.0 and M.hausdorff(mask, empty, percentile=95) == np.inf
    labels = np.where(mask, 2, 0)
    np.testing.assert_array_equal(M.dice(labels, labels, num_classes=3), [1.0, 1.0])
    np.testing.assert_array_equal(M.assd(labels, labels, num_classes=3), [0.0, 0.0])


def test_single_voxel_offset_has_the_exact_distance():
    """Two single voxels: surfaces are the voxels, HD = ASSD = offset length in spacing units."""
    a, b = np.zeros((9, 11, 7), dtype=bool), np.zeros((9, 11, 7), dtype=bool)
    a[2, 3, 1], b[5, 7, 1] = True, True
    spacing = (1.5, 0.5, 2.0)
    expected = np.hypot(3 * 1.5, 4 * 0.5)
    assert M.hausdorff(a, b, spacing) == pytest.approx(expected)
    assert M.assd(a, b, spacing) == pytest.approx(expected)
    assert M.dice(a, b) == 0.0


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda p, r: M.dice(p.astype(float), r), TypeError, "bool or integer"),
        (lambda p, r: M.dice(p.tolist(), r), TypeError, "numpy array or a torch tensor"),
        (lambda p, r: M.dice(p, r[:-1]), ValueError, "same shape"),
        (lambda p, r: M.dice(p[:0], r[:0]), ValueError, "non-empty"),
        (lambda p, r: M.dice(p.astype(int) * 2, r), ValueError, "num_classes=K or labels"),
        (lambda p, r: M.dice(p.astype(int) - 1, r, num_classes=2), ValueError, "negative"),
        (lambda p, r: M.dice(p.astype(int) * 3, r, num_classes=3), ValueError, "num_classes=3"),
        (lambda p, r: M.dice(p, r, num_classes=1), ValueError, "num_classes"),
        (lambda p, r: M.dice(p, r, num_classes=2, labels=[1]), ValueError, "not both"),
        (lambda p, r: M.dice(p, r, labels=[]), ValueError, "labels"),
        (lambda p, r: M.assd(p, r, spacing=(1.0,)), ValueError, "spacing"),
        (lambda p, r: M.assd(p, r, spacing=(1.0, 0.0)), ValueError, "spacing"),
        (lambda p, r: M.hausdorff(p, r, spacing=-1), ValueError, "spacing"),
        (lambda p, r: M.hausdorff(p, r, percentile=101), ValueError, "percentile"),
        (lambda p, r: M.instance_f1(p, r, iou=0), ValueError, "iou"),
        (lambda p, r: M.object_dice(p, r.astype(np.float32)), TypeError, "ref must have a bool or integer"),
        (lambda p, r: M.object_hausdorff(p, r, spacing=(1, 2, 3)), ValueError, "spacing"),
        (lambda p, r: M.object_hausdorff(p.astype(int) - 1, r), ValueError, "negative"),
    ],
)
def test_bad_input_raises(call, exc, match):
    pred, ref = mask_pair(np.random.default_rng(5), (12, 14))
    with pytest.raises(exc, match=match):
        call(pred, ref)


# ------------------------------------------------------------------------------------------ instances
def instance_pair(rng: np.random.Generator, shape=(64, 72)):
    """Reference objects with scattered ids, and a prediction that shifts, drops, splits and adds objects."""
    blobs = blob_field(rng, shape, 2.5) > 0.12
    ref, n = ndi.label(blobs)
    ids = rng.permutation(np.arange(1, n + 1)) * 3 + 7
    ref = np.where(ref > 0, ids[ref - 1], 0)
    moved = np.roll(blobs, (int(rng.integers(0, 2)), -1), axis=(0, 1))
    moved[rng.integers(shape[0]) :, : shape[1] // 6] = False  # drop / cut some objects
    moved[shape[0] // 3, :] = False  # split objects crossing this row
    moved[-6:-2, -6:-2] = True  # a false positive or a merge
    pred, _ = ndi.label(moved)
    assert ref.max() > 0 and pred.max() > 0
    return pred, ref


def objects_of(a: np.ndarray) -> list[np.ndarray]:
    return [a == i for i in np.unique(a) if i != 0]


def brute_hausdorff(x: np.ndarray, y: np.ndarray, spacing) -> float:
    cx, cy = np.argwhere(x) * spacing, np.argwhere(y) * spacing
    return max(directed_hausdorff(cx, cy)[0], directed_hausdorff(cy, cx)[0])


def brute_object_metrics(pred, ref, spacing) -> tuple[float, float]:
    """GlaS object Dice and object Hausdorff, object by object with full masks."""
    ps, rs = objects_of(pred), objects_of(ref)

    def side(own, other):
        area = sum(o.sum() for o in own)
        d_sum = h_sum = 0.0
        for o in own:
            overlaps = [(o & q).sum() for q in other]
            w = o.sum() / area
            if max(overlaps) > 0:
                q = other[int(np.argmax(overlaps))]
                d_sum += w * 2 * (o & q).sum() / (o.sum() + q.sum())
                h_sum += w * brute_hausdorff(o, q, spacing)
            else:
                h_sum += w * min(brute_hausdorff(o, q, spacing) for q in other)
        return d_sum, h_sum

    (d1, h1), (d2, h2) = side(rs, ps), side(ps, rs)
    return (d1 + d2) / 2, (h1 + h2) / 2


def brute_f1(pred, ref, thr) -> float:
    """F1 with a maximum one-to-one matching found by exhaustive search (memoised over used references)."""
    ps, rs = objects_of(pred), objects_of(ref)
    ok = [[(p & r).sum() / (p | r).sum() >= thr for r in rs] for p in ps]

    @functools.lru_cache(maxsize=None)
    def best(i: int, used: int) -> int:
        if i == len(ps):
            return 0
        options = [best(i + 1, used)]
        options += [1 + best(i + 1, used | 1 << j) for j in range(len(rs)) if ok[i][j] and not used >> j & 1]
        return max(options)

    return 2 * best(0, 0) / (len(ps) + len(rs))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_object_dice_and_hausdorff_match_brute_force(seed):
    pred, ref = instance_pair(np.random.default_rng(seed))
    spacing = (0.8, 1.25)
    d_ref, h_ref = brute_object_metrics(pred, ref, np.array(spacing))
    assert 0 < d_ref < 1 and h_ref > 0
    assert M.object_dice(pred, ref) == pytest.approx(d_ref, rel=1e-12)
    assert M.object_hausdorff(torch.from_numpy(pred), torch.from_numpy(ref), spacing) == pytest.approx(h_ref, rel=1e-12)
    assert M.object_dice(ref, ref) == pytest.approx(1.0, rel=1e-12) and M.object_hausdorff(ref, ref) == 0.0


def test_object_hausdorff_uses_the_nearest_object_without_overlap():
    ref, pred = np.zeros((10, 30), int), np.zeros((10, 30), int)
    ref[2:4, 2:4] = 5  # 4 pixels
    pred[2:4, 8:10] = 1  # 4 pixels, no overlap; H = 6
    pred[2:4, 25:27] = 2  # 4 pixels, H to ref = 23
    # ref side: 6; pred side: 0.5 * 6 + 0.5 * 23
    assert M.object_hausdorff(pred, ref) == pytest.approx(0.5 * (6 + 0.5 * 6 + 0.5 * 23))
    assert M.object_dice(pred, ref) == 0.0 and M.instance_f1(pred, ref) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_instance_f1_matches_brute_force_matching(seed):
    pred, ref = instance_pair(np.random.default_rng(seed), shape=(48, 52))
    assert len(np.unique(ref)) > 3
    for thr in (0.5, 0.3, 0.1):
        assert M.instance_f1(pred, ref, iou=thr) == pytest.approx(brute_f1(pred, ref, thr), abs=1e-12)
    assert M.instance_f1(ref, ref) == 1.0


def test_instance_f1_prefers_more_matches_below_half_iou():
    """Maximising the IoU sum would keep one pair here; the one-to-one matching keeps two."""
    ref, pred = np.zeros((4, 20), int), np.zeros((4, 20), int)
    ref[:, 0:4], ref[:, 6:10] = 1, 2
    pred[:, 1:8] = 1  # IoU 12/32 with ref 1, 8/36 with ref 2
    pred[:, 0], pred[:, 15:20] = 2, 2  # IoU 4/36 with ref 1
    assert M.instance_f1(pred, ref, iou=0.1) == 1.0  # (1, 2) and (2, 1)
    assert M.instance_f1(pred, ref, iou=0.2) == 0.5  # only prediction 1 qualifies
    assert M.instance_f1(pred, ref, iou=0.5) == 0.0


def test_instance_metrics_on_empty_maps():
    empty = np.zeros((8, 8), int)
    obj = empty.copy()
    obj[2:5, 2:5] = 4
    assert M.instance_f1(empty, empty) == 1.0 and M.object_dice(empty, empty) == 1.0
    assert M.object_hausdorff(empty, empty) == 0.0
    assert M.instance_f1(obj, empty) == 0.0 and M.object_dice(empty, obj) == 0.0
    assert M.object_hausdorff(obj, empty) == np.inf
