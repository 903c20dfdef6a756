"""``conv1x1_add`` (hmedn_fast.ops.conv1x1): the Triton kernels against ``F.conv*d`` + add in float64 on the same
bf16 / fp16 values (forward, input / weight / bias / running-sum gradients, odd channel counts, 2D and 3D, batches,
channel slices of channels-last buffers, autocast, poisoned outputs), the dispatch, the bad-input errors, and the
dense fusion built on it. Interpreted tests run in a TRITON_INTERPRET=1 subprocess; the GPU ones are marked
``cuda``."""
from __future__ import annotations

import pytest
import torch
from _rounding import assert_rounded_once
from torch.nn import functional as F

from hmedn_fast.ops.conv1x1 import choose, conv1x1_add, conv1x1_add_reference

LAYOUT = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


def _case(n, c_in, c_out, size, dtype, bias, acc, sliced, device="cpu", seed=0):
    """x (a channel slice of a wider channels-last buffer when ``sliced``), a float32 weight whose values are exact
    in ``dtype`` (so the in-kernel rounding is exact under any rounding mode), bias, acc and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    fmt = LAYOUT[2 + len(size)]
    wide = c_in + 5 if sliced else c_in
    buf = torch.randn(n, wide, *size, generator=g).to(dtype).contiguous(memory_format=fmt).to(device)
    x = buf[:, 3:3 + c_in] if sliced else buf
    w = torch.randn(c_out, c_in, *[1] * len(size), generator=g).to(dtype).float().to(device)
    b = torch.randn(c_out, generator=g).to(dtype).float().to(device) if bias else None
    a = torch.randn(n, c_out, *size, generator=g).to(dtype).contiguous(memory_format=fmt).to(device) if acc else None
    gy = torch.randn(n, c_out, *size, generator=g).to(dtype).contiguous(memory_format=fmt).to(device)
    return x, w, b, a, gy


def _float64(x, w, b, a, gy):
    """Value and gradients (acc, x, w, b) of the reference in float64."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (a, x, w, b)]
    a64, x64, w64, b64 = leaves
    y = conv1x1_add_reference(a64, x64, w64, b64)
    live = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(y, live, gy.double()))
    return y.detach(), [next(got) if t is not None else None for t in leaves]


def _check_against_float64(x, w, b, a, gy, backend="triton"):
    dtype = x.dtype
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (a, x, w, b)]
    a_, x_, w_, b_ = leaves
    y = conv1x1_add(a_, x_, w_, b_, backend=backend)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy)
    want_y, want = _float64(x, w, b, a, gy)
    assert_rounded_once(y, want_y, dtype)
    got = iter(grads)
    ga, gx, gw, gb = [next(got) if t is not None else None for t in leaves]
    if a is not None:
        assert ga.dtype == dtype and torch.equal(ga, gy)  # the running sum's gradient is the output's
    assert_rounded_once(gx, want[1], dtype)  # float32 sums of exact products, one rounding
    for got_t, want_t in ((gw, want[2]), (gb, want[3])):
        if want_t is None:
            continue
        assert got_t.dtype == torch.float32 and got_t.shape == want_t.shape and torch.isfinite(got_t).all()
        torch.testing.assert_close(got_t.double(), want_t, rtol=0, atol=1e-5 * want_t.abs().max().item())


@pytest.mark.interpreted
@pytest.mark.parametrize("n, c_in, c_out, size, bias, acc, sliced", [
    (2, 20, 12, (3, 5, 7), True, True, False), (1, 32, 32, (4, 4, 9), False, True, True),
    (3, 8, 16, (5, 6), True, False, False), (1, 64, 33, (2, 3, 11), False, False, True),
    (2, 5, 3, (7, 9), False, True, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_float64(monkeypatch, n, c_in, c_out, size, bias, acc, sliced, dtype):
    from hmedn_fast.ops.triton import conv1x1 as kernels

    real_empty = torch.empty
    monkeypatch.setattr(kernels.torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan")))
    _check_against_float64(*_case(n, c_in, c_out, size, dtype, bias, acc, sliced))


@pytest.mark.interpreted
def test_triton_under_autocast_rounds_like_conv():
    """float32 features and weight under bf16 autocast: the result is bf16, the convolution of the bf16-rounded
    operands (the weight rounded in the kernel), as ``F.conv3d`` under autocast computes it."""
    x, w, b, a, gy = _case(2, 16, 16, (3, 4, 5), torch.bfloat16, True, True, False)
    x32 = x.float().contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv1x1_add(a, x32, w, b, backend="triton")
    assert y.dtype == torch.bfloat16
    assert_rounded_once(y, _float64(x, w, b, a, gy)[0], torch.bfloat16)


@pytest.mark.interpreted
def test_dense_fusion_sum_on_triton_equals_concatenation(monkeypatch):
    """The lean pathway's fusion (one term per feature) through the Triton kernels: value and every gradient equal
    one 1x1 convolution over the concatenation, in float64, within bf16 rounding of the running sums."""
    from hmedn_fast.nn.lean import dense_fusion_sum

    monkeypatch.setenv("HMEDN_BACKEND_CONV1X1_ADD", "triton")
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 8, 3, 4, 5, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
             .requires_grad_() for _ in range(4)]
    conv = torch.nn.Conv3d(32, 16, 1, bias=True)
    with torch.no_grad():
        conv.weight.copy_(conv.weight.to(torch.bfloat16).float())
        conv.bias.copy_(conv.bias.to(torch.bfloat16).float())
    y = dense_fusion_sum(feats, conv)
    gy = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    got = torch.autograd.grad(y, [*feats, conv.weight, conv.bias], gy)
    f64 = [f.detach().double().requires_grad_() for f in feats]
    w64, b64 = conv.weight.detach().double().requires_grad_(), conv.bias.detach().double().requires_grad_()
    want_y = F.conv3d(torch.cat(f64, 1), w64, b64)
    want = torch.autograd.grad(want_y, [*f64, w64, b64], gy.double())
    scale = want_y.abs().max().item()
    torch.testing.assert_close(y.double(), want_y, rtol=0, atol=4 * 2 ** -8 * scale)  # 4 roundings of the sums
    for gt, wt in zip(got, want):
        torch.testing.assert_close(gt.double(), wt, rtol=2 ** -7, atol=1e-5 * wt.abs().max().item())


def test_weight_grad_sink_gathers_slices_and_returns_them_at_channel_zero():
    from hmedn_fast.ops.conv1x1 import WeightGradSink

    weight = torch.randn(3, 7, 1, 1, 1).contiguous(memory_format=torch.channels_last_3d)
    sink = WeightGradSink(weight)
    parts = [torch.randn(3, 4), torch.randn(3, 3)]
    assert sink.put(4, parts[1]) is None
    whole = sink.put(0, parts[0])
    assert whole.shape == weight.shape and whole.stride() == weight.stride() and whole.dtype == weight.dtype
    assert torch.equal(whole.reshape(3, 7), torch.cat(parts, 1)) and sink._grad is None


def test_a_sink_needs_its_own_weight_and_a_start():
    from hmedn_fast.ops.conv1x1 import WeightGradSink

    x, weight, narrow = torch.ones(1, 4, 3, 3), torch.ones(4, 8, 1, 1), torch.ones(4, 4, 1, 1)
    for w, kwargs in ((narrow, dict(sink=WeightGradSink(narrow))),
                      (weight, dict(start=0, sink=WeightGradSink(torch.ones(4, 8, 1, 1)))),
                      (weight, dict(start=0, sink=object()))):
        with pytest.raises(ValueError, match="sink must be"):
            conv1x1_add(None, x, w, **kwargs)


@pytest.mark.not_interpreted
def test_terms_of_a_wide_weight_on_the_reference_equal_slices():
    """``start`` on the reference backend: the term reads its input channels of the wide weight, autograd gives the
    wide weight its gradient (the sink is for the Triton backend)."""
    from hmedn_fast.ops.conv1x1 import WeightGradSink

    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, c, 3, 4, generator=g, requires_grad=True) for c in (2, 3)]
    weight = torch.randn(5, 5, 1, 1, generator=g, requires_grad=True)
    sink = WeightGradSink(weight)
    y = conv1x1_add(conv1x1_add(None, xs[0], weight, None, start=0, sink=sink), xs[1], weight, None, start=2,
                    sink=sink)
    want = F.conv2d(torch.cat(xs, 1), weight)
    torch.testing.assert_close(y, want)
    gy = torch.randn(y.shape, generator=g)
    for a, b in zip(torch.autograd.grad(y, [*xs, weight], gy), torch.autograd.grad(want, [*xs, weight], gy)):
        torch.testing.assert_close(a, b)


def test_automatic_choice_is_reference_on_cpu_and_equals_it():
    x, w, b, a, _ = _case(2, 6, 4, (3, 4, 5), torch.float32, True, True, False)
    assert choose(a, x, w, x.dtype) == "reference"
    torch.testing.assert_close(conv1x1_add(a, x, w, b), a + F.conv3d(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(conv1x1_add(None, x[:, :, 0], w[..., 0], None), F.conv2d(x[:, :, 0], w[..., 0]),
                               rtol=0, atol=0)


@pytest.mark.not_interpreted
def test_forced_triton_without_it_names_the_reason():
    x, w, _, a, _ = _case(1, 4, 4, (3, 3, 3), torch.bfloat16, False, True, False)
    with pytest.raises(RuntimeError, match="conv1x1_add.*TRITON_INTERPRET|conv1x1_add.*triton"):
        conv1x1_add(a, x, w, backend="triton")


@pytest.mark.interpreted
@pytest.mark.parametrize("what, reason", [
    ("float32", "compute dtype"), ("nc_layout", "channels innermost"), ("wide", "64"), ("acc_dtype", "acc's dtype"),
    ("empty", "empty")])
def test_triton_declines_with_a_reason(what, reason):
    x, w, _, a, _ = _case(1, 4, 4, (3, 3, 3), torch.bfloat16, False, True, False)
    if what == "float32":
        x, a = x.float(), a.float()
    elif what == "nc_layout":
        x = x.contiguous()
    elif what == "wide":
        x = torch.randn(1, 65, 3, 3, 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
        w = torch.randn(4, 65, 1, 1, 1)
    elif what == "acc_dtype":
        a = a.half()
    else:
        x, a = x[:0], a[:0]  # an empty batch
        torch.testing.assert_close(conv1x1_add(a, x, w), a + F.conv3d(x, w))  # automatic: the reference
    with pytest.raises(RuntimeError, match=reason):
        conv1x1_add(a, x, w, backend="triton")


def test_int32_offsets_check_counts_the_buffer_a_slice_lives_in():
    """A channel slice's offsets run over its whole buffer (voxel stride = the buffer's channels): meta tensors."""
    from hmedn_fast.ops.conv1x1 import offsets_fit_int32
    from hmedn_fast.ops.strides import voxel_stride

    def fits(voxels: int, wide: int) -> bool:
        t = torch.empty_strided((1, 32, voxels), (voxels * wide, 1, wide), device="meta")
        return offsets_fit_int32(t, voxel_stride(t))

    assert fits(2 ** 20, 2 ** 11)  # last offset 2^31 - 2^11 + 31
    assert not fits(2 ** 20 + 1, 2 ** 11)  # one voxel more: past 2^31
    assert fits(2 ** 26 - 1, 32)  # a dense channels-last tensor just below 2^31 elements


@pytest.mark.parametrize("args, error, match", [
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(1, 4, 3, 3, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (dict(x=torch.ones(1, 4)), ValueError, "x must be"),
    (dict(weight=torch.ones(4, 4, 3, 3)), ValueError, "weight must be"),
    (dict(weight=torch.ones(4, 5, 1, 1)), ValueError, "weight must be"),
    (dict(bias=torch.ones(5)), ValueError, "bias must have shape"),
    (dict(acc=torch.ones(1, 4, 3, 2)), ValueError, "acc must have shape"),
    (dict(acc=torch.ones(1, 4, 3, 3, dtype=torch.int32)), TypeError, "acc must be"),
    (dict(start=-1), ValueError, "start must be"),
    (dict(start=True), ValueError, "start must be"),
    (dict(weight=torch.ones(4, 6, 1, 1), start=3), ValueError, "weight must be"),
])
def test_bad_inputs_name_the_argument(args, error, match):
    call = dict(acc=None, x=torch.ones(1, 4, 3, 3), weight=torch.ones(4, 4, 1, 1), bias=None) | args
    with pytest.raises(error, match=match):
        conv1x1_add(**call)


@pytest.mark.cuda
@pytest.mark.parametrize("seed", range(6))
def test_cuda_matches_float64(seed):
    g = torch.Generator().manual_seed(seed)
    n, c_in, c_out = int(torch.randint(1, 3, (1,), generator=g)), *(int(v) for v in torch.randint(1, 65, (2,),
                                                                                                  generator=g))
    size = tuple(int(v) for v in torch.randint(1, 40, (2 + seed % 2,), generator=g))
    dtype = (torch.bfloat16, torch.float16)[seed % 2]
    _check_against_float64(*_case(n, c_in, c_out, size, dtype, seed % 3 == 0, seed % 3 != 1, seed % 2 == 1, "cuda",
                                  seed))


@pytest.mark.cuda
def test_cuda_autocast_rounds_the_weight_like_conv():
    """Arbitrary float32 weights under bf16 autocast: the kernel's rounding of the weight is autocast's (to nearest):
    the result equals F.conv3d + add under autocast within one bf16 rounding of the sum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 16, 16, 16, generator=g).cuda().contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(32, 32, 1, 1, 1, generator=g).cuda(), torch.randn(32, generator=g).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = F.conv3d(x, w)
        assert choose(a, x.bfloat16(), w, torch.bfloat16) == "triton"
        y = conv1x1_add(a, x, w, b)
    want = a.double() + F.conv3d(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double())
    assert_rounded_once(y, want, torch.bfloat16)
