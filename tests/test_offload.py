"""Saved activations parked in pinned host memory (hmedn_fast.nn.offload.HostParking) and the "stages" level's
encoder stages and HR pathway parked instead of recomputed: gradients equal the unparked ones, the parked tensors leave the
device at ``release``, and a CUDA-graph step with parking replays the eager steps. Pinned memory and side streams
need a GPU: every test is marked ``cuda``; on the CPU the model's parking is off (its stage is recomputed as
before: tests/test_memory_planner.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from hmedn_fast.models import create_model
from hmedn_fast.nn.offload import HostParking, parking_for
from hmedn_fast.train.graphed import GraphedStep
from hmedn_fast.train.memory import set_checkpointing


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[m for _ in range(3) for m in (torch.nn.Linear(256, 256), torch.nn.Tanh())]).cuda(
    ).double()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["fetch", "unpack", "unreleased"])
def test_cuda_parked_tensors_give_the_same_gradients_and_leave_the_device(mode):
    """Three Linear + tanh layers (each saved activation 8 MiB) parked: after ``release`` the device holds at least
    the two inner activations less; the gradients equal the unparked run's bitwise, whether the tensors come back
    by ``fetch`` (a gradient hook), by ``unpack`` alone, or were never released."""
    x = torch.randn(4096, 256, device="cuda", dtype=torch.float64)
    first, second = _mlp(0), _mlp(1)
    want = None
    for parked in (False, True):
        a, b = copy.deepcopy(first), copy.deepcopy(second)
        park = HostParking()
        torch.cuda.synchronize()
        if parked:
            with park.saving():
                h = a(x)
            before = torch.cuda.memory_allocated()
            if mode != "unreleased":
                park.release()
                torch.cuda.synchronize()
                assert before - torch.cuda.memory_allocated() >= 2 * 4096 * 256 * 8
            if mode == "fetch":
                h.register_hook(lambda g: park.fetch())
        else:
            h = a(x)
        b(h).square().sum().backward()
        grads = [p.grad for p in (*a.parameters(), *b.parameters())]
        if want is None:
            want = grads
    assert len(park._slots) >= 3 and all(s.uses == 0 and s.fetched is None for s in park._slots if s.device is None)
    for g, w in zip(grads, want):
        assert torch.equal(g, w)


def _tiny(**kw) -> torch.nn.Module:
    return create_model("hmedn_3d_l2", widths=(8, 8, 8, 8), growth_rates=8, num_layers=2, hr_stage=1,
                        hr_channels=8, hr_blocks=2, dropout=0.0, **kw).cuda().train()


@pytest.mark.cuda
def test_cuda_stages_level_parks_instead_of_recomputing(monkeypatch):
    """At "stages" on CUDA the first encoder stage (or the first two, and the HR pathway) park their saved tensors
    (minimum size lowered for this small model) instead of being recomputed; the gradients and running statistics
    equal those with everything recomputed (nothing parked), deterministic cuDNN, float32."""
    from hmedn_fast.train import memory

    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    base = _tiny()
    x = torch.randn(1, 4, 32, 32, 32, device="cuda")
    results = {}
    for parks in ((0, False), (1, False), (2, True), (0, True)):
        monkeypatch.setattr(memory, "STAGES_PARKED", parks[0])
        monkeypatch.setattr(memory, "STAGES_PARK_HR", parks[1])
        model = copy.deepcopy(base)
        set_checkpointing(model, "stages")
        assert (model.net.park_stages, model.net.park_hr) == parks
        parts = [model.net.enc[s] for s in range(parks[0])] + ([model.net.hr] if parks[1] else [])
        for part in parts:
            parking_for(part).min_bytes = 0
        out = model(x)
        (out.seg.square().mean() + out.contour.square().mean() + sum(a.square().mean() for a in out.aux)).backward()
        results[parks] = ({n: p.grad for n, p in model.named_parameters()}, copy.deepcopy(model.state_dict()))
        for part in parts:  # every parked tensor left the device, came back, was used and dropped
            slots = parking_for(part)._slots
            assert len(slots) >= 3 and all(s.device is None and s.uses == 0 and s.fetched is None for s in slots)
    want_grads, want_state = results[(0, False)]
    for parks, (grads, state) in results.items():
        assert [n for n, g in grads.items() if g is None] == [n for n, g in want_grads.items() if g is None]
        for name, g in want_grads.items():
            if g is not None:
                torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(),
                                           msg=f"{parks} {name}")
        for k, v in want_state.items():
            torch.testing.assert_close(state[k], v, msg=f"{parks} {k}")


@pytest.mark.cuda
def test_cuda_graphed_steps_with_parking_equal_eager_steps(monkeypatch):
    """A "stages" training step with the first two encoder stages and the HR pathway parked, CUDA-graphed (2 eager
    warm-up steps, capture, replays), gives the eager steps' losses and weights over 6 steps on changing batches."""
    from hmedn_fast.train import memory

    monkeypatch.setattr(memory, "STAGES_PARKED", 2)
    monkeypatch.setattr(memory, "STAGES_PARK_HR", True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    g = torch.Generator("cuda").manual_seed(0)
    batches = [torch.randn(1, 4, 32, 32, 32, device="cuda", generator=g) for _ in range(6)]
    base = _tiny()
    runs = []
    for graphed in (False, True):
        model = copy.deepcopy(base)
        set_checkpointing(model, "stages")
        for part in (model.net.enc[0], model.net.enc[1], model.net.hr):
            parking_for(part).min_bytes = 0
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True,
                                capturable=True)

        def step(x, model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = out.seg.square().mean() + out.contour.square().mean() + sum(a.square().mean() for a in out.aux)
            loss.backward()
            opt.step()
            return loss.detach()

        fn = GraphedStep(step) if graphed else step
        losses = [float(fn(x)) for x in batches]
        runs.append((losses, [t.detach().clone() for t in model.parameters()], fn))
    (la, wa, _), (lb, wb, fn) = runs
    assert fn.captures == 1
    torch.testing.assert_close(lb, la, rtol=1e-6, atol=0)
    for a, b in zip(wa, wb):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
def test_cuda_parking_with_a_frozen_encoder(monkeypatch):
    """Fine-tuning the decoder only (encoder, stem, HR pathway and up-convolutions frozen, input without gradient):
    the parked parts' backward never runs and no hook can be registered on their outputs; the step runs and its
    gradients equal those without parking."""
    from hmedn_fast.train import memory

    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    base = _tiny()
    for part in (base.net.stem, base.net.enc, base.net.hr, base.net.up):
        part.requires_grad_(False)
    x = torch.randn(1, 4, 32, 32, 32, device="cuda")
    grads = []
    for parks in ((0, False), (2, True)):
        monkeypatch.setattr(memory, "STAGES_PARKED", parks[0])
        monkeypatch.setattr(memory, "STAGES_PARK_HR", parks[1])
        model = copy.deepcopy(base)
        set_checkpointing(model, "stages")
        out = model(x)
        out.seg.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        if g is not None:
            torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=name)
