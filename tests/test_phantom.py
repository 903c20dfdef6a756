"""Tests of the synthetic low-contrast phantom (hmedn_fast.data.phantom)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from hmedn_fast.data import PhantomConfig, PhantomDataset, make_phantom


def _adjacent_pairs(labels: np.ndarray, a: int, b: int) -> int:
    """Number of face-neighbour voxel pairs (one of class a, the other of class b), all axes."""
    count = 0
    for axis in range(labels.ndim):
        lo = np.take(labels, np.arange(labels.shape[axis] - 1), axis=axis)
        hi = np.take(labels, np.arange(1, labels.shape[axis]), axis=axis)
        count += int((((lo == a) & (hi == b)) | ((lo == b) & (hi == a))).sum())
    return count


def _noise_sigma(image: np.ndarray, label: np.ndarray) -> float:
    """Noise std from neighbouring slab slices (noise is independent across slices, anatomy is not)."""
    inside = ndimage.binary_erosion(label > 0, iterations=3)
    return float((image[2] - image[1])[inside].std() / np.sqrt(2))


def _boundary_contrast(image: np.ndarray, label: np.ndarray, a: int, b: int) -> float:
    """Mean of class a minus mean of class b, each over its voxels 2-3 pixels from the other class."""
    dist_to_b = ndimage.distance_transform_edt(label != b)
    dist_to_a = ndimage.distance_transform_edt(label != a)
    side_a = image[(label == a) & (dist_to_b >= 2) & (dist_to_b <= 3)]
    side_b = image[(label == b) & (dist_to_a >= 2) & (dist_to_a <= 3)]
    return float(side_a.mean() - side_b.mean())


def _relative_contrasts(n: int, **options) -> np.ndarray:
    """(n, 3) |contrast| / noise sigma for prostate-bladder, prostate-rectum, prostate-background."""
    ps = make_phantom(n, seed=11, **options)
    rows = []
    for image, label in zip(ps.images, ps.labels):
        sigma = _noise_sigma(image, label)
        mid = image[image.shape[0] // 2]
        rows.append([abs(_boundary_contrast(mid, label, 1, b)) / sigma for b in (2, 3, 0)])
    return np.array(rows)


def test_shapes_dtypes_ranges_2d():
    ps = make_phantom(3, seed=1, size=(64, 80))
    assert ps.images.shape == (3, 5, 64, 80) and ps.images.dtype == np.float32
    assert ps.labels.shape == (3, 64, 80) and ps.labels.dtype == np.uint8
    assert np.isfinite(ps.images).all() and ps.images.min() >= -1 and ps.images.max() <= 1
    for label in ps.labels:
        assert set(np.unique(label)) == {0, 1, 2, 3}
    assert ps.spacing == pytest.approx((1.6, 1.6))  # 128 mm over the larger side (80 px)


def test_shapes_dtypes_3d_and_touching_in_3d():
    ps = make_phantom(2, seed=2, spatial_dims=3, size=(32, 40, 40), slices=3)
    assert ps.images.shape == (2, 1, 32, 40, 40) and ps.images.dtype == np.float32
    assert ps.labels.shape == (2, 32, 40, 40) and ps.labels.dtype == np.uint8
    assert len(ps.spacing) == 3 and ps.spacing[0] == ps.spacing[1] == ps.spacing[2]
    for label in ps.labels:
        assert _adjacent_pairs(label, 1, 2) >= 20 and _adjacent_pairs(label, 1, 3) >= 20


def test_deterministic_by_seed_and_dataset_matches_arrays():
    a = make_phantom(3, seed=5, size=48)
    b = make_phantom(3, seed=5, size=48)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = make_phantom(3, seed=6, size=48)
    assert not np.array_equal(a.labels, c.labels)
    ds = PhantomDataset(3, seed=5, size=48)
    image, label = ds[2]
    assert image.dtype == torch.float32 and label.dtype == torch.int64
    np.testing.assert_array_equal(image.numpy(), a.images[2])
    np.testing.assert_array_equal(label.numpy(), a.labels[2])
    np.testing.assert_array_equal(ds[-1][1].numpy(), a.labels[2])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch[0].shape == (3, 5, 48, 48) and batch[1].shape == (3, 48, 48)


def test_structures_touch_in_every_2d_sample():
    ps = make_phantom(12, seed=3, size=64)
    for label in ps.labels:
        assert _adjacent_pairs(label, 1, 2) >= 5, "prostate and bladder must touch"
        assert _adjacent_pairs(label, 1, 3) >= 5, "prostate and rectum must touch"


def test_shapes_vary_across_samples_and_seeds():
    labels = np.concatenate([make_phantom(4, seed=s, size=64).labels for s in (0, 1)])
    for k in (1, 2, 3):
        areas = np.array([(lab == k).sum() for lab in labels])
        assert areas.std() / areas.mean() > 0.08, f"class {k} area barely varies: {areas}"
        masks = [lab == k for lab in labels]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                dice = 2 * (masks[i] & masks[j]).sum() / (masks[i].sum() + masks[j].sum())
                assert dice < 0.97, f"class {k}: samples {i} and {j} nearly identical (Dice {dice:.3f})"


def test_touching_boundary_contrast_is_a_fraction_of_the_noise():
    rel = _relative_contrasts(12, size=96, artifacts=False)
    assert rel[:, 0].mean() < 0.6 and rel[:, 1].mean() < 0.6, rel
    assert rel[:, 2].mean() > 4.0, "organ-versus-fat contrast should be large (measure sanity check)"
    # With artifacts (streaks cross the organs) the contrast stays low in the typical sample.
    assert np.median(_relative_contrasts(12, size=96)[:, :2]) < 1.0
    # The measurement follows the option: a clear contrast is measured as clear.
    assert _relative_contrasts(12, size=96, artifacts=False, contrast=3.0)[:, :2].mean() > 1.5


@pytest.mark.parametrize("visible", [0.0, 0.4, 1.0])
def test_touching_boundaries_are_partly_vanishing(visible):
    # Near noise-free phantom: a boundary voxel is "visible" when darker than both organs' means by
    # 10 HU (0.05 in window units); the fraction of visible touching-boundary voxels follows the option.
    ps = make_phantom(4, seed=4, size=96, noise_hu=0.01, artifacts=False, visible_boundary=visible)
    fractions = []
    for image, label in zip(ps.images, ps.labels):
        mid = image[image.shape[0] // 2]
        for a, b in ((1, 2), (1, 3)):
            touch = ndimage.binary_dilation(label == a) & (label == b) | ndimage.binary_dilation(label == b) & (
                label == a)
            floor = min(np.median(mid[label == a]), np.median(mid[label == b])) - 0.05
            fractions.append((mid[touch] < floor).mean())
    assert np.mean(fractions) == pytest.approx(visible, abs=0.15)


@pytest.mark.parametrize(
    "options, name",
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"size": 8}, "size"),
        ({"size": (64,)}, "size"),
        ({"slices": 4}, "slices"),
        ({"noise_hu": -1.0}, "noise_hu"),
        ({"fov_mm": float("nan")}, "fov_mm"),
        ({"contrast": -0.1}, "contrast"),
        ({"visible_boundary": 1.5}, "visible_boundary"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_raise_value_error(options, name):
    with pytest.raises(ValueError, match=name):
        make_phantom(1, **options)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_samples"):
        make_phantom(0)
    with pytest.raises(ValueError, match="length"):
        PhantomDataset(0)
    with pytest.raises(TypeError, match="artifacts"):
        PhantomConfig(artifacts="yes")
    with pytest.raises(TypeError, match="config"):
        make_phantom(1, config={"size": 64})
    with pytest.raises(TypeError, match="colour"):
        make_phantom(1, colour=3)
    with pytest.raises(IndexError):
        PhantomDataset(2, size=32)[2]
