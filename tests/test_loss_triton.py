"""Triton backend of the difficulty-guided loss against the reference.

On CPU the kernels run under ``TRITON_INTERPRET=1``, which must be set before triton is imported: the
test ``test_interpreter_suite`` reruns this file in a subprocess with it set (the other tests of the file
are skipped in the parent process). GPU tests are marked ``cuda``.
"""
from __future__ import annotations


import pytest
import torch



@pytest.mark.not_interpreted
def test_interpreter_suite(interpreter_suite):
    interpreter_suite(__file__)


# ----------------------------------------------------------------------------------------------- helpers
def inputs(shape, factor=(1,), dtype=torch.float32, label_dtype=torch.int64, ignore=None, device="cpu"):
    """Random logits (N, K, *low) and targets at ``factor`` x the logits' resolution."""
    n, k, *low = shape
    factor = tuple(factor) * len(low) if len(factor) == 1 else tuple(factor)
    full = tuple(s * f for s, f in zip(low, factor))
    g = torch.Generator().manual_seed(hash((shape, factor, str(dtype), str(label_dtype))) % 2**31)
    logits = (3 * torch.randn(shape, generator=g)).to(dtype)
    labels = torch.randint(0, k, (n, *full), generator=g)
    if ignore is not None:
        labels[torch.rand(labels.shape, generator=g) < 0.2] = ignore
    weight = 1 + 25 * torch.rand((n, *full), generator=g)
    clog = (2 * torch.randn((n, 1, *low), generator=g)).to(dtype)
    ctgt = torch.rand((n, *full), generator=g)
    cw = 0.5 + torch.rand(k, generator=g)
    to = dict(device=device)
    return (logits.to(**to), labels.to(label_dtype).to(**to), weight.to(**to), clog.to(**to), ctgt.to(**to),
            cw.to(**to))


def run_both(logits, labels, weight, clog, ctgt, cw, ignore, reduction, alpha=0.7, one_pass=None, gout_seed=1):
    """(loss, grad logits, grad contour) of the Triton backend and of the float64 reference."""
    from hmedn_fast.ops import difficulty_guided_loss
    from hmedn_fast.ops.triton import loss as fused

    results = []
    for backend in ("triton", "reference"):
        z = (logits if backend == "triton" else logits.double()).detach().requires_grad_(True)
        c = None if clog is None else (clog if backend == "triton" else clog.double()).detach().requires_grad_(True)
        ct = None if clog is None else ctgt
        if backend == "triton":
            out = fused.difficulty_guided_loss(z, labels, weight, c, ct, alpha, cw, ignore, reduction,
                                               one_pass=one_pass)
        else:
            out = difficulty_guided_loss(z, labels, weight, c, ct, alpha, cw, ignore, reduction, backend="reference")
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(gout_seed)).to(out.device)
        (out * g.to(out.dtype)).sum().backward()
        results.append((out.detach(), z.grad, None if c is None else c.grad))
    return results


def assert_close_to_reference(got, want, dtype):
    """Loss within 1e-5 relative of float64 (computed in fp32 from the same inputs); gradients within the
    rounding of their dtype, relative to the largest gradient."""
    loss, gl, gc = got
    ref_loss, ref_gl, ref_gc = want
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5 * float(ref_loss.abs().max()) / 1e2)
    eps = {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for g, r in ((gl, ref_gl), (gc, ref_gc)):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == r.shape
        torch.testing.assert_close(g.double(), r, rtol=0, atol=eps * float(r.abs().max()))


# ----------------------------------------------------------------------------------------------- interpreter
CASES = {
    "2d odd": ((2, 3, 5, 7), (1,)),
    "3d K=9": ((1, 9, 3, 4, 5), (1,)),
    "2d K=2 down x2": ((2, 2, 3, 5), (2,)),
    "3d down (1,2,3)": ((1, 4, 2, 3, 2), (1, 2, 3)),
    # more tiles (5 per sample, the last partial) than the interpreter's 3 programs: each program loops
    "3d many tiles": ((2, 3, 16, 16, 19), (1,)),
    "3d down x2 many tiles": ((2, 3, 8, 8, 9), (2,)),
}


@pytest.mark.interpreted
def test_many_tiles_cases_loop_over_tiles():
    """The "many tiles" cases give each program of the loss kernel several tiles (and one a partial one)."""
    from hmedn_fast.ops.triton import loss as fused

    programs = fused._max_programs(torch.device("cpu"))
    for case in ("3d many tiles", "3d down x2 many tiles"):
        (n, k, *low), factor = CASES[case]
        children = factor[0] ** len(low)
        voxels = low[0] * low[1] * low[2]
        tiles = n * -(-voxels // fused._block(children, k))
        assert tiles > 2 * programs and voxels % fused._block(children, k), case


@pytest.mark.interpreted
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["all", "bare"])
def test_matches_reference(case, reduction, options):
    shape, factor = CASES[case]
    logits, labels, weight, clog, ctgt, cw = inputs(shape, factor, ignore=255 if options == "all" else None)
    if options == "bare":  # no weight map, no class weights, no contour, no ignore_index
        weight = clog = ctgt = cw = None
    ignore = 255 if options == "all" else None
    got, want = run_both(logits, labels, weight, clog, ctgt, cw, ignore, reduction)
    assert_close_to_reference(got, want, torch.float32)


@pytest.mark.interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_dtypes(dtype, label_dtype):
    logits, labels, weight, clog, ctgt, cw = inputs((2, 4, 6, 5), dtype=dtype, label_dtype=label_dtype, ignore=3)
    got, want = run_both(logits, labels, weight, clog, ctgt, cw, 3, "mean")
    assert_close_to_reference(got, want, dtype)


@pytest.mark.interpreted
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("factor", [(1,), (2,)])
def test_one_pass_and_two_pass_agree(reduction, factor):
    args = inputs((2, 3, 4, 5), factor, ignore=0)
    one = run_both(*args, 0, reduction, one_pass=True)[0]
    two = run_both(*args, 0, reduction, one_pass=False)[0]
    torch.testing.assert_close(one[0], two[0], rtol=0, atol=0)  # same forward reduction
    for a, b in zip(one[1:], two[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


@pytest.mark.interpreted
@pytest.mark.parametrize("alpha", [0.7, 0.0])
@pytest.mark.parametrize("one_pass", [True, False])
def test_gradients_of_parts(alpha, one_pass):
    """Backprop through any combination of (L, L_s, L_r), e.g. L_r alone, matches the reference."""
    from hmedn_fast.ops import difficulty_guided_loss
    from hmedn_fast.ops.triton import loss as fused

    logits, labels, weight, clog, ctgt, cw = inputs((2, 3, 4, 6), ignore=1)
    coefs = torch.tensor([0.3, -1.2, 2.5])
    grads = []
    for backend in ("triton", "reference"):
        z, c = logits.clone().requires_grad_(True), clog.clone().requires_grad_(True)
        if backend == "triton":
            parts = fused.difficulty_guided_loss(z, labels, weight, c, ctgt, alpha, cw, 1, "mean", return_parts=True,
                                                 one_pass=one_pass)
        else:
            parts = difficulty_guided_loss(z, labels, weight, c, ctgt, alpha, cw, 1, return_parts=True,
                                           backend="reference")
        sum(k * p for k, p in zip(coefs, parts)).backward()
        grads.append((z.grad, c.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.interpreted
def test_strided_layouts_read_in_place():
    from hmedn_fast.ops.triton import loss as fused

    logits, labels, weight, clog, ctgt, cw = inputs((2, 3, 4, 5, 3))
    want = run_both(logits, labels, weight, clog, ctgt, cw, None, "mean")[0]
    channels_last = logits.to(memory_format=torch.channels_last_3d)
    assert fused.flat_spatial_stride(channels_last, 2) == 3 and not channels_last.is_contiguous()
    got = run_both(channels_last, labels, weight, clog, ctgt, cw, None, "mean")[0]
    assert got[1].stride() == channels_last.stride()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # one head with K + 1 channels sliced into seg and contour: non-dense views, still no copy needed
    both = torch.cat([logits, clog], dim=1)
    assert fused.flat_spatial_stride(both[:, :3], 2) == 1 and not both[:, :3].is_contiguous()
    sliced = run_both(both[:, :3], labels, weight, both[:, 3:], ctgt, cw, None, "mean")[0]
    for a, b in zip(sliced, want):
        torch.testing.assert_close(a, b)


@pytest.mark.interpreted
@pytest.mark.parametrize("factor", [(1,), (2,)])
def test_every_output_element_written(factor):
    from hmedn_fast.ops.triton import loss as fused

    logits, labels, weight, clog, ctgt, cw = inputs((2, 3, 5, 3), factor, ignore=1)
    args = (logits, labels, weight, clog, ctgt, cw, 1, 0.5)
    nan = float("nan")
    out = torch.full(labels.shape, nan)
    fused._launch(*args, loss=2, out=out)
    total = torch.full((4,), nan)
    grads = (torch.full_like(logits, nan), torch.full_like(clog, nan))
    fused._launch(*args, loss=1, out=total, grads=grads)
    for t in (out, total, *grads):
        assert torch.isfinite(t).all()
    ref = fused.difficulty_guided_loss(logits, labels, weight, clog, ctgt, 0.5, cw, 1, "none")
    torch.testing.assert_close(out, ref)
    assert torch.all(out[labels == 1] == 0)


@pytest.mark.interpreted
def test_deterministic():
    args = inputs((2, 5, 6, 7), ignore=2)
    first, second = (run_both(*args, 2, "mean")[0] for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.interpreted
def test_all_ignored_and_unchecked_out_of_range():
    from hmedn_fast.ops import difficulty_guided_loss

    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = difficulty_guided_loss(logits, torch.full((1, 4, 4), 7), ignore_index=7, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)
    # unchecked out-of-range labels: reads are clamped, so a finite (meaningless) value and no fault
    bad = difficulty_guided_loss(logits, torch.full((1, 4, 4), 50), backend="triton", check_values=False)
    assert torch.isfinite(bad)


@pytest.mark.interpreted
@pytest.mark.parametrize("case", ["label >= K", "negative label", "NaN logits", "NaN contour"])
def test_bad_values_raise_before_the_kernel(case, monkeypatch):
    from hmedn_fast.ops import difficulty_guided_loss
    from hmedn_fast.ops.triton import loss as fused

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("the loss kernel was launched on bad input")

    monkeypatch.setattr(fused, "_loss_kernel", NoLaunch())
    logits, labels, weight, clog, ctgt, cw = inputs((2, 3, 4, 5), label_dtype=torch.int32)
    if case == "label >= K":
        labels[0, 1, 1] = 3
    elif case == "negative label":
        labels[1, 0, 0] = -2
    elif case == "NaN logits":
        logits[0, 2, 1, 1] = float("nan")
    else:
        clog[1, 0, 3, 4] = float("nan")
    match = {"label >= K": "labels must lie", "negative label": "labels must lie", "NaN logits": "logits contain NaN",
             "NaN contour": "contour_logits contain NaN"}[case]
    with pytest.raises(ValueError, match=match):
        difficulty_guided_loss(logits, labels, weight, clog, ctgt, ignore_index=255, backend="triton")


@pytest.mark.interpreted
def test_backend_availability():
    from hmedn_fast.ops import difficulty_guided_loss

    logits, labels, weight, clog, ctgt, cw = inputs((1, 3, 4, 4))
    with pytest.raises(RuntimeError, match="float64"):
        difficulty_guided_loss(logits.double(), labels, backend="triton")
    weight.requires_grad_(True)  # targets with grad: automatic dispatch falls back to the reference
    difficulty_guided_loss(logits, labels, weight).backward()
    assert weight.grad is not None


@pytest.mark.interpreted
@pytest.mark.parametrize("custom_op", [False, True])
def test_second_backward_after_one_pass_is_refused(custom_op):
    from hmedn_fast.ops.triton import loss as fused

    logits, labels, *_ = inputs((1, 3, 4, 4))
    logits.requires_grad_(True)
    loss = fused.difficulty_guided_loss(logits, labels, None, None, None, 1.0, None, None, "mean",
                                        custom_op=custom_op)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice|modified by an inplace operation"):
        loss.backward()


@pytest.mark.interpreted
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("one_pass", [True, False])
def test_custom_op_path_equals_eager_path(reduction, one_pass):
    """The custom op (used while torch.compile traces) and the eager autograd.Function agree exactly."""
    from hmedn_fast.ops.triton import loss as fused

    logits, labels, weight, clog, ctgt, cw = inputs((2, 3, 4, 6), (2,), ignore=2)
    results = []
    for custom_op in (False, True):
        z, c = logits.clone().requires_grad_(True), clog.clone().requires_grad_(True)
        out = fused.difficulty_guided_loss(z, labels, weight, c, ctgt, 0.7, cw, 2, reduction, one_pass=one_pass,
                                           custom_op=custom_op)
        (out * torch.linspace(0.5, 2.0, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), z.grad, c.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.interpreted
def test_custom_op_checks():
    from hmedn_fast.ops.triton import loss as fused  # noqa: F401  (registers the ops)

    logits, labels, weight, clog, ctgt, cw = inputs((2, 3, 4, 5), label_dtype=torch.uint8)
    logits.requires_grad_(True)
    clog.requires_grad_(True)
    op = torch.ops.hmedn_fast.difficulty_guided_loss.default
    for reduction in ("mean", "none"):
        torch.library.opcheck(op, (logits, labels, weight, clog, ctgt, cw, 0.7, 1, reduction, False, True))
    # one-pass returns its gradients as outputs that its backward rescales in place: they are internal
    # (the Python entry point returns `out` only), so opcheck's AOT test, which differentiates through
    # every output, does not apply; test_compile_no_graph_break covers the compiled one-pass path.
    torch.library.opcheck(op, (logits, labels, weight, clog, ctgt, cw, 0.7, 1, "mean", True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.interpreted
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_no_graph_break(reduction):
    import torch._dynamo

    from hmedn_fast.ops import difficulty_guided_loss

    torch._dynamo.reset()
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    logits, labels, weight, clog, ctgt, cw = inputs((2, 3, 6, 5), label_dtype=torch.uint8)
    x = torch.randn(2, 2, 6, 5)

    def step(x):
        head = conv(x)  # one head: 3 class logits + 1 contour logit, sliced
        loss = difficulty_guided_loss(head[:, :3], labels, weight, head[:, 3:], ctgt, 0.5, cw, reduction=reduction,
                                      backend="triton")
        return loss if reduction == "mean" else loss.square().mean()

    explain = torch._dynamo.explain(step)(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager_decomp_partition", fullgraph=True)):
        conv.zero_grad()
        (3 * fn(x)).backward()  # upstream gradient != 1 exercises the one-pass rescaling
        grads.append(conv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.interpreted
def test_hmedn_loss_dispatches_to_triton():
    from hmedn_fast.losses import HMEDNLoss
    from hmedn_fast.models.output import SegmentationOutput
    from hmedn_fast.targets import Targets

    logits, labels, weight, clog, ctgt, cw = inputs((2, 3, 8, 8))
    aux = torch.randn(2, 3, 4, 4)
    out = SegmentationOutput(logits, clog, [aux])
    got = HMEDNLoss(3)(out, labels, Targets(ctgt, weight))
    want = HMEDNLoss(3, backend="reference")(out, labels, Targets(ctgt, weight))
    torch.testing.assert_close(got.total, want.total)
    for key in want.parts:
        torch.testing.assert_close(got.parts[key], want.parts[key])


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.not_interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nc", "channels_last"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("factor", [(1,), (2,)])
def test_gpu_matches_reference(dtype, layout, reduction, factor):
    logits, labels, weight, clog, ctgt, cw = inputs((3, 5, 8, 20, 24), factor, dtype, torch.uint8, 255, "cuda")
    if layout == "channels_last":
        logits = logits.to(memory_format=torch.channels_last_3d)
    got, want = run_both(logits, labels, weight, clog, ctgt, cw, 255, reduction)
    assert_close_to_reference(got, want, dtype)


@pytest.mark.cuda
@pytest.mark.not_interpreted
def test_gpu_compile_no_graph_break():
    import torch._dynamo

    from hmedn_fast.ops import difficulty_guided_loss

    torch._dynamo.reset()
    logits, labels, weight, clog, ctgt, cw = inputs((2, 4, 16, 16, 16), device="cuda")
    conv = torch.nn.Conv3d(4, 5, 1).cuda()

    def step(x):
        head = conv(x)
        return difficulty_guided_loss(head[:, :4], labels, weight, head[:, 4:], ctgt)

    assert torch._dynamo.explain(step)(logits).graph_break_count == 0
    eager = step(logits)
    compiled = torch.compile(step, fullgraph=True)(logits)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.interpreted
def test_maps_with_a_channel_axis_equal_maps_without():
    """weight and contour_target may come as (N, 1, *spatial): same loss and gradients as (N, *spatial)."""
    from hmedn_fast.ops import difficulty_guided_loss

    logits, labels, weight, clog, ctgt, cw = inputs((2, 3, 4, 6))
    results = []
    for w, t in ((weight, ctgt), (weight[:, None], ctgt[:, None])):
        z, c = logits.clone().requires_grad_(True), clog.clone().requires_grad_(True)
        loss = difficulty_guided_loss(z, labels, w, c, t, 0.7, cw, backend="triton")
        loss.backward()
        results.append((loss.detach(), z.grad, c.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
