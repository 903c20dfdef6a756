"""C++ CPU and CUDA backends of the training targets (hmedn_fast.ops.targets_ext) against scipy.ndimage
(float64, written here from SPEC section 2) and against the PyTorch reference."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from hmedn_fast.ops import targets_ext
from hmedn_fast.ops.reference import targets as reference

MU0 = 1.0


def _skip_unless(backend: str) -> None:
    device = "cuda" if backend == "cuda" else "cpu"
    reason = targets_ext.unavailable(backend, torch.zeros(1, 1, 1, dtype=torch.long, device=device))
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    _skip_unless(request.param)
    return request.param


def scipy_targets(labels: np.ndarray, num_classes: int, sc: float, sw: float, mu0: float, mu) -> tuple:
    """SPEC section 2 with scipy.ndimage in float64, one sample at a time."""
    contours, weights, boundaries = [], [], []
    for lab in labels:
        structure = ndi.generate_binary_structure(lab.ndim, 1)
        bs = []
        for k in range(1, num_classes):
            mask = lab == k
            bs.append(mask ^ ndi.binary_erosion(mask, structure=structure, border_value=1))
        b_all = np.any(bs, axis=0).astype(np.float64)
        g = ndi.gaussian_filter(b_all, sc, mode="reflect", truncate=4.0)
        contours.append(g / g.max() if g.max() > 0 else np.zeros_like(g))
        s = [ndi.gaussian_filter(b.astype(np.float64), sw, mode="reflect", truncate=4.0) for b in bs]
        total = np.sum(s, axis=0)
        num = np.sum([m * sk for m, sk in zip(mu, s)], axis=0)
        weights.append(mu0 + num / total.max() if total.max() > 0 else np.full_like(g, mu0))
        boundaries.append(np.stack(bs))
    return np.stack(contours), np.stack(weights), np.stack(boundaries)


def blob_labels(shape: tuple[int, ...], num_classes: int, dtype=torch.int64, generator=None) -> torch.Tensor:
    """Random smooth blobs of classes 1..K-1 on background (a realistic label map, never constant)."""
    noise = torch.rand((num_classes - 1, *shape), generator=generator, dtype=torch.float64).numpy()
    smooth = np.stack([ndi.gaussian_filter(x, 1.5) for x in noise])
    best = smooth.argmax(axis=0) + 1
    keep = smooth.max(axis=0) > np.quantile(smooth.max(axis=0), 0.5)
    labels = np.where(keep, best, 0)
    assert len(np.unique(labels)) > 1
    return torch.from_numpy(labels).to(dtype)


def assert_targets_close(contour, weight, ref_c, ref_w, mu0: float, mu) -> None:
    """Contour within 1e-5; weight within 1e-5 on its normalised scale (W - mu0) / max|mu|."""
    contour, weight, ref_c, ref_w = (torch.as_tensor(x).double().cpu().numpy() for x in (contour, weight, ref_c, ref_w))
    scale = max(abs(float(m)) for m in mu)
    assert np.isfinite(contour).all() and np.isfinite(weight).all()
    np.testing.assert_allclose(contour, ref_c, rtol=0, atol=1e-5)
    np.testing.assert_allclose((weight - mu0) / scale, (ref_w - mu0) / scale, rtol=0, atol=1e-5)


CASES = [
    # (spatial shape, num_classes, mu, sigma_contour, sigma_weight)
    ((37, 29), 3, (25.0, 25.0), 2.0, 8.0),  # odd 2D sizes, uniform mu
    ((17, 40), 4, (25.0, 5.0, 12.5), 2.0, 8.0),  # per-class mu
    ((6, 5), 3, (25.0, 3.0), 2.0, 8.0),  # smaller than the radius on both axes
    ((9, 14, 11), 3, (25.0, 25.0), 2.0, 8.0),  # 3D, odd, smaller than radius 32
    ((12, 7, 21), 4, (2.0, 30.0, 7.0), 2.0, 8.0),
    ((2, 19, 16), 2, (25.0,), 1.3, 3.7),  # non-default sigmas (generic radius path on CUDA)
    ((1, 8, 9), 3, (25.0, 10.0), 2.0, 8.0),  # depth 1
]


@pytest.mark.parametrize("shape,num_classes,mu,sc,sw", CASES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_make_targets_matches_scipy(device, shape, num_classes, mu, sc, sw, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, num_classes, dtype)).encode()))
    labels = torch.stack([blob_labels(shape, num_classes, dtype, gen) for _ in range(2)])
    ref_c, ref_w, _ = scipy_targets(labels.numpy(), num_classes, sc, sw, MU0, mu)
    contour, weight = targets_ext.make_targets(labels.to(device), num_classes, sc, sw, MU0, mu)
    assert contour.shape == weight.shape == labels.shape
    assert contour.dtype == weight.dtype == torch.float32
    assert contour.device.type == weight.device.type == device
    assert_targets_close(contour, weight, ref_c, ref_w, MU0, mu)


@pytest.mark.parametrize("spatial", [(64, 48), (20, 24, 28)])
def test_make_targets_matches_reference(device, spatial):
    labels = torch.stack([blob_labels(spatial, 4) for _ in range(3)]).to(device)
    mu = (25.0, 8.0, 40.0)
    contour, weight = targets_ext.make_targets(labels, 4, 2.0, 8.0, 0.5, mu)
    ref_c, ref_w = reference.make_targets(labels, 4, 2.0, 8.0, 0.5, mu)
    assert_targets_close(contour, weight, ref_c, ref_w, 0.5, mu)


def test_absent_classes_single_voxels_and_empty_boundary(device):
    gen = torch.Generator().manual_seed(3)
    labels = torch.zeros(3, 15, 13, 11, dtype=torch.int64)
    labels[0] = blob_labels((15, 13, 11), 3, generator=gen) * 2  # classes 2 and 4 only, 1 and 3 absent
    labels[1, 7, 6, 5] = 3  # a single voxel: its own boundary
    labels[1, 0, 0, 0] = 1  # a single voxel in a corner
    labels[2] = 2  # one class everywhere: the image edge is no boundary, so no boundary at all
    mu = (25.0, 7.0, 11.0, 3.0)
    ref_c, ref_w, ref_b = scipy_targets(labels.numpy(), 5, 2.0, 8.0, MU0, mu)
    assert ref_b[1].sum() == 2 and ref_b[2].sum() == 0
    contour, weight = targets_ext.make_targets(labels.to(device), 5, 2.0, 8.0, MU0, mu)
    assert_targets_close(contour, weight, ref_c, ref_w, MU0, mu)
    assert torch.all(contour[2] == 0) and torch.all(weight[2] == MU0)
    # the corner voxel is mirrored on 3 axes ('reflect'), so its peak is the sample's maximum
    assert contour[1, 0, 0, 0] == 1 and 0 < contour[1, 7, 6, 5] < 1


def test_non_contiguous_labels(device):
    base = blob_labels((30, 26, 18), 3).to(device)
    labels = base.permute(0, 2, 1)[:, ::2, 1:]  # (30, 9, 25): permuted and strided
    assert not labels.is_contiguous()
    mu = (25.0, 9.0)
    ref_c, ref_w, _ = scipy_targets(labels.cpu().numpy(), 3, 2.0, 8.0, MU0, mu)
    contour, weight = targets_ext.make_targets(labels, 3, 2.0, 8.0, MU0, mu)
    assert_targets_close(contour, weight, ref_c, ref_w, MU0, mu)


@pytest.mark.parametrize("spatial", [(23, 17), (7, 12, 9)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_boundary_map_matches_scipy(device, spatial, dtype):
    labels = torch.stack([blob_labels(spatial, 4, dtype) for _ in range(2)])
    _, _, ref_b = scipy_targets(labels.numpy(), 4, 2.0, 8.0, MU0, (1.0, 1.0, 1.0))
    out = targets_ext.boundary_map(labels.to(device), 4)
    assert out.dtype == torch.bool and out.shape == (2, 3, *spatial)
    assert ref_b.any()
    np.testing.assert_array_equal(out.cpu().numpy(), ref_b)


def test_cpu_threads_give_identical_results():
    _skip_unless("cpu")
    labels = torch.stack([blob_labels((11, 20, 24), 3) for _ in range(2)])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = targets_ext.make_targets(labels, 3, 2.0, 8.0, MU0, (25.0, 4.0))
        torch.set_num_threads(max(2, threads))
        many = targets_ext.make_targets(labels, 3, 2.0, 8.0, MU0, (25.0, 4.0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_opcheck_and_meta(device):
    labels = blob_labels((10, 12, 14), 3).to(device)
    args = (labels, 3, 2.0, 8.0, MU0, [25.0, 5.0], False)
    torch.library.opcheck(torch.ops.hmedn_fast.make_targets.default, args)
    torch.library.opcheck(torch.ops.hmedn_fast.boundary_map.default, (labels, 3))
    contour, weight = torch.ops.hmedn_fast.make_targets(labels.to("meta"), 3, 2.0, 8.0, MU0, [25.0, 5.0])
    assert contour.shape == labels.shape and weight.dtype == torch.float32
    assert torch.ops.hmedn_fast.boundary_map(labels.to("meta"), 3).shape == (10, 2, 12, 14)


def test_compiles_without_graph_break(device):
    labels = blob_labels((3, 12, 20), 3).to(device)

    def fn(lab):
        contour, weight = torch.ops.hmedn_fast.make_targets(lab, 3, 2.0, 8.0, 1.0, [25.0, 5.0], False)
        return contour * weight

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(labels), fn(labels), rtol=0, atol=0)


# ---- bad inputs ------------------------------------------------------------------------------------
def test_bad_label_dtype(device):
    labels = blob_labels((2, 8, 9), 3).to(device)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        targets_ext.make_targets(labels.float(), 3, 2.0, 8.0, MU0, (25.0, 25.0))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        targets_ext.boundary_map(labels.to(torch.bool), 3)


@pytest.mark.parametrize("bad_value", [-1, 3, 200])
def test_labels_out_of_range(device, bad_value):
    labels = blob_labels((2, 9, 10, 11), 3, dtype=torch.int32)
    labels[1, 4, 5, 6] = bad_value
    labels = labels.to(device)
    message = r"labels must lie in \[0, num_classes=3\), got values in \[" + str(min(0, bad_value)) + ", " + \
        str(max(2, bad_value)) + r"\]"
    with pytest.raises(ValueError, match=message):
        targets_ext.make_targets(labels, 3, 2.0, 8.0, MU0, (25.0, 25.0))
    with pytest.raises(ValueError, match=message):
        targets_ext.boundary_map(labels, 3)


@pytest.mark.parametrize("shape", [(5, 6), (2, 3, 4, 5, 6), (4,)])
def test_wrong_ndim(device, shape):
    labels = torch.randint(0, 3, shape, device=device)
    with pytest.raises(ValueError, match=r"labels must have shape \(N, H, W\) or \(N, D, H, W\)"):
        targets_ext.make_targets(labels, 3, 2.0, 8.0, MU0, (25.0, 25.0))
    with pytest.raises(ValueError, match=r"labels must have shape"):
        targets_ext.boundary_map(labels, 3)


@pytest.mark.parametrize("shape", [(0, 5, 6), (2, 0, 6), (2, 4, 5, 0)])
def test_empty_labels(device, shape):
    labels = torch.zeros(shape, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="labels must not be empty"):
        targets_ext.make_targets(labels, 3, 2.0, 8.0, MU0, (25.0, 25.0))
    with pytest.raises(ValueError, match="labels must not be empty"):
        targets_ext.boundary_map(labels, 3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_classes": 1, "mu": ()}, "num_classes must be >= 2"),
        ({"mu": (25.0,)}, "mu must hold num_classes - 1 = 2"),
        ({"mu": (25.0, float("nan"))}, "mu must be finite"),
        ({"sigma_contour": 0.0}, "sigma_contour must be a finite number > 0"),
        ({"sigma_weight": -2.0}, "sigma_weight must be a finite number > 0"),
        ({"sigma_weight": float("inf")}, "sigma_weight must be a finite number > 0"),
        ({"mu0": float("nan")}, "mu0 must be finite"),
    ],
)
def test_bad_parameters(device, kwargs, match):
    labels = blob_labels((2, 8, 9), 3).to(device)
    args = {"num_classes": 3, "sigma_contour": 2.0, "sigma_weight": 8.0, "mu0": MU0, "mu": (25.0, 25.0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        targets_ext.make_targets(labels, **args)


def test_unavailable_reasons():
    cpu_labels = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="backend must be 'cpu' or 'cuda'"):
        targets_ext.unavailable("triton", cpu_labels)
    if targets_ext.unavailable("cpu", cpu_labels) is None:  # extension built: CPU tensors never go to CUDA
        assert targets_ext.unavailable("cuda", cpu_labels) is not None
    if torch.cuda.is_available():
        assert "needs CPU tensors" in targets_ext.unavailable("cpu", cpu_labels.cuda())


# ---- CUDA only -------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_unchecked_labels_stay_finite():
    _skip_unless("cuda")
    labels = blob_labels((2, 9, 10, 11), 3).cuda()
    labels[0, 3, 3, 3] = 7
    contour, weight = targets_ext.make_targets(labels, 3, 2.0, 8.0, MU0, (25.0, 5.0), check_labels=False)
    assert torch.isfinite(contour).all() and torch.isfinite(weight).all()


@pytest.mark.cuda
@pytest.mark.parametrize("batch,spatial", [(2, (128, 128, 128)), (10, (208, 144))])
def test_cuda_benchmark_shapes_match_reference(batch, spatial):
    _skip_unless("cuda")
    labels = torch.stack([blob_labels(spatial, 3) for _ in range(batch)]).cuda()
    for mu in [(25.0, 25.0), (25.0, 10.0)]:
        contour, weight = targets_ext.make_targets(labels, 3, 2.0, 8.0, MU0, mu)
        ref_c, ref_w = reference.make_targets(labels, 3, 2.0, 8.0, MU0, mu)
        assert_targets_close(contour, weight, ref_c, ref_w, MU0, mu)


@pytest.mark.cuda
def test_cuda_large_sigma_and_limits():
    _skip_unless("cuda")
    labels = blob_labels((20, 30, 40), 3).cuda()
    mu = (25.0, 6.0)
    ref_c, ref_w, _ = scipy_targets(labels.cpu().numpy(), 3, 5.5, 20.0, MU0, mu)
    contour, weight = targets_ext.make_targets(labels, 3, 5.5, 20.0, MU0, mu)
    assert_targets_close(contour, weight, ref_c, ref_w, MU0, mu)
    with pytest.raises(ValueError, match="use the cpu backend"):
        targets_ext.make_targets(labels, 3, 2.0, 40.0, MU0, mu)


def _poison_cuda_cache() -> None:
    """Fill freed blocks of PyTorch's CUDA caching allocator (small and large pools) with NaN, so that
    outputs and workspace allocated next start as NaN: an element the kernels never write, or a
    workspace value read before it was written, shows up as a mismatch."""
    blocks = [torch.full((2**17,), float("nan"), device="cuda") for _ in range(64)]  # 512 KiB: small pool
    blocks.append(torch.full((2**25,), float("nan"), device="cuda"))  # 128 MiB: large pool
    del blocks
    assert torch.isnan(torch.empty(2**17, device="cuda")).all()


@pytest.mark.cuda
@pytest.mark.parametrize("spatial", [(40, 70, 45), (64, 64, 64), (3, 100, 77), (150, 96)])
@pytest.mark.parametrize("mu", [(25.0, 25.0), (25.0, 0.0)])
def test_cuda_sparse_boundaries_poisoned_outputs(spatial, mu):
    """The zero-skipping passes: boundaries in one small region (most row chunks, column windows and
    tiles empty), a sample without any boundary, rows not a multiple of the 32-voxel chunk (45, 77,
    and 45 x 70 planes), a class weight of 0 (a field with boundaries but zero values); outputs and
    workspace start as NaN."""
    _skip_unless("cuda")
    gen = torch.Generator().manual_seed(11)
    labels = torch.zeros((3, *spatial), dtype=torch.int64)
    corner = tuple(slice(s // 5, s // 5 + max(2, s // 6)) for s in spatial)
    labels[0][corner] = blob_labels(labels[0][corner].shape, 3, generator=gen)
    labels[1][tuple(slice(0, 2) for _ in spatial)] = 2  # a corner block touching the image edges
    # sample 2: background only, no boundary
    ref_c, ref_w, ref_b = scipy_targets(labels.numpy(), 3, 2.0, 8.0, MU0, mu)
    assert 0 < ref_b[0].mean() < 0.01 and ref_b[2].sum() == 0
    _poison_cuda_cache()
    contour, weight = targets_ext.make_targets(labels.cuda(), 3, 2.0, 8.0, MU0, mu)
    assert_targets_close(contour, weight, ref_c, ref_w, MU0, mu)
    assert torch.all(contour[2] == 0) and torch.all(weight[2] == MU0)


@pytest.mark.cuda
@pytest.mark.parametrize("spatial", [(300, 12, 40), (3, 270, 45), (530, 37)])
@pytest.mark.parametrize("mu", [(25.0, 25.0), (25.0, 4.0)])
def test_cuda_long_axes_match_scipy(spatial, mu):
    """Axes longer than one shared-memory strip (256) are filtered in tiles with reflected halo rows:
    D = 300 (3D), H = 270 (3D), H = 530 (2D); outputs and workspace start as NaN."""
    _skip_unless("cuda")
    labels = torch.stack([blob_labels(spatial, 3, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    ref_c, ref_w, _ = scipy_targets(labels.numpy(), 3, 2.0, 8.0, MU0, mu)
    _poison_cuda_cache()
    contour, weight = targets_ext.make_targets(labels.cuda(), 3, 2.0, 8.0, MU0, mu)
    assert_targets_close(contour, weight, ref_c, ref_w, MU0, mu)
