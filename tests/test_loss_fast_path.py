"""The compiled eager fast path of the fused loss (``csrc/fused_loss.cpp``) against the Python path that launches the
same Triton kernels, and against the float64 reference. GPU tests are marked ``cuda``; the CPU tests cover the parts
that run without a GPU (the description of a compiled kernel, the dispatch without the compiled path)."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from hmedn_fast.ops import loss as loss_mod
from hmedn_fast.ops.triton.launch import native_launch_info


# ----------------------------------------------------------------------------------------------- CPU
def _compiled(signature: dict, **meta) -> SimpleNamespace:
    fields = dict(num_warps=8, shared=1024, num_ctas=1, global_scratch_size=0, profile_scratch_size=0,
                  launch_cooperative_grid=False, launch_pdl=False)
    fields.update(meta)
    return SimpleNamespace(function=1234, metadata=SimpleNamespace(**fields),
                           src=SimpleNamespace(signature=signature))


def test_native_launch_info_codes():
    sig = {"a": "*fp32", "b": "*u8", "n": "i32", "m": "i64", "one": "constexpr", "x": "fp32", "K": "constexpr"}
    assert native_launch_info(_compiled(sig)) == (1234, 256, 1024, "ppilf")


@pytest.mark.parametrize("meta", [dict(num_ctas=2), dict(launch_pdl=True), dict(launch_cooperative_grid=True),
                                  dict(global_scratch_size=64), dict(profile_scratch_size=8),
                                  dict(shared=228 * 1024)])
def test_native_launch_info_refuses_special_launches(meta):
    assert native_launch_info(_compiled({"a": "*fp32", "n": "i32"}, **meta))[3] == ""


@pytest.mark.parametrize("ty", ["fp16", "u1", "i8", "fp64", ("i32", "i32")])
def test_native_launch_info_refuses_other_parameter_types(ty):
    assert native_launch_info(_compiled({"a": "*fp32", "v": ty}))[3] == ""


def test_without_compiled_fast_path_the_python_path_serves(monkeypatch):
    """No ``fused_loss`` in the extension (CPU builds): the public function computes as before, unchecked too."""
    monkeypatch.setattr(loss_mod, "_FAST", [])
    monkeypatch.setattr(loss_mod, "extension", lambda: SimpleNamespace())
    assert loss_mod._fast_path() is None
    logits = torch.randn(2, 3, 4, 5, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 5))
    got = loss_mod.difficulty_guided_loss(logits, labels, check_values=False)
    want = loss_mod.difficulty_guided_loss(logits, labels, backend="reference")
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="alpha"):
        loss_mod.difficulty_guided_loss(logits, labels, alpha=-1.0, check_values=False)


# ----------------------------------------------------------------------------------------------- GPU
def _fast():
    fast = loss_mod._fast_path()
    if fast is None:
        pytest.skip("the extension was built without its CUDA part (no csrc/fused_loss.cpp)")
    return fast


def _options(seed: int) -> dict:
    """A random configuration the fast path serves (plain Python: drawn the same with or without a GPU)."""
    r = random.Random(seed)
    two_d = r.random() < 0.4
    reduction = r.choice(["mean", "sum"])
    label_dtype = r.choice(["uint8", "int16", "int32", "int64"])
    # an ignore_index some label can equal needs a device count as the divisor of a mean: the Python path's case
    unmatched = label_dtype == "uint8" or reduction == "sum"  # -100 fits no uint8 label
    ignore_index = r.choice([None, None] + ([-100] if unmatched else []) + ([5] if reduction == "sum" else []))
    return dict(
        two_d=two_d, n=r.choice([1, 2, 3]), k=r.choice([2, 3, 5, 9]),
        low=[r.choice([3, 5, 8]), r.choice([6, 11]), r.choice([7, 16])][1 if two_d else 0:],
        factor=r.choice([1, 1, 2]), dtype=r.choice(["float32", "float16", "bfloat16"]),
        label_dtype=label_dtype, channels_last=r.random() < 0.3, reduction=reduction, ignore_index=ignore_index,
        weight=r.choice([None, "flat", "channel"]), contour=r.choice([None, "channel", "flat"]),
        alpha=r.choice([0.7, 0.0, 2]), class_weight=r.random() < 0.5, return_parts=r.random() < 0.4,
        contour_grad=r.random() < 0.8, upstream=[r.choice([1.0, 3.0, -0.5]) for _ in range(3)],
        check_values=r.random() < 0.3 and (ignore_index is None or ignore_index < 0),  # ignored 5s: Python path
    )


SEEDS = range(48)


def _case(seed: int) -> dict:
    """The inputs of configuration ``seed`` on the GPU."""
    o = _options(seed)
    n, k, low = o["n"], o["k"], o["low"]
    full = [s * o["factor"] for s in low]
    dtype = getattr(torch, o["dtype"])
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, k, *low, generator=g)).to(dtype).cuda()
    if o["channels_last"]:
        logits = logits.to(memory_format=torch.channels_last if o["two_d"] else torch.channels_last_3d)
    labels = torch.randint(0, k, (n, *full), generator=g)
    if o["ignore_index"] is not None and o["ignore_index"] >= 0:
        labels[torch.rand(labels.shape, generator=g) < 0.2] = o["ignore_index"]
    w = 1 + 25 * torch.rand(n, *full, generator=g)
    clog = (2 * torch.randn(n, 1, *low, generator=g)).to(dtype)
    ctgt = torch.rand(n, *full, generator=g)
    contour = o["contour"]
    return dict(
        o, logits=logits, labels=labels.to(getattr(torch, o["label_dtype"])).cuda(),
        weight=None if o["weight"] is None else (w if o["weight"] == "flat" else w[:, None]).cuda(),
        contour_logits=None if contour is None else (clog if contour == "channel" else clog[:, 0]).cuda(),
        contour_target=None if contour is None else ctgt.cuda(),
        class_weight=(0.5 + torch.rand(k, generator=g)).cuda() if o["class_weight"] else None,
    )


def test_cases_cover_the_options():
    """The random GPU configurations reach every option value (checked on the CPU: they are drawn without a GPU)."""
    drawn = [_options(seed) for seed in SEEDS]
    wanted = dict(two_d={True, False}, factor={1, 2}, dtype={"float32", "float16", "bfloat16"},
                  label_dtype={"uint8", "int16", "int32", "int64"}, channels_last={True, False},
                  reduction={"mean", "sum"}, ignore_index={None, -100, 5}, weight={None, "flat", "channel"},
                  contour={None, "channel", "flat"}, alpha={0.7, 0.0, 2}, class_weight={True, False},
                  return_parts={True, False}, contour_grad={True, False}, check_values={True, False})
    for key, values in wanted.items():
        assert {o[key] for o in drawn} == values, key
    assert any(o["return_parts"] and 1.0 not in o["upstream"][:2] for o in drawn)  # rescaling that moves data


def _run(case: dict, fast: bool, dtype: torch.dtype | None = None):
    """(outputs, grad logits, grad contour logits, grad_fn name) of a forward + backward through the public function
    with the compiled fast path on or off (or through the float64 reference when ``dtype`` is float64)."""
    z = case["logits"].detach()
    c = case["contour_logits"]
    if dtype is not None:
        z, c = z.to(dtype), None if c is None else c.to(dtype)
    z = z.requires_grad_(True)
    c = None if c is None else c.detach().requires_grad_(case["contour_grad"])
    old = loss_mod.FAST_PATH
    loss_mod.FAST_PATH = fast
    try:
        out = loss_mod.difficulty_guided_loss(
            z, case["labels"], case["weight"], c, case["contour_target"], case["alpha"], case["class_weight"],
            case["ignore_index"], case["reduction"], backend="reference" if dtype is not None else None,
            return_parts=case["return_parts"], check_values=case["check_values"])
    finally:
        loss_mod.FAST_PATH = old
    outs = out if isinstance(out, tuple) else (out,)
    total = sum(u * o for u, o in zip(case["upstream"], outs))
    total.backward()
    name = outs[0].grad_fn.name() if outs[0].grad_fn is not None else None
    return [o.detach() for o in outs], z.grad, None if c is None or not case["contour_grad"] else c.grad, name


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.cuda
@pytest.mark.not_interpreted
def test_fast_path_equals_python_path_and_reference(seed):
    fast = _fast()
    case = _case(seed)
    got = _run(case, True)
    want = _run(case, False)
    assert got[3] == "FusedDifficultyGuidedLossBackward"  # the compiled path served the call
    assert want[3] != got[3]
    for a, b in zip(got[0], want[0]):
        assert torch.equal(a, b)  # the same kernels on the same arguments: bit for bit
    for a, b in zip(got[1:3], want[1:3]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.stride() == b.stride() and torch.equal(a, b)
    ref = _run(case, False, torch.float64)
    tol = 1e-5 if case["logits"].dtype == torch.float32 else 2e-2
    for a, b in zip(got[0], ref[0]):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=1e-6)
    for a, b in zip(got[1:3], ref[1:3]):
        if a is not None:
            assert float((a.double() - b).norm() / b.norm().clamp_min(1e-30)) <= tol
    from hmedn_fast.ops._ext import extension

    assert fast is extension().fused_loss
    assert all(extension().fused_loss_kernels().values()), "a kernel specialisation is not launched directly"


@pytest.mark.cuda
@pytest.mark.not_interpreted
def test_fast_path_serves_only_what_it_can():
    fast = _fast()
    logits = torch.randn(2, 3, 4, 6, 8, device="cuda", requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 6, 8), device="cuda", dtype=torch.uint8)
    args = [logits, labels, None, None, None, 1.0, None, None, "mean", False, True]
    assert fast(*args) is not None
    bad_labels, nan_logits = labels.clone(), logits.detach().clone()
    bad_labels[1, 2, 3, 4] = 3
    nan_logits[0, 1, 2, 3, 4] = float("nan")
    for i, value in ((8, "none"), (7, 2), (5, -1.0), (5, True), (0, logits.double()), (1, labels.cpu()),
                     (1, labels.float()), (2, torch.rand(2, 4, 6, 9, device="cuda")), (9, 1), (1, labels[:, :2]),
                     (10, 1), (1, bad_labels), (0, nan_logits)):
        bad = list(args)
        bad[i] = value
        assert fast(*bad) is None, (i, value)
    # with the checks off the fast path computes what it is given (the kernel clamps labels)
    assert fast(*args[:1], bad_labels, *args[2:10], False) is not None
    # errors still come from the Python checks with the fast path on
    with pytest.raises(ValueError, match="labels must lie in"):
        loss_mod.difficulty_guided_loss(logits, bad_labels)
    with pytest.raises(ValueError, match="logits contain NaN"):
        loss_mod.difficulty_guided_loss(nan_logits, labels)
    with pytest.raises(ValueError, match="weight"):
        loss_mod.difficulty_guided_loss(logits, labels, torch.rand(2, 4, 6, 9, device="cuda"), check_values=False)
    with pytest.raises(ValueError, match="reduction"):
        loss_mod.difficulty_guided_loss(logits, labels, reduction="avg", check_values=False)
    # no gradient wanted: no graph
    with torch.no_grad():
        out = loss_mod.difficulty_guided_loss(logits, labels, check_values=False)
    assert out.grad_fn is None and out.dtype == torch.float32


def _steps_on_a_side_stream(logits, labels, steps: int) -> None:
    """``steps`` unchecked forwards + backwards of the loss on a new CUDA stream (gradients reset before each)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(steps):
            logits.grad = None
            loss_mod.difficulty_guided_loss(logits, labels, check_values=False).backward()
    torch.cuda.current_stream().wait_stream(side)


def _small_cuda_case():
    """(logits (2, 3, 8, 8, 8) fp32 needing grad, labels) on CUDA, with the fast path required."""
    _fast()
    logits = torch.randn(2, 3, 8, 8, 8, device="cuda", requires_grad=True)
    return logits, torch.randint(0, 3, (2, 8, 8, 8), device="cuda")


@pytest.mark.cuda
@pytest.mark.not_interpreted
def test_fast_path_second_backward_is_refused_and_streams_work():
    logits, labels = _small_cuda_case()
    loss = loss_mod.difficulty_guided_loss(logits, labels, check_values=False)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()
    want = logits.grad.clone()
    _steps_on_a_side_stream(logits, labels, 3)  # the ticket counter of a new stream, reused
    assert torch.equal(logits.grad, want)


@pytest.mark.cuda
@pytest.mark.not_interpreted
def test_fast_path_steps_aside_under_graph_capture():
    logits, labels = _small_cuda_case()
    eager = loss_mod.difficulty_guided_loss(logits, labels, check_values=False)
    eager.backward()
    want = logits.grad.clone()
    eager = eager.detach()  # frees the graph: a kept AccumulateGrad node would pin the default stream into capture
    _steps_on_a_side_stream(logits, labels, 2)  # warm-up before the capture
    graph = torch.cuda.CUDAGraph()
    logits.grad = None
    with torch.cuda.graph(graph):
        captured = loss_mod.difficulty_guided_loss(logits, labels, check_values=False)
        captured.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert captured.grad_fn.name() != "FusedDifficultyGuidedLossBackward"  # the Python path captured it
    assert torch.equal(captured, eager) and torch.equal(logits.grad, want)

