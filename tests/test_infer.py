"""Sliding-window inference, engines, NIfTI/PNG io and the ``hmedn infer`` command."""
from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import scipy.signal
import torch
from PIL import Image

from hmedn_fast.data import normalize_intensity, slice_stack
from hmedn_fast.infer import (CompiledEngine, EagerEngine, Engine, OnnxRuntimeEngine, gaussian_importance, normalize,
                              read_image, segment, sliding_window_inference, window_starts, write_labels)
from hmedn_fast.infer.cli import main as infer_main
from hmedn_fast.models import create_model
from hmedn_fast.models.io import save_model
from hmedn_fast.postprocess import anatomical_merge


def tiny_3d(**kw):
    return create_model("hmedn_3d_l2", widths=(4, 8, 12, 16), growth_rates=4, num_layers=2, hr_channels=4, hr_blocks=2,
                        **kw).eval()


def tiny_2d(**kw):
    return create_model("hmedn_2d", widths=(8, 12, 16, 24), growth_rates=4, hr_channels=8, hr_blocks=2, **kw).eval()


class PointwiseEngine(Engine):
    """Logits = a fixed random per-voxel linear map of the input channels (+ an optional constant): its
    sliding-window result must equal its direct application, whatever the windows."""

    def __init__(self, spatial_dims=3, in_channels=2, num_classes=3, window=None, scale=1.0):
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self.has_contour, self.device, self.window = True, torch.device("cpu"), window
        self.weight = torch.randn(num_classes, in_channels) * scale
        self.bias = torch.randn(num_classes)
        self.calls = []

    def logits(self, x):
        return torch.einsum("kc,nc...->nk...", self.weight, x) + self.bias.reshape(1, -1, *[1] * self.spatial_dims)

    def run(self, x):
        self.calls.append(tuple(x.shape))
        seg = self.logits(x)
        return seg, seg[:, :1] - seg[:, 1:2]


# ---------------------------------------------------------------- window placement and weights

@pytest.mark.parametrize("size, roi, overlap", [(20, 12, 0.5), (100, 32, 0.25), (7, 7, 0.5), (5, 9, 0.5),
                                                (33, 16, 0.0), (50, 16, 0.9)])
def test_window_starts_cover_and_step(size, roi, overlap):
    starts = window_starts(size, roi, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if roi >= size:
        assert starts == [0]
        return
    assert starts[-1] == size - roi
    step = max(1, int(roi * (1 - overlap)))
    assert all(b - a <= step for a, b in zip(starts, starts[1:]))
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + roi] = True
    assert covered.all()


@pytest.mark.parametrize("roi", [(16, 16, 16), (9, 14, 20), (24, 31)])
def test_gaussian_importance_matches_scipy(roi):
    w = gaussian_importance(roi, 0.125).double().numpy()
    ref = np.ones(())
    for r in roi:
        ref = np.multiply.outer(ref, scipy.signal.windows.gaussian(r, std=0.125 * r))
    ref = np.maximum(ref / ref.max(), 1e-3)
    np.testing.assert_allclose(w, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_importance(roi, 0.0)


# ---------------------------------------------------------------- sliding window

def test_window_covering_volume_equals_direct_forward():
    model = tiny_3d()
    x = torch.randn(2, 4, 13, 10, 11)
    with torch.no_grad():
        ref = model(x)
    for roi in (None, 64):
        out = sliding_window_inference(x, model, roi)
        torch.testing.assert_close(out.probabilities, torch.softmax(ref.seg, 1), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.contour, torch.sigmoid(ref.contour), atol=1e-5, rtol=0)


@pytest.mark.parametrize("importance", ["gaussian", "constant"])
@pytest.mark.parametrize("roi, overlap, batch", [((8, 8, 8), 0.5, 3), ((5, 9, 6), 0.25, 1), ((7, 7, 7), 0.0, 4)])
def test_seams_do_not_change_pointwise_or_constant_models(importance, roi, overlap, batch):
    x = torch.randn(2, 2, 19, 13, 11)
    for scale in (1.0, 0.0):  # scale 0: a constant-prediction model
        engine = PointwiseEngine(scale=scale)
        out = sliding_window_inference(x, engine, roi, overlap=overlap, sw_batch_size=batch, importance=importance)
        ref = torch.softmax(engine.logits(x), 1)
        torch.testing.assert_close(out.probabilities, ref, atol=1e-6, rtol=0)
        seg = engine.logits(x)
        torch.testing.assert_close(out.contour, torch.sigmoid(seg[:, :1] - seg[:, 1:2]), atol=1e-6, rtol=0)
        assert all(s[0] <= batch and s[2:] == roi for s in engine.calls)


def test_fixed_window_engine_pads_small_volumes():
    engine = PointwiseEngine(window=(8, 8, 8))
    x = torch.randn(1, 2, 5, 12, 7)
    out = sliding_window_inference(x, engine, overlap=0.5)
    torch.testing.assert_close(out.probabilities, torch.softmax(engine.logits(x), 1), atol=1e-6, rtol=0)
    assert all(c[1:] == (2, 8, 8, 8) for c in engine.calls) and sum(c[0] for c in engine.calls) == 2  # 1 x 2 x 1
    with pytest.raises(ValueError, match="differs from the engine's fixed window"):
        sliding_window_inference(x, engine, (4, 4, 4))


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_overlapping_windows_match_monai(mode):
    monai_inferers = pytest.importorskip("monai.inferers")
    model = tiny_3d()
    x = torch.randn(1, 4, 14, 12, 13)
    roi = (8, 8, 8)
    ours = sliding_window_inference(x, model, roi, overlap=0.5, sw_batch_size=2, importance=mode).probabilities
    with torch.no_grad():
        ref = monai_inferers.sliding_window_inference(
            x, roi, 2, lambda w: torch.softmax(model(w).seg, 1), overlap=0.5, mode="constant",
            roi_weight_map=gaussian_importance(roi) if mode == "gaussian" else None)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_flip_tta_is_the_mean_over_flips():
    model = tiny_3d()
    x = torch.randn(1, 4, 8, 8, 8)
    out = sliding_window_inference(x, model, flips=True)
    probs, contours = [], []
    with torch.no_grad():
        for k in range(4):
            for axes in itertools.combinations((2, 3, 4), k):
                o = model(x.flip(axes) if axes else x)
                probs.append(torch.softmax(o.seg, 1).flip(axes) if axes else torch.softmax(o.seg, 1))
                contours.append(torch.sigmoid(o.contour).flip(axes) if axes else torch.sigmoid(o.contour))
    assert len(probs) == 8
    torch.testing.assert_close(out.probabilities, torch.stack(probs).mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.contour, torch.stack(contours).mean(0), atol=1e-5, rtol=0)
    one_flip = sliding_window_inference(x, model, flips=[(), (2,)]).probabilities
    torch.testing.assert_close(one_flip, (probs[0] + probs[3]) / 2, atol=1e-5, rtol=0)


def test_sliding_window_bad_inputs():
    model3, model2 = tiny_3d(), tiny_2d()
    x = torch.randn(1, 4, 8, 8, 8)
    with pytest.raises(ValueError, match="3 channels, the model expects in_channels=4"):
        sliding_window_inference(torch.randn(1, 3, 8, 8, 8), model3)
    with pytest.raises(ValueError, match="for this 2D model"):
        sliding_window_inference(torch.randn(1, 5, 8, 8, 8), model2)
    with pytest.raises(TypeError, match="floating-point"):
        sliding_window_inference(x.long(), model3)
    with pytest.raises(ValueError, match="NaN"):
        sliding_window_inference(torch.full_like(x, float("nan")), model3)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(x, model3, 4, overlap=1.0)
    with pytest.raises(ValueError, match="sw_batch_size"):
        sliding_window_inference(x, model3, 4, sw_batch_size=0)
    with pytest.raises(ValueError, match="roi_size"):
        sliding_window_inference(x, model3, (4, 4))
    with pytest.raises(ValueError, match="importance"):
        sliding_window_inference(x, model3, 4, importance="linear")
    with pytest.raises(ValueError, match="flips"):
        sliding_window_inference(x, model3, 4, flips=[(3,)])
    with pytest.raises(TypeError, match="engine must be"):
        sliding_window_inference(x, torch.nn.Conv3d(4, 2, 1), 4)


# ---------------------------------------------------------------- segment (image -> labels)

def test_segment_3d_and_postprocess():
    model = tiny_3d(num_classes=3)
    image = np.random.default_rng(0).normal(size=(4, 16, 12, 8)).astype(np.float32)
    raw = segment(image, model, roi_size=8, postprocess=False)
    probs = sliding_window_inference(torch.from_numpy(image)[None], model, 8).probabilities
    np.testing.assert_array_equal(raw, probs.argmax(1)[0].numpy())
    assert raw.dtype == np.uint8
    merged = segment(image, model, roi_size=8, postprocess=True, min_size=20)
    np.testing.assert_array_equal(merged, anatomical_merge(raw, min_size=20))


def test_segment_2d_model_on_volume_slice_by_slice():
    model = tiny_2d(in_channels=5)
    volume = np.random.default_rng(1).normal(size=(1, 12, 10, 7)).astype(np.float32)
    labels = segment(volume, model, postprocess=False, slice_axis=2)
    stacks, _ = slice_stack(volume, np.zeros(volume.shape[1:], np.uint8), axis=2, slices=5)
    with torch.no_grad():
        ref = model(torch.from_numpy(stacks)).seg.argmax(1).numpy()  # (Z, X, Y)
    np.testing.assert_array_equal(labels, np.moveaxis(ref, 0, 2))
    with pytest.raises(ValueError, match="odd multiple"):
        segment(np.zeros((2, 6, 6, 6), np.float32) + 1, model)
    with pytest.raises(ValueError, match="for this 3D model"):
        segment(np.ones((4, 8, 8), np.float32), tiny_3d())


# ---------------------------------------------------------------- engines

def test_engines_agree_on_cpu(tmp_path):
    from hmedn_fast.export import export_onnx

    model = tiny_3d()
    x = torch.randn(2, 4, 8, 16, 8)
    with torch.no_grad():
        ref = model(x)
    seg, contour = EagerEngine(model)(x)
    torch.testing.assert_close(seg, ref.seg, atol=1e-4, rtol=0)  # fused vs unfused
    seg, _ = EagerEngine(model, dtype=torch.bfloat16)(x)
    assert (torch.softmax(seg, 1) - torch.softmax(ref.seg, 1)).abs().max() < 0.05
    ort_engine = OnnxRuntimeEngine(export_onnx(model, tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert (ort_engine.spatial_dims, ort_engine.in_channels, ort_engine.num_classes) == (3, 4, 4)
    a = sliding_window_inference(x, ort_engine, 8, overlap=0.5).probabilities
    b = sliding_window_inference(x, model, 8, overlap=0.5).probabilities
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_engine_argument_errors():
    model = tiny_3d()
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        CompiledEngine(model, (8, 8, 8), device="cpu")
    with pytest.raises(ValueError, match="captures its own CUDA graphs"):
        CompiledEngine(model, (8, 8, 8), device="cpu", cuda_graph=False, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="window must be 3 positive ints"):
        CompiledEngine(model, (8, 8), device="cpu", cuda_graph=False, compile=False)
    with pytest.raises(ValueError, match="dtype must be one of"):
        EagerEngine(model, dtype=torch.float64)
    with pytest.raises(TypeError, match="SegmentationModel"):
        EagerEngine(torch.nn.Conv3d(1, 1, 1))
    engine = CompiledEngine(model, (8, 8, 8), batch=2, device="cpu", dtype=torch.float32, cuda_graph=False,
                            compile=False)
    with pytest.raises(ValueError, match="windows of size"):
        engine(torch.randn(1, 4, 8, 8, 9))
    with pytest.raises(ValueError, match="at most 2 windows"):
        engine(torch.randn(3, 4, 8, 8, 8))


def test_compiled_engine_cpu_matches_eager():
    # the smallest network with a contour head keeps the CPU compile short; the GPU test covers hmedn models
    model = create_model("dilnet3", spatial_dims=3, in_channels=2, num_classes=3, channels=4, num_blocks=1,
                         contour=True).eval()
    engine = CompiledEngine(model, (8, 8, 8), batch=3, device="cpu", dtype=torch.float32, cuda_graph=False,
                            warmup=1)
    assert engine.compiled
    x = torch.randn(2, 2, 8, 8, 8)  # fewer windows than the static batch
    seg, contour = engine(x)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(seg, ref.seg, atol=1e-4, rtol=0)
    torch.testing.assert_close(contour, ref.contour, atol=1e-4, rtol=0)


@pytest.mark.cuda
def test_cudagraph_engine_matches_eager_on_gpu():
    model = tiny_3d().cuda()
    x = torch.randn(3, 4, 16, 16, 16, device="cuda")  # fewer windows than the static batch
    ref_seg, ref_contour = EagerEngine(model, fuse=False)(x)
    for compile_ in (False, True):
        engine = CompiledEngine(model, (16, 16, 16), batch=4, dtype=torch.float32, compile=compile_)
        seg, contour = engine(x)
        scale = ref_seg.abs().max()
        assert (seg - ref_seg).abs().max() < 1e-2 * scale  # TF32 convolutions on both sides
        assert (contour - ref_contour).abs().max() < 1e-2 * ref_contour.abs().max()
        engine = CompiledEngine(model, (16, 16, 16), batch=4, dtype=torch.bfloat16, compile=compile_)
        assert (torch.softmax(engine(x)[0], 1) - torch.softmax(ref_seg, 1)).abs().max() < 0.05
    volume = torch.randn(1, 4, 40, 30, 20, device="cuda")
    on_gpu = sliding_window_inference(volume, engine, overlap=0.5, sw_batch_size=4)
    on_cpu = sliding_window_inference(volume, engine, overlap=0.5, sw_batch_size=4, accumulate_device="cpu")
    assert on_gpu.probabilities.is_cuda and on_cpu.probabilities.device.type == "cpu"
    torch.testing.assert_close(on_gpu.probabilities.cpu(), on_cpu.probabilities, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- io

def _nifti(path, data, *, zooms=(1.5, 0.8, 2.0)):
    affine = np.array([[0.0, -zooms[1], 0, 10], [zooms[0], 0, 0, -20], [0, 0, zooms[2], 5], [0, 0, 0, 1]])
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = b"hmedn test"
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, str(path))
    return img


@pytest.mark.parametrize("shape", [(14, 11, 9), (14, 11, 9, 3)])
def test_nifti_round_trip_keeps_affine_and_header(shape, tmp_path):
    data = np.random.default_rng(2).normal(100, 20, size=shape).astype(np.float32)
    src = _nifti(tmp_path / "case.nii.gz", data)
    image = read_image(tmp_path / "case.nii.gz")
    expected = data[None] if len(shape) == 3 else np.moveaxis(data, -1, 0)
    np.testing.assert_array_equal(image.data, expected)
    labels = np.random.default_rng(3).integers(0, 4, size=shape[:3]).astype(np.uint8)
    out = write_labels(labels, image, tmp_path / "out")
    assert out.name == "case.nii.gz"
    back = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, src.affine)
    for key in ("pixdim", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                "srow_x", "srow_y", "srow_z", "xyzt_units", "descrip"):
        np.testing.assert_array_equal(back.header[key][..., :4] if key == "pixdim" else back.header[key],
                                      src.header[key][..., :4] if key == "pixdim" else src.header[key], err_msg=key)


def test_msd_nifti_round_trip(shared_data, tmp_path):
    path = sorted(p for p in (shared_data / "msd_hippocampus" / "imagesTr").glob("*.nii.gz")
                  if not p.name.startswith("."))[0]
    image = read_image(path)
    src = nib.load(str(path))
    labels = (image.data[0] > np.median(image.data[0])).astype(np.uint8)
    back = nib.load(str(write_labels(labels, image, tmp_path)))
    np.testing.assert_array_equal(back.affine, src.affine)
    np.testing.assert_array_equal(back.header.get_zooms(), src.header.get_zooms()[:3])
    for key in ("qform_code", "sform_code"):
        assert back.header[key] == src.header[key]
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)


def test_png_read_write(tmp_path):
    rgba = np.random.default_rng(4).integers(0, 255, size=(21, 17, 4)).astype(np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cells.png")
    image = read_image(tmp_path / "cells.png")
    np.testing.assert_array_equal(image.data, np.moveaxis(rgba[..., :3], -1, 0).astype(np.float32))
    Image.fromarray(rgba[..., 0]).save(tmp_path / "gray.png")
    assert read_image(tmp_path / "gray.png").data.shape == (1, 21, 17)
    labels = np.random.default_rng(5).integers(0, 3, size=(21, 17)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(write_labels(labels, image, tmp_path / "out"))), labels)


def test_read_errors(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not gzip")
    with pytest.raises(ValueError, match="cannot read image .*broken.nii.gz"):
        read_image(tmp_path / "broken.nii.gz")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    _nifti(tmp_path / "nan.nii", data)
    with pytest.raises(ValueError, match="NaN"):
        read_image(tmp_path / "nan.nii")
    _nifti(tmp_path / "ok.nii", np.ones((4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="spatial shape"):
        write_labels(np.zeros((4, 4, 5), np.uint8), read_image(tmp_path / "ok.nii"), tmp_path)


def test_normalize_modes():
    rng = np.random.default_rng(6)
    data = np.stack([rng.normal(50, 10, (9, 8, 7)), rng.exponential(3, (9, 8, 7))]).astype(np.float32)
    z = normalize(data)
    d64 = data.astype(np.float64)
    ref = (d64 - d64.mean(axis=(1, 2, 3), keepdims=True)) / d64.std(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(z, ref, atol=1e-5)
    np.testing.assert_allclose(normalize(data, "clip_zscore"), normalize_intensity(data), atol=1e-6)
    np.testing.assert_array_equal(normalize(data, "none"), data)
    fixed = normalize(data, {"mean": [50, 3], "std": [10, 2]})
    np.testing.assert_allclose(fixed[1], (d64[1] - 3) / 2, atol=1e-5)
    assert (normalize(np.full((1, 3, 3), 7.0)) == 0).all()
    with pytest.raises(ValueError, match="one per channel"):
        normalize(data, {"mean": [1, 2, 3], "std": [1]})
    with pytest.raises(ValueError, match="std values must be > 0"):
        normalize(data, {"mean": [0], "std": [0]})
    with pytest.raises(ValueError, match="intensity must be"):
        normalize(data, "minmax")


# ---------------------------------------------------------------- CLI

def test_cli_3d_files_and_errors(tmp_path, capsys):
    model = create_model("unet_3d", in_channels=1, num_classes=3, widths=(4, 8)).eval()
    ckpt = save_model(model, tmp_path / "model.pt", intensity="clip_zscore")
    rng = np.random.default_rng(7)
    inputs = tmp_path / "in"
    inputs.mkdir()
    volumes = {}
    for name in ("a", "b"):
        volumes[name] = rng.normal(size=(18, 15, 11)).astype(np.float32)
        _nifti(inputs / f"{name}.nii.gz", volumes[name])
    (inputs / "c.nii.gz").write_bytes(b"corrupt")
    out = tmp_path / "out"
    rc = infer_main(["--model", str(ckpt), "--input", str(inputs), str(tmp_path / "missing.nii"), "--output",
                     str(out), "--roi", "8", "--no-postprocess"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "c.nii.gz" in err and "cannot read image" in err and "missing.nii" in err
    for name, vol in volumes.items():
        written = nib.load(str(out / f"{name}.nii.gz"))
        np.testing.assert_allclose(written.affine, nib.load(str(inputs / f"{name}.nii.gz")).affine)
        expected = segment(normalize_intensity(vol[None]), model, roi_size=8, postprocess=False)
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    rc = infer_main(["--model", str(ckpt), "--input", str(inputs / "a.nii.gz"), "--output", str(tmp_path / "o2"),
                     "--roi", "8", "--engine", "onnx", "--no-postprocess"])
    assert rc == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "o2" / "a.nii.gz")).dataobj),
                                  np.asarray(nib.load(str(out / "a.nii.gz")).dataobj))


def test_cli_wrong_channels_png_and_bad_checkpoint(tmp_path, capsys):
    ckpt3 = save_model(create_model("unet_3d", in_channels=2, num_classes=2, widths=(4, 8)), tmp_path / "m3.pt")
    _nifti(tmp_path / "one_channel.nii.gz", np.random.default_rng(8).normal(size=(8, 8, 8)).astype(np.float32))
    rc = infer_main(["--model", str(ckpt3), "--input", str(tmp_path / "one_channel.nii.gz"), "--output",
                     str(tmp_path / "out")])
    assert rc == 1 and "1 channels, the model expects in_channels=2" in capsys.readouterr().err
    ckpt2 = save_model(create_model("unet_2d", in_channels=3, num_classes=2, widths=(4, 8)), tmp_path / "m2.pt")
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (19, 23, 4)).astype(np.uint8), "RGBA").save(
        tmp_path / "cells.png")
    assert infer_main(["--model", str(ckpt2), "--input", str(tmp_path / "cells.png"), "--output",
                       str(tmp_path / "out")]) == 0
    assert np.asarray(Image.open(tmp_path / "out" / "cells.png")).shape == (19, 23)
    (tmp_path / "bad.pt").write_bytes(b"nope")
    assert infer_main(["--model", str(tmp_path / "bad.pt"), "--input", str(tmp_path / "cells.png"), "--output",
                       str(tmp_path / "out")]) == 2
    assert "cannot read model checkpoint" in capsys.readouterr().err
