"""Our ops, graphed steps, inference engines and the trainer on the second GPU of a machine (cuda:1) while cuda:0
is the current device: Triton launches, CUDA-graph captures and replays must follow the tensors' device, as
PyTorch ops do. Needs two GPUs (e.g. the nvidia-h100-x2 machine); skips otherwise."""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA GPUs")]


@pytest.fixture(autouse=True)
def first_gpu_current():
    before = torch.cuda.current_device()
    benchmark, deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.cuda.set_device(0)
    yield
    torch.cuda.set_device(before)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic


def test_triton_norm_and_loss_on_the_second_gpu():
    from hmedn_fast.ops.loss import difficulty_guided_loss
    from hmedn_fast.ops.norm_act import norm_act

    dev = torch.device("cuda", 1)
    x = torch.randn(2, 16, 12, 12, 12, device=dev).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.rand(16, device=dev) + 0.5, torch.randn(16, device=dev)
    grads = {}
    for backend in ("triton", "reference"):
        xi = x.clone().requires_grad_(True)
        out = norm_act(xi, w, b, kind="batch", backend=backend)
        out.square().sum().backward()
        grads[backend] = (out.detach(), xi.grad)
    assert torch.cuda.current_device() == 0
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    logits = torch.randn(2, 3, 10, 11, 12, device=dev)
    labels = torch.randint(0, 3, (2, 10, 11, 12), device=dev, dtype=torch.uint8)
    weight = torch.rand(2, 10, 11, 12, device=dev) + 1.0
    losses = {}
    for backend in ("triton", "reference"):
        z = logits.clone().requires_grad_(True)
        loss = difficulty_guided_loss(z, labels, weight, backend=backend)
        loss.backward()
        losses[backend] = (loss.detach(), z.grad)
    for got, want in zip(losses["triton"], losses["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    from hmedn_fast.ops import measured
    from hmedn_fast.ops.conv import conv_forward
    measured.forget()
    torch.backends.cudnn.benchmark = True  # the automatic backend is timed (Triton vs cuDNN) on cuda:1's inputs
    x = torch.randn(1, 16, 24, 24, 24, device=dev, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    w = torch.randn(16, 16, 3, 3, 3, device=dev, dtype=torch.bfloat16) * 0.1
    got = conv_forward(x, w, (1, 1, 1), (1, 1, 1), (1, 1, 1), 1)
    want = torch.nn.functional.conv3d(x.float(), w.float(), None, 1, 1)
    assert got.device == dev and len(measured.remembered()) == 1 and torch.cuda.current_device() == 0
    assert (got.float() - want).abs().max() < 2e-2 * want.abs().max()


def test_graphed_steps_and_engine_on_the_second_gpu():
    """A graph captured on cuda:0 first, then steps on cuda:1 replayed from a graph equal the same steps run eagerly
    (deterministic cuDNN: bitwise), and a graphed inference engine on cuda:1 matches the eager one."""
    from hmedn_fast.infer.engines import CompiledEngine, EagerEngine
    from hmedn_fast.models import create_model
    from hmedn_fast.train.graphed import GraphedStep

    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True

    def make(dev):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3, padding=1), torch.nn.BatchNorm3d(8), torch.nn.ReLU(),
                                  torch.nn.Conv3d(8, 3, 3, padding=1)).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=torch.tensor(1e-2, device=dev), fused=True, capturable=True)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return loss.detach()
        return net, step

    first = GraphedStep(make(torch.device("cuda", 0))[1])  # the process's first capture is on cuda:0
    x0, y0 = torch.randn(2, 2, 8, 8, 8, device="cuda:0"), torch.randint(0, 3, (2, 8, 8, 8), device="cuda:0")
    for _ in range(4):
        first(x0, y0)
    assert first.captures == 1

    dev = torch.device("cuda", 1)
    g = torch.Generator(dev).manual_seed(3)
    batches = [(torch.randn(2, 2, 8, 8, 8, device=dev, generator=g),
                torch.randint(0, 3, (2, 8, 8, 8), device=dev, generator=g)) for _ in range(6)]
    runs = []
    for graphed in (False, True):
        net, step = make(dev)
        fn = GraphedStep(step) if graphed else step
        losses = [float(fn(x, y)) for x, y in batches]
        runs.append((losses, [t.detach().clone() for t in (*net.parameters(), *net.buffers())], fn))
    (la, wa, _), (lb, wb, fn) = runs
    assert fn.captures == 1 and lb == la and torch.cuda.current_device() == 0
    for a, b in zip(wa, wb):
        assert torch.equal(a, b)

    model = create_model("hmedn_3d_l2", widths=(4, 8, 12, 16), growth_rates=4, num_layers=2, hr_channels=4,
                         hr_blocks=2).eval().to(dev)
    v = torch.randn(2, 4, 16, 16, 16, device=dev)
    ref = EagerEngine(model, device=dev, fuse=False)(v)[0]
    got = CompiledEngine(model, (16, 16, 16), batch=2, device=dev, dtype=torch.float32, compile=False)(v)[0]
    assert got.device == dev and (got - ref).abs().max() < 1e-2 * ref.abs().max()


def test_trainer_on_the_second_gpu(tmp_path):
    from _tiny_models import TINY_3D
    from hmedn_fast.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(
        data="phantom", out=str(tmp_path / "run"), model="hmedn_3d_l2", phantom_cases=4, phantom_size=32,
        overrides=TINY_3D,
        num_classes=4, epochs=1, steps_per_epoch=4, batch_size=1, progress=False, device="cuda:1"))
    assert trainer.device == torch.device("cuda", 1) and trainer.cuda_graph
    trainer.fit()
    assert math.isfinite(trainer.history[-1]["train_loss"])
    assert next(trainer.net.parameters()).device == torch.device("cuda", 1)
