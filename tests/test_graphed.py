"""GraphedStep (whole training steps replayed from a CUDA graph) and the trainer's cuda_graph option: argument
errors on the CPU; on a GPU, replayed steps equal eager steps, new input shapes are captured anew, and a
non-finite step inside a replay is skipped on the device."""
from __future__ import annotations

import math

import pytest
import torch

from _tiny_models import TINY_2D, TINY_3D
from hmedn_fast.train import TrainConfig, Trainer
from hmedn_fast.train.graphed import GraphedStep


def test_bad_arguments():
    with pytest.raises(TypeError, match="step must be callable"):
        GraphedStep(3)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        GraphedStep(lambda x: x, warmup=0)
    with pytest.raises(ValueError, match="one or more CUDA tensors"):
        GraphedStep(lambda x: x)(torch.ones(2))
    with pytest.raises(ValueError, match="one or more CUDA tensors"):
        GraphedStep(lambda x: x)()
    with pytest.raises(TypeError, match="static_inputs must be a bool"):
        GraphedStep(lambda x: x, static_inputs=1)


class _FakeCapture:
    """Stands in for ``torch.cuda.graph`` on the CPU: ending a capture interrupted by an exception raises an error of
    its own (as ending an invalidated stream capture may), chained to the interrupting one."""

    def __init__(self, graph, stream=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is not None:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


@pytest.mark.parametrize("raised, expected", [(torch.OutOfMemoryError("CUDA out of memory (simulated)"),
                                               torch.OutOfMemoryError),
                                              (ValueError("a bug in the step"), RuntimeError)])
def test_failed_capture_resets_and_keeps_out_of_memory_visible(monkeypatch, raised, expected):
    """A step that fails while captured leaves no graph behind (the next call warms up again); an out-of-memory
    error stays a torch.OutOfMemoryError (what the trainer's escalation catches) even when ending the capture raised
    over it; other errors propagate as they come."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)

    def step(x):
        raise raised

    fn = GraphedStep(step, warmup=1)
    fn._signature, fn._warm = "a signature", 1
    with pytest.raises(expected) as info:
        fn._capture((torch.ones(2),))
    assert fn._graph is None and fn._warm == 0 and fn.captures == 0 and fn._inputs == ()
    if expected is torch.OutOfMemoryError:
        assert "while capturing" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)


class _RecordingStep(GraphedStep):
    """A GraphedStep that runs its step eagerly (any device) and logs resets and calls in ``events``."""

    def __init__(self, step, events):
        super().__init__(step)
        self.events = events  # after the constructor's own reset

    def __call__(self, *inputs):
        self.events.append("step")
        return self.step(*inputs)

    def reset(self):
        getattr(self, "events", []).append("reset")
        super().reset()


@pytest.mark.parametrize("budgeted", [False, True])
def test_trainer_frees_the_graph_before_each_validation_under_a_budget(tmp_path, monkeypatch, budgeted):
    """The graph's private pool keeps the training step's peak reserved, where validation cannot allocate; under a
    memory budget (most of the cap) the trainer frees the graph and the gradients before validating, and training
    captures again. Without a budget the graph stays."""
    trainer = Trainer(TrainConfig(
        data="phantom", out=str(tmp_path / "run"), model="hmedn_2d", phantom_cases=6, phantom_size=32,
        overrides=TINY_2D, epochs=3, steps_per_epoch=2, batch_size=2, val_every=2, threads=1,
        progress=False, device="cpu"))
    if budgeted:  # what the planner leaves (CUDA only); the trainer only asks whether there is one
        trainer.memory_plan = {"budget_bytes": 2**30}
    events = []
    trainer.step_fn = _RecordingStep(trainer._step_tensors, events)
    validate = trainer.validate

    def validating():
        events.append("validate" if all(p.grad is None for p in trainer.net.parameters()) else "validate (grads)")
        return validate()

    monkeypatch.setattr(trainer, "validate", validating)
    trainer.fit()
    if budgeted:
        assert events == ["step"] * 4 + ["reset", "validate"] + ["step"] * 2 + ["reset", "validate"]
    else:
        assert events == ["step"] * 4 + ["validate (grads)"] + ["step"] * 2 + ["validate (grads)"]


# --------------------------------------------------------------------------------------------------- GPU
def _deterministic():
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _small_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.BatchNorm3d(8), torch.nn.ReLU(),
        torch.nn.Conv3d(8, 3, 3, padding=2, dilation=2)).cuda()


def _plain_step(net: torch.nn.Module, opt: torch.optim.Optimizer):
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def _batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator("cuda").manual_seed(seed)
    return [(torch.randn(2, 2, 12, 12, 12, device="cuda", generator=g),
             torch.randint(0, 3, (2, 12, 12, 12), device="cuda", generator=g)) for _ in range(count)]


def _eager_vs_graphed(batches, graphed_step, call=lambda fn, x, y, i: fn(x, y)) -> GraphedStep:
    """Train one small net eagerly and one through ``graphed_step(step)`` on ``batches`` (``call(fn, x, y, i)`` runs
    step i); assert equal losses, weights and running statistics; return the GraphedStep."""
    runs = []
    for graphed in (False, True):
        net = _small_net(0)
        opt = torch.optim.AdamW(net.parameters(), lr=torch.tensor(1e-2, device="cuda"), fused=True, capturable=True)
        step = _plain_step(net, opt)
        fn = graphed_step(step) if graphed else step
        losses = [float(call(fn, x, y, i)) for i, (x, y) in enumerate(batches)]
        runs.append((losses, [t.detach().clone() for t in (*net.parameters(), *net.buffers())], fn))
    (la, wa, _), (lb, wb, fn) = runs
    assert lb == la
    for a, b in zip(wa, wb):
        assert torch.equal(a, b)
    return fn


@pytest.mark.cuda
def test_cuda_replayed_steps_equal_eager_steps():
    """Same weights, running statistics and losses after 6 steps on changing batches, eager vs graphed (2 eager
    warm-up steps, capture, replays); a new batch shape is captured anew with a warning."""
    _deterministic()
    fn = _eager_vs_graphed(_batches(0, 6), GraphedStep)
    assert fn.captures == 1
    x, y = torch.randn(1, 2, 8, 8, 8, device="cuda"), torch.randint(0, 3, (1, 8, 8, 8), device="cuda")
    with pytest.warns(RuntimeWarning, match="capturing a new graph"):
        for _ in range(4):
            assert torch.isfinite(fn(x, y))
    assert fn.captures == 2


@pytest.mark.cuda
def test_cuda_static_inputs_replay_on_the_callers_tensors():
    """static_inputs=True: the same losses and weights as eager steps when each batch is copied into the captured
    tensors in place, no input buffers allocated at capture (one batch less memory), and other tensors refused."""
    _deterministic()
    batches = _batches(1, 5)
    xb, yb = torch.empty_like(batches[0][0]), torch.empty_like(batches[0][1])

    def call(fn, x, y, i):
        xb.copy_(x)
        yb.copy_(y)
        capturing = isinstance(fn, GraphedStep) and i == fn.warmup
        if capturing:
            assert fn._inputs == ()
        loss = fn(xb, yb)
        if capturing:  # the capturing call: the graph runs on xb and yb themselves, no copies
            assert fn._inputs[0] is xb and fn._inputs[1] is yb
        return loss

    fn = _eager_vs_graphed(batches, lambda step: GraphedStep(step, static_inputs=True), call)
    assert fn.captures == 1
    with pytest.raises(ValueError, match="same tensors"):
        fn(batches[0][0].clone(), batches[0][1])


def _trainer(tmp_path, graph: bool) -> Trainer:
    return Trainer(TrainConfig(
        data="phantom", out=str(tmp_path / str(graph)), model="hmedn_3d_l2", phantom_cases=4, phantom_size=32,
        overrides=TINY_3D,
        num_classes=4, epochs=1, steps_per_epoch=8, batch_size=1, augment=False, progress=False,
        checkpointing="lean", cuda_graph=graph, cudnn_benchmark=False))


@pytest.mark.cuda
def test_cuda_graph_trainer_steps_equal_eager_steps(tmp_path):
    """hmedn_3d_l2 (lean checkpointing, bf16, channels-last: the trainer's CUDA defaults) trained 5 steps by the
    trainer with and without cuda_graph: equal loss parts and weights; the scheduler's learning rate reaches the
    replayed AdamW; a NaN batch inside the replays is skipped on the device (weights unchanged, warning) and the
    next replay trains on."""
    _deterministic()
    g = torch.Generator("cuda").manual_seed(1)
    batches = [(torch.randn(1, 1, 32, 32, 32, device="cuda", generator=g),
                torch.randint(0, 4, (1, 32, 32, 32), device="cuda", generator=g, dtype=torch.uint8))
               for _ in range(5)]
    runs = []
    for graph in (False, True):
        trainer = _trainer(tmp_path, graph)
        parts = [trainer.train_step(x, y) for x, y in batches]
        runs.append((parts, [t.detach().clone() for t in trainer.net.state_dict().values()], trainer))
    (pa, wa, _), (pb, wb, trainer) = runs
    assert trainer.step_fn.captures == 1 and trainer.optimizer.param_groups[0]["lr"].is_cuda
    assert pb == pa
    for a, b in zip(wa, wb):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in trainer.net.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        assert trainer.train_step(torch.full_like(batches[0][0], float("nan")), batches[0][1]) is None
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.net.parameters()))
    assert trainer.train_step(*batches[1]) is not None
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.net.parameters()))
    assert trainer.step_fn.captures == 1


@pytest.mark.cuda
def test_trainer_defaults_to_lean_steps_replayed_from_a_cuda_graph(tmp_path):
    """Without checkpointing / cuda_graph options a CUDA trainer takes the fast path (lean blocks, the step
    replayed from a CUDA graph) and trains."""
    trainer = Trainer(TrainConfig(
        data="phantom", out=str(tmp_path / "auto"), model="hmedn_3d_l2", phantom_cases=4, phantom_size=32,
        overrides=TINY_3D,
        num_classes=4, epochs=1, steps_per_epoch=4, batch_size=1, progress=False))
    assert trainer.cuda_graph is True and trainer.checkpoint_level == "lean"
    assert isinstance(trainer.step_fn, GraphedStep)
    trainer.fit()
    assert trainer.step_fn.captures == 1
    row = trainer.history[-1]
    assert row["cuda_graph"] is True and row["checkpointing"] == "lean" and math.isfinite(row["train_loss"])


@pytest.mark.cuda
def test_trainer_resumes_an_eager_run_with_cuda_graph_steps(tmp_path):
    """A run trained without the CUDA graph and resumed with the default (graph on) captures and trains on: the
    optimizer groups loaded from the checkpoint become capturable."""
    kw = dict(data="phantom", out=str(tmp_path / "run"), model="hmedn_3d_l2", phantom_cases=4, phantom_size=32,
              overrides=TINY_3D, num_classes=4, steps_per_epoch=3, batch_size=1, progress=False)
    Trainer(TrainConfig(**kw, epochs=1, cuda_graph=False)).fit()
    trainer = Trainer(TrainConfig(**kw, epochs=2, resume=True))
    assert trainer.cuda_graph is True
    assert all(group["capturable"] for group in trainer.optimizer.param_groups)
    trainer.fit()
    assert trainer.step_fn.captures == 1 and math.isfinite(trainer.history[-1]["train_loss"])


@pytest.mark.cuda
def test_memory_budget_steps_replay_a_cuda_graph_and_a_capture_out_of_memory_escalates(tmp_path):
    """With a memory budget the planned steps are replayed from a CUDA graph too. An allocation over the budget
    while the step is being captured (a ballast tensor standing in for a capture that does not fit) escalates
    checkpointing like an eager step's out-of-memory error: the trainer warns, warms up at the next level,
    captures it and trains on with finite losses."""
    budget = 2 * 2**30
    trainer = Trainer(TrainConfig(
        data="phantom", out=str(tmp_path / "budget"), model="hmedn_3d_l2", phantom_cases=4, phantom_size=32,
        overrides=TINY_3D,
        num_classes=4, epochs=1, steps_per_epoch=4, batch_size=1, progress=False, memory_budget=str(budget)))
    assert trainer.cuda_graph is True and isinstance(trainer.step_fn, GraphedStep)
    planned = trainer.checkpoint_level
    assert planned == "none"  # the tiny model fits the budget without checkpointing
    step, ballast = trainer.step_fn.step, []

    def step_with_ballast(*inputs):
        if torch.cuda.is_current_stream_capturing() and not ballast:
            ballast.append(True)
            torch.empty(budget, dtype=torch.uint8, device="cuda")  # over the process's cap: out of memory
        return step(*inputs)

    trainer.step_fn.step = step_with_ballast
    g = torch.Generator("cuda").manual_seed(2)
    batches = [(torch.randn(1, 1, 32, 32, 32, device="cuda", generator=g),
                torch.randint(0, 4, (1, 32, 32, 32), device="cuda", generator=g, dtype=torch.uint8))
               for _ in range(6)]
    with pytest.warns(RuntimeWarning, match="escalating activation checkpointing to 'lean'"):
        parts = [trainer.train_step(x, y) for x, y in batches]
    assert ballast and trainer.checkpoint_level == "lean" and trainer.step_fn.captures == 1
    assert all(p is not None and math.isfinite(p["loss"]) for p in parts)
    trainer.fit()
    assert trainer.history[-1]["cuda_graph"] is True and math.isfinite(trainer.history[-1]["train_loss"])


@pytest.mark.cuda
@pytest.mark.parametrize("checkpoint", ["lean", "blocks", "auto"])
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_hr_pathway_as_a_partial_graph_equals_eager(checkpoint, bf16):
    """The lean HR pathway inside an otherwise eager model, its forward and backward each replayed from a CUDA graph
    (``torch.cuda.make_graphed_callables``, captured under ``autocast(cache_enabled=False)`` for bf16): features,
    logits, input and parameter gradients equal the eager module's (fp32 1e-4, bf16 2e-2 relative to the largest)
    on inputs other than the capture's, over two steps. "auto" resolves to "none" eagerly and captures "lean" (compared
with the eager lean module: "none" runs other kernels, cuDNN's and ATen's, whose TF32 / bf16 rounding differs)."""
    import copy

    from hmedn_fast.nn import HRPathway

    torch.manual_seed(0)
    eager = HRPathway(8, 16, 3, (2, 4), num_classes=3, spatial_dims=3, checkpoint=checkpoint).cuda()
    eager = eager.to(memory_format=torch.channels_last_3d)
    graphed = copy.deepcopy(eager)
    sample = torch.randn(1, 8, 12, 16, 20, device="cuda").to(memory_format=torch.channels_last_3d)
    if checkpoint == "auto":
        assert eager.resolve_checkpoint(sample.requires_grad_()) == "none"
        eager.checkpoint = "lean"
    autocast = dict(device_type="cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
    with torch.autocast(**autocast):
        graphed = torch.cuda.make_graphed_callables(graphed, (sample.requires_grad_(),))
    if checkpoint == "auto":  # the blocks keep the mode of the last forward run: the captured one
        assert {b.checkpoint for b in graphed.blocks} == {"lean"}
    tol = 2e-2 if bf16 else 1e-4
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(sample.shape, device="cuda", generator=g).to(memory_format=torch.channels_last_3d)
        grads = [torch.randn(s, device="cuda", generator=g) for s in ((1, 16, 12, 16, 20), (1, 3, 12, 16, 20))]
        results = []
        for module in (eager, graphed):
            xi = x.clone().requires_grad_()
            module.zero_grad(set_to_none=True)
            with torch.autocast(**autocast):
                outs = module(xi)
            torch.autograd.backward(outs, [gr.to(o.dtype) for gr, o in zip(grads, outs)])
            results.append([*(o.detach().float() for o in outs), xi.grad.float(),
                            *(p.grad.float() for p in module.parameters())])
        for got, want in zip(results[1], results[0]):
            assert got.shape == want.shape and torch.isfinite(got).all()
            err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
            assert err <= tol, (seed, err)
