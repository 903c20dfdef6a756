"""hmedn_fast.ops.conv.conv_input_grad (input gradient without the forward's input) against ATen's
convolution_backward in float64: 2D / 3D, strides (incl. sizes the striding rounds down), paddings, dilations,
groups, channels-last gradients; a shape that does not fit raises. Its Triton backend (forced: the forward kernel
on the flipped, channel-swapped weights, C_in output channels in blocks) against float64 on the same bf16/fp16
values, in a TRITON_INTERPRET=1 subprocess and on CUDA; what it does not take falls back or raises when forced."""
from __future__ import annotations

import pytest
import torch

from _fake_measure import count_calls, fake_timing
from _rounding import assert_rounded_once
from hmedn_fast.ops.conv import conv_input_grad


@pytest.mark.parametrize("shape, c_out, k, stride, padding, dilation, groups", [
    ((2, 6, 7, 8, 9), 4, 3, 1, 1, 1, 1), ((1, 6, 9, 7, 8), 4, 3, 1, 2, 2, 2), ((1, 4, 9, 10, 11), 6, 3, 2, 1, 1, 1),
    ((1, 4, 8, 9, 10), 2, 1, 1, 0, 1, 1), ((2, 3, 11, 12), 5, 3, 2, 0, 1, 1), ((1, 4, 10, 9), 4, 3, 1, 3, 3, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_input_gradient_equals_aten(shape, c_out, k, stride, padding, dilation, groups, channels_last):
    nd = len(shape) - 2
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(c_out, shape[1] // groups, *([k] * nd), dtype=torch.float64)
    conv = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv3d
    y = conv(x, w, None, stride, padding, dilation, groups)
    gy = torch.randn(y.shape, dtype=torch.float64)
    if channels_last:
        gy = gy.to(memory_format=torch.channels_last if nd == 2 else torch.channels_last_3d)
    want = torch.ops.aten.convolution_backward(gy, x, w, None, [stride] * nd, [padding] * nd, [dilation] * nd, False,
                                               [0] * nd, groups, [True, False, False])[0]
    got = conv_input_grad(gy, w, x.shape, [stride] * nd, [padding] * nd, [dilation] * nd, groups)
    assert got.shape == x.shape and got.dtype == gy.dtype
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


def _triton_case(n, c_out, c_in, size, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(0)
    gy = torch.randn(n, c_out, *size, generator=g).to(dtype).to(device).contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(c_out, c_in, 3, 3, 3, generator=g) / (27 * c_out) ** 0.5).to(device)
    return gy, w


def _check_triton_input_grad(gy, w, c_in, d):
    """The gradient (output poisoned first) equals the float64 one up to float32 accumulation and one rounding to
    gy's dtype."""
    from hmedn_fast.ops.triton import conv_fwd

    shape = (gy.shape[0], c_in, *gy.shape[2:])
    real_empty = torch.empty
    conv_fwd.torch.empty = lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))  # poison the output
    try:
        got = conv_input_grad(gy, w, shape, [1] * 3, [d] * 3, [d] * 3, 1, backend="triton")
    finally:
        conv_fwd.torch.empty = real_empty
    want = torch.ops.aten.convolution_backward(gy.double(), torch.zeros(shape, dtype=torch.float64, device=gy.device),
                                               w.to(gy.dtype).double(), None, [1] * 3, [d] * 3, [d] * 3, False,
                                               [0] * 3, 1, [True, False, False])[0]
    assert_rounded_once(got, want, gy.dtype)


@pytest.mark.interpreted
@pytest.mark.parametrize("n, c_out, c_in, size, d", [
    (2, 16, 48, (5, 6, 7), 1), (1, 16, 80, (4, 5, 3), 2), (1, 32, 20, (3, 4, 5), 3), (1, 16, 144, (3, 3, 4), 1),
    (1, 16, 16, (4, 4, 4), 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_input_grad_matches_float64(n, c_out, c_in, size, d, dtype):
    gy, w = _triton_case(n, c_out, c_in, size, dtype)
    _check_triton_input_grad(gy, w, c_in, d)


@pytest.mark.interpreted
@pytest.mark.parametrize("c_out, offset, width", [(16, 32, 64), (32, 0, 48)])
def test_triton_input_grad_of_a_channel_slice(c_out, offset, width):
    """The gradient as a channel slice of a channels-last buffer whose other channels hold NaN (read in place)."""
    gy, w = _triton_case(1, c_out, 40, (4, 5, 3))
    buf = torch.full((1, width, 4, 5, 3), float("nan"), dtype=gy.dtype).contiguous(memory_format=torch.channels_last_3d)
    buf[:, offset:offset + c_out] = gy
    _check_triton_input_grad(buf[:, offset:offset + c_out], w, 40, 1)


@pytest.mark.interpreted
def test_triton_input_grad_falls_back_or_raises_when_forced(monkeypatch):
    gy, w = _triton_case(1, 16, 8, (4, 4, 4))
    args = ((1, 8, 8, 8, 8), [2] * 3, [1] * 3, [1] * 3, 1)  # strided: not a "same" convolution
    gy2 = torch.randn(1, 16, 4, 4, 4).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    want = conv_input_grad(gy2, w, *args, backend="reference")
    assert torch.equal(conv_input_grad(gy2, w, *args), want)  # automatic: the transposed convolution
    with pytest.raises(RuntimeError, match="groups 1 and stride 1"):
        conv_input_grad(gy2, w, *args, backend="triton")
    monkeypatch.setenv("HMEDN_BACKEND_CONV_DGRAD", "triton")
    with pytest.raises(RuntimeError, match="channels-last"):
        conv_input_grad(gy.contiguous(), w, (1, 8, 4, 4, 4), [1] * 3, [1] * 3, [1] * 3, 1)


def _count_kernel_calls(monkeypatch) -> list:
    from hmedn_fast.ops.triton import conv_fwd

    return count_calls(monkeypatch, conv_fwd, "conv3x3_input_grad")


@pytest.mark.interpreted
@pytest.mark.parametrize("c_out, c_in, kernel", [(16, 48, True), (32, 32, True), (32, 160, False)])
def test_automatic_input_grad_follows_the_static_rule(monkeypatch, c_out, c_in, kernel):
    """Without timing, the kernel runs where prefers_triton_input_grad says (16 output channels, or 32 from at
    most 32), for conv_input_grad and for conv_backward's input gradient; both equal the float64 gradient."""
    from hmedn_fast.ops import measured
    from hmedn_fast.ops.conv import conv_backward

    measured.forget()
    calls = _count_kernel_calls(monkeypatch)
    gy, w = _triton_case(1, c_out, c_in, (3, 4, 5))
    x = torch.randn(1, c_in, 3, 4, 5).bfloat16().contiguous(memory_format=torch.channels_last_3d)
    want = torch.ops.aten.convolution_backward(gy.double(), x.double(), w.bfloat16().double(), None, [1] * 3,
                                               [1] * 3, [1] * 3, False, [0] * 3, 1, [True, False, False])[0]
    for got in (conv_input_grad(gy, w, x.shape, [1] * 3, [1] * 3, [1] * 3, 1),
                conv_backward(gy, x, w, [1] * 3, [1] * 3, [1] * 3, 1, True, False)[0]):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert len(calls) == (2 if kernel else 0)


@pytest.mark.interpreted
def test_measured_input_grad_choice_overrides_the_static_rule(monkeypatch):
    """Where timing is possible (faked: the transposed convolution faster) the 16 -> 48 input gradient, the kernel's
    by the static rule, takes cuDNN's path; the choice is remembered (one timing per signature)."""
    from hmedn_fast.ops import measured

    measured.forget()
    calls = _count_kernel_calls(monkeypatch)
    timed = fake_timing(monkeypatch, calls, "reference")
    gy, w = _triton_case(1, 16, 48, (3, 4, 5))
    args = ((1, 48, 3, 4, 5), [1] * 3, [1] * 3, [1] * 3, 1)
    first = conv_input_grad(gy, w, *args)
    assert sorted(timed) == ["reference", "triton"] and len(calls) == 1  # the kernel ran once, while timed
    assert torch.equal(first, conv_input_grad(gy, w, *args, backend="reference"))
    conv_input_grad(gy, w, *args)
    assert len(timed) == 2 and len(calls) == 1
    measured.forget()


@pytest.mark.cuda
@pytest.mark.parametrize("c_out, c_in, size, d", [(16, 80, 48, 1), (16, 48, 37, 1), (32, 32, 40, 2), (16, 144, 24, 1)])
def test_cuda_triton_input_grad_matches_float64(c_out, c_in, size, d):
    gy, w = _triton_case(1, c_out, c_in, (size, size + 3, size - 5), device="cuda")
    _check_triton_input_grad(gy, w, c_in, d)


def test_shape_that_does_not_fit_raises():
    gy = torch.randn(1, 4, 5, 5, 5)
    with pytest.raises(ValueError, match="input_shape"):
        conv_input_grad(gy, torch.randn(4, 3, 3, 3, 3), (1, 3, 9, 9, 9), [1] * 3, [1] * 3, [1] * 3, 1)


def test_add_to_adds_the_gradient_in_place():
    """``add_to``: the gradient is added into the given tensor (in place, returned), in its dtype; a tensor of
    another shape is refused before anything runs."""
    gy = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)
    args = ((2, 3, 5, 6, 7), [1] * 3, [2] * 3, [2] * 3, 1)
    base = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64)
    acc = base.clone()
    got = conv_input_grad(gy, w, *args, add_to=acc)
    assert got is acc
    torch.testing.assert_close(got, base + conv_input_grad(gy, w, *args), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="add_to must have the input's shape"):
        conv_input_grad(gy, w, *args, add_to=torch.zeros(2, 3, 5, 6, 6, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.parametrize("d", [1, 2, 4])
def test_cuda_kernel_adds_in_its_epilogue(monkeypatch, d):
    """The CUDA kernel (32 -> 32, bf16 channels-last) adds add_to's values to its float32 sums and rounds once: the
    result is within half an ulp of add_to + the float64 gradient, written into add_to, and no add kernel runs."""
    from hmedn_fast.ops import conv_mma

    g = torch.Generator().manual_seed(d)
    cl = torch.channels_last_3d
    gy = torch.randn(2, 32, 9, 17, 23, generator=g).to("cuda", torch.bfloat16).contiguous(memory_format=cl)
    w = torch.randn(32, 32, 3, 3, 3, generator=g).mul_(0.1).cuda()
    base = torch.randn(2, 32, 9, 17, 23, generator=g).to("cuda", torch.bfloat16).contiguous(memory_format=cl)
    acc = base.clone()
    assert conv_mma.unsupported(gy, w, d, acc) is None
    monkeypatch.setenv("HMEDN_BACKEND_CONV_DGRAD", "cuda")
    calls = []
    real = conv_mma.conv3x3_input_grad
    monkeypatch.setattr(conv_mma, "conv3x3_input_grad", lambda *a, **k: calls.append(k) or real(*a, **k))
    got = conv_input_grad(gy, w, gy.shape, [1] * 3, [d] * 3, [d] * 3, 1, add_to=acc)
    assert got is acc and calls and calls[-1].get("add_to") is acc
    wd = w.to(torch.bfloat16).double()
    want = base.double() + torch.ops.aten.convolution_backward(
        gy.double(), gy.double(), wd, None, [1] * 3, [d] * 3, [d] * 3, False, [0] * 3, 1, [True, False, False])[0]
    assert_rounded_once(got, want, torch.bfloat16)
