"""pytest-benchmark suite of one training step (forward + HMEDNLoss + backward + AdamW) per checkpointing level,
and of the data pipeline's sample production.

    python -m pytest benchmarks/test_train_step.py --benchmark-only

CPU rows use a small hmedn_3d_l2 (1x1x32^3) so they run anywhere; CUDA rows run the paper's hmedn_3d_l2 at
1x4x128^3 as the trainer does on CUDA (bf16 autocast, channels-last, fused AdamW), one row replayed from a CUDA
graph (``--cuda-graph``), and skip without a GPU. The standalone GPU script with the DynUNet baseline, the
8 GiB largest-cube search and the JSON report is ``benchmarks/gpu_train.py``.
"""
from __future__ import annotations

import pytest
import torch

from hmedn_fast.data.augment import AugmentConfig, augment_batch
from hmedn_fast.data.datasets import PatchDataset, load_volumes
from hmedn_fast.losses import HMEDNLoss
from hmedn_fast.models import create_model
from hmedn_fast.train.graphed import GraphedStep
from hmedn_fast.train.memory import LEVELS, set_checkpointing
from record import environment

SMALL = dict(in_channels=1, widths=(8, 8, 16, 16, 16), growth_rates=4, num_layers=2, hr_channels=8, hr_blocks=3)


def _step_fn(device: str, level: str, size: int, overrides: dict, dtype: torch.dtype | None, graph: bool = False):
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if device == "cuda" else torch.contiguous_format  # the trainer's layouts
    model = create_model("hmedn_3d_l2", **overrides).to(device, memory_format=fmt).train()
    set_checkpointing(model, level)
    lr = torch.tensor(1e-4, device=device) if device == "cuda" else 1e-4  # the trainer's optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-7, fused=True, capturable=graph)
    loss_fn = HMEDNLoss(4, check_values=False).to(device)
    x = torch.randn(1, model.in_channels, size, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (1, size, size, size), dtype=torch.uint8, device=device)

    def train(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x)
        loss = loss_fn(out, y).total
        loss.backward()
        opt.step()
        return loss.detach()

    fn = GraphedStep(train) if graph else train

    def step():
        fn(x, y)
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(fn.warmup + 1 if graph else 1):  # warm-up (graph: the eager steps and the capture)
        step()
    return step


@pytest.mark.parametrize("level", LEVELS)
def test_cpu_train_step(benchmark, level):
    benchmark.extra_info.update(shape=[1, 1, 32, 32, 32], level=level)
    benchmark.pedantic(_step_fn("cpu", level, 32, SMALL, None), rounds=3, iterations=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("level", LEVELS)
def test_cuda_train_step_128(benchmark, level):
    torch.backends.cudnn.benchmark = True
    step = _step_fn("cuda", level, 128, {}, torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(shape=[1, 4, 128, 128, 128], level=level,
                                peak_mib=torch.cuda.max_memory_allocated() / 2**20, **environment())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_train_step_128_graphed(benchmark):
    """The lean step replayed from a CUDA graph (what ``hmedn train`` runs by default on one CUDA GPU)."""
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats()
    step = _step_fn("cuda", "lean", 128, {}, torch.bfloat16, graph=True)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update(shape=[1, 4, 128, 128, 128], level="lean", cuda_graph=True,
                                peak_mib=torch.cuda.max_memory_allocated() / 2**20, **environment())


def test_sample_production(benchmark):
    """Patch sampling + augmentation of a batch of 8 2D phantom samples (the data side of a step)."""
    ds = PatchDataset(load_volumes("phantom", spatial_dims=2, phantom_cases=8, phantom_size=64), (64, 64), 64)
    cfg = AugmentConfig(slice_groups=5)

    def batch():
        items = [ds[i] for i in range(8)]
        return augment_batch(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]),
                             [i[2] for i in items], cfg)

    benchmark.pedantic(batch, rounds=5, iterations=1)
