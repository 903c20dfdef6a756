"""Data pipeline of the trainer: sampling, padding, augmentation, PNG instances, splits, slice stacks."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from hmedn_fast.data.augment import AugmentConfig, augment_batch, augment_sample
from hmedn_fast.data.datasets import (PatchDataset, StepBatchSampler, Volume, check_volumes, default_patch_size,
                                      load_volumes, make_split, read_or_write_split, to_slice_stacks)
from hmedn_fast.data.png import find_png_pairs, instance_boundaries, load_png_pair, semantic_from_instances
from hmedn_fast.data.sampling import pad_to_size, patch_start, sample_patch, sample_seed


# ------------------------------------------------------------------------------------------ sampling
def test_sample_seed_is_a_pure_function_and_distinct():
    seeds = {sample_seed(3, e, i) for e in range(4) for i in range(50)}
    assert len(seeds) == 200
    assert sample_seed(3, 1, 7) == sample_seed(3, 1, 7)
    with pytest.raises(ValueError, match="index"):
        sample_seed(0, 0, -1)
    with pytest.raises(ValueError, match="seed"):
        sample_seed(1.5, 0, 0)


def test_pad_to_size_centres_and_fills_with_channel_minimum():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 5, 7, 9)).astype(np.float32)
    label = rng.integers(0, 3, size=(5, 7, 9)).astype(np.uint8)
    img, lab = pad_to_size(image, label, (8, 7, 4))
    assert img.shape == (2, 8, 7, 9) and lab.shape == (8, 7, 9) and img.dtype == np.float32
    np.testing.assert_array_equal(img[:, 1:6], image)  # 3 extra: 1 before, 2 after
    np.testing.assert_array_equal(lab[1:6], label)
    for c in range(2):
        assert np.all(img[c, [0, 6, 7]] == image[c].min())
    assert not lab[[0, 6, 7]].any()
    with pytest.raises(ValueError, match="patch_size"):
        pad_to_size(image, label, (8, 7))


def test_sample_patch_is_a_crop_of_the_padded_case():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 20, 13)).astype(np.float32)
    label = (rng.random((20, 13)) > 0.9).astype(np.uint8)
    for seed in range(20):
        img, lab = sample_patch(image, label, (8, 16), np.random.default_rng(seed), foreground_prob=0.5)
        padded_img, padded_lab = pad_to_size(image, label, (8, 16))
        windows = np.lib.stride_tricks.sliding_window_view(padded_img[0], (8, 16))
        hits = np.argwhere((windows == img[0]).all(axis=(2, 3)))
        assert len(hits) >= 1
        y, x = hits[0]
        np.testing.assert_array_equal(lab, padded_lab[y:y + 8, x:x + 16])


def test_foreground_oversampling_and_class_balance():
    label = np.zeros((64, 64, 64), dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1  # tiny class
    label[40:60, 40:60, 40:60] = 2  # large class
    rng = np.random.default_rng(0)
    starts = [patch_start(label, (16, 16, 16), rng, 1.0) for _ in range(400)]
    hit = [tuple(np.unique(label[s[0]:s[0] + 16, s[1]:s[1] + 16, s[2]:s[2] + 16])) for s in starts]
    assert all(max(h) > 0 for h in hit)  # every patch holds foreground
    tiny = np.mean([1 in h for h in hit])
    assert 0.35 < tiny < 0.65  # the class is chosen first, uniformly
    uniform = [patch_start(label, (16, 16, 16), rng, 0.0) for _ in range(400)]
    frac_tiny_uniform = np.mean([s[0] <= 3 and s[1] <= 3 and s[2] <= 3 for s in uniform])
    assert frac_tiny_uniform < 0.02
    with pytest.raises(ValueError, match="foreground_prob"):
        patch_start(label, (16, 16, 16), rng, 1.5)
    with pytest.raises(ValueError, match="exceeds"):
        patch_start(label, (80, 16, 16), rng, 0.5)


# ------------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize("shape", [(12, 12, 12), (10, 12, 12), (16, 20)])
def test_augmentation_keeps_image_and_label_aligned(shape):
    rng = np.random.default_rng(2)
    image = torch.from_numpy(rng.normal(size=(2, *shape)).astype(np.float32))
    label = (image[0] > 0.3).to(torch.uint8) + (image[1] > 1.0).to(torch.uint8)
    cfg = AugmentConfig(scale=(0.5, 2.0), shift=(-1.0, 1.0))
    changed = 0
    for seed in range(12):
        img, lab = augment_sample(image, label, seed, cfg)
        assert img.shape == image.shape and lab.shape == label.shape and lab.dtype == torch.uint8
        # recover the per-channel affine map from two voxels, then check the label is the same function of it
        flat, orig = img.reshape(2, -1).double(), image.reshape(2, -1).double()
        s = (flat.max(1).values - flat.min(1).values) / (orig.max(1).values - orig.min(1).values)
        t = flat.min(1).values - s * orig.min(1).values
        assert torch.all(s > 0)
        back = (img.double() - t.view(2, *[1] * len(shape))) / s.view(2, *[1] * len(shape))
        expect = (back[0] > 0.3).to(torch.uint8) + (back[1] > 1.0).to(torch.uint8)
        assert torch.equal(lab, expect)
        np.testing.assert_allclose(np.sort(back.numpy().ravel()), np.sort(image.double().numpy().ravel()), atol=1e-5)
        changed += not torch.equal(lab, label)
    assert changed >= 6


def test_augmentation_is_seeded_and_batch_independent():
    x = torch.randn(3, 1, 8, 8, 8)
    y = (x[:, 0] > 0).to(torch.uint8)
    cfg = AugmentConfig()
    a = augment_batch(x, y, [5, 6, 7], cfg)
    b = augment_batch(x[1:], y[1:], [6, 7], cfg)
    assert torch.equal(a[0][1:], b[0]) and torch.equal(a[1][1:], b[1])
    with pytest.raises(ValueError, match="seed"):
        augment_batch(x, y, [1, 2], cfg)


def test_slice_order_reversal():
    image = torch.arange(10, dtype=torch.float32).view(10, 1, 1).expand(10, 4, 4).clone()  # 2 modalities x 5
    label = torch.zeros(4, 4, dtype=torch.uint8)
    cfg = AugmentConfig(flip=False, rotate90=False, scale=(1, 1), shift=(0, 0), slice_groups=5)
    seen = set()
    for seed in range(10):
        img, _ = augment_sample(image, label, seed, cfg)
        order = tuple(int(v) for v in img[:, 0, 0])
        assert order in {tuple(range(10)), (4, 3, 2, 1, 0, 9, 8, 7, 6, 5)}
        seen.add(order)
    assert len(seen) == 2


@pytest.mark.parametrize("kwargs, match", [({"scale": (2, 1)}, "scale"), ({"shift": (0,)}, "shift"),
                                           ({"scale": (-1, 1)}, "scale"), ({"slice_groups": 0}, "slice_groups")])
def test_augment_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)


# ------------------------------------------------------------------------------------------ PNG instances
def _reference_boundaries(instances: np.ndarray) -> np.ndarray:
    out = np.zeros(instances.shape, dtype=bool)
    for i in np.unique(instances[instances > 0]):
        mask = instances == i
        out |= mask ^ ndimage.binary_erosion(mask, ndimage.generate_binary_structure(2, 1), border_value=1)
    return out


def test_instance_boundaries_match_per_instance_erosion():
    rng = np.random.default_rng(4)
    inst = np.zeros((40, 50), dtype=np.int32)
    for i in range(1, 9):
        y, x, r = rng.integers(0, 40), rng.integers(0, 50), rng.integers(3, 9)
        yy, xx = np.ogrid[:40, :50]
        inst[(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = i  # overlapping discs: touching instances
    np.testing.assert_array_equal(instance_boundaries(inst), _reference_boundaries(inst))
    sem = semantic_from_instances(inst)
    assert set(np.unique(sem)) <= {0, 1, 2}
    np.testing.assert_array_equal(sem > 0, inst > 0)


def test_png_folder_reading_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    inst = np.zeros((20, 30), dtype=np.uint16)
    inst[3:9, 4:12], inst[10:18, 15:25] = 1, 300
    Image.fromarray(rgb).save(tmp_path / "images" / "a.png")
    Image.fromarray(inst).save(tmp_path / "labels" / "a.png")
    sample = load_png_pair(*find_png_pairs(tmp_path)[0])
    grey = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(sample.image[0], (grey - grey.mean()) / grey.std(), atol=1e-5)
    np.testing.assert_array_equal(sample.instances, inst)
    np.testing.assert_array_equal(sample.label == 2, _reference_boundaries(inst.astype(np.int32)))
    Image.fromarray(rgb[:10]).save(tmp_path / "images" / "b.png")
    Image.fromarray(inst).save(tmp_path / "labels" / "b.png")
    with pytest.raises(ValueError, match="b.png"):
        load_png_pair(tmp_path / "images" / "b.png", tmp_path / "labels" / "b.png")
    (tmp_path / "images" / "c.png").write_bytes(b"not a png")
    (tmp_path / "labels" / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="c.png"):
        load_png_pair(tmp_path / "images" / "c.png", tmp_path / "labels" / "c.png")
    (tmp_path / "images" / "d.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="d.png"):
        find_png_pairs(tmp_path)


@pytest.mark.data
def test_dsb_png_sample(shared_data):
    pairs = find_png_pairs(shared_data / "dsb2018_stage1_train")[:2]
    for image, label in pairs:
        s = load_png_pair(image, label)
        raw = np.asarray(Image.open(label)).astype(np.int32)
        np.testing.assert_array_equal(s.label == 2, _reference_boundaries(raw))
        assert abs(float(s.image.mean())) < 1e-3 and abs(float(s.image.std()) - 1) < 1e-3


# ------------------------------------------------------------------------------------------ volumes, splits
def test_split_is_deterministic_disjoint_and_persisted(tmp_path):
    names = [f"case_{i}" for i in range(10)]
    a = make_split(names, 0.3, seed=1)
    assert a == make_split(list(reversed(names)), 0.3, seed=1)
    assert len(a["val"]) == 3 and sorted(a["train"] + a["val"]) == sorted(names)
    assert make_split(names, 0.3, seed=2) != a
    path = tmp_path / "split.json"
    assert read_or_write_split(path, names, 0.3, 1) == a
    assert json.loads(path.read_text())["val"] == a["val"]
    assert read_or_write_split(path, names, 0.5, 9) == a  # the stored split wins
    with pytest.raises(ValueError, match="absent"):
        read_or_write_split(path, names[:5], 0.3, 1)
    with pytest.raises(ValueError, match="at least 2"):
        make_split(["one"])


def test_slice_stacks_and_patch_dataset():
    rng = np.random.default_rng(6)
    vols = [Volume(rng.normal(size=(1, 6, 7, 9)).astype(np.float32), rng.integers(0, 3, (6, 7, 9)).astype(np.uint8),
                   (1.0, 2.0, 3.0), f"v{i}", f"v{i}.nii") for i in range(2)]
    stacks = to_slice_stacks(vols, slices=3, axis=1)
    assert len(stacks) == 14 and stacks[0].image.shape == (3, 6, 9) and stacks[0].spacing == (1.0, 3.0)
    np.testing.assert_array_equal(stacks[8].image[1], vols[1].image[0, :, 1])  # volume 1, slice 1, centre
    np.testing.assert_array_equal(stacks[8].label, vols[1].label[:, 1])
    assert default_patch_size(stacks) == (16, 16)
    ds = PatchDataset(stacks, (8, 8), samples_per_epoch=6, seed=3)
    first = [ds[i] for i in range(6)]
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(first, [ds[i] for i in range(6)]))
    ds.set_epoch(1)
    assert not all(torch.equal(a[0], ds[i][0]) for i, a in enumerate(first))
    assert first[0][0].shape == (3, 8, 8) and first[0][1].dtype == torch.uint8


def test_step_batch_sampler_splits_global_batches_between_ranks():
    single = list(StepBatchSampler(5, 4, start_step=2))
    ranks = [list(StepBatchSampler(5, 2, start_step=2, rank=r, world_size=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    assert single[0] == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="rank"):
        StepBatchSampler(5, 2, rank=2, world_size=2)


def test_check_volumes_names_the_file():
    v = Volume(np.zeros((1, 4, 4), np.float32) + 1, np.full((4, 4), 3, np.uint8), (1.0, 1.0), "x", "/data/x.png")
    with pytest.raises(ValueError, match="/data/x.png.*value 3"):
        check_volumes([v], num_classes=3)
    with pytest.raises(ValueError, match="/data/x.png.*in_channels=2"):
        check_volumes([v], num_classes=4, in_channels=2)


def _write_msd(root, cases):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for name, image, label in cases:
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"{name}.nii.gz"))


def test_load_volumes_msd_folder_and_errors(tmp_path):
    rng = np.random.default_rng(7)
    good = [(f"c{i}", rng.normal(100, 20, (9, 10, 11)).astype(np.float32), rng.integers(0, 3, (9, 10, 11)).astype(np.uint8))
            for i in range(3)]
    _write_msd(tmp_path / "ok", good)
    vols = load_volumes(tmp_path / "ok", max_cases=2)
    assert [v.name for v in vols] == ["c0", "c1"] and vols[0].image.shape == (1, 9, 10, 11)
    assert abs(float(vols[0].image.mean())) < 0.05
    _write_msd(tmp_path / "bad", good[:1] + [("c9", good[1][1], good[1][2][:, :, :5])])
    with pytest.raises(ValueError, match="c9.nii.gz"):
        load_volumes(tmp_path / "bad")
    _write_msd(tmp_path / "broken", good[:1])
    (tmp_path / "broken" / "imagesTr" / "c0.nii.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="c0.nii.gz"):
        load_volumes(tmp_path / "broken")
    with pytest.raises(ValueError, match="neither"):
        load_volumes(tmp_path)
    with pytest.raises(ValueError, match="'phantom' or an existing folder"):
        load_volumes(tmp_path / "missing")


@pytest.mark.data
def test_hippocampus_volumes(shared_data):
    vols = load_volumes(shared_data / "msd_hippocampus", max_cases=2)
    for v in vols:
        assert v.image.shape[0] == 1 and v.image.shape[1:] == v.label.shape and v.spacing == (1.0, 1.0, 1.0)
        assert set(np.unique(v.label)) == {0, 1, 2}
        assert v.source.endswith(f"{v.name}.nii.gz")
