"""Fused norm (+ residual) + ReLU: Triton backend against the PyTorch reference (F.batch_norm / instance_norm /
group_norm), forward, gradients and running statistics, NC* and channels-last, 2D and 3D; the lean residual
block on the Triton backend against eager autograd; input errors.

On CPU the kernels run under ``TRITON_INTERPRET=1``, which must be set before triton is imported:
``test_interpreter_suite`` reruns this file in a subprocess with it set (the interpreted tests are skipped in
the parent process). GPU tests are marked ``cuda``.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

from hmedn_fast.ops.norm_act import norm_act, norm_act_reference



@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element a kernel fails to write shows."""
    from hmedn_fast.ops.triton import norm as kernels
    nan = float("nan")
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(kernels.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(nan))
    monkeypatch.setattr(kernels.torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(nan))


@pytest.fixture
def small_tiles(monkeypatch):
    """Few reduce programs (chunks of several BLOCK_S) and small stats tiles (several combination steps)."""
    from hmedn_fast.ops.triton import norm as kernels
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 8)
    monkeypatch.setattr(kernels, "STATS_TILE", 8)
    kernels.geometry.cache_clear()
    yield
    kernels.geometry.cache_clear()


def make(shape, channels_last, residual, dtype=torch.float32, device="cpu", seed=0, loc=0.3, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (scale * torch.randn(shape, generator=g, dtype=torch.float64) + loc).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    w = (torch.rand(c, generator=g) + 0.5).to(device)
    b = (0.3 * torch.randn(c, generator=g)).to(device)
    r = torch.randn(shape, generator=g).to(device, dtype) if residual else None
    stats = ((0.1 * torch.randn(c, generator=g)).to(device), (torch.rand(c, generator=g) + 0.5).to(device))
    return x, w, b, r, stats


def compare(shape, kind, channels_last, residual, training=True, dtype=torch.float32, groups=2, relu=True,
            device="cpu", rtol=1e-4, running=None, affine=True, residual_grad=True, momentum=0.1, loc=0.3,
            scale=1.5):
    """Triton forward, every gradient and the updated running statistics against the reference in float64 on
    the same (rounded) values. ``running`` defaults to "batch" kinds.

    The reference's ReLU is applied by hand: where the float64 pre-activation is within ``1e-5`` (relative) of
    zero, float32 rounding may put it on either side, and the mask there is taken from the Triton output so
    that one such element cannot flip a weight-gradient sum; elsewhere it is the reference's own."""
    x, w, b, r, (rm, rv) = make(shape, channels_last, residual, dtype, device, loc=loc, scale=scale)
    if not affine:
        w = b = None
    running = kind == "batch" if running is None else running
    gy = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    results = []
    for backend in ("triton", "reference"):
        cast = (lambda t: t) if backend == "triton" else (lambda t: t.double())
        grads = (True, True, True, residual_grad)
        leaves = [cast(t).clone().requires_grad_(need) if t is not None else None
                  for t, need in zip((x, w, b, r), grads)]
        stats = (cast(rm).clone(), cast(rv).clone()) if running else (None, None)
        y = norm_act(leaves[0], leaves[1], leaves[2], kind=kind, num_groups=groups, residual=leaves[3],
                     relu=relu and backend == "triton", running_mean=stats[0], running_var=stats[1],
                     training=training, momentum=momentum, backend=backend)
        if relu and backend == "reference":
            ambiguous = y.detach().abs() <= 1e-5 * y.detach().abs().max()
            y = y * torch.where(ambiguous, results[0][0].detach() > 0, y.detach() > 0)
        y.backward(cast(gy))
        results.append([y] + [t.grad for t in leaves if t is not None and t.requires_grad]
                       + [s for s in stats if s is not None])
    got_y = results[0][0]
    assert got_y.stride() == x.stride() and got_y.dtype == dtype
    assert len(results[0]) == len(results[1])
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        scale_ = want.abs().max().item()
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale_)


LAYOUTS = [((2, 6, 5, 7), False), ((2, 6, 5, 7), True), ((2, 4, 3, 5, 6), False), ((2, 4, 3, 5, 6), True),
           ((1, 70, 3, 4, 45), False), ((3, 70, 2, 3, 9), True)]


@pytest.mark.interpreted
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("shape,channels_last", LAYOUTS)
def test_triton_matches_reference(poisoned, kind, shape, channels_last):
    compare(shape, kind, channels_last, residual=True)


@pytest.mark.interpreted
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("shape,channels_last", [((2, 8, 4, 5), True), ((2, 8, 3, 4, 5), False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(poisoned, kind, shape, channels_last, dtype):
    compare(shape, kind, channels_last, residual=True, dtype=dtype, groups=4, rtol=2e-2)


@pytest.mark.interpreted
@pytest.mark.parametrize("case", [dict(residual=False), dict(relu=False, residual=True),
                                  dict(residual=True, residual_grad=False), dict(residual=True, affine=False),
                                  dict(residual=False, relu=False, affine=False)])
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
def test_triton_variants(poisoned, kind, case):
    compare((3, 8, 6, 5), kind, False, **case)


@pytest.mark.interpreted
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_group_counts(poisoned, groups, channels_last):
    compare((2, 8, 3, 4, 5), "group", channels_last, residual=True, groups=groups)


@pytest.mark.interpreted
@pytest.mark.parametrize("groups", [2, 5])
def test_triton_wide_groups(poisoned, groups):
    compare((2, 40, 3, 7), "group", True, residual=True, groups=groups)  # 20 / 8 channels per group


@pytest.mark.interpreted
@pytest.mark.parametrize("kind", ["batch", "instance"])
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.25])
def test_triton_running_statistics_update(poisoned, kind, momentum):
    """Updated running_mean / running_var (unbiased variance, momentum; averaged over N for instance norm) equal
    F.batch_norm's / F.instance_norm's (compare includes them)."""
    compare((3, 6, 5, 4, 3), kind, True, residual=True, running=True, momentum=momentum)


@pytest.mark.interpreted
@pytest.mark.parametrize("kind", ["batch", "instance"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_running_statistics_eval(poisoned, kind, channels_last):
    compare((2, 6, 5, 7), kind, channels_last, residual=True, training=False, running=True)


@pytest.mark.interpreted
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("shape,channels_last", [((2, 6, 5, 7, 11), False), ((3, 20, 9, 31), True)])
def test_triton_long_chunks_small_tiles(poisoned, small_tiles, kind, shape, channels_last):
    compare(shape, kind, channels_last, residual=True, running=kind != "group", groups=2)


@pytest.mark.interpreted
@pytest.mark.parametrize("kind", ["batch", "group"])
def test_triton_large_mean_many_chunks(poisoned, small_tiles, kind):
    """|mean| >> std over many chunks of a large S: float32 chunk statistics must not cancel. Without the ReLU:
    float32 rounding of x - mean at |x| ~ 1000 (~5e-5) exceeds compare's band of ambiguous pre-activations."""
    compare((2, 4, 64, 96), kind, False, residual=True, relu=False, loc=1000.0, scale=1.0, groups=2)


@pytest.mark.interpreted
@pytest.mark.parametrize("kind,training", [("batch", True), ("instance", True), ("group", True), ("batch", False)])
def test_triton_launches_and_torch_ops(monkeypatch, kind, training):
    """Forward: 3 kernel launches (2 with running statistics), backward: 3, and no torch op beside them but the
    allocation of their outputs (the kernels themselves are stubbed out: only the host side is observed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hmedn_fast.ops.triton import norm as kernels
    launches, ops = [], []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __call__(self, grid, *args, **constexprs):
            launches.append(self.name)

    for name in ("_REDUCE", "_STATS", "_GRAD_STATS", "_FORWARD", "_BACKWARD"):
        monkeypatch.setattr(kernels, name, Stub(name))

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    x, w, b, r, (rm, rv) = make((2, 4, 3, 4, 5), True, True)
    x, w, b, r = (t.requires_grad_() for t in (x, w, b, r))
    gy = torch.randn(x.shape).to(memory_format=torch.channels_last_3d)
    with Record():
        y = norm_act(x, w, b, kind=kind, residual=r, running_mean=rm, running_var=rv, training=training,
                     backend="triton")
    assert launches == (["_REDUCE"] if training else []) + ["_STATS", "_FORWARD"]
    assert set(ops) <= {"aten.empty", "aten.empty_like"}, ops
    launches.clear()
    ops.clear()
    with Record():
        torch.autograd.grad(y, (x, w, b, r), gy)
    assert launches == ["_REDUCE", "_GRAD_STATS", "_BACKWARD"]
    assert set(ops) <= {"aten.empty", "aten.empty_like"}, ops


@pytest.mark.interpreted
def test_triton_residual_of_another_dtype(poisoned):
    """A float32 residual (block input) beside a bfloat16 pre-activation (autocast conv output): the output is
    float32 (as ``x + residual``, the reference's), each gradient in its input's dtype."""
    x, w, b, r, _ = make((2, 4, 3, 5, 6), True, True, dtype=torch.bfloat16)
    r = r.float().requires_grad_()
    x.requires_grad_()
    y = norm_act(x, w, b, kind="group", num_groups=2, residual=r, backend="triton")
    gy = torch.randn(y.shape, dtype=y.dtype)
    y.backward(gy)
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    want = norm_act_reference(x64, w.double(), b.double(), kind="group", num_groups=2, residual=r64)
    want.backward(gy.double())
    same_dtypes = norm_act_reference(x.detach(), w, b, kind="group", num_groups=2, residual=r.detach())
    assert y.dtype == same_dtypes.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32
    for got, ref in ((y, want), (x.grad, x64.grad), (r.grad, r64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.interpreted
def test_triton_handles_expanded_upstream_gradient():
    x, w, b, r, _ = make((2, 4, 5, 6), True, True)
    x.requires_grad_()
    norm_act(x, w, b, kind="instance", residual=r, backend="triton").sum().backward()  # dy is a stride-0 view
    x2 = x.detach().clone().requires_grad_()
    norm_act_reference(x2, w, b, kind="instance", residual=r).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_accumulates_into_a_channel_slice(dtype):
    """``backward(..., accumulate=buf[:, :C])`` adds dx to a channel slice of a wider channels-last buffer in
    float32 with one rounding: equals ``buf + dx`` computed apart (exactly in float32 and within one rounding of
    the buffer's dtype in bfloat16), leaves the other channels alone, returns the slice; bad slices raise."""
    from hmedn_fast.ops.triton import norm as kernels
    x, w, b, _, _ = make((2, 5, 3, 4, 6), True, False, dtype=dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    buf = torch.randn(2, 9, 3, 4, 6, generator=torch.Generator().manual_seed(4)).to(
        dtype=dtype, memory_format=torch.channels_last_3d)
    xf, xs = kernels.flat(x)
    geo = kernels.geometry(tuple(x.shape), xs, None, "batch", 1, True)
    _, coef = kernels.forward(geo, xf, None, w, b, None, None, 1e-5, 0.1, True, True, False)
    dx, dw, db, _ = kernels.backward(geo, xf, None, dy, w, coef, True, True, True, w.dtype, False)
    before = buf.clone()
    out, dw2, db2, _ = kernels.backward(geo, xf, None, dy, w, coef, True, True, True, w.dtype, False,
                                        accumulate=buf[:, :5])
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:, 5:], before[:, 5:]) and torch.equal(dw2, dw) and torch.equal(db2, db)
    want = before[:, :5].float() + dx.float()
    tol = 0 if dtype == torch.float32 else 2 * 2.0**-8 * want.abs().max().item()  # dx's own rounding + one
    torch.testing.assert_close(buf[:, :5].float(), want, rtol=0, atol=tol)
    for bad, kw in ((buf[:, :4], {}), (buf[:, :5, :, :2], {}), (buf[:, :5].transpose(3, 4), {})):
        with pytest.raises(ValueError, match="accumulate must have"):
            kernels.backward(geo, xf, None, dy, w, coef, True, True, False, None, False, accumulate=bad)
    with pytest.raises(ValueError, match="need_r"):
        kernels.backward(geo, xf, xf, dy, w, coef, True, True, False, None, True, accumulate=buf[:, :5])


def chunk_statistics(x: torch.Tensor, split: int) -> torch.Tensor:
    """(N, split, 2, C) float32: each channel's mean and M2 over ``split`` equal chunks of the flattened spatial
    samples, computed in float64 (what a convolution's epilogue or the reduce pass hands the statistics kernel)."""
    v = x.double().flatten(2).unflatten(2, (split, -1))  # (N, C, split, S / split)
    mean = v.mean(3)
    m2 = (v - mean[..., None]).square().sum(3)
    return torch.stack([mean, m2], 2).permute(0, 3, 2, 1).float().contiguous()


@pytest.mark.interpreted
@pytest.mark.parametrize("split", [1, 4, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_forward_with_precomputed_chunk_statistics(split, dtype):
    """``forward(..., part=...)``: statistics reduced elsewhere (any equal chunks) give the output, coefficients and
    running statistics of the forward's own reduce pass; part of another shape, a split that does not divide S, or
    running statistics are refused before any launch."""
    from hmedn_fast.ops.triton import norm as kernels
    x, w, b, _, (rm, rv) = make((2, 5, 3, 4, 6), True, False, dtype=dtype)
    x = x * 3 + 1.5  # a mean away from 0
    xf, xs = kernels.flat(x)
    geo = kernels.geometry(tuple(x.shape), xs, None, "batch", 1, True)
    runs = []
    for part in (None, chunk_statistics(xf, split)):
        m, v = torch.zeros(5), torch.ones(5)
        y, coef = kernels.forward(geo, xf, None, w, b, m, v, 1e-5, 0.1, True, True, True, part=part)
        runs.append((y, coef, m, v))
    for got, want in zip(runs[1], runs[0]):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-5 * want.float().abs().max().item())
    good = chunk_statistics(xf, split)
    for bad in (good[:1], good[..., :4], chunk_statistics(xf, 8)[:, :7].contiguous(), good.double()):
        with pytest.raises(ValueError, match="part must be float32"):
            kernels.forward(geo, xf, None, w, b, None, None, 1e-5, 0.1, True, True, False, part=bad)
    eval_geo = kernels.geometry(tuple(x.shape), xs, None, "batch", 1, False)
    with pytest.raises(ValueError, match="batch statistics"):
        kernels.forward(eval_geo, xf, None, w, b, rm, rv, 1e-5, 0.1, True, False, False, part=good)


@pytest.mark.interpreted
@pytest.mark.parametrize("mode", ["lean", "blocks"])
def test_lean_block_on_triton_matches_eager(monkeypatch, mode):
    from hmedn_fast.nn import ResidualDilatedBlock
    ref = ResidualDilatedBlock(4, (1, 2), spatial_dims=3)
    with torch.no_grad():
        ref.norm1.weight.uniform_(0.5, 1.5)
        ref.norm2.bias.normal_(0, 0.3)
    lean = ResidualDilatedBlock(4, (1, 2), spatial_dims=3, checkpoint=mode)
    lean.load_state_dict(ref.state_dict())
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    x = torch.randn(2, 4, 4, 5, 6)
    grads = []
    for block in (ref, lean):
        xi = x.clone().requires_grad_()
        block(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in block.parameters()] + list(block.buffers()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.not_interpreted
@pytest.mark.parametrize("call,err,match", [
    (lambda x, w: norm_act(x, w, w, kind="layer"), ValueError, "kind must be one of"),
    (lambda x, w: norm_act(x, w[:3], w), ValueError, "weight must have shape"),
    (lambda x, w: norm_act(x, w, w, kind="group", num_groups=3), ValueError, "num_groups"),
    (lambda x, w: norm_act(x, w, w, residual=x[:1]), ValueError, "residual must have"),
    (lambda x, w: norm_act(x, w, w, training=False), ValueError, "running_mean and running_var"),
    (lambda x, w: norm_act(x, w, w, running_mean=w), ValueError, "given together"),
    (lambda x, w: norm_act(x, w.to("meta"), w), ValueError, "weight must be on x's device"),
    (lambda x, w: norm_act(x, w, w, residual=x.to("meta")), ValueError, "residual must be on x's device"),
    (lambda x, w: norm_act(x[:, :, :1, :1], w, w, kind="instance"), ValueError, "more than 1 value per channel"),
    (lambda x, w: norm_act(x[:1, :, :1, :1], w, w), ValueError, "more than 1 value per channel"),
    (lambda x, w: norm_act(x.long(), w, w), TypeError, "floating-point"),
    (lambda x, w: norm_act(x[0, 0], w, w), ValueError, "at least one spatial"),
    (lambda x, w: norm_act("x", w, w), TypeError, "x must be a torch.Tensor"),
    (lambda x, w: norm_act(x, w, w, backend="triton"), RuntimeError, "TRITON_INTERPRET"),
])
def test_bad_inputs(call, err, match):
    with pytest.raises(err, match=match):
        call(torch.randn(2, 4, 5, 6), torch.ones(4))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_pathway_shapes(kind, dtype, rtol):
    compare((1, 32, 64, 64, 64), kind, True, residual=True, dtype=dtype, device="cuda", rtol=rtol, groups=8)
    compare((10, 56, 36, 52), kind, False, residual=True, dtype=dtype, device="cuda", rtol=rtol, groups=8)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,running", [("batch", True), ("instance", True), ("instance", False), ("group", False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_repeat_launches(kind, running, channels_last):
    """The second call of a configuration launches the cached compiled kernels directly (FastLauncher): it must
    give what the first gave, training and eval, with running statistics, NC* and channels-last."""
    for _ in range(2):
        compare((3, 24, 20, 22, 18), kind, channels_last, residual=True, running=running, groups=4, device="cuda")
        if running:
            compare((3, 24, 20, 22, 18), kind, channels_last, residual=True, running=True, training=False,
                    device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["lean", "blocks"])
def test_cuda_pathway_modes_match_eager(mode, monkeypatch):
    """fp32 without TF32: with TF32 convolutions (PyTorch's default for cuDNN) a last-bit difference between
    BatchNorm kernels (the lean path calls ``native_batch_norm``, eager may pick cuDNN's) is amplified to ~5e-4
    of the features' range over three blocks, which says nothing about the lean path. The lean blocks' norm
    engine is forced to ATen's here (on CUDA they default to the Triton kernels, whose last bits differ more from
    cuDNN's: a flipped ReLU mask of one near-zero activation then changes ~2 % of the input gradient's elements by
    1e-3 of its range; ``tests/test_lean_blocks_triton.py`` compares that engine with eager flip-tolerantly)."""
    from hmedn_fast.nn import HRPathway
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "reference")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    ref = HRPathway(16, 32, num_blocks=3, dilations=(2, 4), num_classes=4, spatial_dims=3).cuda()
    other = HRPathway(16, 32, num_blocks=3, dilations=(2, 4), num_classes=4, spatial_dims=3, checkpoint=mode).cuda()
    other.load_state_dict(ref.state_dict())
    x = torch.randn(1, 16, 32, 32, 32, device="cuda")
    grads = []
    for path in (ref, other):
        xi = x.clone().requires_grad_()
        feats, logits = path(xi)
        (feats.square().mean() + logits.square().mean()).backward()
        grads.append([feats, xi.grad] + [p.grad for p in path.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.cuda
def test_cuda_automatic_choice_and_large_channels_last_batch_norm():
    """The automatic backend is Triton exactly for training-mode BatchNorm of large channels-last 3D CUDA tensors
    with autograd on; at such a shape (a distilling-pathway layer, bf16) Triton equals the float64 reference."""
    from hmedn_fast.ops.norm_act import TRITON_MIN_ELEMENTS, prefers_triton
    cl = torch.channels_last_3d
    big = torch.empty(1, 16, 128, 128, 128, device="cuda", dtype=torch.bfloat16).to(memory_format=cl)
    assert big.numel() >= TRITON_MIN_ELEMENTS and prefers_triton(big, "batch", True)
    assert not prefers_triton(big, "batch", False) and not prefers_triton(big, "instance", True)
    assert not prefers_triton(big.contiguous(), "batch", True)
    assert not prefers_triton(big[:, :, :8].contiguous(memory_format=cl), "batch", True)  # below the size
    with torch.no_grad():
        assert not prefers_triton(big, "batch", True)
    compare((1, 16, 128, 128, 128), "batch", True, residual=False, dtype=torch.bfloat16, device="cuda", rtol=2e-2)


@pytest.mark.parametrize("cls", ["dense", "conv_norm_relu"])
@pytest.mark.parametrize("norm_spec", ["batch", "instance", ("group", {"num_groups": 2})])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layers_through_norm_act_equal_plain_modules(cls, norm_spec, momentum):
    """DenseLayer and ConvNormReLU call norm + ReLU through norm_act: outputs, gradients, running statistics
    and num_batches_tracked equal the plain module chain relu(norm(.)) in float64, training then eval."""
    from hmedn_fast.nn.blocks import DenseLayer
    from hmedn_fast.nn.layers import ConvNormReLU
    torch.manual_seed(0)
    make_layer = (lambda: DenseLayer(6, 4, 3, norm_spec)) if cls == "dense" else (
        lambda: ConvNormReLU(3, 6, 4, 3, norm_spec=norm_spec))
    ours, plain = make_layer().double(), make_layer().double()
    plain.load_state_dict(ours.state_dict())
    for m in (ours, plain):
        for sub in m.modules():
            if hasattr(sub, "momentum") and isinstance(sub, nn.modules.batchnorm._NormBase):
                sub.momentum = momentum
    norm, act = (plain.norm, plain.conv) if cls == "dense" else (plain[1], plain[0])
    plain_forward = ((lambda x: act(torch.relu(norm(x)))) if cls == "dense" else
                     (lambda x: torch.relu(norm(act(x)))))
    x = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64)
    for training in (True, True, False):
        ours.train(training), plain.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), plain_forward(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
        ya.square().sum().backward(), yb.square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
        for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
        for (name, a), b in zip(ours.named_buffers(), plain.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
        x = x * 1.3 + 0.2
