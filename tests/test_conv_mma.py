"""Tensor-core 3x3x3 convolution (hmedn_fast.ops.conv_mma, kernels/conv3x3.cu): forward and input gradient against
F.conv3d / its autograd in float64 on the same bf16/fp16 values (float32 accumulation, one rounding), on random
shapes (batches, sizes smaller than the 16 x 16 tile and than the dilation, dilations 1-6), outputs poisoned before
the kernel runs, writes into a channel slice of a wider buffer (the other channels untouched); what it declines, and
the binding's errors. The kernel runs on CUDA only (marked ``cuda``); the CPU tests cover ``unsupported``."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from _fake_measure import count_calls
from _rounding import assert_rounded_once
from hmedn_fast.ops import _ext, conv_mma

CL = torch.channels_last_3d


def _case(n, size, dtype, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, *size, generator=g).to(dtype).to(device).contiguous(memory_format=CL)
    w = (torch.randn(32, 32, 3, 3, 3, generator=g) / (27 * 32) ** 0.5).to(dtype).to(device)
    return x, w


def test_conv_forward_stats_on_the_cpu_are_none():
    from hmedn_fast.ops.conv import conv_forward

    x, w = _case(1, (4, 16, 16), torch.bfloat16, 0, device="cpu")
    y, part = conv_forward(x, w, [1] * 3, [1] * 3, [1] * 3, 1, stats=True)
    assert part is None
    torch.testing.assert_close(y, conv_forward(x, w, [1] * 3, [1] * 3, [1] * 3, 1), rtol=0, atol=0)


def test_unsupported_names_the_reason_on_cpu():
    x, w = _case(1, (4, 5, 6), torch.bfloat16, 0, device="cpu")
    reason = conv_mma.unsupported(x, w, 2)
    assert reason is not None and ("CUDA" in reason)


def _random_shapes(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        n = int(torch.randint(1, 3, (), generator=g))
        size = tuple(int(v) for v in torch.randint(1, 40, (3,), generator=g))
        d = int(torch.randint(1, 7, (), generator=g))
        yield n, size, d


def _force_tile_rows(monkeypatch, rows: int) -> None:
    """Every call below launches the kernel with ``rows``-row output tiles (partial edge tiles included); 8 rows are
    the column kernel, which only sm_90a builds have (skipped elsewhere, saying so)."""
    if rows == conv_mma.COLUMN_ROWS and not _ext.extension().conv3x3_mma_column_runs_on(torch.cuda.current_device()):
        pytest.skip("the column kernel (tile_rows 8) needs an sm_90a build on an sm_90 GPU")
    monkeypatch.setattr(conv_mma, "tile_rows", lambda height, dilation, device: rows)


def test_tile_rows_rule(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [conv_mma.tile_rows(h, 4, cpu) for h in (16, 32, 48, 64, 5)] == [16, 32, 16, 32, 16]
    assert [conv_mma.tile_rows(64, d, cpu) for d in (1, 2, 3, 4, 6)] == [16, 32, 32, 32, 32]
    monkeypatch.setattr(conv_mma, "_built", lambda: True)
    monkeypatch.setattr(conv_mma, "_column_runs_on", lambda device: device == 0)
    assert [conv_mma.tile_rows(h, d, gpu) for h, d in ((16, 1), (64, 2), (5, 6))] == [8, 8, 8]
    assert conv_mma.tile_rows(64, 2, torch.device("cuda", 1)) == 32
    monkeypatch.setattr(conv_mma, "COLUMNS", False)
    assert conv_mma.tile_rows(64, 2, gpu) == 32


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [8, 16, 32])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_and_input_grad_match_float64(seed, dtype, rows, monkeypatch):
    _force_tile_rows(monkeypatch, rows)
    for n, size, d in _random_shapes(4, seed):
        x, w = _case(n, size, dtype, seed)
        assert conv_mma.unsupported(x, w, d) is None
        out = torch.full_like(x, float("nan"))
        y = conv_mma.conv3x3_forward(x, w, d, out=out)
        assert y is out
        assert_rounded_once(y, F.conv3d(x.double(), w.double(), padding=d, dilation=d), dtype)
        # input gradient: x plays the output gradient
        xd = x.double().requires_grad_()
        F.conv3d(xd, w.double(), padding=d, dilation=d).backward(x.double())
        assert_rounded_once(conv_mma.conv3x3_input_grad(x, w, d), xd.grad, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("n, size, d", [(2, (45, 64, 48), 3), (1, (64, 64, 64), 1), (1, (20, 24, 40), 6),
                                        (3, (9, 16, 16), 2)])
def test_column_kernel_on_long_columns(n, size, d, monkeypatch):
    """The column kernel on volumes large enough for columns of up to 8 output planes (the launcher's choice), chains
    of uneven length (depth not a multiple of the dilation or of the column), forward, input gradient and the input
    gradient added into a buffer, each against float64 rounded once."""
    _force_tile_rows(monkeypatch, conv_mma.COLUMN_ROWS)
    x, w = _case(n, size, torch.bfloat16, d)
    want = F.conv3d(x.double(), w.double(), padding=d, dilation=d)
    assert_rounded_once(conv_mma.conv3x3_forward(x, w, d, out=torch.full_like(x, float("nan"))), want,
                        torch.bfloat16)
    xd = x.double().requires_grad_()
    F.conv3d(xd, w.double(), padding=d, dilation=d).backward(x.double())
    assert_rounded_once(conv_mma.conv3x3_input_grad(x, w, d), xd.grad, torch.bfloat16)
    base = torch.randn_like(x, dtype=torch.float32).bfloat16().contiguous(memory_format=CL)
    got = conv_mma.conv3x3_input_grad(x, w, d, add_to=base.clone())
    assert_rounded_once(got, xd.grad + base.double(), torch.bfloat16)


_FIRST_LAUNCH_IN_CAPTURE = textwrap.dedent("""
    import torch
    from hmedn_fast.ops import conv_mma
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 32, 7, 16, 24, generator=g).half().cuda().contiguous(memory_format=torch.channels_last_3d)
    w = (torch.randn(32, 32, 3, 3, 3, generator=g) / 30).half().cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the process's first use of the kernels
        y = conv_mma.conv3x3_forward(x, w, 3)
        gi = conv_mma.conv3x3_input_grad(x, w, 3)
    x.copy_(torch.randn(x.shape, generator=g).half())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, conv_mma.conv3x3_forward(x, w, 3)), "forward replay differs from eager"
    assert torch.equal(gi, conv_mma.conv3x3_input_grad(x, w, 3)), "input gradient replay differs from eager"
    print("rows", conv_mma.tile_rows(16, 3, x.device))
""")


@pytest.mark.cuda
def test_first_launch_inside_a_cuda_graph_capture():
    """A process's first launch of the kernels may come while a CUDA graph is captured (checkpoint="auto" runs "none"
    eagerly and captures "lean"): in a fresh process the first forward and input gradient (fp16, dilation 3) are
    captured without invalidating the capture, and replays on new inputs equal eager calls bit for bit."""
    run = subprocess.run([sys.executable, "-c", _FIRST_LAUNCH_IN_CAPTURE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("rows ")


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [0, 8, 32])
def test_writes_into_a_channel_slice_only(offset):
    x, w = _case(2, (5, 19, 33), torch.bfloat16, 7)
    buf = torch.full((2, 72, 5, 19, 33), float("nan"), dtype=torch.bfloat16, device="cuda").contiguous(
        memory_format=CL)
    src = torch.randn(2, 72, 5, 19, 33, device="cuda").bfloat16().contiguous(memory_format=CL)
    src[:, offset:offset + 32] = x  # the input as a slice of a wider buffer too
    before = buf.clone()
    conv_mma.conv3x3_forward(src[:, offset:offset + 32], w, 3, out=buf[:, offset:offset + 32])
    assert_rounded_once(buf[:, offset:offset + 32].contiguous(memory_format=CL),
                        F.conv3d(x.double(), w.double(), padding=3, dilation=3), torch.bfloat16)
    rest = torch.ones(72, dtype=torch.bool)
    rest[offset:offset + 32] = False
    assert torch.equal(buf[:, rest].isnan(), before[:, rest].isnan())


@pytest.mark.cuda
def test_declines_and_errors():
    x, w = _case(1, (8, 8, 8), torch.bfloat16, 1)
    assert "32 -> 32" in conv_mma.unsupported(x[:, :16].contiguous(memory_format=CL), w[:16, :16], 1)
    assert "bfloat16 or float16" in conv_mma.unsupported(x.float(), w.float(), 1)
    assert "channels-last" in conv_mma.unsupported(x.contiguous(), w, 1)
    big = _ext.extension().conv3x3_mma_max_dilation() + 1
    assert "dilation" in conv_mma.unsupported(x, w, big)
    with pytest.raises(ValueError, match="dilation"):
        conv_mma.conv3x3_forward(x, w, big)
    with pytest.raises(ValueError, match="channels innermost"):
        conv_mma.conv3x3_forward(x.contiguous(), w, 1)
    with pytest.raises(TypeError, match="dtype"):
        conv_mma.conv3x3_forward(x, w, 1, out=torch.empty_like(x, dtype=torch.float16))


def test_forcing_cuda_on_the_cpu_names_the_reason():
    from hmedn_fast.ops.conv import conv_forward

    x, w = _case(1, (4, 5, 6), torch.bfloat16, 0, device="cpu")
    with pytest.raises(RuntimeError, match="CUDA"):
        conv_forward(x, w, (1, 1, 1), (2,) * 3, (2,) * 3, 1, backend="cuda")


@pytest.mark.cuda
def test_dispatch_takes_the_kernel_for_32_to_32(monkeypatch):
    """The automatic choice runs this kernel for a 32 -> 32 "same" 3x3x3 convolution (static rule without
    cudnn.benchmark; with it, all three backends are timed once and the fastest remembered), forward and input
    gradient, with the float64 result rounded once; 32 -> 16 never reaches it."""
    from hmedn_fast.ops import measured
    from hmedn_fast.ops.conv import conv_forward, conv_input_grad

    fwd = count_calls(monkeypatch, conv_mma, "conv3x3_forward")
    dgrad = count_calls(monkeypatch, conv_mma, "conv3x3_input_grad")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    x, w = _case(2, (9, 21, 17), torch.bfloat16, 3)
    args = ((1, 1, 1), (2,) * 3, (2,) * 3, 1)
    assert_rounded_once(conv_forward(x, w, *args), F.conv3d(x.double(), w.double(), padding=2, dilation=2),
                        torch.bfloat16)
    xd = x.double().requires_grad_()
    F.conv3d(xd, w.double(), padding=2, dilation=2).backward(x.double())
    assert_rounded_once(conv_input_grad(x, w, x.shape, *args), xd.grad, torch.bfloat16)
    assert len(fwd) == len(dgrad) == 1
    conv_forward(x, w[:16], *args)
    assert len(fwd) == 1
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    measured.forget()
    conv_forward(x, w, *args)
    (times,) = measured.timings().values()
    assert sorted(times) == ["cuda", "reference", "triton"]
    measured.forget()


def _assert_wgrad_matches_float64(g, x, d):
    """The kernel's weight gradient within 1e-5 of the largest entry of F.conv3d's float64 one (same bf16/fp16
    values; float32 accumulation of exact products)."""
    wd = torch.zeros(32, 32, 3, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    F.conv3d(x.double(), wd, padding=d, dilation=d).backward(g.double())
    got = conv_mma.conv3x3_wgrad(g, x, d)
    assert got.dtype == torch.float32 and got.shape == wd.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), wd.grad, rtol=0, atol=1e-5 * wd.grad.abs().max().item())


@pytest.mark.cuda
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_grad_matches_float64(seed, dtype):
    """float32 accumulation of bf16/fp16 products (exact) over up to ~100k voxels: within 1e-5 of the largest
    float64 gradient entry."""
    for n, size, d in _random_shapes(3, 100 + seed):
        x, _ = _case(n, size, dtype, seed)
        g, _ = _case(n, size, dtype, seed + 50)
        _assert_wgrad_matches_float64(g, x, d)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [1, 4, 5, 6])
def test_weight_grad_with_many_tiles_per_block(d):
    """594 output tiles per kernel depth against 2 x SMs / 3 blocks: every block walks and accumulates several."""
    x, _ = _case(2, (33, 47, 40), torch.bfloat16, d)
    g, _ = _case(2, (33, 47, 40), torch.bfloat16, d + 50)
    _assert_wgrad_matches_float64(g, x, d)


@pytest.mark.cuda
def test_weight_grad_of_channel_slices_and_dispatch(monkeypatch):
    """Input and gradient as channel slices of wider channels-last buffers; conv_backward's automatic choice runs it
    for 32 -> 32 and returns the weight's dtype."""
    from hmedn_fast.ops.conv import conv_backward

    calls = count_calls(monkeypatch, conv_mma, "conv3x3_wgrad")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    x, w = _case(2, (6, 21, 35), torch.bfloat16, 5)
    g, _ = _case(2, (6, 21, 35), torch.bfloat16, 6)
    wide = torch.randn(2, 48, 6, 21, 35, device="cuda").bfloat16().contiguous(memory_format=CL)
    wide[:, 8:40] = x
    want = torch.zeros(32, 32, 3, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    F.conv3d(x.double(), want, padding=2, dilation=2).backward(g.double())
    got = conv_mma.conv3x3_wgrad(g, wide[:, 8:40], 2)
    torch.testing.assert_close(got.double(), want.grad, rtol=0, atol=1e-5 * want.grad.abs().max().item())
    gi, gw = conv_backward(g, x, w.float(), (1, 1, 1), (2,) * 3, (2,) * 3, 1, True, True)
    assert gw.dtype == torch.float32 and len(calls) == 2
    torch.testing.assert_close(gw.double(), want.grad, rtol=0, atol=1e-5 * want.grad.abs().max().item())
    assert "grad" in conv_mma.wgrad_unsupported(g.float(), x, 2)


def _tile_statistics(y: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """(N, D * H / rows * W / 16, 2, 32) float64: each rows x 16 tile's per-channel mean and M2 of y as stored."""
    n, c, d, h, w = y.shape
    v = y.double().unflatten(4, (w // 16, 16)).unflatten(3, (h // rows, rows))  # (N, C, D, th, rows, tw, 16)
    v = v.permute(0, 2, 3, 5, 1, 4, 6).reshape(n, d * (h // rows) * (w // 16), c, rows * 16)
    mean = v.mean(-1)
    return torch.stack([mean, (v - mean[..., None]).square().sum(-1)], 2)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [8, 16, 32])
@pytest.mark.parametrize("d", [1, 2, 5])
def test_forward_writes_tile_statistics(d, rows, monkeypatch):
    """``stats``: every tile's per-channel mean and M2 of the stored (rounded) outputs, float64 reference, for 8-
    (column kernel), 16- and 32-row tiles; poisoned buffer fully written; H or W not a multiple of 16 has no statistics
    shape and the extension refuses it, as it refuses a height that is not a multiple of the tile rows and tile rows
    other than 8 / 16 / 32."""
    _force_tile_rows(monkeypatch, rows)
    x, w = _case(2, (5, 32, 48), torch.bfloat16, d)
    shape = conv_mma.tile_stats_shape(x, d)
    assert shape == (2, 5 * (32 // rows) * 3, 2, 32)
    stats = torch.full(shape, float("nan"), device="cuda")
    y = conv_mma.conv3x3_forward(x, w, d, stats=stats)
    assert_rounded_once(y, F.conv3d(x.double(), w.double(), padding=d, dilation=d), torch.bfloat16)
    want = _tile_statistics(y, rows)
    assert torch.isfinite(stats).all()
    torch.testing.assert_close(stats[:, :, 0].double(), want[:, :, 0], rtol=1e-5, atol=1e-6 * y.abs().max().item())
    m2 = want[:, :, 1]
    torch.testing.assert_close(stats[:, :, 1].double(), m2, rtol=1e-4, atol=1e-4 * m2.max().item())
    odd = x[..., :40]
    assert conv_mma.tile_stats_shape(odd, d) is None
    with pytest.raises(ValueError, match="multiple of 16"):
        conv_mma.conv3x3_forward(odd.contiguous(memory_format=CL), w, d,
                                 stats=torch.empty(2, 30, 2, 32, device="cuda"))
    ext, packed = _ext.extension(), torch.zeros(27, 32, 32, dtype=x.dtype, device="cuda")
    short = _case(2, (5, 16, 48), torch.bfloat16, d)[0]
    with pytest.raises(ValueError, match="tile_rows"):
        ext.conv3x3_mma_(short, packed, torch.empty_like(short), d, False, False,
                         torch.empty(2, 15, 2, 32, device="cuda"), 32)
    with pytest.raises(ValueError, match="tile_rows must be 8, 16 or 32"):
        ext.conv3x3_mma_(x, packed, torch.empty_like(x), d, False, False, None, 12)


@pytest.mark.cuda
@pytest.mark.parametrize("size, d", [((4, 16, 32), 2), ((3, 32, 16), 4)])
def test_conv_forward_hands_over_statistics_only_from_the_kernel(size, d):
    """conv_forward(stats=True): (y, part) with the kernel's tile statistics (of the tiles tile_rows picks for the GPU)
    when the CUDA kernel runs, None from the other backends; a batch norm fed with them normalises as with its own
    reduce pass."""
    from hmedn_fast.ops.conv import conv_forward
    from hmedn_fast.ops.triton import norm as kernels

    x, w = _case(1, size, torch.bfloat16, 3)
    rows = conv_mma.tile_rows(size[1], d, x.device)
    args = ([1] * 3, [d] * 3, [d] * 3, 1)
    y, part = conv_forward(x, w, *args, backend="cuda", stats=True)
    assert part is not None and part.shape == (1, size[0] * size[1] // rows * size[2] // 16, 2, 32)
    torch.testing.assert_close(part.double(), _tile_statistics(y, rows), rtol=1e-4,
                               atol=1e-4 * y.abs().max().item() ** 2)
    assert conv_forward(x, w, *args, backend="reference", stats=True)[1] is None
    yf, ys = kernels.flat(y)
    geo = kernels.geometry(tuple(y.shape), ys, None, "batch", 1, True)
    gamma, beta = torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda")
    own = kernels.forward(geo, yf, None, gamma, beta, None, None, 1e-5, 0.1, True, True, False)
    handed = kernels.forward(geo, yf, None, gamma, beta, None, None, 1e-5, 0.1, True, True, False, part=part)
    torch.testing.assert_close(handed[1], own[1], rtol=1e-5, atol=1e-6)
    scale = own[0].float().abs().max().item()
    torch.testing.assert_close(handed[0].float(), own[0].float(), rtol=0, atol=2 ** -7 * scale)
