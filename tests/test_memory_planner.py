"""Memory planner decisions (fake measurer), budget parsing, checkpointing levels, OOM escalation."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from hmedn_fast.models import create_model
from hmedn_fast.train import TrainConfig, Trainer
from hmedn_fast.train.memory import LEVELS, OOMEscalator, parse_memory_budget, plan_memory, set_checkpointing

GIB = 2**30


@pytest.mark.parametrize("text, total, expected", [
    ("8GiB", None, 8 * GIB), ("512MB", None, 512 * 10**6), ("1e9", None, 10**9), ("2048", None, 2048),
    ("1.5 KiB", None, 1536), ("0.5", 1000, 500), (0.25, 1000, 250), ("25%", 1000, 250), (4 * GIB, None, 4 * GIB)])
def test_parse_memory_budget(text, total, expected):
    assert parse_memory_budget(text, total) == expected


@pytest.mark.parametrize("text, total, match", [("lots", None, "look like"), ("-1GiB", None, "look like"),
                                                ("0", 1000, "fraction"), ("150%", 1000, "fraction"),
                                                ("0.5", None, "CUDA"), (True, None, "look like")])
def test_parse_memory_budget_errors(text, total, match):
    with pytest.raises(ValueError, match=match):
        parse_memory_budget(text, total)


class FakeGPU:
    """Peak bytes of a step: parameters + per-voxel activations by level (lean keeps 60%, middle 45%, blocks 30%,
    stages 20%)."""

    factor = {"none": 1.0, "lean": 0.6, "middle": 0.45, "blocks": 0.3, "stages": 0.2}

    def __init__(self, oom_above: float = math.inf):
        self.oom_above, self.calls = oom_above, []

    def __call__(self, level, patch, batch):
        self.calls.append((level, tuple(patch), batch))
        peak = 10**8 + 1000 * self.factor[level] * batch * math.prod(patch)
        if peak > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return int(peak)


def _peak(level, patch, batch):
    return 10**8 + 1000 * FakeGPU.factor[level] * batch * math.prod(patch)


@pytest.mark.parametrize("level", LEVELS)
def test_plan_takes_the_cheapest_level_that_fits(level):
    need = _peak(level, (64, 64, 64), 2)
    budget = int(need / 0.9) + 1
    fake = FakeGPU()
    plan = plan_memory(budget, (64, 64, 64), 2, fake)
    assert (plan.level, plan.patch_size, plan.batch_size) == (level, (64, 64, 64), 2)
    assert plan.peak_bytes == int(need) and plan.peak_bytes <= 0.9 * budget
    assert [c[0] for c in fake.calls] == list(LEVELS[:LEVELS.index(level) + 1])
    assert len(plan.trials) == len(fake.calls)


def test_plan_shows_its_trials_in_a_progress_bar(capsys):
    budget = int(_peak("blocks", (64, 64, 64), 2) / 0.9) + 1
    plan_memory(budget, (64, 64, 64), 2, FakeGPU(), progress=True)
    err = capsys.readouterr().err
    assert "memory plan (0.27 GiB budget): 3trial" in err
    assert f"blocks 64x64x64 batch 2: {_peak('blocks', (64, 64, 64), 2) / 2**30:.2f} GiB" in err
    plan_memory(budget, (64, 64, 64), 2, FakeGPU())
    assert capsys.readouterr().err == ""


def test_plan_halves_the_batch_then_shrinks_the_patch():
    leanest = LEVELS[-1]
    budget = int(_peak(leanest, (64, 64, 64), 1) / 0.9) + 1
    fake = FakeGPU()
    plan = plan_memory(budget, (64, 64, 64), 4, fake)
    assert (plan.level, plan.patch_size, plan.batch_size) == (leanest, (64, 64, 64), 1)
    assert [c[2] for c in fake.calls[len(LEVELS):]] == [2, 1]

    budget = int(_peak(leanest, (48, 48, 48), 1) / 0.9) + 1
    plan = plan_memory(budget, (64, 64, 64), 2, FakeGPU())
    assert plan.level == leanest and plan.batch_size == 1
    assert _peak(leanest, plan.patch_size, 1) <= 0.9 * budget
    assert sorted(plan.patch_size) == [48, 48, 48]  # shrunk axis by axis, largest first, 16 at a time


def test_plan_counts_out_of_memory_as_not_fitting():
    fake = FakeGPU(oom_above=_peak("lean", (32, 32), 8) + 1)  # "none" OOMs, "lean" fits
    plan = plan_memory(10 * GIB, (32, 32), 8, fake)
    assert plan.level == "lean"
    assert plan.trials[0]["peak_bytes"] is None and plan.trials[1]["peak_bytes"] == int(_peak("lean", (32, 32), 8))


def test_plan_raises_when_nothing_fits():
    with pytest.raises(ValueError, match="no configuration fits"):
        plan_memory(10**8, (64, 64), 2, FakeGPU())
    with pytest.raises(ValueError, match="budget_bytes"):
        plan_memory(0, (64, 64), 2, FakeGPU())
    with pytest.raises(ValueError, match="batch_size"):
        plan_memory(GIB, (64, 64), 0, FakeGPU())


def test_escalator():
    esc = OOMEscalator("none")
    assert [esc.escalate() for _ in range(5)] == ["lean", "middle", "blocks", "stages", None]
    with pytest.raises(ValueError, match="current"):
        OOMEscalator("all")


def _saved_bytes_and_grads(model, x):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = out.seg.square().mean() + out.contour.square().mean() + sum(a.square().mean() for a in out.aux)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return sum(saved), grads


@pytest.mark.parametrize("norm", ["instance", "batch"])  # batch: the lean level runs the lean dense blocks too
def test_checkpointing_levels_keep_gradients_and_save_memory(norm):
    model = create_model("hmedn_2d", widths=(8, 8, 16, 16), growth_rates=4, num_layers=2, hr_stage=2, hr_channels=8,
                         hr_blocks=3, norm=norm, dropout=0.0).double()
    x = torch.randn(2, 5, 16, 16, dtype=torch.float64)
    results = {}
    for level in LEVELS:
        assert set_checkpointing(model, level) > 0
        results[level] = _saved_bytes_and_grads(model, x)
    for level in LEVELS[1:]:
        for name, g in results["none"][1].items():
            torch.testing.assert_close(results[level][1][name], g, rtol=1e-10, atol=1e-12, msg=f"{level} {name}")
    assert (results["none"][0] > results["lean"][0] > results["middle"][0] > results["blocks"][0]
            > results["stages"][0])
    assert model.net.hr.checkpoint == "blocks" and set_checkpointing(model, "middle") and model.net.hr.checkpoint == "middle"
    with pytest.raises(ValueError, match="level"):
        set_checkpointing(model, "everything")


@pytest.mark.parametrize("norm, lean_dense", [("batch", True), ("instance", False)])
def test_blocks_level_keeps_lean_dense_blocks_and_checkpoints_the_others(norm, lean_dense):
    """At "blocks" the BatchNorm dense blocks stay lean (checkpointing them would save nothing and recompute eager
    concatenations in backward); dense blocks the lean block cannot run are checkpointed; "none" undoes both."""
    from hmedn_fast.nn.blocks import DenseBlock
    model = create_model("hmedn_2d", widths=(8, 8, 16, 16), growth_rates=4, num_layers=2, hr_stage=2, hr_channels=8,
                         hr_blocks=2, norm=norm, dropout=0.0)
    dense = [m for m in model.modules() if isinstance(m, DenseBlock)]
    set_checkpointing(model, "blocks")
    assert all(m.lean and ("forward" in m.__dict__) != lean_dense for m in dense)
    assert model.net.hr.checkpoint == "blocks"
    set_checkpointing(model, "none")
    assert all(not m.lean and "forward" not in m.__dict__ for m in dense)


def test_trainer_escalates_checkpointing_on_out_of_memory(tmp_path):
    cfg = TrainConfig(data="phantom", out=str(tmp_path), model="hmedn_2d", phantom_cases=3, phantom_size=32,
                      overrides=dict(widths=(8, 8, 16, 16), growth_rates=4, num_layers=2, hr_stage=2, hr_channels=8,
                                     hr_blocks=2), epochs=1, steps_per_epoch=1, progress=False, device="cpu")
    trainer = Trainer(cfg)
    real_forward, calls = trainer.net.forward, []

    def flaky(x):
        calls.append(trainer.checkpoint_level)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(x)

    trainer.net.forward = flaky
    images, labels = torch.randn(2, 5, 32, 32), torch.randint(0, 4, (2, 32, 32), dtype=torch.uint8)
    with pytest.warns(RuntimeWarning, match="escalating activation checkpointing to 'lean'"):
        parts = trainer.train_step(images, labels)
    assert calls == ["none", "lean"] and math.isfinite(parts["loss"])
    assert trainer.net.net.hr.checkpoint == "lean"

    def always_oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    trainer.net.forward = always_oom
    with pytest.warns(RuntimeWarning) as warned, pytest.raises(torch.OutOfMemoryError):
        trainer.train_step(images, labels)
    assert [str(w.message).split("'")[1] for w in warned] == ["middle", "blocks", "stages"]
    assert trainer.checkpoint_level == "stages" and trainer.net.net.recompute_stages == 2


def test_checkpointing_levels_keep_batchnorm_running_statistics():
    """A training step at every level leaves the same BatchNorm running statistics and batch counters as
    plain autograd: the recomputed forward of checkpointed blocks must not update them a second time."""
    base = create_model("hmedn_2d", widths=(8, 8, 16, 16), growth_rates=4, num_layers=2, hr_stage=2, hr_channels=8,
                        hr_blocks=2, norm="batch", dropout=0.0).double().train()
    x = torch.randn(2, 5, 16, 16, dtype=torch.float64)
    states = {}
    for level in LEVELS:
        model = copy.deepcopy(base)
        set_checkpointing(model, level)
        _saved_bytes_and_grads(model, x)
        states[level] = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in states["none"].items())  # the step did update
    for level in LEVELS[1:]:
        for k, v in states["none"].items():
            torch.testing.assert_close(states[level][k], v, rtol=1e-12, atol=1e-14, msg=f"{level} {k}")


def test_stages_level_recomputes_the_first_stage_without_random_numbers(monkeypatch):
    """With dropout on, "stages" (first stage recomputed in backward, the full-resolution dense blocks' backward in
    channel groups: 4 channels here, so that the 4 -> 8 channel blocks take 1 and 2 groups) gives the "blocks"
    level's loss, gradients, running statistics and RNG state after the step: the dropout masks are drawn once,
    outside the recomputed part, and the recomputation draws nothing."""
    from hmedn_fast.train import memory
    monkeypatch.setattr(memory, "STAGES_GROUP_CHANNELS", 4)
    monkeypatch.setattr(memory, "STAGES_ENCODER_GROUP_CHANNELS", 4)
    base = create_model("hmedn_3d_l2", widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_stage=1,
                        hr_channels=4, hr_blocks=2, dropout=0.3).double().train()
    x = torch.randn(1, 4, 16, 16, 16, dtype=torch.float64)
    results = {}
    for level in ("blocks", "stages"):
        model = copy.deepcopy(base)
        set_checkpointing(model, level)
        torch.manual_seed(5)
        _, grads = _saved_bytes_and_grads(model, x)
        results[level] = (grads, torch.get_rng_state(), copy.deepcopy(model.state_dict()))
    (ga, rng_a, sd_a), (gb, rng_b, sd_b) = results["blocks"], results["stages"]
    assert torch.equal(rng_a, rng_b)
    for name, g in ga.items():
        torch.testing.assert_close(gb[name], g, rtol=1e-10, atol=1e-12, msg=name)
    for k, v in sd_a.items():
        torch.testing.assert_close(sd_b[k], v, rtol=1e-12, atol=1e-14, msg=k)


def test_stages_level_groups_the_full_resolution_dense_blocks_backward():
    """"stages" sets group_channels on the distilling pathway's two full-resolution dense blocks (encoder and
    decoder stage 0) and on no other; the other levels clear it."""
    from hmedn_fast.nn.blocks import DenseBlock
    from hmedn_fast.train.memory import STAGES_ENCODER_GROUP_CHANNELS, STAGES_GROUP_CHANNELS
    model = create_model("hmedn_3d_l2", widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_stage=1,
                         hr_channels=4, hr_blocks=2)
    net = model.net
    full = {id(net.enc[0][0]), id(net.dec[0][0])}
    dense = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert len(dense) > 2 and full <= {id(m) for m in dense}
    set_checkpointing(model, "stages")
    want = {id(net.enc[0][0]): STAGES_ENCODER_GROUP_CHANNELS, id(net.dec[0][0]): STAGES_GROUP_CHANNELS}
    assert [m.group_channels for m in dense] == [want.get(id(m)) for m in dense]
    for level in ("blocks", "none"):
        set_checkpointing(model, level)
        assert all(m.group_channels is None for m in dense)


@pytest.mark.parametrize("level", ["blocks", "stages"])
def test_stages_level_recomputes_two_encoder_stages_and_the_hr_pathway(level):
    """At "stages" the stem, the first two encoder stages' dense blocks and transitions, and the HR pathway keep
    nothing for backward of their own (they run again there from their inputs: the ops inside save through the
    recomputation's hooks, not the caller's); the third stage, and at "blocks" all of them, do. Gradients:
    test_stages_level_recomputes_the_first_stage_without_random_numbers and the real-model test."""
    from hmedn_fast.train.memory import STAGES_RECOMPUTED
    model = create_model("hmedn_3d_l2", widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_stage=2,
                         hr_channels=4, hr_blocks=2).train()
    set_checkpointing(model, level)
    net = model.net
    assert (net.recompute_stages, net.recompute_hr) == ((2, True) if level == "stages" else (0, False))
    assert STAGES_RECOMPUTED == 2
    parts = {"stem": [net.stem], "hr": [net.hr], **{f"enc{s}": list(net.enc[s][:2]) for s in range(3)}}
    inside, saved = [], {k: 0 for k in parts}
    for name, modules in parts.items():
        for m in modules:  # dense block and transition of an encoder stage
            m.register_forward_pre_hook(lambda m, i, n=name: inside.append(n))
            m.register_forward_hook(lambda m, i, o: inside.pop() and None)

    def pack(t):
        if inside:
            saved[inside[-1]] += t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.randn(1, 4, 16, 16, 16))
    recomputed = {"stem", "enc0", "enc1", "hr"} if level == "stages" else set()
    assert {k for k, v in saved.items() if v == 0} == recomputed, saved
    out.seg.sum().backward()


def test_step_measurer_needs_a_warm_up_step():
    from hmedn_fast.train.memory import cuda_step_measurer
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        cuda_step_measurer(lambda level: None, None, 1, 2, torch.device("cuda", 0), None, steps=1)


@pytest.mark.cuda
def test_cuda_step_measurer_reports_the_steady_step_not_the_first_steps_kernel_timing():
    """The first step of a shape times candidate kernels (cudnn.benchmark; the Triton-or-cuDNN measured choices),
    allocating what later steps never hold. The planner must plan for the steps it will run: a measure right after
    the measured choices were forgotten equals one with them remembered (cuDNN's own algorithm cache cannot be
    cleared, so its timing is cold only where no earlier test used these shapes; on the H100 the measured choices
    alone made the old measurer report 3325 instead of 2602 MiB at 128^3,
    benchmarks/results/planner_measurer_ab_nvidia_h100_80gb_hbm3.json)."""
    from hmedn_fast.losses import HMEDNLoss
    from hmedn_fast.ops import measured
    from hmedn_fast.train.memory import cuda_step_measurer

    def build(level):
        model = create_model("hmedn_3d_l2", in_channels=4, num_classes=3)
        set_checkpointing(model, level)
        return model

    device = torch.device("cuda", 0)
    loss_fn = HMEDNLoss(3, check_values=False).to(device)
    measure = cuda_step_measurer(build, loss_fn, 4, 3, device, torch.bfloat16, torch.channels_last_3d)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        measured.forget()
        cold = measure("lean", (64, 64, 64), 1)
        warm = measure("lean", (64, 64, 64), 1)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    assert abs(cold - warm) <= 0.01 * warm, f"first measure {cold / 2**20:.1f} MiB, second {warm / 2**20:.1f} MiB"


@pytest.mark.slow
def test_stages_level_of_the_real_model_keeps_gradients():
    """hmedn_3d_l2 at its real widths (1x4x32^3, float64, dropout off): at "stages" the decoder's full-resolution
    dense block takes its layers' 64 and 80 input channels in 48-channel groups in backward (reading each layer's
    output gradient in place), the decoder blocks take their input through input_buffer, the first stage and the HR
    pathway are recomputed (on the CPU nothing is parked); every parameter gradient equals plain autograd's
    (measured: 6e-14 relative)."""
    base = create_model("hmedn_3d_l2", dropout=0.0).double().train()
    x = torch.randn(1, 4, 32, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = {}
    for level in ("none", "stages"):
        model = copy.deepcopy(base)
        set_checkpointing(model, level)
        out = model(x)
        (out.seg.square().mean() + out.contour.square().mean()).backward()
        grads[level] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["none"].keys() == grads["stages"].keys() and len(grads["none"]) > 200
    for name, g in grads["none"].items():
        torch.testing.assert_close(grads["stages"][name], g, rtol=1e-9, atol=1e-12 * g.abs().max().item(), msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("level, graph_break", [("lean", "net.up.0"), ("lean", "net.dec.1.1"), ("stages", None)])
def test_compiled_levels_equal_eager(level, graph_break):
    """torch.compile (inductor, CPU, float64) of a model at a lean level gives plain autograd's gradients and
    running statistics, also with a graph break inside the decoder (a user's model may have them; "stages" makes
    its own around the recomputed parts, which run eagerly). Regression: the decoder's in-place input buffer
    (DenseBlock.input_buffer) gave O(1)-wrong gradients to its parts when graph breaks split the traced code, so
    under compile the decoder concatenates."""
    base = create_model("hmedn_3d_l2", widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_stage=2,
                        hr_channels=4, hr_blocks=2, dropout=0.0).double().train()
    x = torch.randn(1, 4, 16, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = {}
    for compiled in (False, True):
        model = copy.deepcopy(base)
        set_checkpointing(model, level if compiled else "none")
        if compiled and graph_break:
            dict(model.named_modules())[graph_break].register_forward_pre_hook(
                lambda m, i: torch._dynamo.graph_break())
        torch._dynamo.reset()
        out = (torch.compile(model) if compiled else model)(x)
        out.seg.square().mean().backward()
        results[compiled] = ({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                             {k: v.clone() for k, v in model.state_dict().items() if "running" in k})
    (want, want_stats), (got, got_stats) = results[False], results[True]
    assert want and want.keys() <= got.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12 * g.abs().max().item(), msg=name)
    for k, v in want_stats.items():
        torch.testing.assert_close(got_stats[k], v, rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("level", ["none", "stages"])
def test_decoder_drops_each_skip_once_copied(level):
    """The full-resolution skip (the first encoder stage's output after dropout) is freed before the decoder's
    full-resolution stage runs: nothing saves it for backward, and the forward no longer holds it beside that stage's
    peak; the step's gradients are those of the model (checked by the level tests above)."""
    import weakref
    model = create_model("hmedn_3d_l2", widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_stage=2,
                         hr_channels=4, hr_blocks=2, dropout=0.3).double().train()
    set_checkpointing(model, level)
    net, seen = model.net, {}
    assert net.hr_stage == 1  # as in hmedn_3d_l2: the HR pathway (which saves its input) reads the second stage
    net.enc[0][2].register_forward_hook(lambda m, args, out: seen.update(skip=weakref.ref(out)))
    net.dec[0].register_forward_pre_hook(lambda m, args: seen.update(alive=seen["skip"]() is not None))
    out = model(torch.randn(1, 4, 16, 16, 16, dtype=torch.float64))
    out.seg.sum().backward()
    assert seen["alive"] is False
