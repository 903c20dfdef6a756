"""Training targets against scipy.ndimage (float64), on random blobby label maps in 2D and 3D."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from hmedn_fast import targets as T
from hmedn_fast.ops.reference import targets as R


def blobby_labels(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int, absent=(), blur=2.5):
    """Random label map (N, *spatial) of smooth blobs touching the border; classes in ``absent`` removed."""
    n, spatial = shape[0], shape[1:]
    noise = rng.normal(size=(n, num_classes, *spatial))
    fields = ndi.gaussian_filter(noise, sigma=(0, 0, *([blur] * len(spatial))))
    labels = fields.argmax(axis=1)
    for k in absent:
        labels[labels == k] = 0
    return labels


def scipy_boundaries(lab: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """B_k = mask ^ binary_erosion(mask, face connectivity, border_value=1), one sample."""
    structure = ndi.generate_binary_structure(lab.ndim, 1)
    masks = [lab == k for k in range(1, num_classes)]
    return [m ^ ndi.binary_erosion(m, structure, border_value=1) for m in masks]


def scipy_targets(labels: np.ndarray, num_classes: int, sc: float, sw: float, mu0: float, mu) -> tuple:
    """SPEC section 2 in float64 with scipy, sample by sample."""
    mu = [mu] * (num_classes - 1) if np.isscalar(mu) else list(mu)

    def g(x, s):
        return ndi.gaussian_filter(x.astype(np.float64), s, mode="reflect", truncate=4.0)

    contours, weights = [], []
    for lab in labels:
        b = scipy_boundaries(lab, num_classes)
        c = g(np.any(b, axis=0), sc)
        contours.append(c / c.max() if c.max() > 0 else np.zeros_like(c))
        s = [g(bk, sw) for bk in b]
        total = np.sum(s, axis=0)
        weighted = np.sum([m * sk for m, sk in zip(mu, s)], axis=0)
        weights.append(mu0 + weighted / total.max() if total.max() > 0 else np.full_like(total, mu0))
    return np.stack(contours), np.stack(weights)


CASES = [
    # (shape, num_classes, absent classes, sigma_contour, sigma_weight, mu0, mu)
    ((3, 40, 52), 4, (2,), 2.0, 8.0, 1.0, 25.0),
    ((2, 33, 27), 5, (), 1.5, 5.0, 0.5, (5.0, 25.0, 40.0, 10.0)),
    ((2, 10, 14, 12), 3, (), 2.0, 8.0, 1.0, 25.0),  # 3D, radius 32 > every size: repeated reflection
    ((2, 6, 9, 7), 4, (1,), 1.0, 3.0, 2.0, (3.0, 7.0, 11.0)),
]


@pytest.mark.parametrize("shape,k,absent,sc,sw,mu0,mu", CASES)
def test_make_targets_matches_scipy(shape, k, absent, sc, sw, mu0, mu):
    rng = np.random.default_rng(sum(shape))
    labels = blobby_labels(rng, shape, k, absent)
    labels[0] = 0  # a sample without any structure: C = 0, W = mu0
    labels_t = torch.from_numpy(labels).to(torch.int64)
    out = T.make_targets(labels_t, k, sc, sw, mu0, mu, backend="reference")
    c_ref, w_ref = scipy_targets(labels, k, sc, sw, mu0, mu)
    assert out.contour.dtype == out.weight.dtype == torch.float32
    assert out.contour.shape == out.weight.shape == labels_t.shape
    np.testing.assert_allclose(out.contour.numpy(), c_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.weight.numpy(), w_ref, rtol=0, atol=1e-5)
    assert float(c_ref[1:].max()) == pytest.approx(1.0)  # the other samples really have boundaries
    np.testing.assert_allclose(
        T.contour_map(labels_t, k, sc, backend="reference").numpy(), c_ref, rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        T.weight_map(labels_t, k, sw, mu0, mu, backend="reference").numpy(), w_ref, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(2, 23, 31), (1, 7, 12, 9)])
def test_boundary_map_matches_scipy_erosion(dtype, shape):
    rng = np.random.default_rng(3)
    labels = blobby_labels(rng, shape, 4, absent=(3,), blur=1.5)
    out = T.boundary_map(torch.from_numpy(labels).to(dtype), 4, backend="reference")
    assert out.dtype == torch.bool and out.shape == (shape[0], 3, *shape[1:])
    for n in range(shape[0]):
        expected = np.stack(scipy_boundaries(labels[n], 4))
        np.testing.assert_array_equal(out[n].numpy(), expected)
    assert not out[:, 2].any() and out[:, :2].any()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_every_label_dtype_works_with_the_automatic_backend(dtype):
    labels = blobby_labels(np.random.default_rng(12), (2, 21, 25), 3)
    b = T.boundary_map(torch.from_numpy(labels).to(dtype), 3)
    c = T.contour_map(torch.from_numpy(labels).to(dtype), 3)
    np.testing.assert_array_equal(b.numpy(), np.stack([np.stack(scipy_boundaries(lab, 3)) for lab in labels]))
    np.testing.assert_allclose(c.numpy(), scipy_targets(labels, 3, 2.0, 8.0, 1.0, 25.0)[0], rtol=0, atol=1e-5)


def test_defaults_are_the_paper_settings():
    labels = torch.from_numpy(blobby_labels(np.random.default_rng(5), (2, 36, 30), 4))
    c_ref, w_ref = scipy_targets(labels.numpy(), 4, 2.0, 8.0, 1.0, 25.0)
    out = T.make_targets(labels, 4, backend="reference")
    np.testing.assert_allclose(out.contour.numpy(), c_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.weight.numpy(), w_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(T.contour_map(labels, 4, backend="reference").numpy(), c_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(T.weight_map(labels, 4, backend="reference").numpy(), w_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape,sigma", [((1, 1, 1), 2.0), ((2, 3, 5), 8.0), ((1, 2, 1, 4), 3.0), ((1, 67,), 2.5)])
def test_gaussian_matches_scipy_reflect_on_any_size(shape, sigma):
    x = np.random.default_rng(7).random(shape)
    spatial = len(shape) - 1
    expected = np.stack([ndi.gaussian_filter(s, sigma, mode="reflect", truncate=4.0) for s in x])
    out = R.gaussian_filter(torch.from_numpy(x).float(), sigma, spatial)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)


def test_canny_boundaries_follow_the_class_transitions():
    skimage_feature = pytest.importorskip("skimage.feature")
    labels = blobby_labels(np.random.default_rng(11), (2, 40, 48), 4, absent=(2,), blur=3.0)
    out = T.boundary_map(torch.from_numpy(labels), 4, method="canny")
    assert out.shape == (2, 3, 40, 48) and out.dtype == torch.bool
    near = ndi.generate_binary_structure(2, 2)
    for n in range(2):
        for k in (1, 3):
            mask = labels[n] == k
            expected = skimage_feature.canny(mask.astype(np.float64), sigma=1.0, mode="nearest")
            np.testing.assert_array_equal(out[n, k - 1].numpy(), expected)
            assert expected.sum() > 10
            # every Canny edge pixel lies within one pixel of the mask's transition (both sides)
            transition = mask ^ ndi.binary_erosion(mask, border_value=1)
            transition |= ~mask & ndi.binary_dilation(mask)
            assert not (expected & ~ndi.binary_dilation(transition, near)).any()
        assert not out[n, 1].any()
    c = T.contour_map(torch.from_numpy(labels), 4, method="canny")
    g = ndi.gaussian_filter(out.numpy().any(axis=1).astype(np.float64), (0, 2, 2), mode="reflect")
    np.testing.assert_allclose(c.numpy(), g / g.max(axis=(1, 2), keepdims=True), rtol=0, atol=1e-5)


BAD = [
    (lambda L: L + 4, 4, {}, ValueError, "labels must lie in"),
    (lambda L: L - 1, 4, {}, ValueError, "labels must lie in"),
    (lambda L: L.float(), 4, {}, TypeError, "integer dtype"),
    (lambda L: L.bool(), 4, {}, TypeError, "integer dtype"),
    (lambda L: L.numpy(), 4, {}, TypeError, "torch.Tensor"),
    (lambda L: L[0], 4, {}, ValueError, r"\(N, H, W\)"),
    (lambda L: L[None, None], 4, {}, ValueError, r"\(N, H, W\)"),
    (lambda L: L[:0], 4, {}, ValueError, "non-empty"),
    (lambda L: L[:, :0], 4, {}, ValueError, "non-empty"),
    (lambda L: L.clamp(max=0), 1, {}, ValueError, "num_classes"),
    (lambda L: L, 4.0, {}, ValueError, "num_classes"),
    (lambda L: L, 4, {"method": "sobel"}, ValueError, "method"),
    (lambda L: L[:, None], 4, {"method": "canny"}, ValueError, "2D only"),
    (lambda L: L, 4, {"method": "canny", "backend": "cpu"}, ValueError, "reference"),
    (lambda L: L, 4, {"backend": "triton"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("fn", [T.boundary_map, T.contour_map, T.weight_map, T.make_targets])
@pytest.mark.parametrize("make,k,kwargs,exc,match", BAD)
def test_bad_labels_raise(fn, make, k, kwargs, exc, match):
    labels = torch.from_numpy(blobby_labels(np.random.default_rng(1), (2, 8, 9), 4))
    with pytest.raises(exc, match=match):
        fn(make(labels), k, **kwargs)


@pytest.mark.parametrize(
    "fn,kwargs,match",
    [
        (T.contour_map, {"sigma": 0.0}, "sigma"),
        (T.weight_map, {"sigma": float("nan")}, "sigma"),
        (T.make_targets, {"sigma_contour": -1.0}, "sigma_contour"),
        (T.make_targets, {"sigma_weight": "8"}, "sigma_weight"),
        (T.weight_map, {"mu": (1.0, 2.0)}, "mu must be"),
        (T.make_targets, {"mu": [1.0, 2.0, float("inf")]}, "mu must be"),
        (T.make_targets, {"mu": "25"}, "mu must be"),
        (T.weight_map, {"mu0": None}, "mu0"),
    ],
)
def test_bad_parameters_raise(fn, kwargs, match):
    labels = torch.from_numpy(blobby_labels(np.random.default_rng(2), (1, 8, 9), 4))
    with pytest.raises(ValueError, match=match):
        fn(labels, 4, **kwargs)


def test_missing_extension_falls_back_to_reference(monkeypatch):
    monkeypatch.setitem(sys.modules, "hmedn_fast.ops.targets_ext", None)  # import raises ImportError
    labels = torch.from_numpy(blobby_labels(np.random.default_rng(4), (2, 20, 18), 3))
    c_ref, w_ref = scipy_targets(labels.numpy(), 3, 2.0, 8.0, 1.0, 25.0)
    out = T.make_targets(labels, 3)
    np.testing.assert_allclose(out.contour.numpy(), c_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out.weight.numpy(), w_ref, rtol=0, atol=1e-5)
    for backend in ("cpu", "cuda"):
        with pytest.raises(RuntimeError, match="targets_ext could not be imported"):
            T.make_targets(labels, 3, backend=backend)
    monkeypatch.setenv("HMEDN_BACKEND_TARGETS", "cpu")
    with pytest.raises(RuntimeError, match="environment"):
        T.contour_map(labels, 3)


def test_extension_contract_is_called_as_agreed(monkeypatch):
    """A stand-in targets_ext records the calls; automatic dispatch must pick 'cpu' and pass the contract."""
    calls = []
    fake = types.ModuleType("hmedn_fast.ops.targets_ext")
    fake.unavailable = lambda backend, labels: None if backend == "cpu" else "no GPU in this test"

    def fake_boundary(labels, num_classes):
        calls.append(("boundary_map", labels, num_classes))
        return R.boundary_map(labels, num_classes)

    def fake_targets(labels, num_classes, sigma_contour, sigma_weight, mu0, mu, check_labels=True):
        assert check_labels is False  # checked in Python already: the op must not read the labels back again
        calls.append(("make_targets", labels, num_classes, sigma_contour, sigma_weight, mu0, mu))
        return R.make_targets(labels, num_classes, sigma_contour, sigma_weight, mu0, mu)

    fake.boundary_map, fake.make_targets = fake_boundary, fake_targets
    monkeypatch.setitem(sys.modules, "hmedn_fast.ops.targets_ext", fake)
    labels = torch.from_numpy(blobby_labels(np.random.default_rng(6), (2, 16, 20), 4)).to(torch.int32)
    T.boundary_map(labels, 4)
    out = T.make_targets(labels, 4, 1.5, 6, 2, [3, 4.5, 6])
    w = T.weight_map(labels, 4, sigma=5.0, mu=10)
    assert [c[0] for c in calls] == ["boundary_map", "make_targets", "make_targets"]
    assert calls[0][1] is labels and calls[0][2] == 4
    assert calls[1][2:] == (4, 1.5, 6.0, 2.0, (3.0, 4.5, 6.0))
    assert all(type(v) is float for v in (*calls[1][3:6], *calls[1][6]))
    assert calls[2][4:] == (5.0, 1.0, (10.0, 10.0, 10.0))
    _, w_ref = scipy_targets(labels.numpy(), 4, 1.5, 6.0, 2.0, [3, 4.5, 6])
    np.testing.assert_allclose(out.weight.numpy(), w_ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(w.numpy(), scipy_targets(labels.numpy(), 4, 2.0, 5.0, 1.0, 10.0)[1], atol=1e-5)
    with pytest.raises(RuntimeError, match="no GPU in this test"):
        T.boundary_map(labels, 4, backend="cuda")


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_compiled_backends_match_reference(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for shape, k in [((2, 37, 45), 4), ((2, 9, 13, 11), 3)]:
        labels = torch.from_numpy(blobby_labels(np.random.default_rng(8), shape, k, absent=(1,))).to(device)
        reason = T._ext_unavailable(backend, labels)
        if reason is not None:
            pytest.skip(f"{backend} backend unavailable: {reason}")
        for mu in (25.0, list(range(3, 3 + k - 1))):
            out = T.make_targets(labels, k, mu=mu, backend=backend)
            ref = T.make_targets(labels, k, mu=mu, backend="reference")
            assert out.contour.device == labels.device and out.contour.dtype == torch.float32
            torch.testing.assert_close(out.contour, ref.contour, rtol=0, atol=1e-5)
            # the weight map spans [mu0, mu0 + max(mu)] (up to 26): compare its normalised part
            # (W - mu0) / max(mu) in [0, 1] at 1e-5, i.e. 1e-5 of the map's range. Raw W at 1e-5 would ask for
            # 3 float32 ulps at 26 after two or three 65-tap float32 passes; the C++ kernel lands at ~6 ulps
            # (1.1e-5, relative 6e-7), the float64 reference is the only backend that meets that.
            top = max(mu) if isinstance(mu, list) else mu
            torch.testing.assert_close((out.weight - 1.0) / top, (ref.weight - 1.0) / top, rtol=0, atol=1e-5)
        assert torch.equal(T.boundary_map(labels, k, backend=backend), T.boundary_map(labels, k, backend="reference"))


@pytest.mark.cuda
def test_reference_on_cuda_matches_cpu():
    labels = torch.from_numpy(blobby_labels(np.random.default_rng(9), (2, 8, 12, 10), 4))
    cpu = T.make_targets(labels, 4, backend="reference")
    gpu = T.make_targets(labels.cuda(), 4, backend="reference")
    assert gpu.contour.is_cuda and gpu.weight.is_cuda
    torch.testing.assert_close(gpu.contour.cpu(), cpu.contour, rtol=0, atol=1e-5)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=0, atol=1e-5)
    assert T.boundary_map(labels.cuda()[:, 0], 4, method="canny").is_cuda
