"""Linear upsampling with the gather backward (hmedn_fast.ops.upsample): forward and input gradient against
F.interpolate's own autograd (float64, 2D and 3D, integer factors per axis incl. odd ones and 1, NC* and
channels-last), poisoned outputs, dispatch and input errors. The interpreted tests run in a TRITON_INTERPRET=1
subprocess (``test_interpreter_suite``); the GPU test is marked ``cuda``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hmedn_fast.ops.upsample import upsample_linear


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


def _reference(x, size):
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    xr = x.detach().clone().requires_grad_()
    y = F.interpolate(xr, size=size, mode=mode, align_corners=False)
    return xr, y


@pytest.mark.interpreted
@pytest.mark.parametrize("shape, factors", [
    ((2, 3, 4, 5, 3), (2, 2, 2)), ((1, 2, 3, 2, 4), (4, 1, 8)), ((1, 2, 2, 3, 5), (3, 5, 1)),
    ((2, 3, 5, 7), (2, 3)), ((1, 1, 1, 6), (4, 2)),
])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("grad_layout", ["nc", "channels_last", "cl_slice"])
def test_gather_backward_matches_interpolate_autograd(monkeypatch, shape, factors, channels_last, grad_layout):
    """The output gradient as NC*, channels-last, or a channel slice of a wider channels-last tensor (what the
    backward of torch.cat over channels-last side outputs passes on): the latter two are gathered in
    channels-last memory order and give a channels-last input gradient."""
    from hmedn_fast.ops.triton import upsample as kernels
    real_empty = torch.empty
    monkeypatch.setattr(kernels.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=fmt)
    size = tuple(s * f for s, f in zip(shape[2:], factors))
    xr, want = _reference(x, size)
    gy = torch.randn(want.shape, dtype=torch.float64)
    if grad_layout == "channels_last":
        gy = gy.to(memory_format=fmt)
    elif grad_layout == "cl_slice":
        wide = torch.randn((shape[0], shape[1] + 3, *size), dtype=torch.float64).to(memory_format=fmt)
        wide[:, 1:1 + shape[1]] = gy
        gy = wide[:, 1:1 + shape[1]]
    want.backward(gy)
    xt = x.detach().clone().requires_grad_()
    got = upsample_linear(xt, size, backend="triton")
    assert torch.equal(got, want)
    got.backward(gy)
    assert xt.grad.shape == x.shape and torch.isfinite(xt.grad).all()
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-12, atol=1e-12)
    from hmedn_fast.ops.triton.upsample import upsample_backward
    direct = upsample_backward(gy, factors)
    torch.testing.assert_close(direct, xr.grad, rtol=1e-12, atol=1e-12)
    if grad_layout != "nc" and shape[1] > 1:
        assert direct.is_contiguous(memory_format=fmt)
    else:
        assert direct.is_contiguous()


@pytest.mark.interpreted
def test_gather_backward_float32_and_bfloat16_input():
    """float32 gradients accumulate in float32; a bfloat16 input gets its gradient back in bfloat16."""
    x = torch.randn(1, 2, 3, 4, 5)
    xr, want = _reference(x, (6, 8, 20))
    gy = torch.randn(want.shape)
    want.backward(gy)
    xt = x.clone().requires_grad_()
    upsample_linear(xt, (6, 8, 20), backend="triton").backward(gy)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-6, atol=1e-6)
    xb = x.bfloat16().requires_grad_()
    upsample_linear(xb, (6, 8, 20), backend="triton").backward(gy.bfloat16())
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.float(), xr.grad, rtol=2e-2, atol=2e-2 * xr.grad.abs().max().item())


@pytest.mark.not_interpreted
def test_automatic_backend_on_cpu_is_interpolate():
    x = torch.randn(1, 2, 3, 4, 5, requires_grad=True)
    y = upsample_linear(x, (6, 8, 10))
    assert "UpsampleTrilinear3D" in type(y.grad_fn).__name__
    assert torch.equal(y, F.interpolate(x, size=(6, 8, 10), mode="trilinear", align_corners=False))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        upsample_linear(x, (6, 8, 10), backend="triton")


@pytest.mark.not_interpreted
@pytest.mark.parametrize("call, err, match", [
    (lambda x: upsample_linear(x.numpy(), (4, 4, 4)), TypeError, "x must be a torch.Tensor"),
    (lambda x: upsample_linear(x.long(), (4, 4, 4)), TypeError, "floating point"),
    (lambda x: upsample_linear(x[0, 0], (4, 4)), ValueError, "x must be"),
    (lambda x: upsample_linear(x, (4, 4)), ValueError, "size must be 3 ints"),
    (lambda x: upsample_linear(x, (4, 0, 4)), ValueError, "size must be 3 ints"),
    (lambda x: upsample_linear(x, (4, 4, 4), backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs(call, err, match):
    with pytest.raises(err, match=match):
        call(torch.randn(1, 2, 2, 2, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_cuda_gather_backward_hed_side_outputs(factor):
    """The HED side outputs of hmedn_3d_l2 (4 classes up to 128^3), channels-last bf16 under autocast as in
    training: the forward is F.interpolate's, the float32 gradient equals its atomic scatter's up to summation
    order, and comes back in bfloat16."""
    x = torch.randn(1, 4, *(128 // factor,) * 3, device="cuda").to(memory_format=torch.channels_last_3d)
    gy = torch.randn(1, 4, 128, 128, 128, device="cuda")
    xr, want = _reference(x, (128,) * 3)
    want.backward(gy)
    xt = x.detach().clone().requires_grad_()
    got = upsample_linear(xt, (128,) * 3)
    assert type(got.grad_fn).__name__ == "_GatherBackwardBackward"
    got.backward(gy)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-5, atol=1e-5 * xr.grad.abs().max().item())
    xb = x.detach().bfloat16().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        yb = upsample_linear(xb, (128,) * 3)
    yb.backward(gy.to(yb.dtype))
    assert xb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(xb.grad.float(), xr.grad, rtol=2e-2, atol=2e-2 * xr.grad.abs().max().item())
