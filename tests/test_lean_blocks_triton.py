"""LeanBatchNormBlock on the Triton norm engine (hmedn_fast.nn.lean): outputs, every gradient and the running
statistics equal the eager ResidualDilatedBlock (ATen BatchNorm) in float32 under TRITON_INTERPRET=1 and on the
GPU (marked ``cuda``); the engine choice; bf16 accuracy against float64 on the GPU.

The interpreted tests run in a TRITON_INTERPRET=1 subprocess (``test_interpreter_suite``)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hmedn_fast.nn import ResidualDilatedBlock
from hmedn_fast.nn import lean


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


def _blocks(channels: int, spatial_dims: int, mode: str, training: bool, dtype=torch.float32, affine=True):
    norm = "batch" if affine else ("batch", {"affine": False})
    ref = ResidualDilatedBlock(channels, (1, 2), spatial_dims=spatial_dims, norm=norm).to(dtype).train(training)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.3)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    out = copy.deepcopy(ref)
    out.checkpoint = mode
    return ref, out


def _run(block: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    y = block(x)
    y.backward(gy)
    return [y.detach(), x.grad, *(p.grad for p in block.parameters()), *block.buffers()]


@pytest.fixture
def spy(monkeypatch):
    """Counts the lean block's Triton norm calls."""
    calls = []
    real = lean.triton_norm_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(lean, "triton_norm_forward", counted)
    return calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.interpreted
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["lean", "middle", "blocks"])
@pytest.mark.parametrize("shape,channels_last", [((2, 6, 5, 6, 7), True), ((2, 6, 5, 6, 7), False),
                                                 ((3, 6, 9, 11), False)])
def test_triton_engine_equals_eager(monkeypatch, spy, training, mode, shape, channels_last):
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    ref, block = _blocks(shape[1], len(shape) - 2, mode, training)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d)
    gy = torch.randn(shape)
    want, got = _run(ref, x, gy), _run(block, x, gy)
    assert len(spy) == 2  # both norms of the forward took the Triton engine
    assert len(got) == len(want) == 2 + 6 + 6  # y, dx, 6 parameters, 2 x (mean, var, count)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5 * w.abs().max().item() + 1e-7, msg=f"tensor {i}")
    if channels_last:
        assert got[0].is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.interpreted
@pytest.mark.parametrize("frozen", [False, True])
def test_triton_engine_without_affine_or_with_frozen_parameters(monkeypatch, spy, frozen):
    """Norms without affine parameters; or conv / norm parameters that need no gradient (only x does)."""
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    ref, block = _blocks(5, 3, "lean", True, affine=frozen)
    if frozen:
        for b in (ref, block):
            b.requires_grad_(False)
    x, gy = torch.randn(2, 5, 4, 5, 6), torch.randn(2, 5, 4, 5, 6)
    want, got = _run(ref, x, gy), _run(block, x, gy)
    assert len(spy) == 2 and len(got) == len(want) == (2 + 6 + 6 if frozen else 2 + 2 + 6)
    assert [g is None for g in got] == [w is None for w in want] == [False, False] + [frozen] * (len(got) - 8) + [
        False] * 6
    for i, (g, w) in enumerate(zip(got, want)):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5 * w.abs().max().item() + 1e-7, msg=f"tensor {i}")


@pytest.mark.not_interpreted
def test_cpu_takes_the_aten_engine(spy):
    """Without a forced backend the CPU runs ATen's BatchNorm (Triton would need the interpreter)."""
    ref, block = _blocks(4, 3, "lean", True)
    x, gy = torch.randn(2, 4, 5, 5, 5), torch.randn(2, 4, 5, 5, 5)
    for g, w in zip(_run(block, x, gy), _run(ref, x, gy)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
    assert spy == []


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["lean", "middle", "blocks"])
def test_cuda_triton_engine_equals_eager_float32(monkeypatch, spy, mode):
    """An HR block of hmedn_3d_l2 (32 channels, 48^3, channels-last) in float32 (TF32 off): the automatic engine
    is Triton on CUDA. The output and the running statistics must match eager's to float32 rounding. Two
    BatchNorm implementations differ in the last bits, which can flip the ReLU mask of a near-zero activation and
    change the gradient at that element by O(1) (and its convolution neighbourhood after it), so gradients must
    match in bulk: relative L2 error below 1e-3 and, for the large ones, at most 1 % of the elements beyond 1e-5 of
    the tensor's range."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ref, block = (b.cuda().to(memory_format=torch.channels_last_3d) for b in _blocks(32, 3, mode, True))
    x = torch.randn(1, 32, 48, 48, 48, device="cuda").to(memory_format=torch.channels_last_3d)
    gy = torch.randn(1, 32, 48, 48, 48, device="cuda")
    want, got = _run(ref, x, gy), _run(block, x, gy)
    assert len(spy) == 2
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        if i == 0 or i >= 8:  # output, running statistics
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=f"tensor {i}")
            continue
        off = ((g - w).abs() > 1e-5 * w.abs().max()).float().mean().item() if g.numel() > 1000 else 0.0
        assert off < 0.01 and _rel(g, w) < 1e-3, (i, off, _rel(g, w))


@pytest.mark.cuda
def test_cuda_triton_engine_bf16_accuracy(spy):
    """Under bf16 autocast the lean block (Triton norms) and the eager block round at different points; both
    are compared with a float64 run: the lean block's error must stay within 10 % of the eager one's (plus a
    bf16-sized floor), and the eager error must be bf16-sized."""
    ref, block = (b.cuda().to(memory_format=torch.channels_last_3d) for b in _blocks(32, 3, "lean", True))
    exact = copy.deepcopy(ref).double()
    x = torch.randn(1, 32, 48, 48, 48, device="cuda").to(memory_format=torch.channels_last_3d)
    gy = torch.randn(1, 32, 48, 48, 48, device="cuda")
    want = _run(exact, x.double(), gy.double())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, got = _run(ref, x, gy), _run(block, x, gy)
    assert len(spy) == 2
    for i, (g, e, w) in enumerate(zip(got[:8], eager[:8], want[:8])):  # y, dx and the 6 parameter gradients
        err_g, err_e = _rel(g, w), _rel(e, w)
        assert 0 < err_e < 0.1, (i, err_e)
        assert err_g <= 1.1 * err_e + 2e-3, (i, err_g, err_e)
