"""Tests of the MSD-layout reader (hmedn_fast.data.msd) on small NIfTI files written here and on real data."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from hmedn_fast.data.msd import MSDSliceDataset, find_msd_cases, load_msd_case, slice_stack


def _write(path: Path, array: np.ndarray, zooms=(1.5, 2.0, 3.0)) -> Path:
    img = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
    img.header.set_zooms(tuple(zooms) + tuple(1.0 for _ in range(array.ndim - 3)))
    nib.save(img, str(path))
    return path


def _layout(root: Path, shapes, rng, modalities: int = 0) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, shape in enumerate(shapes):
        image_shape = shape + ((modalities,) if modalities else ())
        _write(root / "imagesTr" / f"case_{i:03d}.nii.gz", rng.normal(100, 20, image_shape).astype(np.float32))
        _write(root / "labelsTr" / f"case_{i:03d}.nii.gz", rng.integers(0, 3, shape).astype(np.uint8))
    return root


def _zscore_reference(channel: np.ndarray) -> np.ndarray:
    c = channel.astype(np.float64)
    lo, hi = np.percentile(c, [0.5, 99.5])
    c = np.minimum(np.maximum(c, lo), hi)
    return (c - c.mean()) / c.std()


def test_find_cases_skips_hidden_files_and_pairs_labels(tmp_path):
    root = _layout(tmp_path / "task", [(6, 7, 8), (5, 7, 9)], np.random.default_rng(0))
    (root / "imagesTr" / "._case_000.nii.gz").write_bytes(b"junk")
    pairs = find_msd_cases(root)
    assert [p[0].name for p in pairs] == ["case_000.nii.gz", "case_001.nii.gz"]
    assert all(label.parent.name == "labelsTr" and label.name == image.name for image, label in pairs)


def test_find_cases_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="imagesTr"):
        find_msd_cases(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(ValueError, match="imagesTr"):
        find_msd_cases(tmp_path)
    _write(tmp_path / "imagesTr" / "lonely.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(FileNotFoundError, match="lonely.nii.gz"):
        find_msd_cases(tmp_path)


def test_load_case_normalises_and_reads_spacing(tmp_path):
    rng = np.random.default_rng(1)
    root = _layout(tmp_path, [(6, 7, 8)], rng, modalities=2)
    image_path, label_path = find_msd_cases(root)[0]
    vol = load_msd_case(image_path, label_path)
    raw = np.asarray(nib.load(str(image_path)).dataobj)
    assert vol.image.shape == (2, 6, 7, 8) and vol.image.dtype == np.float32
    for m in range(2):
        np.testing.assert_allclose(vol.image[m], _zscore_reference(raw[..., m]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(vol.label, np.asarray(nib.load(str(label_path)).dataobj))
    assert vol.label.dtype == np.uint8 and vol.spacing == (1.5, 2.0, 3.0) and vol.name == "case_000"


def test_load_case_errors_name_the_files(tmp_path):
    good = _write(tmp_path / "img.nii.gz", np.random.default_rng(2).normal(size=(4, 5, 6)).astype(np.float32))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a nifti file")
    with pytest.raises(ValueError, match="broken.nii.gz"):
        load_msd_case(broken, good)
    mismatch = _write(tmp_path / "lab_small.nii.gz", np.zeros((4, 5, 5), np.uint8))
    with pytest.raises(ValueError, match="lab_small.nii.gz.*img.nii.gz"):
        load_msd_case(good, mismatch)
    fractional = _write(tmp_path / "lab_frac.nii.gz", np.full((4, 5, 6), 0.5, np.float32))
    with pytest.raises(ValueError, match="lab_frac.nii.gz"):
        load_msd_case(good, fractional)
    two_d = _write(tmp_path / "img2d.nii", np.ones((4, 5, 1, 1, 2), np.float32), zooms=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="img2d.nii"):
        load_msd_case(two_d, good)


@pytest.mark.parametrize("axis", [0, 2])
def test_slice_stack_matches_explicit_neighbours(axis):
    rng = np.random.default_rng(3)
    image = rng.normal(size=(2, 6, 7, 8)).astype(np.float32)
    label = rng.integers(0, 3, (6, 7, 8)).astype(np.uint8)
    stacks, labels = slice_stack(image, label, axis=axis, slices=5)
    n = label.shape[axis]
    assert stacks.shape == (n, 10) + tuple(np.delete(label.shape, axis)) and stacks.dtype == np.float32
    for i in range(n):
        np.testing.assert_array_equal(labels[i], np.take(label, i, axis=axis))
        for m in range(2):
            for j, offset in enumerate(range(-2, 3)):
                neighbour = min(max(i + offset, 0), n - 1)
                np.testing.assert_array_equal(stacks[i, m * 5 + j], np.take(image[m], neighbour, axis=axis))


def test_slice_stack_errors():
    image, label = np.zeros((1, 4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="slices"):
        slice_stack(image, label, slices=4)
    with pytest.raises(ValueError, match="axis"):
        slice_stack(image, label, axis=3)
    with pytest.raises(ValueError, match="label"):
        slice_stack(image, label[:3])


def test_slice_dataset_pads_to_common_size(tmp_path):
    rng = np.random.default_rng(4)
    pairs = find_msd_cases(_layout(tmp_path, [(20, 17, 5), (18, 33, 4)], rng))
    ds = MSDSliceDataset(pairs)
    assert len(ds) == 9 and ds.size == (32, 48) and ds.index[5] == (1, 0)
    image, label = ds[6]
    assert image.dtype == torch.float32 and image.shape == (5, 32, 48)
    assert label.dtype == torch.int64 and label.shape == (32, 48)
    vol = load_msd_case(*pairs[1])
    raw_label = vol.label[:, :, 1]  # item 6 = case 1, slice 1; (18, 33) centred in (32, 48) at (7, 7)
    np.testing.assert_array_equal(label[7:25, 7:40].numpy(), raw_label)
    assert label.sum() == int(raw_label.sum())
    np.testing.assert_allclose(image[2, 7:25, 7:40].numpy(), vol.image[0, :, :, 1])
    assert torch.all(image[:, :7] == float(vol.image.min()))
    assert ds.num_classes == 3
    with pytest.raises(ValueError, match="size"):
        MSDSliceDataset(pairs, size=(32,))
    with pytest.raises(ValueError, match="cases"):
        MSDSliceDataset([])


@pytest.mark.data
def test_real_hippocampus_cases(shared_data):
    pairs = find_msd_cases(shared_data / "msd_hippocampus")[:3]
    ds = MSDSliceDataset(pairs)
    assert ds.num_classes == 3 and ds.size[0] % 16 == 0 and ds.size[1] % 16 == 0
    assert set(np.unique(ds.labels)) <= {0, 1, 2} and ds.labels.max() == 2
    for vol in ds.volumes:
        assert vol.image.shape[0] == 1 and abs(float(vol.image.mean())) < 1e-3
