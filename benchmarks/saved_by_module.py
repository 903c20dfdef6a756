"""What a model's training forward keeps for backward, by module, on the CPU (no GPU needed): saved-tensor hooks
record every tensor autograd saves (each storage once, parameters excluded) under the innermost named module
(up to ``--depth`` dots) that saved it; recomputed parts save through their own hooks and so count only their
inputs, as on the GPU.

    python benchmarks/saved_by_module.py [--model hmedn_3d_l2] [--level stages] [--size 32] [--scale-to 128]

``--scale-to S``: sizes scaled to an S^3 input (voxel ratio) and float32 activations counted as bf16 (what the
trainer's bf16 autocast saves), for comparison with ``benchmarks/train_peak.py`` on the GPU. The per-op GPU peak
also holds the gradients and temporaries of the moment; this lists what is held for backward at the forward's end.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hmedn_fast.models import create_model  # noqa: E402
from hmedn_fast.train.memory import LEVELS, set_checkpointing  # noqa: E402


def saved_by_module(model: torch.nn.Module, x: torch.Tensor, depth: int) -> dict[str, list[torch.Tensor]]:
    """Module name -> the tensors (one per storage) that its forward saved for backward."""
    stack = ["<top>"]
    handles = []
    for name, module in model.named_modules():
        if name and name.count(".") < depth:
            handles.append(module.register_forward_pre_hook(lambda m, i, n=name: stack.append(n)))
            handles.append(module.register_forward_hook(lambda m, i, o: stack.pop() and None))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, by = set(), collections.defaultdict(list)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in params and t.untyped_storage().nbytes():
            seen.add(key)
            by[stack[-1]].append(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return dict(by)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hmedn_3d_l2")
    parser.add_argument("--level", default="stages", choices=LEVELS)
    parser.add_argument("--size", type=int, default=32, help="cube edge of the CPU run (default 32)")
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--scale-to", type=int, default=128, help="report sizes for this cube edge in bf16 (0: as run)")
    parser.add_argument("--depth", type=int, default=4, help="module name depth to group by (default 4)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model(args.model, in_channels=args.in_channels, num_classes=args.num_classes).train()
    model = model.to(memory_format=torch.channels_last_3d)
    set_checkpointing(model, args.level)
    x = torch.randn(1, args.in_channels, *(args.size,) * 3).to(memory_format=torch.channels_last_3d)
    ratio = (args.scale_to / args.size) ** 3 if args.scale_to else 1.0

    def mib(t: torch.Tensor) -> float:
        bf16 = args.scale_to and t.dtype == torch.float32 and t.numel() > 1000  # not the per-channel statistics
        return t.untyped_storage().nbytes() * ratio * (0.5 if bf16 else 1.0) / 2**20

    rows = sorted(((sum(mib(t) for t in ts), name) for name, ts in saved_by_module(model, x, args.depth).items()),
                  reverse=True)
    edge = args.scale_to or args.size
    print(f"{args.model} at {args.level}: saved for backward at the forward's end, MiB at 1x{args.in_channels}x{edge}^3"
          + (" (bf16)" if args.scale_to else ""))
    for size, name in rows:
        print(f"{size:9.1f}  {name}")
    print(f"{sum(r[0] for r in rows):9.1f}  total")


if __name__ == "__main__":
    main()
