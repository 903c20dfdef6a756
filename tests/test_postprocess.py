"""anatomical_merge: hand-built scenes, and random maps against a direct full-image implementation."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from hmedn_fast.postprocess import anatomical_merge


def direct_merge(lab: np.ndarray, min_size: int, large_size, connectivity: int = 1) -> np.ndarray:
    """The documented rules, written plainly: full-image labelling of every complement, no cropping."""
    st = ndi.generate_binary_structure(lab.ndim, connectivity)
    large, small = [], []
    for k in range(1, lab.max() + 1):
        comp, n = ndi.label(lab == k, st)
        masks = [comp == i for i in range(1, n + 1)]
        if not masks:
            continue
        sizes = [m.sum() for m in masks]
        for i, m in enumerate(masks):
            is_large = i == int(np.argmax(sizes)) if large_size is None else sizes[i] >= large_size
            (large if is_large else small).append((k, m))
    large_union = np.any([m for _, m in large], axis=0) if large else np.zeros(lab.shape, bool)
    out, absorbed = lab.copy(), np.zeros(lab.shape, bool)
    border = np.zeros(lab.shape, bool)
    for d in range(lab.ndim):
        idx = [slice(None)] * lab.ndim
        idx[d] = 0
        border[tuple(idx)] = True
        idx[d] = -1
        border[tuple(idx)] = True
    for k, m in large:
        outside, n = ndi.label(~m, st)
        for r in range(1, n + 1):
            region = outside == r
            if not (region & border).any() and not (region & large_union).any():
                out[region] = k
                absorbed |= region
    for _, m in small:
        if m.sum() < min_size:
            out[m & ~absorbed] = 0
    return out


def scene() -> np.ndarray:
    lab = np.zeros((40, 50), dtype=np.int32)
    lab[5:25, 5:25] = 1  # large class-1 structure ...
    lab[10:14, 10:14] = 0  # ... with a background hole
    lab[16:19, 16:19] = 2  # ... and a small class-2 island inside
    lab[30:38, 30:45] = 2  # the large class-2 structure
    lab[2:4, 40:42] = 2  # tiny class-2 island outside: dropped
    lab[30:39, 2:12] = 1  # class-1 component of 90 voxels: kept (>= min_size)
    lab[28:40, 16:28] = 3  # class-3 ring (touching the border) enclosing ...
    lab[31:36, 19:25] = 0
    lab[32:35, 20:24] = 1  # ... a tiny class-1 piece: absorbed into class 3
    lab[0:3, 5:10] = 3  # class-3 piece at the border, 15 voxels: dropped
    return lab


def test_scene_follows_the_rules():
    lab = scene()
    out = anatomical_merge(lab, min_size=20)
    expected = lab.copy()
    expected[5:25, 5:25] = 1
    expected[2:4, 40:42] = 0
    expected[31:36, 19:25] = 3
    expected[0:3, 5:10] = 0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, direct_merge(lab, 20, None))
    # the class-1 component of 90 voxels goes when min_size exceeds it
    assert (anatomical_merge(lab, min_size=91)[30:39, 2:12] == 0).all()
    # with large_size=300 only the class-1 square is large: the class-2 block (120 voxels) is kept,
    # the class-3 ring absorbs nothing and the tiny class-1 piece inside it is dropped
    out_large = anatomical_merge(lab, min_size=20, large_size=300)
    np.testing.assert_array_equal(out_large, direct_merge(lab, 20, 300))
    assert (out_large[30:38, 30:45] == 2).all() and (out_large[31:36, 19:25] == 0).all()


def test_enclosed_large_structure_is_kept():
    lab = np.zeros((30, 30), dtype=np.int64)
    lab[3:27, 3:27] = 3  # whole tumour
    lab[8:22, 8:22] = 0
    lab[10:20, 10:20] = 1  # core: the largest class-1 component, nested in class 3
    lab[9, 9] = 2  # tiny class-2 voxel in the same enclosed region
    out = anatomical_merge(lab, min_size=5)
    np.testing.assert_array_equal(out[10:20, 10:20], 1)
    assert out[9, 9] == 2  # its region holds a large structure: not absorbed; class 2's largest: kept
    np.testing.assert_array_equal(out, direct_merge(lab, 5, None))


def test_hole_touching_the_border_is_not_absorbed():
    lab = np.ones((12, 12), dtype=np.uint8)
    lab[0:4, 5:7] = 0  # a notch open to the image border
    lab[6:8, 6:8] = 0  # a closed hole
    out = anatomical_merge(lab, min_size=1)
    assert (out[0:4, 5:7] == 0).all() and (out[6:8, 6:8] == 1).all()


@pytest.mark.parametrize(
    "shape,large_size,connectivity",
    [((48, 56), None, 1), ((48, 56), 40, 2), ((14, 18, 16), None, 1), ((14, 18, 16), 30, 3)],
)
def test_random_maps_match_direct_implementation(shape, large_size, connectivity):
    rng = np.random.default_rng(sum(shape))
    fields = ndi.gaussian_filter(rng.normal(size=(4, *shape)), (0, *[1.5] * len(shape)))
    lab = fields.argmax(0).astype(np.int16)
    speckle = rng.random(shape) < 0.03  # tiny islands and holes
    lab[speckle] = rng.integers(0, 4, int(speckle.sum()))
    out = anatomical_merge(lab, min_size=12, large_size=large_size, connectivity=connectivity)
    expected = direct_merge(lab, 12, large_size, connectivity)
    changed = expected != lab
    assert (changed & (expected > 0)).any() and (changed & (expected == 0)).any()  # absorbed and dropped
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(
        anatomical_merge(out, min_size=12, large_size=large_size, connectivity=connectivity), out
    )  # idempotent


def test_batch_and_tensor_inputs():
    rng = np.random.default_rng(3)
    batch = np.stack([scene(), np.roll(scene(), 3, axis=1)]).astype(np.int64)
    batch[1, rng.random(batch.shape[1:]) < 0.01] = 2
    out = anatomical_merge(torch.from_numpy(batch), min_size=20, spatial_dims=2)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64 and out.shape == batch.shape
    for n in range(2):
        np.testing.assert_array_equal(out[n].numpy(), anatomical_merge(batch[n], min_size=20))
    vol = batch[:, :12, :12]  # 3D volume (2, 12, 12) when no spatial_dims is given
    np.testing.assert_array_equal(anatomical_merge(vol, 20), direct_merge(vol, 20, None))


@pytest.mark.parametrize(
    "labels,kwargs,exc,match",
    [
        (np.zeros((8, 8), np.float32), {}, TypeError, "integer dtype"),
        (np.zeros((8, 8), bool), {}, TypeError, "integer dtype"),
        ([[0, 1]], {}, TypeError, "numpy array or a torch tensor"),
        (np.zeros(8, np.int64), {}, ValueError, "spatial dims"),
        (np.zeros((2, 2, 8, 8), np.int64), {}, ValueError, "spatial dims"),
        (np.zeros((2, 2, 8, 8), np.int64), {"spatial_dims": 2}, ValueError, "spatial dims"),
        (np.zeros((0, 8), np.int64), {}, ValueError, "non-empty"),
        (np.full((8, 8), -1), {}, ValueError, "negative"),
        (np.zeros((8, 8), np.int64), {"min_size": -1}, ValueError, "min_size"),
        (np.zeros((8, 8), np.int64), {"large_size": 0}, ValueError, "large_size"),
        (np.zeros((8, 8), np.int64), {"connectivity": 3}, ValueError, "connectivity"),
        (np.zeros((8, 8), np.int64), {"spatial_dims": 1}, ValueError, "spatial_dims"),
    ],
)
def test_bad_input_raises(labels, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        anatomical_merge(labels, **kwargs)


@pytest.mark.cuda
def test_cuda_tensor_stays_on_device():
    lab = torch.from_numpy(scene()).cuda()
    out = anatomical_merge(lab, min_size=20)
    assert out.is_cuda and torch.equal(out.cpu(), torch.from_numpy(anatomical_merge(scene(), min_size=20)))
