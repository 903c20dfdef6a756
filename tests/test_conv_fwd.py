"""Forward of 3x3x3 "same" convolutions (hmedn_fast.ops.conv.conv_forward, Triton kernel of
hmedn_fast.ops.triton.conv_fwd) against F.conv3d in float64 on the same bf16/fp16 values: dilations 1-3, odd
sizes, input channels not a multiple of the channel step, 16 and 32 output channels, batches, poisoned outputs;
autocast; dispatch (what falls back to F.conv3d) and forcing; the lean dense block routing its layers through it.
Interpreted tests run in a TRITON_INTERPRET=1 subprocess (``test_interpreter_suite``); GPU tests are marked
``cuda``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from _fake_measure import count_calls, fake_timing
from _rounding import assert_rounded_once
from hmedn_fast.ops.conv import conv_forward

CL = torch.channels_last_3d


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


def _case(n, c_in, c_out, size, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, *size, generator=g).to(dtype).to(device).contiguous(memory_format=CL)
    w = (torch.randn(c_out, c_in, 3, 3, 3, generator=g) / (27 * c_in) ** 0.5).to(dtype).to(device)
    return x, w


def _check_rounding(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, d: int) -> None:
    """y equals the float64 convolution up to float32 accumulation and one rounding to x's dtype."""
    assert_rounded_once(y, F.conv3d(x.double(), w.double(), padding=d, dilation=d), x.dtype)


@pytest.mark.interpreted
@pytest.mark.parametrize("n, c_in, c_out, size, d", [
    (2, 16, 16, (5, 6, 7), 1), (1, 20, 32, (6, 5, 9), 2), (1, 4, 16, (4, 3, 5), 1), (1, 80, 16, (3, 4, 5), 3),
    (3, 48, 16, (2, 9, 3), 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_matches_float64(monkeypatch, n, c_in, c_out, size, d, dtype):
    from hmedn_fast.ops.triton import conv_fwd

    real_empty = torch.empty
    monkeypatch.setattr(conv_fwd.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    x, w = _case(n, c_in, c_out, size, dtype)
    y = conv_forward(x, w, (1, 1, 1), (d,) * 3, (d,) * 3, 1, backend="triton")
    _check_rounding(y, x, w, d)


@pytest.mark.interpreted
@pytest.mark.parametrize("n, c_in, c_out, size, d, block, box", [
    (2, 16, 16, (5, 6, 7), 1, 32, (4, 2)), (1, 20, 32, (6, 5, 9), 2, 16, (8, 2)), (1, 32, 32, (3, 9, 4), 3, 64, (2, 8)),
    (1, 16, 48, (4, 3, 10), 1, 16, (16, 1))])
def test_box_tiles_match_float64(monkeypatch, n, c_in, c_out, size, d, block, box):
    """Each program a D x H x W box of one sample: boxes cut by every axis's end, batches, boxes wider than the
    volume, several output-channel blocks; the input gradient (the same kernel, dilation negated) too. Outputs are
    poisoned before the kernel runs, so an unwritten element fails."""
    from hmedn_fast.ops.triton import conv_fwd

    real_empty = torch.empty
    monkeypatch.setattr(conv_fwd.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    x, w = _case(n, c_in, c_out, size)
    _check_rounding(conv_fwd.conv3x3_forward(x, w, d, block_voxels=block, box=box, block_k=16), x, w, d)
    gy = torch.randn(n, c_out, *size).bfloat16().contiguous(memory_format=CL)
    gx = conv_fwd.conv3x3_input_grad(gy, w, d, block_voxels=block, box=box, block_k=16)
    xr = x.double().requires_grad_()
    F.conv3d(xr, w.double(), padding=d, dilation=d).backward(gy.double())
    assert_rounded_once(gx, xr.grad, torch.bfloat16)


@pytest.mark.interpreted
def test_box_tiles_write_into_a_buffer_slice():
    """Box tiles reading a channel slice of a channels-last tensor (NaN around it) and writing into another."""
    from hmedn_fast.ops.triton.conv_fwd import conv3x3_forward

    src = torch.full((1, 48, 4, 5, 6), float("nan")).bfloat16().contiguous(memory_format=CL)
    x, w = _case(1, 16, 16, (4, 5, 6))
    src[:, 16:32] = x
    buf = torch.full((1, 64, 4, 5, 6), float("nan")).bfloat16().contiguous(memory_format=CL)
    conv3x3_forward(src[:, 16:32], w, 2, block_voxels=32, box=(4, 4), out=buf[:, 32:48])
    _check_rounding(buf[:, 32:48].contiguous(memory_format=CL), x, w, 2)
    assert buf[:, :32].isnan().all() and buf[:, 48:].isnan().all()


@pytest.mark.not_interpreted
@pytest.mark.parametrize("c_in, c_out_block, size, box", [
    (16, 16, (128, 128, 128), (8, 8)), (32, 32, (64, 64, 64), (8, 8)), (16, 64, (4, 32, 32), (8, 8)),
    (48, 16, (128, 128, 128), None), (16, 128, (128, 128, 128), None), (16, 16, (3, 64, 64), None),
    (32, 32, (64, 16, 64), None)])
def test_launch_config_takes_boxes_only_where_they_were_measured(monkeypatch, c_in, c_out_block, size, box):
    """Boxes for <= 32 shifted and <= 64 output channels on volumes of >= 4 x 32 x 32; flat tiles otherwise, and
    everywhere with BOX_TILES off."""
    from hmedn_fast.ops.triton import conv_fwd, conv_wgrad

    assert conv_fwd.launch_config(c_in, c_out_block, size)[4] == box
    monkeypatch.setattr(conv_wgrad, "BOX_TILES", False)
    assert conv_fwd.launch_config(c_in, c_out_block, size)[4] is None


def test_box_must_divide_the_block():
    from hmedn_fast.ops.triton.conv_fwd import conv3x3_forward

    x, w = _case(1, 16, 16, (4, 4, 4))
    with pytest.raises(ValueError, match="box must be powers of two"):
        conv3x3_forward(x, w, 1, block_voxels=32, box=(3, 2))
    with pytest.raises(ValueError, match="box must be powers of two"):
        conv3x3_forward(x, w, 1, block_voxels=16, box=(8, 4))


@pytest.mark.interpreted
def test_forward_under_autocast_computes_in_the_autocast_dtype():
    """float32 input and weight under bf16 autocast: computed in bf16 as F.conv3d would (and returned in bf16)."""
    x, w = _case(1, 16, 16, (4, 5, 6), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_forward(x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, backend="triton")
    _check_rounding(y, x.bfloat16(), w.bfloat16(), 1)


@pytest.mark.not_interpreted
@pytest.mark.parametrize("layout", [torch.contiguous_format, CL])
@pytest.mark.parametrize("c_out, c_in", [(32, 32), (16, 48)])
def test_pack_taps_is_the_cast_then_the_rearrangement(layout, c_out, c_in):
    """One copy gives what the cast and the ``.contiguous()`` of the permuted weight gave, bit for bit, for
    contiguous and channels-last weights (what ``module.to(memory_format=...)`` leaves), without autograd history."""
    from hmedn_fast.ops.geometry import pack_taps

    w = torch.randn(c_out, c_in, 3, 3, 3).contiguous(memory_format=layout).requires_grad_()
    for in_first, order in ((False, (2, 3, 4, 0, 1)), (True, (2, 3, 4, 1, 0))):
        want = w.detach().bfloat16().permute(order).reshape(27, w.shape[order[3]], w.shape[order[4]]).contiguous()
        got = pack_taps(w, torch.bfloat16, in_first)
        assert got.is_contiguous() and got.dtype == torch.bfloat16 and torch.equal(got, want)
        assert not got.requires_grad


@pytest.mark.interpreted
def test_kernel_rounds_a_float32_weight_as_a_cast_would():
    """The forward and input-gradient kernels take the float32 parameter itself (no separate cast kernel): the
    result is bit for bit that of the weight cast to the input's dtype first."""
    from hmedn_fast.ops.triton import conv_fwd

    x, w = _case(1, 16, 32, (3, 5, 4), torch.bfloat16)
    w32 = w.float() + torch.randn(w.shape) * 1e-3  # not representable in bf16
    assert torch.equal(conv_fwd.conv3x3_forward(x, w32, 2), conv_fwd.conv3x3_forward(x, w32.bfloat16(), 2))
    gy = torch.randn(1, 32, 3, 5, 4).bfloat16().contiguous(memory_format=CL)
    assert torch.equal(conv_fwd.conv3x3_input_grad(gy, w32, 2), conv_fwd.conv3x3_input_grad(gy, w32.bfloat16(), 2))
    assert "floating-point weight" in conv_fwd.unsupported(x, w.to(torch.int32), (1,) * 3, (1,) * 3, (1,) * 3, 1)


@pytest.mark.interpreted
@pytest.mark.parametrize("change, reason", [
    (dict(stride=(2, 2, 2)), "stride 1"), (dict(groups=2), "groups 1"), (dict(padding=(0, 0, 0)), "padding"),
    (dict(dtype=torch.float32), "bf16 / fp16"), (dict(c_out=8), "16 or 32"), (dict(layout=False), "channels-last"),
])
def test_unsupported_convolutions_fall_back_or_raise_when_forced(change, reason):
    x, w = _case(1, 16, change.get("c_out", 16), (4, 4, 4), change.get("dtype", torch.bfloat16))
    if change.get("layout") is False:
        x = x.contiguous()
    if change.get("groups"):
        w = w[:, :8].contiguous()
    args = (change.get("stride", (1, 1, 1)), change.get("padding", (1, 1, 1)), (1, 1, 1), change.get("groups", 1))
    want = F.conv3d(x, w, None, *args)
    assert torch.equal(conv_forward(x, w, *args), want)  # automatic: F.conv3d
    with pytest.raises(RuntimeError, match=reason):
        conv_forward(x, w, *args, backend="triton")


@pytest.mark.interpreted
@pytest.mark.parametrize("c_in, triton", [(16, True), (48, True), (32, False), (64, False)])
def test_automatic_choice_follows_the_measured_speed(monkeypatch, c_in, triton):
    from hmedn_fast.ops.triton import conv_fwd

    calls = count_calls(monkeypatch, conv_fwd, "conv3x3_forward")
    x, w = _case(1, c_in, 16, (3, 4, 5))
    conv_forward(x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1)
    assert calls == ([1] if triton else [])


@pytest.mark.interpreted
@pytest.mark.parametrize("faster", ["triton", "reference"])
def test_measured_choice_overrides_the_static_rule(monkeypatch, faster):
    """Where timing is possible (cudnn.benchmark on CUDA; faked here) the faster backend runs, whatever the static
    rule says (32 -> 16: cuDNN by the rule); the choice is remembered per shape; forcing a backend times nothing."""
    from hmedn_fast.ops import measured
    from hmedn_fast.ops.triton import conv_fwd

    measured.forget()
    calls = count_calls(monkeypatch, conv_fwd, "conv3x3_forward")
    timed = fake_timing(monkeypatch, calls, faster)
    x, w = _case(1, 32, 16, (3, 4, 5))
    args = ((1, 1, 1), (1,) * 3, (1,) * 3, 1)
    chosen = [1] if faster == "triton" else []
    for timing in ([1], []):  # the first call times the kernel once, then runs the choice
        calls.clear()
        y = conv_forward(x, w, *args)
        assert len(calls) == len(timing + chosen)
        if faster == "reference":  # PyTorch's CPU convolution picks its output layout (it differs between machines)
            y = y.contiguous(memory_format=torch.channels_last_3d)
        _check_rounding(y, x, w, 1)
    assert sorted(timed) == ["reference", "triton"]  # timed once: the second call took the remembered choice
    assert list(measured.remembered().values()) == [faster]
    calls.clear()
    conv_forward(x, w, *args, backend="reference")
    assert calls == [] and len(timed) == 2
    measured.forget()


@pytest.mark.interpreted
def test_lean_dense_block_routes_its_layers_through_the_kernel(monkeypatch):
    """A 16 -> 64 channel dense block (layers 16, 32, 48 -> 16), bf16 channels-last: the 16 and 48 channel layers
    run the Triton forward, writing into the block's buffer, the three input gradients the same kernel; outputs and
    gradients match the eager float32 block to bf16 rounding."""
    from hmedn_fast.nn.blocks import DenseBlock
    from hmedn_fast.ops.triton import conv_fwd

    calls = []
    real = conv_fwd.conv3x3_forward
    into = []
    monkeypatch.setattr(conv_fwd, "conv3x3_forward",
                        lambda x, w, d, **k: calls.append(x.shape[1]) or into.append(k.get("out")) or real(x, w, d, **k))
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    ref = DenseBlock(16, 16, 3, spatial_dims=3)
    lean = copy.deepcopy(ref).bfloat16().to(memory_format=CL)
    lean.lean = True
    x = torch.randn(1, 16, 4, 5, 6)
    gy = torch.randn(1, 64, 4, 5, 6)
    xr, xl = x.clone().requires_grad_(), x.bfloat16().contiguous(memory_format=CL).requires_grad_()
    ref(xr).backward(gy)
    yl = lean(xl)
    assert calls == [16, 48]
    assert [t.data_ptr() - yl.data_ptr() for t in into] == [16 * 2, 48 * 2]  # its channels of the output buffer
    yl.backward(gy.bfloat16())
    assert calls[2:] == [16, 16, 16]  # the input gradients: the same kernel on each layer's 16-channel gradient
    torch.testing.assert_close(yl.float(), ref(xr).detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(xl.grad.float(), xr.grad, rtol=5e-2, atol=5e-2 * xr.grad.abs().max().item())


@pytest.mark.not_interpreted
def test_automatic_backend_on_cpu_is_f_conv3d():
    x, w = _case(1, 16, 16, (4, 4, 4))
    assert torch.equal(conv_forward(x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1), F.conv3d(x, w, padding=1))


@pytest.mark.cuda
@pytest.mark.parametrize("c_in, c_out, size, d", [(16, 16, (64, 64, 64), 1), (48, 16, (40, 48, 56), 1),
                                                 (32, 32, (33, 34, 35), 3), (16, 16, (4, 40, 37), 1),
                                                 (32, 32, (7, 64, 33), 2)])
def test_cuda_forward_matches_float64(c_in, c_out, size, d):
    x, w = _case(1, c_in, c_out, size, device="cuda")
    y = torch.full((1, c_out, *size), float("nan"), device="cuda")  # the kernel allocates; poison the pool first
    del y
    _check_rounding(conv_forward(x, w, (1, 1, 1), (d,) * 3, (d,) * 3, 1, backend="triton"), x, w, d)


@pytest.mark.cuda
def test_cuda_measured_choice_is_remembered_and_correct(monkeypatch):
    """With cudnn.benchmark on, the first call of a shape times both backends and remembers the faster; the
    result is the convolution either way (bf16 rounding of a float32 sum)."""
    from hmedn_fast.ops import measured

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    measured.forget()
    x, w = _case(1, 32, 16, (24, 20, 28), device="cuda")
    for _ in range(2):
        y = conv_forward(x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1)
        want = F.conv3d(x.double(), w.double(), padding=1)
        torch.testing.assert_close(y.double(), want, rtol=2.0 ** -7, atol=1e-5 * want.abs().max().item())
    choices = measured.remembered()
    assert len(choices) == 1 and next(iter(choices.values())) in ("triton", "reference")
    measured.forget()


@pytest.mark.interpreted
@pytest.mark.parametrize("backend", ["triton", "reference", None])
def test_forward_into_a_buffer_slice(monkeypatch, backend):
    """``out=`` a channel slice of a channels-last buffer (poisoned): every element of it written with the float64
    result rounded once, the buffer's other channels untouched, on either backend (the Triton kernel writes in
    place, the reference copies) and the automatic choice."""
    from hmedn_fast.ops.triton import conv_fwd

    calls = count_calls(monkeypatch, conv_fwd, "conv3x3_forward")
    x, w = _case(2, 48, 16, (5, 6, 7))
    buf = torch.randn(2, 96, 5, 6, 7).bfloat16().contiguous(memory_format=CL)
    buf[:, 48:64] = float("nan")
    before = buf.clone()
    y = conv_forward(x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, backend=backend, out=buf[:, 48:64])
    assert y.data_ptr() == buf[:, 48:64].data_ptr() and len(calls) == (backend != "reference")
    _check_rounding(buf[:, 48:64].contiguous(memory_format=CL), x, w, 1)
    assert torch.equal(buf[:, :48], before[:, :48]) and torch.equal(buf[:, 64:], before[:, 64:])


@pytest.mark.interpreted
def test_forward_into_rejects_or_falls_back_for_bad_out():
    """An out tensor the kernel cannot write (NC*, another dtype): automatic -> reference with a copy; forced Triton
    -> RuntimeError naming it; the kernel itself -> ValueError naming ``out``."""
    from hmedn_fast.ops.triton.conv_fwd import conv3x3_forward

    x, w = _case(1, 16, 16, (4, 4, 4))
    want = F.conv3d(x, w, padding=1)
    for out in (torch.empty(1, 16, 4, 4, 4, dtype=torch.bfloat16), torch.empty_like(want, dtype=torch.float32)):
        assert torch.equal(conv_forward(x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, out=out), want.to(out.dtype))
        with pytest.raises(RuntimeError, match="out tensor"):
            conv_forward(x, w, (1, 1, 1), (1,) * 3, (1,) * 3, 1, backend="triton", out=out)
        with pytest.raises(ValueError, match="out must"):
            conv3x3_forward(x, w, 1, out=out)
