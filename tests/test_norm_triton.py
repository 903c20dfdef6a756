"""Fused norm (+ residual) + ReLU: Triton backend against the PyTorch reference (F.batch_norm / instance_norm /
group_norm), forward, gradients and running statistics, NC* and channels-last, 2D and 3D; the lean residual
block on the Triton backend against eager autograd; input errors.

On CPU the kernels run under ``TRITON_INTERPRET=1``, which must be set before triton is imported:
``test_interpreter_suite`` reruns this file in a subprocess with it set (the interpreted tests are skipped in
the parent process). GPU tests are marked ``cuda``.
"""
from __future__ import annotations

import os

import pytest
import torch

from hmedn_fast.ops.norm_act import norm_act, norm_act_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess")
not_interpreted = pytest.mark.skipif(INTERPRET, reason="parent-process test")


@not_interpreted
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


def make(shape, kind, channels_last, residual, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (1.5 * torch.randn(shape, generator=g) + 0.3).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    w = (torch.rand(c, generator=g) + 0.5).to(device)
    b = (0.3 * torch.randn(c, generator=g)).to(device)
    r = torch.randn(shape, generator=g).to(device, dtype) if residual else None
    stats = ((0.1 * torch.randn(c, generator=g)).to(device), (torch.rand(c, generator=g) + 0.5).to(device))
    return x, w, b, r, stats


def compare(shape, kind, channels_last, residual, training=True, dtype=torch.float32, groups=2, relu=True,
            device="cpu", rtol=1e-4):
    x, w, b, r, (rm, rv) = make(shape, kind, channels_last, residual, dtype, device)
    running = kind == "batch"
    results = []
    for backend in ("triton", "reference"):
        # the reference runs in float32 on the same (rounded) values: a bfloat16 reference would round the
        # pre-activation before its ReLU and flip the gradient mask of near-zero elements
        cast = (lambda t: t) if backend == "triton" else (lambda t: t.float())
        leaves = [cast(t).clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
        stats = (rm.clone(), rv.clone()) if running else (None, None)
        y = norm_act(leaves[0], leaves[1], leaves[2], kind=kind, num_groups=groups, residual=leaves[3], relu=relu,
                     running_mean=stats[0], running_var=stats[1], training=training, backend=backend)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        y.backward(gy.to(y.dtype))
        results.append([y] + [t.grad for t in leaves if t is not None] + [s for s in stats if s is not None])
    assert results[0][0].is_contiguous() == x.is_contiguous() and results[0][0].dtype == dtype
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=rtol * scale)


@interpreted
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("shape,channels_last", [((2, 6, 5, 7), False), ((2, 6, 5, 7), True),
                                                 ((2, 4, 3, 5, 6), True), ((1, 70, 3, 4, 45), False)])
def test_triton_matches_reference(poisoned, kind, shape, channels_last):
    compare(shape, kind, channels_last, residual=True)


@interpreted
@pytest.mark.parametrize("case", [dict(residual=False), dict(relu=False, residual=True),
                                  dict(training=False, residual=True), dict(kind="group", groups=1, residual=False)])
def test_triton_variants(poisoned, case):
    kind = case.pop("kind", "batch")
    compare((3, 8, 6, 5), kind, False, **case)


@interpreted
def test_triton_bfloat16(poisoned):
    compare((2, 8, 4, 5, 6), "batch", True, residual=True, dtype=torch.bfloat16, rtol=2e-2)


@interpreted
def test_triton_handles_expanded_upstream_gradient():
    x, w, b, r, _ = make((2, 4, 5, 6), "instance", True, True)
    x.requires_grad_()
    norm_act(x, w, b, kind="instance", residual=r, backend="triton").sum().backward()  # dy is a stride-0 view
    x2 = x.detach().clone().requires_grad_()
    norm_act_reference(x2, w, b, kind="instance", residual=r).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


@interpreted
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


@not_interpreted
@pytest.mark.parametrize("call,err,match", [
    (lambda x, w: norm_act(x, w, w, kind="layer"), ValueError, "kind must be one of"),
    (lambda x, w: norm_act(x, w[:3], w), ValueError, "weight must have shape"),
    (lambda x, w: norm_act(x, w, w, kind="group", num_groups=3), ValueError, "num_groups"),
    (lambda x, w: norm_act(x, w, w, residual=x[:1]), ValueError, "residual must have"),
    (lambda x, w: norm_act(x, w, w, training=False), ValueError, "running_mean and running_var"),
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
@pytest.mark.parametrize("mode", ["lean", "blocks"])
def test_cuda_pathway_modes_match_eager(mode):
    from hmedn_fast.nn import HRPathway
    torch.manual_seed(0)
    ref = HRPathway(16, 32, num_blocks=3, dilations=(2, 4), num_classes=4, spatial_dims=3).cuda()
    other = HRPathway(16, 32, num_blocks=3, dilations=(2, 4), num_classes=4, spatial_dims=3, checkpoint=mode).cuda()
    other.load_state_dict(ref.state_dict())
    x = torch.randn(1, 16, 32, 32, 32, device="cuda")
    torch.backends.cudnn.deterministic = True
    grads = []
    for path in (ref, other):
        xi = x.clone().requires_grad_()
        feats, logits = path(xi)
        (feats.square().mean() + logits.square().mean()).backward()
        grads.append([feats, xi.grad] + [p.grad for p in path.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
