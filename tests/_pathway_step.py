"""A small 3D HR pathway on CUDA (32 channels, three blocks of mixed dilations, a head) and one bf16 training step of
it, for the CUDA tests that compare a pathway step with and without one of its optimisations."""
from __future__ import annotations

from collections.abc import Callable

import torch

from hmedn_fast.nn import HRPathway

CL = torch.channels_last_3d


def pathway_step(mode: str) -> Callable[[], list[torch.Tensor]]:
    """A seeded pathway in checkpoint ``mode`` and its step: forward under bf16 autocast, backward of a fixed loss;
    the step returns [features, logits, input gradient, every parameter's gradient]."""
    torch.manual_seed(0)
    path = HRPathway(32, 32, num_blocks=3, dilations=[(2, 4), (1, 3), (4, 2)], num_classes=3, spatial_dims=3,
                     checkpoint=mode).cuda().to(memory_format=CL)
    x = torch.randn(1, 32, 6, 32, 48, device="cuda").contiguous(memory_format=CL).requires_grad_()
    g = torch.randn(1, 32, 6, 32, 48, device="cuda")

    def step() -> list[torch.Tensor]:
        path.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            feats, logits = path(x)
        (feats.float() * g).sum().add(logits.float().square().mean()).backward()
        return [feats, logits, x.grad] + [p.grad for p in path.parameters()]

    return step
