"""Difficulty-guided loss: public function + reference backend against a float64 NumPy formula (SPEC 3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit, logsumexp

from hmedn_fast.losses import DEFAULT_AUX_WEIGHT, HMEDNLoss
from hmedn_fast.models.output import SegmentationOutput
from hmedn_fast.ops import difficulty_guided_loss
from hmedn_fast.ops.reference import loss as reference
from hmedn_fast.targets import Targets, make_targets

LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LABEL_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]
# relative tolerance of gradients stored in the logits' dtype (one rounding of values of order 1/N)
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _up(a: np.ndarray, full: tuple[int, ...]) -> np.ndarray:
    """Nearest upsampling by integer factors of the trailing len(full) axes (np.repeat)."""
    for i, f in enumerate(full):
        axis = a.ndim - len(full) + i
        a = np.repeat(a, f // a.shape[axis], axis=axis)
    return a


def formula(logits, labels, weight=None, clog=None, ctgt=None, alpha=1.0, cw=None, ignore=None, reduction="mean"):
    """SPEC section 3 in float64 NumPy / SciPy. Returns (total, L_s, L_r) or the per-voxel map."""
    y = labels.long().numpy()
    full = y.shape[1:]
    z = _up(logits.double().numpy(), full)
    valid = np.ones(y.shape, bool) if ignore is None else y != ignore
    yc = np.where(valid, y, 0)
    w = np.ones(y.shape) if weight is None else weight.double().numpy().reshape(y.shape)
    if cw is not None:
        w = w * cw.double().numpy()[yc]
    nll = logsumexp(z, axis=1) - np.take_along_axis(z, yc[:, None], axis=1)[:, 0]
    seg = np.where(valid, w * nll, 0.0)
    ctr = np.zeros(y.shape)
    if clog is not None:
        r = _up(clog.double().numpy().reshape(y.shape[0], *logits.shape[2:]), full)
        ctr = np.where(valid, (expit(r) - ctgt.double().numpy().reshape(y.shape)) ** 2, 0.0)
    if reduction == "none":
        return seg + alpha * ctr
    n = max(int(valid.sum()), 1) if reduction == "mean" else 1
    return (seg.sum() + alpha * ctr.sum()) / n, seg.sum() / n, ctr.sum() / n


def formula_grad(logits, labels, weight=None, cw=None, ignore=None):
    """d L_s(mean) / d logits in float64 for same-resolution logits: (1/N) W nu (softmax - onehot)."""
    z = logits.double().numpy()
    y = labels.long().numpy()
    valid = np.ones(y.shape, bool) if ignore is None else y != ignore
    yc = np.where(valid, y, 0)
    w = np.ones(y.shape) if weight is None else weight.double().numpy().reshape(y.shape)
    if cw is not None:
        w = w * cw.double().numpy()[yc]
    w = np.where(valid, w, 0.0) / max(int(valid.sum()), 1)
    p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    onehot = np.moveaxis(np.eye(z.shape[1])[yc], -1, 1)
    return w[:, None] * (p - onehot)


def per_voxel_atol(logits, weight=None, cw=None, eps=2.0**-24):
    """Float32 absolute error bound of one voxel's ``W nu (logsumexp(z) - z[y])``: 8 ulp of max |lse|."""
    w = 1.0 if weight is None else float(weight.max())
    w *= 1.0 if cw is None else float(cw.max())
    return 8 * eps * (float(logits.abs().max()) + np.log(logits.shape[1]) + 1) * w


def make_inputs(shape=(2, 3, 5, 6), factor=1, label_dtype=torch.int64, ignore=None, dtype=torch.float32):
    """Random logits (N, K, *low), labels at factor x the logits' resolution, weight, contour pair."""
    n, k, *low = shape
    full = tuple(s * factor for s in low)
    logits = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, k, (n, *full)).to(label_dtype)
    if ignore is not None:
        labels[torch.rand(labels.shape) < 0.25] = ignore
    weight = 1 + 25 * torch.rand(n, *full)
    clog = 2 * torch.randn(n, 1, *low, dtype=torch.float64).to(dtype)
    ctgt = torch.rand(n, *full)
    return logits, labels, weight, clog, ctgt


# ----------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 4, 3, 4, 5), (3, 2, 1, 7)])
@pytest.mark.parametrize("factor", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_formula(shape, factor, reduction):
    logits, labels, weight, clog, ctgt = make_inputs(shape, factor, ignore=None)
    cw = 0.5 + torch.rand(shape[1])
    for kwargs in (
        {},
        dict(weight=weight),
        dict(weight=weight, contour_logits=clog, contour_target=ctgt, alpha=0.7, class_weight=cw),
    ):
        got = difficulty_guided_loss(logits, labels, reduction=reduction, backend="reference", **kwargs)
        want = formula(logits, labels, kwargs.get("weight"), kwargs.get("contour_logits"),
                       kwargs.get("contour_target"), kwargs.get("alpha", 1.0), kwargs.get("class_weight"),
                       reduction=reduction)
        want = want if reduction == "none" else want[0]
        assert got.dtype == torch.float32
        assert got.shape == labels.shape if reduction == "none" else got.ndim == 0
        # per voxel, lse - z[y] cancels in float32: error of a few ulp of |z| times the weight
        atol = per_voxel_atol(logits, kwargs.get("weight"), kwargs.get("class_weight"))
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=2e-6, atol=atol)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int64])
def test_ignore_index_counts_only_kept_voxels(label_dtype):
    logits, labels, weight, clog, ctgt = make_inputs((2, 4, 6, 7), 1, label_dtype, ignore=255)
    got = difficulty_guided_loss(logits, labels, weight, clog, ctgt, ignore_index=255, return_parts=True,
                                 backend="reference")
    want = formula(logits, labels, weight, clog, ctgt, ignore=255)
    np.testing.assert_allclose([float(g) for g in got], want, rtol=2e-6)
    # N counts kept voxels: the mean times N equals the sum
    total_sum = difficulty_guided_loss(logits, labels, weight, clog, ctgt, ignore_index=255, reduction="sum",
                                       backend="reference")
    n_kept = int((labels != 255).sum())
    assert 0 < n_kept < labels.numel()
    torch.testing.assert_close(got[0] * n_kept, total_sum, rtol=1e-6, atol=0)
    per_voxel = difficulty_guided_loss(logits, labels, weight, clog, ctgt, ignore_index=255, reduction="none",
                                       backend="reference")
    assert torch.all(per_voxel[labels == 255] == 0) and torch.all(per_voxel[labels != 255] > 0)


def test_ignore_index_outside_label_dtype_ignores_nothing():
    logits, labels, *_ = make_inputs(label_dtype=torch.uint8)
    got = difficulty_guided_loss(logits, labels, ignore_index=-100, backend="reference")
    np.testing.assert_allclose(float(got), formula(logits, labels)[0], rtol=2e-6)


def test_all_voxels_ignored_gives_zero_loss_and_zero_grad():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 4, 4), 7)
    loss = difficulty_guided_loss(logits, labels, ignore_index=7, backend="reference")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_dtype_combinations(dtype, label_dtype):
    logits, labels, weight, clog, ctgt = make_inputs((2, 4, 6, 5), 1, label_dtype, ignore=3, dtype=dtype)
    cw = 0.5 + torch.rand(4)
    logits.requires_grad_(True)
    loss = difficulty_guided_loss(logits, labels, weight, clog, ctgt, class_weight=cw, ignore_index=3,
                                  backend="reference")
    loss.backward()
    want = formula(logits.detach(), labels, weight, clog, ctgt, cw=cw, ignore=3)[0]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    np.testing.assert_allclose(loss.item(), want, rtol=1e-12 if dtype == torch.float64 else 2e-6)
    assert logits.grad.dtype == dtype
    want_grad = formula_grad(logits.detach(), labels, weight, cw, ignore=3)
    scale = np.abs(want_grad).max()
    np.testing.assert_allclose(logits.grad.double().numpy(), want_grad, rtol=0, atol=GRAD_RTOL[dtype] * scale)


def test_gradcheck_reference_float64():
    logits, labels, weight, clog, ctgt = make_inputs((2, 3, 3, 4), 2, ignore=1, dtype=torch.float64)
    cw = 0.5 + torch.rand(3, dtype=torch.float64)
    logits.requires_grad_(True)
    clog.requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        def fn(z, c, reduction=reduction):
            return difficulty_guided_loss(z, labels, weight, c, ctgt, alpha=0.6, class_weight=cw, ignore_index=1,
                                          reduction=reduction, backend="reference")

        assert torch.autograd.gradcheck(fn, (logits, clog), fast_mode=True)


def test_nearest_downsampled_logits_equal_upsampled_ones():
    logits, labels, weight, clog, ctgt = make_inputs((2, 3, 3, 2, 4), 2)
    up = torch.nn.functional.interpolate(logits, scale_factor=2, mode="nearest")
    up_c = torch.nn.functional.interpolate(clog, scale_factor=2, mode="nearest")
    for reduction in ("mean", "none"):
        got = difficulty_guided_loss(logits, labels, weight, clog, ctgt, reduction=reduction, backend="reference")
        want = difficulty_guided_loss(up, labels, weight, up_c, ctgt, reduction=reduction, backend="reference")
        torch.testing.assert_close(got, want)


def test_map_layouts_accepted():
    logits, labels, weight, clog, ctgt = make_inputs((2, 3, 5, 6))
    a = difficulty_guided_loss(logits, labels, weight, clog, ctgt, backend="reference")
    b = difficulty_guided_loss(logits, labels, weight[:, None], clog[:, 0], ctgt[:, None], backend="reference")
    c = difficulty_guided_loss(logits.to(memory_format=torch.channels_last), labels, weight, clog, ctgt,
                               backend="reference")
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


# ----------------------------------------------------------------------------------------------- errors
def _bad_cases():
    z = torch.randn(2, 3, 4, 5)
    y = torch.randint(0, 3, (2, 4, 5))
    nan_z = z.clone()
    nan_z[1, 2, 3, 4] = float("nan")
    c, ct = torch.randn(2, 1, 4, 5), torch.rand(2, 4, 5)
    nan_c = c.clone()
    nan_c[0, 0, 1, 1] = float("nan")
    neg = y.clone()
    neg[0, 1, 1] = -1
    return {
        "label >= K": ((z, torch.where(y == 1, 3, y)), {}, ValueError, r"labels must lie in \[0, 3\)"),
        "negative label": ((z, neg), {"ignore_index": 255}, ValueError, "labels must lie in"),
        "float labels": ((z, y.float()), {}, TypeError, "labels must have a dtype"),
        "shape mismatch": ((z, y[:, :3]), {}, ValueError, "labels must be"),
        "batch mismatch": ((z, y[:1]), {}, ValueError, "labels must be"),
        "NaN logits": ((nan_z, y), {}, ValueError, "logits contain NaN"),
        "NaN contour logits": ((z, y), {"contour_logits": nan_c, "contour_target": ct}, ValueError,
                               "contour_logits contain NaN"),
        "empty batch": ((z[:0], y[:0]), {}, ValueError, "logits must be non-empty"),
        "empty spatial": ((z[:, :, :0], y[:, :0]), {}, ValueError, "logits must be non-empty"),
        "one class": ((z[:, :1], y * 0), {}, ValueError, "K >= 2"),
        "integer logits": ((y[:, None].repeat(1, 3, 1, 1), y), {}, TypeError, "logits must have a dtype"),
        "logits ndim": ((z[0], y[0]), {}, ValueError, "logits must be"),
        "class_weight K": ((z, y), {"class_weight": torch.ones(4)}, ValueError, r"class_weight must have shape \(3,\)"),
        "device mix": ((z, y.to("meta")), {}, ValueError, "labels is on meta"),
        "device mix weight": ((z, y), {"weight": torch.ones(2, 4, 5, device="meta")}, ValueError, "weight is on meta"),
        "weight shape": ((z, y), {"weight": torch.ones(2, 4, 4)}, ValueError, "weight must have shape"),
        "contour alone": ((z, y), {"contour_logits": c}, ValueError, "given together"),
        "contour shape": ((z, y), {"contour_logits": c[..., :2], "contour_target": ct}, ValueError,
                          "contour_logits must have shape"),
        "alpha": ((z, y), {"alpha": -1.0}, ValueError, "alpha"),
        "alpha nan": ((z, y), {"alpha": float("nan")}, ValueError, "alpha"),
        "ignore_index float": ((z, y), {"ignore_index": 1.5}, TypeError, "ignore_index"),
        "reduction": ((z, y), {"reduction": "avg"}, ValueError, "reduction"),
        "parts with none": ((z, y), {"reduction": "none", "return_parts": True}, ValueError, "return_parts"),
        "backend": ((z, y), {"backend": "cuda"}, ValueError, "backend must be one of"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_before_computing(case, monkeypatch):
    args, kwargs, error, match = _bad_cases()[case]

    def must_not_run(*a, **k):
        raise AssertionError("the loss was computed for bad input")

    monkeypatch.setattr(reference, "difficulty_guided_loss", must_not_run)
    with pytest.raises(error, match=match):
        difficulty_guided_loss(*args, backend=kwargs.pop("backend", "reference"), **kwargs)


def test_negative_label_equal_to_ignore_index_is_accepted():
    logits, labels, *_ = make_inputs(label_dtype=torch.int32, ignore=-1)
    got = difficulty_guided_loss(logits, labels, ignore_index=-1, backend="reference")
    np.testing.assert_allclose(float(got), formula(logits, labels, ignore=-1)[0], rtol=2e-6)


def test_triton_backend_on_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits, labels, *_ = make_inputs()
    with pytest.raises(RuntimeError, match="triton"):
        difficulty_guided_loss(logits, labels, backend="triton")
    # automatic choice falls back to the reference
    np.testing.assert_allclose(float(difficulty_guided_loss(logits, labels)), formula(logits, labels)[0], rtol=2e-6)


def test_triton_older_than_3_3_falls_back_to_the_reference(monkeypatch):
    triton = pytest.importorskip("triton")
    from hmedn_fast.ops import loss as loss_mod

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the device check passes: only the version decides
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    loss_mod._triton_too_old.cache_clear()
    try:
        logits, labels, *_ = make_inputs()
        with pytest.raises(RuntimeError, match=r"triton >= 3\.3"):
            difficulty_guided_loss(logits, labels, backend="triton")
        got = difficulty_guided_loss(logits, labels)
        np.testing.assert_allclose(float(got), formula(logits, labels)[0], rtol=2e-6)
    finally:
        loss_mod._triton_too_old.cache_clear()


# ----------------------------------------------------------------------------------------------- HMEDNLoss
def _blob_labels(n: int, size: tuple[int, ...], k: int) -> torch.Tensor:
    """Random label maps of nested boxes, so that boundaries (and targets) are non-trivial."""
    labels = torch.zeros((n, *size), dtype=torch.int64)
    for i in range(n):
        for c in range(1, k):
            lo = [int(torch.randint(0, s // 2, ())) for s in size]
            hi = [lo_ + int(torch.randint(2, s - lo_ + 1, ())) for lo_, s in zip(lo, size)]
            labels[(i, *[slice(a, b) for a, b in zip(lo, hi)])] = c
    return labels


def _output(n=2, k=3, size=(12, 16), aux_factors=(2, 4), contour=True, dtype=torch.float32):
    seg = torch.randn(n, k, *size, dtype=dtype, requires_grad=True)
    ctr = torch.randn(n, 1, *size, dtype=dtype, requires_grad=True) if contour else None
    aux = [torch.randn(n, k, *[s // f for s in size], dtype=dtype, requires_grad=True) for f in aux_factors]
    return SegmentationOutput(seg, ctr, aux)


def test_hmedn_loss_matches_formula_with_targets_and_deep_supervision():
    labels = _blob_labels(2, (12, 16), 3)
    out = _output()
    cw = torch.tensor([0.5, 1.0, 2.0])
    crit = HMEDNLoss(3, alpha=0.8, aux_weights=(0.3, 0.7), class_weight=cw, backend="reference")
    total, parts = crit(out, labels)
    tg = make_targets(labels, 3)
    assert float(tg.weight.max()) > 1.5 and float(tg.contour.max()) == pytest.approx(1.0)
    main = formula(out.seg.detach(), labels, tg.weight, out.contour.detach(), tg.contour, 0.8, cw)
    aux = [formula(a.detach(), labels, tg.weight, cw=cw)[0] for a in out.aux]
    np.testing.assert_allclose(total.item(), main[0] + 0.3 * aux[0] + 0.7 * aux[1], rtol=2e-6)
    np.testing.assert_allclose([float(parts[k]) for k in ("seg", "contour", "aux0", "aux1")],
                               [main[1], main[2], *aux], rtol=2e-6)
    assert all(not p.requires_grad for p in parts.values())
    total.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (out.seg, out.contour, *out.aux))


def test_hmedn_loss_uses_given_targets_and_options():
    labels = _blob_labels(2, (8, 8, 8), 3)
    labels[:, :2] = 9
    out = _output(size=(8, 8, 8), aux_factors=(2,), contour=False)
    given = Targets(contour=torch.rand(2, 8, 8, 8), weight=1 + torch.rand(2, 8, 8, 8))
    total, parts = HMEDNLoss(3, ignore_index=9, backend="reference")(out, labels, given)
    want = formula(out.seg.detach(), labels, given.weight, ignore=9)[0]
    want_aux = formula(out.aux[0].detach(), labels, given.weight, ignore=9)[0]
    np.testing.assert_allclose(total.item(), want + DEFAULT_AUX_WEIGHT * want_aux, rtol=2e-6)
    assert set(parts) == {"seg", "aux0"}  # no contour head, no contour term
    # ignored voxels become background for the targets only; without weight map: plain CE
    crit = HMEDNLoss(3, ignore_index=9, use_weight_map=False, use_contour=False, backend="reference")
    total, _ = crit(SegmentationOutput(out.seg), labels)
    np.testing.assert_allclose(total.item(), formula(out.seg.detach(), labels, ignore=9)[0], rtol=2e-6)
    tg = crit.make_targets(labels)
    torch.testing.assert_close(tg.weight, make_targets(torch.where(labels == 9, 0, labels), 3).weight)


def test_hmedn_loss_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        HMEDNLoss(1)
    with pytest.raises(ValueError, match="aux_weights"):
        HMEDNLoss(3, aux_weights=-1.0)
    with pytest.raises(ValueError, match="class_weight"):
        HMEDNLoss(3, class_weight=[1.0, 2.0])
    labels = _blob_labels(2, (12, 16), 3)
    with pytest.raises(ValueError, match="aux_weights has 1 entries but the output has 2"):
        HMEDNLoss(3, aux_weights=[0.5], backend="reference")(_output(), labels)
    with pytest.raises(ValueError, match="num_classes=4"):
        HMEDNLoss(4, backend="reference")(_output(), labels)
    with pytest.raises(TypeError, match="SegmentationOutput"):
        HMEDNLoss(3, backend="reference")(torch.zeros(2, 3, 12, 16), labels)


def test_hmedn_loss_checks_every_head_in_one_read_back(monkeypatch):
    """check_values=True checks the labels once and every head's logits in one value check (one host
    synchronisation on CUDA), before the targets (whose own label read-back is skipped) and the loss terms (asked for
    none); check_values=False checks nothing. The loss equals the unchecked one."""
    import hmedn_fast.losses as losses

    seen, checks, loss_checks = [], [], []
    real_targets, real_check, real_loss = losses.make_targets, losses.check_input_values, losses.difficulty_guided_loss
    monkeypatch.setattr(losses, "make_targets", lambda *a, **kw: seen.append(kw["check_labels"]) or real_targets(*a, **kw))
    monkeypatch.setattr(losses, "check_input_values", lambda *a: checks.append(len(a[4])) or real_check(*a))
    monkeypatch.setattr(losses, "difficulty_guided_loss",
                        lambda *a, **kw: loss_checks.append(kw["check_values"]) or real_loss(*a, **kw))
    labels = _blob_labels(2, (12, 16), 3)
    out = _output()
    totals = [HMEDNLoss(3, backend="reference", check_values=check)(out, labels).total for check in (True, False)]
    assert seen == [False, False] and checks == [2] and loss_checks == [False] * 6
    assert torch.equal(totals[0], totals[1])


def test_hmedn_loss_value_errors_name_the_problem():
    """Bad labels and NaN in any head raise ValueError; a NaN in an aux map's partial last cell (left out of its
    term) does not."""
    labels = _blob_labels(2, (12, 16), 3)
    crit = HMEDNLoss(3, backend="reference")
    bad = labels.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="labels"):
        crit(_output(), bad)
    for head in ("seg", "contour", "aux"):
        out = _output()
        t = out.aux[1] if head == "aux" else getattr(out, head)
        with torch.no_grad():
            t[1, 0, 1, 2] = float("nan")
        with pytest.raises(ValueError, match="contain NaN"):
            crit(out, labels)
    seg = torch.randn(2, 3, 10, 16)
    aux = torch.randn(2, 3, 3, 4)  # factor 4: rows 0-1 are whole cells of the 10 label rows, row 2 is partial
    aux[:, :, 2] = float("nan")
    total = crit(SegmentationOutput(seg, None, [aux], aux_scales=[(4, 4)]), _blob_labels(2, (10, 16), 3)).total
    assert torch.isfinite(total)


def test_make_targets_without_label_check_still_checks_on_cpu():
    """check_labels=False only skips the check where it costs a synchronisation (CUDA); CPU labels stay checked."""
    labels = _blob_labels(1, (6, 6), 3)
    labels[0, 0, 0] = 5
    for backend in ("reference", None):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
            make_targets(labels, 3, backend=backend, check_labels=False)


@pytest.mark.cuda
def test_hmedn_loss_without_checks_never_synchronises():
    """With check_values=False a CUDA forward + backward (targets, fused loss, deep supervision) queues its work
    without waiting for the GPU: torch's sync debug mode turns any synchronisation into an error. Needs the CUDA
    targets backend (the reference targets always read the labels' range back)."""
    from hmedn_fast.ops import _ext

    if not _ext.has_cuda():
        pytest.skip("the C++/CUDA extension is not built with CUDA (pip install --no-build-isolation -e .)")
    labels = _blob_labels(2, (16, 16, 16), 3).cuda()
    out = _output(size=(16, 16, 16), aux_factors=(2,))
    seg, ctr, *aux = (t.detach().cuda().requires_grad_(True) for t in (out.seg, out.contour, *out.aux))
    crit = HMEDNLoss(3, check_values=False)
    ref = HMEDNLoss(3, check_values=True)(SegmentationOutput(seg, ctr, aux), labels).total
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = crit(SegmentationOutput(seg, ctr, aux), labels).total
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(total, ref)
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in (seg, ctr, *aux))


@pytest.mark.cuda
def test_hmedn_loss_checked_step_synchronises_once():
    """With check_values=True (the default) a CUDA step with two deep-supervision heads waits for the GPU once: the
    single value check's read-back (torch's sync debug mode warns at every synchronisation)."""
    import warnings

    from hmedn_fast.ops import _ext

    if not _ext.has_cuda():
        pytest.skip("the C++/CUDA extension is not built with CUDA (pip install --no-build-isolation -e .)")
    labels = _blob_labels(2, (16, 16, 16), 3).cuda()
    out = _output(size=(16, 16, 16), aux_factors=(2, 4))
    heads = SegmentationOutput(*(t.detach().cuda().requires_grad_(True) for t in (out.seg, out.contour)),
                               [t.detach().cuda().requires_grad_(True) for t in out.aux])
    crit = HMEDNLoss(3)
    crit(heads, labels)  # warm-up: compiles and caches outside the count
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            crit(heads, labels).total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
