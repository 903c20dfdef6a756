"""Memory-lean dense block (hmedn_fast.nn.dense_lean) against the eager DenseBlock: outputs, input and parameter
gradients, running statistics and layout, in float64 (ATen engine), under TRITON_INTERPRET=1 with the Triton
norm engine forced, and on the GPU (marked ``cuda``); float64 gradcheck; saved memory.

The interpreted tests run in a TRITON_INTERPRET=1 subprocess (``test_interpreter_suite``)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hmedn_fast.nn.blocks import DenseBlock
from hmedn_fast.nn.dense_lean import LeanDenseBlock, lean_dense_forward, supported


@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


def _blocks(c_in, growth, layers, spatial_dims, dtype=torch.float64, affine=True, momentum=0.1, norm="batch"):
    spec = norm if norm != "batch" or affine else ("batch", {"affine": False})
    ref = DenseBlock(c_in, growth, layers, spatial_dims, spec).to(dtype)
    g = torch.Generator().manual_seed(3)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.momentum = momentum
            if m.affine:
                m.weight.data = torch.rand(m.weight.shape, generator=g, dtype=dtype) + 0.5
                m.bias.data = torch.randn(m.bias.shape, generator=g, dtype=dtype) * 0.3
    lean = copy.deepcopy(ref)
    lean.lean = True
    return ref, lean


def _run(block, x, gy, x_grad=True):
    xi = x.clone().requires_grad_(x_grad)
    y = block(xi)
    y.backward(gy)
    return y, xi.grad, [p.grad for p in block.parameters()], [b.clone() for b in block.buffers()]


def _compare(ref, lean, x, rtol, atol_scale, x_grad=True, steps=2):
    out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    for _ in range(steps):
        shape = (x.shape[0], ref.out_channels, *x.shape[2:])
        gy = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(x.device, out_dtype)
        ref.zero_grad(), lean.zero_grad()
        want = _run(ref, x, gy, x_grad)
        got = _run(lean, x, gy, x_grad)
        fmt = (torch.channels_last if x.ndim == 4 else torch.channels_last_3d) if not x.is_contiguous() else (
            torch.contiguous_format)
        assert got[0].dtype == want[0].dtype and got[0].is_contiguous(memory_format=fmt)  # x's layout
        for a, b in zip(got[:2], want[:2]):
            if b is None:
                assert a is None
                continue
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol_scale * b.abs().max().item())
        for a, b in zip(got[2] + got[3], want[2] + want[3]):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol_scale * max(b.abs().max().item(), 1e-30))
        x = x * 1.2 + 0.1


@pytest.mark.not_interpreted
@pytest.mark.parametrize("shape, channels_last", [((2, 6, 7, 9), False), ((2, 6, 7, 9), True),
                                                  ((2, 6, 5, 6, 7), False), ((2, 6, 5, 6, 7), True)])
@pytest.mark.parametrize("affine, momentum", [(True, 0.1), (False, None)])
def test_lean_dense_block_equals_eager_float64(shape, channels_last, affine, momentum):
    ref, lean = _blocks(6, 4, 3, len(shape) - 2, affine=affine, momentum=momentum)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    _compare(ref, lean, x, rtol=1e-10, atol_scale=1e-12)
    ref.eval(), lean.eval()  # running statistics, gradients still on (fine-tuning with frozen norms)
    _compare(ref, lean, x, rtol=1e-10, atol_scale=1e-12, steps=1)


@pytest.mark.not_interpreted
@pytest.mark.parametrize("limit", [1, 5, 8, 100])
@pytest.mark.parametrize("affine", [True, False])
def test_lean_dense_block_channel_groups_equal_eager_float64(limit, affine):
    """group_channels: the backward takes each layer's input in groups of at most ``limit`` channels (the last group
    narrower when it does not divide the layer's 6, 10 or 14 channels); the same outputs, gradients and running
    statistics as the eager block."""
    ref, lean = _blocks(6, 4, 3, 3, affine=affine)
    lean.group_channels = limit
    x = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
    _compare(ref, lean, x, rtol=1e-10, atol_scale=1e-12)


@pytest.mark.not_interpreted
def test_lean_dense_block_channel_groups_hold_less():
    """The widest layer's backward temporaries shrink from its 32 input channels to 8 with group_channels=8: its
    input's replay copy, activation and input gradient (at least 3 x 24 channels less at the backward's peak of live
    bytes); the forward is not grouped (the same peak)."""
    from _live_bytes import LiveBytes

    _, lean = _blocks(8, 8, 4, 3)  # layer inputs: 8, 16, 24, 32 channels
    x = torch.randn(1, 8, 12, 12, 12, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
    gy = torch.randn(1, 40, 12, 12, 12, dtype=torch.float64)
    channel = 12**3 * 8
    peaks = {}
    for limit in (None, 8):
        lean.group_channels = limit
        with LiveBytes() as fwd:
            y = lean(x.clone().requires_grad_())
        with LiveBytes() as bwd:
            y.backward(gy)
        peaks[limit] = fwd.peak, bwd.peak
    assert peaks[None][0] == peaks[8][0]
    assert peaks[None][1] - peaks[8][1] >= 3 * 24 * channel


@pytest.mark.not_interpreted
@pytest.mark.parametrize("lean_block", [True, False])
def test_input_buffer_equals_concatenation(lean_block):
    """block(block.input_buffer(parts)) equals block(torch.cat(parts, 1)) with the parts' gradients, in float64
    (parts of two layouts: the buffer takes the first part's); the lean block fills the buffer it was given in place
    (the output is the buffer) and makes no concatenated tensor: the forward's peak of live bytes is lower by at
    least the concatenation's size."""
    from _live_bytes import LiveBytes

    ref, lean = _blocks(6, 4, 3, 3)
    lean.lean = lean_block
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(2, 4, 5, 6, 7, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last_3d),
             torch.randn(2, 2, 5, 6, 7, generator=g, dtype=torch.float64)]
    gy = torch.randn(2, ref.out_channels, 5, 6, 7, generator=g, dtype=torch.float64)
    results, peaks = [], []
    for block, via_buffer in ((ref, False), (lean, False), (lean, True)):
        block.zero_grad()
        ps = [p.clone().requires_grad_() for p in parts]
        with LiveBytes() as m:
            buf = block.input_buffer([ps[0], ps[1]]) if via_buffer else torch.cat(ps, 1)
            y = block(buf)
        if via_buffer and lean_block:
            assert y is buf and y.shape[1] == block.out_channels
            assert y.is_contiguous(memory_format=torch.channels_last_3d)
        y.backward(gy)
        results.append((y, *(p.grad for p in ps), *(q.grad for q in block.parameters())))
        peaks.append(m.peak)
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if lean_block:
        assert peaks[1] - peaks[2] >= 2 * 6 * 5 * 6 * 7 * 8  # the (2, 6, 5, 6, 7) float64 concatenation


@pytest.mark.not_interpreted
def test_input_buffer_gradcheck():
    _, lean = _blocks(3, 2, 2, 2)
    parts = [torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True),
             torch.randn(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)]
    params = list(lean.parameters())
    assert torch.autograd.gradcheck(lambda a, b, *ps: lean(lean.input_buffer([a, b])), (*parts, *params), eps=1e-6,
                                    atol=1e-6)


@pytest.mark.not_interpreted
def test_dense_block_rejects_wrong_inputs():
    """A tensor of the wrong channel count, even one of the output's size, is an error (never taken as a buffer and
    overwritten); a lean buffer given to the block when it does not run lean (no grad) is an error too; so are
    parts that are none, of other sizes or of another channel count in all."""
    _, lean = _blocks(6, 4, 3, 3)
    for channels in (5, lean.out_channels):
        with pytest.raises(ValueError, match="x must be"):
            lean(torch.randn(1, channels, 4, 4, 4, dtype=torch.float64, requires_grad=True))
    buf = lean.input_buffer([torch.randn(1, 6, 4, 4, 4, dtype=torch.float64, requires_grad=True)])
    with torch.no_grad(), pytest.raises(ValueError, match="lean buffer"):
        lean(buf)
    a = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    for bad in ([], [a], [a, torch.randn(1, 2, 4, 4, 5, dtype=torch.float64)], [a, torch.randn(2, 2, 4, 4, 4)]):
        with pytest.raises(ValueError, match="parts must"):
            lean.input_buffer(bad)


@pytest.mark.not_interpreted
def test_group_channels_rejects_bad_values():
    block = DenseBlock(4, 4, 2, 3)
    for bad in (0, -2, 1.5, True, "8"):
        with pytest.raises(ValueError, match="group_channels"):
            block.group_channels = bad
    block.group_channels = 16
    assert block.group_channels == 16


@pytest.mark.not_interpreted
def test_lean_dense_block_parameters_only_and_fallbacks():
    """x without grad (parameters only); instance-norm blocks and eval without grad run the eager path."""
    ref, lean = _blocks(5, 3, 2, 3)
    x = torch.randn(2, 5, 4, 5, 6, dtype=torch.float64)
    _compare(ref, lean, x, rtol=1e-10, atol_scale=1e-12, x_grad=False)
    inst = DenseBlock(5, 3, 2, 3, "instance").double()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(lean))  # DDP runs: statistics across processes
    assert supported(lean) and not supported(inst) and not supported(synced)
    calls = []
    real = LeanDenseBlock.apply
    LeanDenseBlock.apply = lambda *a: calls.append(1) or real(*a)
    try:
        inst.lean = True
        inst(x.clone().requires_grad_()).sum().backward()
        with torch.no_grad():
            lean(x)
        assert calls == []
        lean(x.clone().requires_grad_())
        assert calls == [1]
    finally:
        LeanDenseBlock.apply = real


@pytest.mark.not_interpreted
def test_lean_dense_block_gradcheck():
    _, lean = _blocks(3, 2, 2, 2)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    params = [p for p in lean.parameters()]
    assert torch.autograd.gradcheck(lambda inp, *ps: lean_dense_forward(lean, inp), (x, *params), eps=1e-6,
                                    atol=1e-6)


@pytest.mark.not_interpreted
def test_lean_dense_block_saves_less():
    """Saved for backward: the eager block keeps every layer's concatenated input and its norm output (O(n^2)
    channels); the lean block keeps its output buffer (C_in + n g channels) and per-layer statistics."""
    ref, lean = _blocks(8, 8, 4, 3, dtype=torch.float32)
    x = torch.randn(1, 8, 16, 16, 16, requires_grad=True)
    saved = {}
    for name, block in (("eager", ref), ("lean", lean)):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            block(x)
        saved[name] = sum(sizes)
    buffer = 40 * 16**3 * 4
    params = sum(p.numel() * 4 for p in lean.parameters())
    stats = 2 * 4 * sum(layer.norm.num_features for layer in lean.layers)  # mean and 1 / std per channel
    assert saved["lean"] == buffer + params + stats
    assert saved["eager"] > 2.5 * saved["lean"]


@pytest.mark.interpreted
@pytest.mark.parametrize("shape", [(2, 6, 3, 4, 5), (2, 6, 5, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lean_dense_block_triton_engine(monkeypatch, shape, channels_last):
    """Triton norm engine (forced): reads channel slices of the shared buffer, replays with saved coefficients;
    equals the eager block (whose norm_act calls take Triton too) in float32, 3D and 2D."""
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    ref, lean = _blocks(6, 4, 3, len(shape) - 2, dtype=torch.float32)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
    _compare(ref, lean, x, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.interpreted
def test_lean_dense_block_triton_engine_input_buffer(monkeypatch):
    """Triton norm engine (forced), the block filling a buffer from input_buffer (two parts, channels-last):
    outputs and all gradients equal the eager block on the concatenation, in float32."""
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    ref, lean = _blocks(6, 4, 3, 3, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(2, k, 3, 4, 5, generator=g).to(memory_format=torch.channels_last_3d) for k in (4, 2)]
    gy = torch.randn(2, ref.out_channels, 3, 4, 5, generator=g)
    results = []
    for block, make in ((ref, lambda ps: torch.cat(ps, 1)), (lean, lambda ps: lean.input_buffer(ps))):
        ps = [p.clone().requires_grad_() for p in parts]
        y = block(make(ps))
        y.backward(gy)
        results.append((y, *(p.grad for p in ps), *(q.grad for q in block.parameters())))
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.interpreted
def test_lean_dense_block_triton_engine_channel_groups(monkeypatch):
    """Triton norm engine (forced) with group_channels=4: each group replays and differentiates with its channels'
    saved coefficients and norm parameters and adds into its slice of the gradient buffer; equals the eager
    block."""
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    ref, lean = _blocks(6, 4, 3, 3, dtype=torch.float32)
    lean.group_channels = 4
    x = torch.randn(2, 6, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    _compare(ref, lean, x, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.interpreted
def test_lean_dense_block_triton_engine_frozen_convolutions(monkeypatch):
    """Triton engine with frozen convolution weights (no weight gradients: the backward skips them and still takes
    the input gradient without the activation); x and the norm parameters get the eager block's gradients."""
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    ref, lean = _blocks(6, 4, 3, 3, dtype=torch.float32)
    for block in (ref, lean):
        for layer in block.layers:
            layer.conv.weight.requires_grad_(False)
    x = torch.randn(2, 6, 3, 4, 5).to(memory_format=torch.channels_last_3d)
    gy = torch.randn(2, ref.out_channels, 3, 4, 5)
    want, got = _run(ref, x, gy), _run(lean, x, gy)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5 * want[0].abs().max().item())
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5 * want[1].abs().max().item())
    assert [g is None for g in got[2]] == [w is None for w in want[2]] == [False, False, True] * 3
    for g, w in zip(got[2], want[2]):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())


def _grads_with(block, x, w, o, mode):
    """Input (and other-path) gradients of one of the graphs around the block used by the reuse tests."""
    xi, other = x.clone().requires_grad_(), o.clone().requires_grad_()
    if mode == "private":  # a multiply after the block: its gradient is fresh and private
        (block(xi) * w).sum().backward()
    elif mode == "other_path_pending":  # add hands one gradient to both paths; the other path runs backward later
        s = other.sin()
        (s + block(xi)).mul(w).sum().backward()
    elif mode == "two_uses":  # the same gradient reaches two lean blocks: only the second may write it
        (block(xi) + block(xi * 2)).mul(w).sum().backward()
    return [xi.grad, other.grad, *[p.grad for p in block.parameters()]]


@pytest.mark.not_interpreted
@pytest.mark.parametrize("mode, reuses", [("private", 1), ("other_path_pending", 0), ("two_uses", 1)])
def test_lean_dense_block_reuses_only_private_gradients(mode, reuses):
    """The backward accumulates into the incoming gradient instead of a copy only where nothing else can read it
    (hmedn_fast.nn.grad_reuse): gradients equal the eager block's in float64 with the reuse, and the reuse count
    says when it happened (not while another path's node still holds the gradient, at the second of two blocks
    sharing one)."""
    from hmedn_fast.nn import grad_reuse
    ref, lean = _blocks(6, 4, 3, 3)
    g = torch.Generator().manual_seed(7)
    x, w, o = (torch.randn(2, c, 5, 6, 7, generator=g, dtype=torch.float64) for c in (6, 18, 18))
    want = _grads_with(ref, x, w, o, mode)
    before = grad_reuse.reused
    got = _grads_with(lean, x, w, o, mode)
    assert grad_reuse.reused - before == reuses
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * b.abs().max().item())


@pytest.mark.not_interpreted
def test_lean_dense_block_leaves_visible_gradients_alone(monkeypatch):
    """A gradient the caller passed (y.backward(gy)) or a hook kept is never written; with the reuse switched off
    nothing is reused; the reuse lowers the backward's peak by one block-output-sized buffer."""
    from hmedn_fast.nn import grad_reuse
    from _live_bytes import LiveBytes
    _, lean = _blocks(6, 4, 3, 3)
    x = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64)
    gy = torch.randn(2, 18, 5, 6, 7, dtype=torch.float64)
    before, kept = grad_reuse.reused, []
    snapshot = gy.clone()
    lean(x.clone().requires_grad_()).backward(gy)
    assert torch.equal(gy, snapshot)
    y = lean(x.clone().requires_grad_())
    y.register_hook(kept.append)
    (y * gy).sum().backward()
    assert torch.equal(kept[0], gy) and grad_reuse.reused == before

    peaks = {}
    for enabled in (True, False):
        monkeypatch.setattr(grad_reuse, "ENABLED", enabled)
        xi = x.clone().requires_grad_()
        with LiveBytes() as m:
            (lean(xi) * gy).sum().backward()
        peaks[enabled] = m.peak
    assert grad_reuse.reused == before + 1
    assert peaks[False] - peaks[True] == gy.numel() * gy.element_size()


@pytest.mark.interpreted
@pytest.mark.parametrize("limit", [None, 8])
def test_lean_dense_block_backward_frees_each_layer_before_the_next(monkeypatch, limit):
    """Triton engine (forced): when layer i's backward replays its activation, the tensors layer i+1's backward made
    (its replayed activation, its input gradient: up to c_(i+1) channels each) are gone, so they never sit beside
    layer i's at the backward's peak; only layer i's output-gradient copy (made before its replay) is alive, and
    with groups not even that (the gradient buffer's slice is read in place). With group_channels=8 the same holds for every group: the layer inputs of 8, 16, 24 and 32
    channels replay in 1, 2, 3 and 4 groups, each after the previous group's activation and input gradient are gone."""
    import weakref
    from hmedn_fast.nn import dense_lean
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    _, lean = _blocks(8, 8, 4, 3, dtype=torch.float32)
    lean.group_channels = limit
    x = torch.randn(1, 8, 6, 6, 6).to(memory_format=torch.channels_last_3d).requires_grad_()
    w = torch.randn(1, 40, 6, 6, 6).to(memory_format=torch.channels_last_3d)
    y = lean(x)
    made, alive_at_replay = [], []

    def recorded(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            made.append(weakref.ref(out))
            return out
        return call

    real_replay = dense_lean._TritonNorm.replay

    def replay(self, *args):
        alive_at_replay.append(sum(r() is not None for r in made))
        return recorded(real_replay)(self, *args)

    monkeypatch.setattr(dense_lean._TritonNorm, "replay", replay)
    monkeypatch.setattr(dense_lean, "conv_input_grad", recorded(dense_lean.conv_input_grad))
    monkeypatch.setattr(dense_lean, "_dense", recorded(dense_lean._dense))
    (y * w).sum().backward()
    groups = 4 if limit is None else 1 + 2 + 3 + 4
    copies = 4 if limit is None else 0  # per layer without groups: its output gradient's dense copy (read faster)
    assert len(made) == 2 * groups + copies + 1  # per group: activation, input gradient; then the block input's grad
    assert alive_at_replay == [1 if copies else 0] * groups


@pytest.mark.not_interpreted
def test_lean_dense_block_under_cpu_autocast():
    """bf16 autocast (CPU): the convolutions run in bf16 as in the eager block, the buffer in the dtype torch.cat
    gives (float32 here); outputs and gradients equal the eager block's up to bf16 rounding."""
    ref, lean = _blocks(6, 4, 3, 3, dtype=torch.float32)
    x = torch.randn(2, 6, 5, 6, 7).to(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _compare(ref, lean, x, rtol=2e-2, atol_scale=2e-2)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.cuda
def test_cuda_lean_dense_block_full_resolution(monkeypatch):
    """A full-resolution dense block of hmedn_3d_l2 (16 -> 80 channels at 80^3, channels-last) in float32 with the
    eager block's norms on the Triton backend too (the lean block takes Triton on CUDA at every size; the eager block
    only from 2^22 elements, and two BatchNorm implementations differ in the last bits, which flips ReLU masks of
    near-zero activations and then single gradient elements by O(1)): the same kernels on a shared buffer must
    give the eager block's outputs, gradients and running statistics (measured bitwise equal)."""
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    ref, lean = _blocks(16, 16, 4, 3, dtype=torch.float32)
    ref, lean = ref.cuda().to(memory_format=torch.channels_last_3d), lean.cuda().to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 16, 80, 80, 80, device="cuda").to(memory_format=torch.channels_last_3d)
    _compare(ref, lean, x, rtol=1e-6, atol_scale=1e-6)


def _cuda_errors_vs_float64(monkeypatch, limit, autocast):
    """Relative errors (norm-wise, against a float64 run of the same block) of the eager and the lean block at
    hmedn_3d_l2's full-resolution dense block size, for the output, input gradient and every parameter gradient;
    and both blocks' running statistics. The lean block has ``group_channels=limit``."""
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ref, lean = _blocks(16, 16, 4, 3, dtype=torch.float32)
    lean.group_channels = limit
    ref, lean = ref.cuda().to(memory_format=torch.channels_last_3d), lean.cuda().to(memory_format=torch.channels_last_3d)
    exact = copy.deepcopy(ref).double()
    x = torch.randn(1, 16, 80, 80, 80, device="cuda").to(memory_format=torch.channels_last_3d)
    gy = torch.randn((1, ref.out_channels, 80, 80, 80), generator=torch.Generator().manual_seed(5)).cuda()
    monkeypatch.delenv("HMEDN_BACKEND_NORM_ACT")  # float64 runs on the reference norm
    want = _run(exact, x.double(), gy.double())
    monkeypatch.setenv("HMEDN_BACKEND_NORM_ACT", "triton")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        gy = gy.bfloat16() if autocast else gy
        eager = _run(ref, x, gy)
        got = _run(lean, x, gy)
    pairs = list(zip([*got[:2], *got[2]], [*eager[:2], *eager[2]], [*want[:2], *want[2]]))
    assert len(pairs) == 2 + 3 * 4
    return [(_rel(g, w), _rel(e, w)) for g, e, w in pairs], got[3], eager[3]


@pytest.mark.cuda
def test_cuda_lean_dense_block_channel_groups_float32(monkeypatch):
    """With group_channels=32 (the "stages" level) the layers of 48, 64 and 80 input channels run backward in 2, 2
    and 3 groups: the same sums, but the convolution backward picks its algorithm (and so its summation order) per
    shape, so the grouped block is not bitwise the eager one (measured: 7 of 6912 weight-gradient elements
    2.6e-5 apart). Against float64 the grouped errors must be within 2x of the eager block's (which are well under
    bf16's: up to 3.4e-4 measured, for the input gradient, where float32 flips the ReLU masks of near-zero
    activations). The forward is not grouped: running statistics equal."""
    errors, got_stats, eager_stats = _cuda_errors_vs_float64(monkeypatch, 32, autocast=False)
    for i, (err_g, err_e) in enumerate(errors):
        assert 0 < err_e < 1e-3, (i, err_e)
        assert err_g <= 2 * err_e, (i, err_g, err_e)
    for g, e in zip(got_stats, eager_stats):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("limit", [None, 32])
def test_cuda_lean_dense_block_bf16_accuracy(monkeypatch, limit):
    """The same block under bf16 autocast: eager and lean round at different points (the lean block accumulates
    input gradients in float32 inside the norm backward), so neither is bitwise the other. Both are compared
    with a float64 run of the same block: the lean block's error must not exceed the eager block's by more than
    10 % (on the CPU the lean block was the more accurate one), and the eager error must be bf16-sized; with or
    without 32-channel backward groups ("stages": no extra rounding, each gradient element is one sum)."""
    errors, got_stats, eager_stats = _cuda_errors_vs_float64(monkeypatch, limit, autocast=True)
    for i, (err_g, err_e) in enumerate(errors):
        assert 0 < err_e < 0.1, (i, err_e)
        assert err_g <= 1.1 * err_e, (i, err_g, err_e)
    for g, e in zip(got_stats, eager_stats):  # the same forward computation
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_lean_dense_block_gradient_reuse(monkeypatch):
    """On the GPU (Triton norm engine, channels-last, bf16 autocast as the trainer runs it) the backward that
    accumulates into the private incoming gradient gives the same gradients as the one that copies it, bitwise."""
    from hmedn_fast.nn import grad_reuse
    _, lean = _blocks(16, 16, 4, 3, dtype=torch.float32)
    lean = lean.cuda().to(memory_format=torch.channels_last_3d)
    g = torch.Generator("cuda").manual_seed(2)
    x = torch.randn(1, 16, 32, 32, 32, device="cuda", generator=g).to(memory_format=torch.channels_last_3d)
    w = torch.randn(1, 80, 32, 32, 32, device="cuda", generator=g).to(memory_format=torch.channels_last_3d)
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(grad_reuse, "ENABLED", enabled)
        lean.zero_grad()
        before = grad_reuse.reused
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = lean(xi)
        (y.float() * w).sum().backward()
        runs[enabled] = (grad_reuse.reused - before, [xi.grad, *[p.grad for p in lean.parameters()]])
    assert runs[False][0] == 0 and runs[True][0] == 1
    for a, b in zip(runs[True][1], runs[False][1]):
        assert torch.equal(a, b)
