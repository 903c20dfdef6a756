"""Model family: shapes on odd sizes, gradients to every parameter, paper parameter counts, receptive field,
batch independence in eval mode, and clear errors on bad input."""
import pytest
import torch

from hmedn_fast.models import MODELS, SegmentationOutput, count_parameters, create_model, list_models
from hmedn_fast.nn import DenseBlock, HRPathway, ResidualDilatedBlock

REQUIRED = {"dilnet1", "dilnet2", "dilnet3", "dstnet1", "dstnet2", "hrdn_l1", "hrdn_l2", "hrdn_l3", "hrdn_l4",
            "hmedn_2d", "hmedn_3d_l2", "hmedn_3d_l3", "unet_2d", "unet_3d"}
ODD_SIZE = {2: (150, 211), 3: (37, 50, 45)}


def test_list_models_has_the_paper_family():
    assert REQUIRED <= set(list_models())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_forward_backward_odd_size(name):
    model = create_model(name)
    spec = MODELS[name]
    size = ODD_SIZE[spec.spatial_dims]
    x = torch.randn(1, model.in_channels, *size)
    out = model(x)
    assert isinstance(out, SegmentationOutput)
    assert out.seg.shape == (1, model.num_classes, *size)
    if model.contour_head is not None:
        assert out.contour.shape == (1, 1, *size)
    else:
        assert out.contour is None
    for a in out.aux:
        assert a.shape[:2] == (1, model.num_classes)
        factor = [s / t for s, t in zip(size, a.shape[2:])]
        assert all(1 <= f < 2 ** 5 for f in factor), (a.shape, size)
    loss = out.seg.square().mean() + sum(a.square().mean() for a in out.aux)
    if out.contour is not None:
        loss = loss + out.contour.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing[:5]}"


@pytest.mark.parametrize("name", [n for n in sorted(MODELS) if MODELS[n].paper_params_m])
def test_parameter_counts_match_paper(name):
    paper = MODELS[name].paper_params_m * 1e6
    got = count_parameters(create_model(name))
    assert abs(got - paper) / paper < 0.05, f"{name}: {got / 1e6:.3f}M vs paper {paper / 1e6:.2f}M"


def test_defaults_as_paper():
    m2, m3 = create_model("hmedn_2d"), create_model("hmedn_3d_l2")
    assert (m2.in_channels, m2.num_classes, m2.spatial_dims) == (5, 4, 2)
    assert (m3.in_channels, m3.num_classes, m3.spatial_dims) == (4, 4, 3)
    assert m2.contour_head is not None
    assert create_model("hmedn_3d_l2", contour=False).contour_head is None
    m = create_model("hrdn_l2", in_channels=1, num_classes=3, norm="group")
    out = m.eval()(torch.randn(2, 1, 33, 47))
    assert out.seg.shape == (2, 3, 33, 47)


@pytest.mark.parametrize("spatial_dims,size,blocks,dil", [(2, 61, 2, (2, 4)), (2, 71, 1, (3, 5)), (3, 31, 1, (2, 3))])
def test_hr_pathway_receptive_field_by_gradient(spatial_dims, size, blocks, dil):
    torch.manual_seed(1)
    path = HRPathway(3, 8, num_blocks=blocks, dilations=dil, num_classes=2, spatial_dims=spatial_dims).double().eval()
    x = torch.randn(1, 3, *([size] * spatial_dims), dtype=torch.float64, requires_grad=True)
    feats, logits = path(x)
    c = size // 2
    logits[(0, 0) + (c,) * spatial_dims].backward()
    nz = (x.grad.abs().sum(1)[0] != 0).nonzero()
    span = (nz.max(0).values - nz.min(0).values + 1).tolist()
    assert span == [path.receptive_field] * spatial_dims
    assert path.receptive_field == 3 + 2 * blocks * sum(dil)


def test_dilnet_receptive_fields():
    assert [create_model(n).receptive_field for n in ("dilnet1", "dilnet2", "dilnet3")] == [147, 111, 99]


@pytest.mark.parametrize("name,size", [("hmedn_2d", (37, 45)), ("dilnet3", (21, 30)), ("unet_2d", (20, 18)),
                                       ("hmedn_3d_l2", (13, 17, 11)), ("unet_3d", (9, 12, 10))])
def test_eval_batch_equals_one_by_one(name, size):
    model = create_model(name).eval()
    x = torch.randn(3, model.in_channels, *size)
    with torch.no_grad():
        batch = model(x)
        for i in range(3):
            single = model(x[i:i + 1])
            torch.testing.assert_close(single.seg, batch.seg[i:i + 1], rtol=1e-4, atol=1e-5)
            if single.contour is not None:
                torch.testing.assert_close(single.contour, batch.contour[i:i + 1], rtol=1e-4, atol=1e-5)


def test_padding_does_not_leak_into_the_crop_for_multiples():
    model = create_model("dstnet2").eval()
    x = torch.randn(1, 5, 32, 40)
    with torch.no_grad():
        a = model(x).seg
        b = model.forward_padded(x)[1]
    torch.testing.assert_close(a, b)


def test_blocks_shapes_and_residual():
    blk = ResidualDilatedBlock(6, (2, 3), spatial_dims=3, norm="instance")
    x = torch.randn(2, 6, 9, 10, 11)
    assert blk(x).shape == x.shape
    assert blk.receptive_field == 11
    dense = DenseBlock(5, growth_rate=4, num_layers=3, spatial_dims=2)
    y = dense(torch.randn(1, 5, 8, 8))
    assert y.shape == (1, dense.out_channels, 8, 8) and dense.out_channels == 17


def test_xavier_init_option():
    torch.manual_seed(0)
    w = create_model("dilnet3", init="xavier").net.blocks[0].conv1.weight
    fan = w.shape[1] * w[0, 0].numel()
    bound = (6 / (fan + w.shape[0] * w[0, 0].numel())) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    w_def = create_model("dilnet3", init="default").net.blocks[0].conv1.weight
    assert w_def.abs().max() <= (1 / fan) ** 0.5 + 1e-6  # kaiming_uniform(a=sqrt 5) bound of PyTorch's default


@pytest.mark.parametrize("bad,err,match", [
    (lambda m: m(torch.randn(1, 3, 32, 32)), ValueError, "in_channels=5"),
    (lambda m: m(torch.randn(5, 32, 32)), ValueError, "4 dims"),
    (lambda m: m(torch.randn(1, 5, 16, 16, 16)), ValueError, "spatial_dims=2"),
    (lambda m: m(torch.randint(0, 3, (1, 5, 32, 32))), TypeError, "floating-point"),
    (lambda m: m(torch.randn(0, 5, 32, 32)), ValueError, "non-empty"),
    (lambda m: m("image"), TypeError, "torch.Tensor"),
])
def test_bad_input_errors(bad, err, match):
    model = create_model("dstnet2")
    with pytest.raises(err, match=match):
        bad(model)


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="unknown model name 'hmedn_4d'"):
        create_model("hmedn_4d")
    with pytest.raises(TypeError, match="unexpected override"):
        create_model("hmedn_2d", widht=3)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        create_model("hmedn_2d", spatial_dims=4)
    with pytest.raises(ValueError, match="norm must be one of"):
        create_model("hmedn_2d", norm="layer")
    with pytest.raises(ValueError, match="hr_stage"):
        create_model("hmedn_2d", hr_stage=7)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_model("unet_2d", num_classes=1)
    with pytest.raises(ValueError, match="dilations"):
        ResidualDilatedBlock(4, (2,))
    with pytest.raises(ValueError, match="init must be one of"):
        create_model("dilnet1", init="he")


def test_save_load_roundtrip(tmp_path):
    from hmedn_fast.models.io import load_model, save_model
    model = create_model("dstnet2", in_channels=2, num_classes=3).eval()
    path = save_model(model, tmp_path / "m.pt", spacing=(1.0, 1.0))
    assert not list(tmp_path.glob(".*.tmp"))
    loaded, record = load_model(path)
    assert record["spacing"] == (1.0, 1.0) and record["model"] == "dstnet2"
    x = torch.randn(1, 2, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).seg, model(x).seg)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(tmp_path / "bad.pt")


def test_hmedn_loss_on_odd_sizes_uses_whole_aux_cells():
    """aux maps of an odd-size input have ceil(size / f) cells; HMEDNLoss scores the whole cells only, which
    equals the loss of the model's aux logits cropped by hand against the cropped labels."""
    from hmedn_fast.losses import HMEDNLoss
    from hmedn_fast.ops import difficulty_guided_loss
    model = create_model("hrdn_l2", num_classes=3).eval()
    x = torch.randn(2, 5, 37, 53)
    labels = torch.randint(0, 3, (2, 37, 53))
    with torch.no_grad():
        out = model(x)
    assert out.aux_scales == [(2, 2), (4, 4), (8, 8), (2, 2)]
    assert [tuple(a.shape[2:]) for a in out.aux] == [(19, 27), (10, 14), (5, 7), (19, 27)]
    loss_fn = HMEDNLoss(3, aux_weights=1.0, use_weight_map=False)
    res = loss_fn(out, labels)
    for i, (a, (f, _)) in enumerate(zip(out.aux, out.aux_scales)):
        h, w = 37 // f, 53 // f
        expected = difficulty_guided_loss(a[:, :, :h, :w], labels[:, :h * f, :w * f], backend="reference")
        torch.testing.assert_close(res.parts[f"aux{i}"], expected)
    main = difficulty_guided_loss(out.seg, labels, backend="reference")
    torch.testing.assert_close(res.total, main + sum(res.parts[f"aux{i}"] for i in range(4)))


@pytest.mark.parametrize("level", ["none", "lean"])
def test_decoder_does_not_hold_the_upsampled_features_while_its_stage_runs(monkeypatch, level):
    """The decoder stage's input is the upsampled features, the skip (and the HR features) along channels: copied
    into the lean dense block's buffer ("lean") or concatenated ("none"). The upsampled tensor is not needed after
    that, and no reference may keep it alive while the stage's dense block runs (it would add to the forward's
    peak: 64 MiB at hmedn_3d_l2's 128^3 in bf16)."""
    import weakref
    from hmedn_fast.nn import dense_lean
    from hmedn_fast.train.memory import set_checkpointing
    model = create_model("hmedn_3d_l2", widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_stage=1,
                         hr_channels=4, hr_blocks=2).train()
    set_checkpointing(model, level)
    net, ups, alive = model.net, [], []
    for s in range(net.depth):
        net.up[s].register_forward_hook(lambda m, i, o: ups.append(weakref.ref(o)))
        if level == "none":
            net.dec[s][0].layers[0].register_forward_pre_hook(lambda m, i: alive.append(ups[-1]() is not None))
    if level == "lean":  # the lean block runs no layer module: look when it prepares each layer's norm
        real = dense_lean.norm_call
        monkeypatch.setattr(dense_lean, "norm_call", lambda *a, **k: (
            alive.append(ups[-1]() is not None) if ups else None, real(*a, **k))[1])
    model(torch.randn(1, 4, 16, 16, 16, requires_grad=True)).seg.sum().backward()
    per_stage = 1 if level == "none" else 2  # the lean blocks' two layers
    assert len(alive) == net.depth * per_stage and not any(alive)


@pytest.mark.parametrize("pool", ["ours", "torch"])
def test_stages_keeps_no_first_stage_output_for_backward(monkeypatch, pool):
    """At the "stages" level the first stage is recomputed in backward, so its output (the full-resolution skip,
    hmedn_3d_l2 at 128^3 in bf16: 64 MiB) must not be kept through the backward by anything: the decoder copies it
    into its buffer and the pooling (hmedn_fast.nn.layers.MaxPool) keeps only its indices. With torch's pooling,
    which also keeps its input, it stays alive (the test's own control)."""
    import weakref
    from torch import nn
    from hmedn_fast.nn import layers
    from hmedn_fast.train.memory import set_checkpointing
    if pool == "torch":
        monkeypatch.setattr(layers, "MaxPool", lambda dims: nn.MaxPool3d(2))
    model = create_model("hmedn_3d_l2", widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_stage=2,
                         hr_channels=4, hr_blocks=2).train()
    set_checkpointing(model, "stages")
    pooled = []
    model.net.pool.register_forward_pre_hook(lambda m, i: pooled.append(weakref.ref(i[0])))
    y = model(torch.randn(1, 4, 16, 16, 16, requires_grad=True)).seg
    assert len(pooled) == model.net.depth  # the first call pools the first stage's output
    first = pooled[0]()
    if pool == "ours":
        assert first is None
    else:
        assert first is not None and first.shape[1:] == (4, 16, 16, 16)
    y.sum().backward()
