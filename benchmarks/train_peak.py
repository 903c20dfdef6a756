"""Where a training step peaks on the GPU, op by op: a dispatch mode reads ``torch.cuda.memory_allocated()`` after
every op of one eager training step (forward, loss, and the backward on the autograd thread, which inherits the mode)
and keeps the op and the innermost ``hmedn_fast`` frames at each new maximum. It replaces the allocator's history
recording (``torch.cuda.memory._record_memory_history``), under which the ``stages`` step fails inside the first
stage's recomputation (``docs/decisions/train.md``, stop 21).

    python benchmarks/train_peak.py [--config lean_stages] [--size 128] [--stages-group-channels 32] [--out DIR]

``--config``: an eager setting of ``benchmarks/gpu_train.py`` (hmedn_3d_l2, 1x4xS^3); the step runs three times
first (kernel choices and cuDNN's algorithm search allocate what training never holds). Prints the peak, where it
was reached and the last new maxima; with ``--out`` also writes ``train_peak_<config>_<card>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_train  # noqa: E402
from record import card_slug, environment  # noqa: E402
from hmedn_fast.train import memory  # noqa: E402


class PeakProbe(TorchDispatchMode):
    """``with PeakProbe() as p: ...``: ``p.peak`` (bytes allocated after an op, at most), ``p.where`` (the op and
    frames there) and ``p.trail`` (every new maximum)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak, self.where, self.trail = 0, None, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        now = torch.cuda.memory_allocated()
        if now > self.peak:
            frames = [f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                      if "hmedn_fast" in f.filename or "gpu_train" in f.filename]
            self.peak, self.where = now, {"op": str(func), "frames": frames[-8:]}
            self.trail.append({"mib": now / 2**20, "op": str(func), "frames": frames[-3:]})
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eager = [name for name, spec in gpu_train.CONFIGS.items() if not spec[5] and not spec[4]]
    parser.add_argument("--config", default="lean_stages", choices=eager, help="eager gpu_train setting")
    parser.add_argument("--size", type=int, default=128, help="cube edge (default 128)")
    parser.add_argument("--stages-group-channels", type=int, default=memory.STAGES_GROUP_CHANNELS,
                        help=f"channel groups at the stages level, 0 for none (default {memory.STAGES_GROUP_CHANNELS})")
    parser.add_argument("--out", type=Path, help="folder for the JSON record")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("train_peak.py needs a CUDA GPU")
    memory.STAGES_GROUP_CHANNELS = args.stages_group_channels or None
    torch.backends.cudnn.benchmark = True
    step = gpu_train.make_step(args.config, args.size)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with PeakProbe() as probe:
        step()
    torch.cuda.synchronize()
    card = torch.cuda.get_device_name()
    record = {**environment(), "config": args.config, "size": args.size,
              "stages_group_channels": memory.STAGES_GROUP_CHANNELS, "allocated_before_mib": before / 2**20, "allocator_peak_mib": torch.cuda.max_memory_allocated() / 2**20,
              "probe_peak_mib": probe.peak / 2**20, "where": probe.where, "trail": probe.trail}
    print(f"== {args.config} {args.size}^3 groups={memory.STAGES_GROUP_CHANNELS}: allocated before "
          f"{record['allocated_before_mib']:.0f} MiB, allocator peak {record['allocator_peak_mib']:.0f} MiB, "
          f"after-op peak {record['probe_peak_mib']:.0f} MiB")
    print("at:", probe.where["op"], *("\n    " + f for f in probe.where["frames"]))
    for t in probe.trail[-12:]:
        print(f"  {t['mib']:8.0f} {t['op']:40s} {' <- '.join(reversed(t['frames']))}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"train_peak_{args.config}_{card_slug(card)}.json"
        path.write_text(json.dumps(record, indent=1))
        print("wrote", path)


if __name__ == "__main__":
    main()
