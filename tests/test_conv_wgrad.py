"""Weight gradient of 3x3x3 "same" convolutions (hmedn_fast.ops.conv.conv_backward, Triton kernel of
hmedn_fast.ops.triton.conv_wgrad) against ATen's convolution_backward in float64 on the same bf16/fp16 values:
dilations 1-3, odd sizes, input channels not a multiple of the channel block, 16 and 32 output channels, batches,
poisoned work buffers; dispatch (what falls back to ATen) and forcing. Interpreted tests run in a TRITON_INTERPRET=1
subprocess (``test_interpreter_suite``); the GPU test is marked ``cuda``."""
from __future__ import annotations

import pytest
import torch
from _fake_measure import count_calls, fake_timing
from _gpu_time import graph_ms

from hmedn_fast.ops.conv import conv_backward

CL = torch.channels_last_3d


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


def _case(n, c_in, c_out, size, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, *size, generator=g).to(dtype).to(device).contiguous(memory_format=CL)
    gy = torch.randn(n, c_out, *size, generator=g).to(dtype).to(device).contiguous(memory_format=CL)
    w = torch.randn(c_out, c_in, 3, 3, 3, generator=g).to(device)
    return x, gy, w


def _float64_grads(gy, x, w, d):
    return torch.ops.aten.convolution_backward(gy.double(), x.double(), w.double(), None, [1] * 3, [d] * 3, [d] * 3,
                                               False, [0] * 3, 1, [True, True, False])[:2]


@pytest.mark.interpreted
@pytest.mark.parametrize("n, c_in, c_out, size, d", [
    (2, 20, 16, (5, 6, 7), 1), (1, 16, 32, (6, 5, 9), 2), (1, 70, 16, (4, 3, 5), 1), (1, 8, 16, (7, 7, 4), 3),
    (3, 33, 32, (2, 9, 3), 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_gradient_matches_float64(monkeypatch, n, c_in, c_out, size, d, dtype):
    from hmedn_fast.ops.triton import conv_wgrad

    real_empty = torch.empty
    monkeypatch.setattr(conv_wgrad.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    x, gy, w = _case(n, c_in, c_out, size, dtype)
    gi, gw = conv_backward(gy, x, w, (1, 1, 1), (d,) * 3, (d,) * 3, 1, True, True, backend="triton")
    want_gi, want_gw = _float64_grads(gy, x, w.to(dtype), d)
    assert gw.dtype == torch.float32 and gw.shape == w.shape and torch.isfinite(gw).all()
    # float32 sums of exact bf16 / fp16 products: only the accumulation rounds
    torch.testing.assert_close(gw.double(), want_gw, rtol=0, atol=1e-5 * want_gw.abs().max().item())
    assert gi.dtype == dtype  # ATen's input gradient, untouched
    torch.testing.assert_close(gi.double(), want_gi, rtol=2e-2, atol=2e-2 * want_gi.abs().max().item())


@pytest.mark.interpreted
@pytest.mark.parametrize("n, c_in, c_out, size, d, block, box", [
    (2, 20, 16, (5, 6, 7), 1, 32, (4, 2)), (1, 16, 32, (6, 5, 9), 2, 16, (8, 2)), (3, 33, 32, (2, 9, 3), 3, 64, (2, 8))])
def test_box_tiles_match_float64(monkeypatch, n, c_in, c_out, size, d, block, box):
    """Each tile a D x H x W box of one sample (boxes cut by every axis's end, batches, split over 5 programs, the
    last of which runs past the last box in the first two cases), poisoned partial-sum buffer."""
    from hmedn_fast.ops.triton import conv_wgrad

    real_empty = torch.empty
    monkeypatch.setattr(conv_wgrad.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    x, gy, w = _case(n, c_in, c_out, size)
    gw = conv_wgrad.conv3x3_wgrad(gy, x, d, num_programs=15, block_voxels=block, box=box,
                                  cin_block=32 if c_in <= 32 else 64)
    _, want = _float64_grads(gy, x, w.to(gy.dtype), d)
    torch.testing.assert_close(gw.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.not_interpreted
@pytest.mark.parametrize("c_in, c_out, size, box", [
    (32, 32, (64, 64, 64), (16, 4)), (64, 16, (128, 128, 128), (16, 4)), (48, 16, (2, 32, 40), (16, 4)),
    (16, 16, (128, 128, 128), None), (32, 16, (64, 64, 64), None), (160, 32, (16, 16, 16), None),
    (32, 32, (64, 31, 64), None)])
def test_launch_config_takes_boxes_only_where_they_were_measured(monkeypatch, c_in, c_out, size, box):
    """Boxes for the 32-voxel class (32 output channels, or more than 32 input channels) on volumes with H and W >=
    32; the flat tiles elsewhere and with BOX_TILES off."""
    from hmedn_fast.ops.triton import conv_wgrad

    assert conv_wgrad.launch_config(c_in, c_out, size)[5] == box
    monkeypatch.setattr(conv_wgrad, "BOX_TILES", False)
    assert conv_wgrad.launch_config(c_in, c_out, size)[5] is None


@pytest.mark.interpreted
@pytest.mark.parametrize("c_out, offset, width", [(16, 32, 64), (32, 16, 48)])
def test_gradient_as_a_channel_slice_of_a_buffer(c_out, offset, width):
    """The lean dense block passes its gradient buffer's channel slice (voxel stride = the buffer's channels): the
    kernel reads it in place; the buffer's other channels hold NaN, so a read outside the slice shows."""
    x, gy, w = _case(1, 24, c_out, (4, 5, 6))
    buf = torch.full((1, width, 4, 5, 6), float("nan"), dtype=gy.dtype).contiguous(memory_format=CL)
    buf[:, offset:offset + c_out] = gy
    sliced = buf[:, offset:offset + c_out]
    assert not sliced.is_contiguous(memory_format=CL)
    _, gw = conv_backward(sliced, x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, False, True, backend="triton")
    _, want = _float64_grads(gy, x, w.to(gy.dtype), 1)
    torch.testing.assert_close(gw.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


@pytest.mark.interpreted
def test_only_the_weight_gradient():
    x, gy, w = _case(1, 16, 16, (4, 4, 4))
    gi, gw = conv_backward(gy, x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, False, True, backend="triton")
    assert gi is None and gw.shape == w.shape
    gi, gw = conv_backward(gy, x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, True, False, backend="triton")
    assert gw is None and gi.shape == x.shape


@pytest.mark.interpreted
@pytest.mark.parametrize("change, reason", [
    (dict(c_out=8), "16 or 32 output channels"), (dict(dtype=torch.float32), "bf16 / fp16"),
    (dict(layout=torch.contiguous_format), "channels-last"), (dict(padding=0), "padding equal to one dilation"),
    (dict(stride=2), "stride 1")])
def test_unsupported_convolutions_fall_back_or_raise_when_forced(monkeypatch, change, reason):
    monkeypatch.setenv("HMEDN_BACKEND_CONV_DGRAD", "reference")  # the input gradient's own dispatch: its tests
    c_out = change.get("c_out", 16)
    x, gy, w = _case(1, 16, c_out, (4, 4, 4), change.get("dtype", torch.bfloat16))
    if "layout" in change:
        x = x.contiguous()
    pad, stride = change.get("padding", 1), change.get("stride", 1)
    if pad != 1 or stride != 1:
        gy = torch.ops.aten.convolution(x, w.to(x.dtype), None, [stride] * 3, [pad] * 3, [1] * 3, False, [0] * 3, 1)
    args = (gy, x, w, (stride,) * 3, (pad,) * 3, (1,) * 3, 1, True, True)
    with pytest.raises(RuntimeError, match=reason):
        conv_backward(*args, backend="triton")
    got = conv_backward(*args)  # automatic: ATen
    want = torch.ops.aten.convolution_backward(gy, x, w.to(x.dtype), None, [stride] * 3, [pad] * 3, [1] * 3, False,
                                               [0] * 3, 1, [True, True, False])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1].float())


@pytest.mark.interpreted
@pytest.mark.parametrize("c_in, c_out, triton", [(48, 16, True), (32, 32, True), (32, 16, True), (16, 16, False)])
def test_automatic_choice_follows_the_measured_speed(monkeypatch, c_in, c_out, triton):
    """Automatic dispatch takes the kernel where it beat cuDNN (H100 sweep), ATen where cuDNN was as fast; forcing
    still takes the kernel."""
    from hmedn_fast.ops.triton import conv_wgrad

    calls = count_calls(monkeypatch, conv_wgrad, "conv3x3_wgrad")
    x, gy, w = _case(1, c_in, c_out, (3, 4, 3))
    conv_backward(gy, x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, False, True)
    assert calls == ([1] if triton else [])
    conv_backward(gy, x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, False, True, backend="triton")
    assert len(calls) == (2 if triton else 1)


@pytest.mark.interpreted
@pytest.mark.parametrize("need_input", [False, True])
def test_measured_choice_overrides_the_static_rule(monkeypatch, need_input):
    """Where timing is possible (faked here) the faster backend runs (16 -> 16: ATen by the static rule, the kernel
    faster here), with the input gradient when asked; forcing a backend times nothing."""
    from hmedn_fast.ops import measured
    from hmedn_fast.ops.triton import conv_wgrad

    measured.forget()
    monkeypatch.setenv("HMEDN_BACKEND_CONV_DGRAD", "reference")  # the input gradient's own choice is not timed here
    calls = count_calls(monkeypatch, conv_wgrad, "conv3x3_wgrad")
    timed = fake_timing(monkeypatch, calls, "triton")
    x, gy, w = _case(1, 16, 16, (3, 4, 3))
    gi, gw = conv_backward(gy, x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, need_input, True)
    assert sorted(timed) == ["reference", "triton"] and len(calls) == 2  # the kernel timed once, then chosen
    want_gi, want_gw = _float64_grads(gy, x, w, 1)
    torch.testing.assert_close(gw.double(), want_gw, rtol=1e-2, atol=1e-2 * want_gw.abs().max().item())
    assert (gi is not None) == need_input
    if need_input:
        torch.testing.assert_close(gi.double(), want_gi, rtol=1e-2, atol=1e-2 * want_gi.abs().max().item())
    conv_backward(gy, x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, need_input, True, backend="reference")
    assert len(calls) == 2 and len(timed) == 2
    measured.forget()


@pytest.mark.not_interpreted
def test_automatic_backend_on_cpu_is_aten():
    x, gy, w = _case(1, 16, 16, (4, 4, 4))
    got = conv_backward(gy, x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, True, True)
    want = torch.ops.aten.convolution_backward(gy, x, w.to(x.dtype), None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3,
                                               1, [True, True, False])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1].float())


@pytest.mark.cuda
@pytest.mark.parametrize("c_in, c_out, size, d", [(64, 16, 48, 1), (20, 16, 37, 1), (32, 32, 40, 2), (32, 32, 24, 4)])
def test_cuda_weight_gradient_matches_float64(c_in, c_out, size, d):
    """The compiled kernel (bf16 tensor-core dots) at training-like sizes: float32 accumulation error only, and at
    least as accurate as cuDNN's bf16 weight gradient."""
    x, gy, w = _case(2, c_in, c_out, (size, size + 3, size - 5), device="cuda")
    _, gw = conv_backward(gy, x, w, (1, 1, 1), (d,) * 3, (d,) * 3, 1, False, True, backend="triton")
    _, want = _float64_grads(gy, x, w.to(x.dtype), d)
    _, cudnn = conv_backward(gy, x, w, (1, 1, 1), (d,) * 3, (d,) * 3, 1, False, True, backend="reference")
    err = ((gw.double() - want).norm() / want.norm()).item()
    assert err < 1e-5
    assert err <= ((cudnn.double() - want).norm() / want.norm()).item()


@pytest.mark.cuda
@pytest.mark.parametrize("c_in, c_out, size, d", [(64, 16, 64, 1), (32, 16, 64, 1), (32, 32, 64, 2), (160, 32, 16, 1)])
def test_cuda_launch_config_is_not_pathological(c_in, c_out, size, d):
    """The default launch configuration of every hmedn_3d_l2 shape class runs within 2x of cuDNN's GPU time (it is
    0.5-1.3x in the H100 sweep; a 32-channel block with 32 output channels once made it 10-50x slower). GPU time
    from CUDA-graph replay: at 16^3 both take ~40 us and eager timing would compare the hosts' launch costs."""
    from hmedn_fast.ops.triton.conv_wgrad import conv3x3_wgrad

    x, gy, w = _case(1, c_in, c_out, (size,) * 3, device="cuda")
    w = w.to(x.dtype)
    ours = graph_ms(lambda: conv3x3_wgrad(gy, x, d))
    cudnn = graph_ms(lambda: torch.ops.aten.convolution_backward(gy, x, w, None, [1] * 3, [d] * 3, [d] * 3, False,
                                                                 [0] * 3, 1, [False, True, False]))
    assert ours < 2 * cudnn, (ours, cudnn)
