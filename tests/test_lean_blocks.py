"""Memory-lean residual dilated block and HR pathway checkpoint modes: float64 gradcheck of the custom autograd,
identical outputs / gradients / running statistics across modes, less memory kept for backward, the "auto"
rule, the concatenation-free dense fusion, and clear errors."""
import pytest
import torch
from torch import nn

from hmedn_fast.models import create_model
from hmedn_fast.nn import HRPathway, ResidualDilatedBlock
from hmedn_fast.nn.lean import LeanBatchNormBlock, LeanResidualBlock, dense_fusion_sum

NORMS = ["batch", "instance", ("group", {"num_groups": 2})]


def randomise(module: nn.Module) -> nn.Module:
    """Non-trivial norm affine parameters (fresh ones are 1 / 0)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.3)
    return module


@pytest.mark.parametrize("recompute", [0, 1, 2])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradcheck_float64(spatial_dims, norm, recompute):
    block = randomise(ResidualDilatedBlock(4, (1, 2), spatial_dims, norm)).double()
    size = (5, 6) if spatial_dims == 2 else (3, 4, 4)
    x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
    params = [block.conv1.weight, block.norm1.weight, block.norm1.bias, block.conv2.weight, block.norm2.weight,
              block.norm2.bias]
    fn = lambda x, *p: LeanResidualBlock.apply(x, block, recompute, *p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("recompute", [0, 1, 2])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradcheck_float64_batch_norm_block(spatial_dims, training, recompute):
    """The BatchNorm path (batch statistics in training, running ones in eval), affine and not."""
    for affine in (True, False):
        block = ResidualDilatedBlock(4, (2, 1), spatial_dims, ("batch", {"affine": affine}))
        block = randomise(block).double().train(training)
        with torch.no_grad():
            for m in (block.norm1, block.norm2):
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
        size = (5, 6) if spatial_dims == 2 else (3, 4, 4)
        x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
        params = [block.conv1.weight, block.norm1.weight, block.norm1.bias, block.conv2.weight, block.norm2.weight,
                  block.norm2.bias]
        live = [p for p in params if p is not None]

        def fn(x, *p, block=block, params=params):
            it = iter(p)
            return LeanBatchNormBlock.apply(x, block, recompute, *(next(it) if q is not None else None
                                                                   for q in params))
        assert torch.autograd.gradcheck(fn, (x, *live), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_batch_norm_block_equals_eager_in_train_and_eval():
    """Outputs, every gradient and the running statistics of LeanBatchNormBlock equal eager autograd's."""
    torch.manual_seed(4)
    x = torch.randn(2, 5, 4, 6, 5, dtype=torch.float64)
    gy = torch.randn(2, 5, 4, 6, 5, dtype=torch.float64)
    init = randomise(ResidualDilatedBlock(5, (1, 3), spatial_dims=3)).double().state_dict()
    for training in (True, False):
        for mode in ("lean", "middle", "blocks"):
            ref, lean = (ResidualDilatedBlock(5, (1, 3), spatial_dims=3, checkpoint=m).double().train(training)
                         for m in ("none", mode))
            for block in (ref, lean):
                block.load_state_dict(init)
            y_ref, g_ref = _run(ref, x, gy)
            y, g = _run(lean, x, gy)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            assert len(g) == len(g_ref) == 7
            for a, b in zip(g, g_ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            assert not training or not torch.equal(lean.norm1.running_mean, init["norm1.running_mean"])
            for (name, a), b in zip(lean.named_buffers(), ref.buffers()):
                torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14, msg=name)


def _run(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = module(x)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(gy)
    return y.detach(), [x.grad] + [p.grad for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("norm", NORMS)
def test_pathway_modes_give_identical_outputs_gradients_and_statistics(norm):
    torch.manual_seed(3)
    ref = randomise(HRPathway(3, 6, num_blocks=3, dilations=[(1, 2), (2, 3), (3, 1)], num_classes=2, norm=norm))
    ref = ref.double()
    initial = {k: v.clone() for k, v in ref.state_dict().items()}
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    gy = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    y_ref, g_ref = _run(ref, x, gy)
    for mode in ("lean", "middle", "blocks", "auto"):
        other = HRPathway(3, 6, num_blocks=3, dilations=[(1, 2), (2, 3), (3, 1)], num_classes=2, norm=norm,
                          checkpoint=mode).double()
        other.load_state_dict(initial)
        y, g = _run(other, x, gy)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        assert len(g) == len(g_ref) > 10
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for (name, a), b in zip(other.named_buffers(), ref.buffers()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct tensors other than the module's parameters that autograd keeps for backward during
    module(x)."""
    seen = {}
    params = {q.untyped_storage().data_ptr() for q in module.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_lean_modes_keep_less_for_backward():
    path = HRPathway(4, 8, num_blocks=4, dilations=(2, 3), num_classes=2)
    x = torch.randn(1, 4, 24, 24)
    kept = {}
    for mode in ("none", "lean", "middle", "blocks"):
        path.checkpoint = mode
        kept[mode] = _saved_bytes(path, x)
    full = 8 * 24 * 24 * 4  # one (1, L, H, W) float32 tensor
    # per block eager keeps conv1 out, ReLU out, conv2 out, block out; lean drops the ReLU out and the 5-tensor
    # concatenation of the dense fusion (a sum of per-input 1x1 convs in "lean" and "blocks"), blocks also both
    # conv outputs (block outputs stay: the dense fusion needs them); middle keeps the second conv output only
    assert kept["none"] - kept["lean"] >= (4 + 5) * full
    assert kept["lean"] - kept["middle"] >= 4 * full
    assert kept["middle"] - kept["blocks"] >= 4 * full
    path.checkpoint, path.dense_sum = "lean", False  # forced concatenation: kept again
    assert _saved_bytes(path, x) - kept["lean"] >= 5 * full


def test_auto_rule(monkeypatch):
    """Eagerly the fastest mode that fits ("none", then "lean", "middle", "blocks"); under CUDA-graph capture "lean"
    first; "none" without gradients; the estimates bound what each mode's autograd graph keeps."""
    from hmedn_fast.nn import pathways

    path = HRPathway(3, 8, num_blocks=2, dilations=(1, 2))
    x = torch.randn(2, 3, 10, 12)
    unit = 2 * 8 * 10 * 12 * 4
    need_none, need_lean, need_middle = (4 * 2 + 5 + 3) * unit, (3 * 2 + 4) * unit, (2 * 2 + 4) * unit
    path.checkpoint = "auto"
    for budget, eager, captured in ((need_none, "none", "lean"), (need_none - 1, "lean", "lean"),
                                    (need_lean, "lean", "lean"), (need_lean - 1, "middle", "middle"),
                                    (need_middle, "middle", "middle"), (need_middle - 1, "blocks", "blocks")):
        path.memory_budget = budget
        monkeypatch.setattr(pathways, "_capturing", lambda t: False)
        assert path.resolve_checkpoint(x) == eager
        monkeypatch.setattr(pathways, "_capturing", lambda t: True)
        assert path.resolve_checkpoint(x) == captured
        with torch.no_grad():
            assert path.resolve_checkpoint(x) == "none"
    monkeypatch.setattr(pathways, "_capturing", lambda t: False)
    path.memory_budget = None
    assert path.resolve_checkpoint(x) == "none"  # CPU: unlimited
    for blocks, dense in ((9, True), (4, True), (2, True), (6, False)):  # the estimates cover what autograd keeps
        p = HRPathway(8, 8, blocks, (2, 4), num_classes=4, dense=dense)
        x = torch.randn(1, 8, 12, 12)
        unit = 8 * 12 * 12 * 4
        for mode, estimate in (("none", 4 * blocks + 5 + (blocks + 1) * dense), ("lean", 3 * blocks + 4),
                               ("middle", 2 * blocks + 4)):
            p.checkpoint = mode
            assert 0.85 * estimate * unit <= _saved_bytes(p, x) <= 1.15 * estimate * unit, (blocks, dense, mode)


def test_blocks_backward_holds_few_fusion_gradients():
    """In "blocks" the dense fusion's terms are added inside the block loop, so backward makes each feature's
    fusion gradient just before that feature's block runs backward: the forward + backward peak of live tensors
    is 39 % of eager's on this pathway (52 % when the fusion summed all features after the loop and backward held
    every feature's gradient at once), and gradients are unchanged."""
    from _live_bytes import LiveBytes

    path = HRPathway(8, 8, 9, (2, 4), num_classes=4, spatial_dims=3).double()
    x = torch.randn(1, 8, 16, 16, 16, dtype=torch.float64)
    gf, gl = torch.randn_like(x), torch.randn(1, 4, 16, 16, 16, dtype=torch.float64)
    peaks, grads = {}, {}
    for mode in ("none", "blocks"):
        path.checkpoint = mode
        xr = x.clone().requires_grad_()
        with LiveBytes() as live:
            torch.autograd.backward(list(path(xr)), [gf, gl])
        peaks[mode], grads[mode] = live.peak, xr.grad
    assert peaks["blocks"] < 0.45 * peaks["none"], peaks
    torch.testing.assert_close(grads["blocks"], grads["none"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm, mode, bound", [("batch", "lean", 5.5), ("batch", "middle", 6.5),
                                               ("batch", "blocks", 6.5), ("instance", "lean", 9.5),
                                               ("instance", "middle", 9.5), ("instance", "blocks", 8.5)])
def test_block_backward_drops_each_tensor_once_dead(norm, mode, bound):
    """A lean block's backward holds at most ``bound`` activations' worth of new tensors at once: each replayed or
    gradient tensor is dropped as soon as it is dead (BatchNorm, ATen engine: 5.13 / 6.13 now, 8.25 / 10.25 while they
    lived to the end of the backward; InstanceNorm, nested autograd: 9.25 / 8.13, was 10.25 / 10.25; "middle" 6.13 /
    9.13: the recomputed first conv output is new there), and the gradients are eager autograd's."""
    from _live_bytes import LiveBytes

    torch.manual_seed(0)
    block = ResidualDilatedBlock(8, (2, 4), 3, norm).double()
    x = torch.randn(1, 8, 12, 12, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    block.checkpoint = "none"
    want = torch.autograd.grad(block(x), [x, *block.parameters()], g)
    block.checkpoint = mode
    y = block(x)
    with LiveBytes() as live:
        got = torch.autograd.grad(y, [x, *block.parameters()], g)
    assert live.peak <= bound * x.numel() * x.element_size(), live.peak / (x.numel() * x.element_size())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_dense_fusion_sum_checks_the_channels_added():
    from hmedn_fast.nn.lean import DenseFusionSum

    fusion = DenseFusionSum(nn.Conv2d(12, 5, 1))
    fusion.add(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="4 channels, conv takes 12"):
        fusion.result()


@pytest.mark.parametrize("layouts", [("nc", "nc", "nc"), ("cl", "cl", "cl"), ("cl", "nc", "cl"), ("nc", "cl", "cl")])
@pytest.mark.parametrize("dims", [2, 3])
def test_dense_fusion_sum_equals_concatenation(layouts, dims):
    """NC*, channels-last and mixed layouts: the value and every gradient (features, weight, bias) equal the
    concatenated 1x1 convolution's in float64."""
    torch.manual_seed(dims)
    conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(12, 5, 1, bias=True).double()
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    size = (3, 4, 5)[:dims]
    feats = [torch.randn(2, 4, *size, dtype=torch.float64).contiguous(memory_format=fmt if k == "cl" else
                                                                    torch.contiguous_format).requires_grad_()
             for k in layouts]
    got = dense_fusion_sum(feats, conv)
    gy = torch.randn_like(got)
    grads = torch.autograd.grad(got, [*feats, conv.weight, conv.bias], gy)
    want = conv(torch.cat(feats, 1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, torch.autograd.grad(want, [*feats, conv.weight, conv.bias], gy)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,kw,size", [("dilnet3", dict(channels=8, num_blocks=2), (20, 18)),
                                          ("hrdn_l2", dict(widths=(8, 12, 16, 20), growth_rates=4, num_layers=1,
                                                           hr_channels=6, hr_blocks=2), (16, 20))])
def test_models_checkpoint_modes_same_gradients(name, kw, size):
    torch.manual_seed(1)
    ref = create_model(name, **kw)
    x = torch.randn(2, 5, *size)
    grads = {}
    for mode in ("none", "blocks", "middle", "lean"):
        model = create_model(name, checkpoint=mode, **kw)
        model.load_state_dict(ref.state_dict())
        model.train()
        out = model(x)
        (out.seg.square().mean() + sum(a.square().mean() for a in out.aux)).backward()
        grads[mode] = [p.grad for p in model.parameters()]
    for mode in ("blocks", "middle", "lean"):
        for a, b in zip(grads[mode], grads["none"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_autocast_matches_eager():
    torch.manual_seed(2)
    ref = randomise(ResidualDilatedBlock(8, (2, 3), spatial_dims=3))
    lean = ResidualDilatedBlock(8, (2, 3), spatial_dims=3, checkpoint="blocks")
    lean.load_state_dict(ref.state_dict())
    x = torch.randn(2, 8, 6, 7, 8)
    results = []
    for block in (ref, lean):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(xi)
        y.float().square().sum().backward()
        results.append([y.float(), xi.grad, block.conv1.weight.grad, block.norm2.bias.grad])
    assert results[1][0].dtype == torch.float32 and lean.conv1.weight.grad.dtype == torch.float32
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


@pytest.mark.parametrize("spatial_dims, need_x", [(2, True), (3, True), (3, False)])
def test_lean_conv_gradcheck_float64(spatial_dims, need_x):
    """The projection's convolution through our conv ops (reference backends on the CPU): float64 gradcheck, and the
    pathway's projection runs it outside "none" (the modes test above compares the gradients with eager's)."""
    from hmedn_fast.nn.lean import LeanConv

    conv = nn.Conv3d(3, 4, 3, padding=2, dilation=2, bias=False) if spatial_dims == 3 else nn.Conv2d(3, 4, 3, padding=1,
                                                                                                      bias=False)
    conv = conv.double()
    x = torch.randn(2, 3, *(4, 5, 6)[:spatial_dims], dtype=torch.float64, requires_grad=need_x)
    assert torch.autograd.gradcheck(lambda x, w: LeanConv.apply(x, w, conv), (x, conv.weight), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)
    path = HRPathway(3, 4, num_blocks=1, checkpoint="middle")
    y, _ = path(torch.randn(1, 3, 6, 6))
    assert any("LeanConv" in n for n in _graph_names(y.grad_fn)), _graph_names(y.grad_fn)
    path.checkpoint = "none"
    assert not any("LeanConv" in n for n in _graph_names(path(torch.randn(1, 3, 6, 6))[0].grad_fn))


def _graph_names(node) -> set[str]:
    """Names of every autograd node reachable from ``node``."""
    seen, stack = {}, [node]
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen[id(n)] = type(n).__name__
        stack.extend(f for f, _ in n.next_functions)
    return set(seen.values())


def test_lean_block_rejects_a_bad_recompute_count():
    block = ResidualDilatedBlock(4, (1, 2))
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    params = [block.conv1.weight, block.norm1.weight, block.norm1.bias, block.conv2.weight, block.norm2.weight,
              block.norm2.bias]
    for fn in (LeanResidualBlock, LeanBatchNormBlock):
        with pytest.raises(ValueError, match="recompute must be 0, 1 or 2"):
            fn.apply(x, block, 3, *params)


def test_bad_checkpoint_arguments():
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        ResidualDilatedBlock(4, (1, 2), checkpoint="auto")
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        HRPathway(3, 4, num_blocks=1, checkpoint="everything")
    with pytest.raises(ValueError, match="memory_budget"):
        HRPathway(3, 4, num_blocks=1, memory_budget=-5)
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        create_model("dstnet2", checkpoint="full")
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        create_model("dilnet1", checkpoint="yes")
