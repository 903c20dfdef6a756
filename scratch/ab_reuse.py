"""Lean dense blocks' backward accumulating into the incoming gradient when it is private (hmedn_fast.nn.grad_reuse)
vs always copying it first, in the training step of hmedn_3d_l2 at 1x4x128^3 (graphed lean and blocks levels, the
trainer's default and its escalation): step time and peak memory (graphed: over every step, capture included, as
gpu_train.time_steps), DynUNet bf16 in the same process. Two rounds."""
import datetime, json, os, statistics, sys
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch, triton
torch.backends.cudnn.benchmark = True
import gpu_train as gt
from hmedn_fast.nn import grad_reuse
from timing import cuda_times
res = {}
for rnd in range(2):
    for name, config, reuse in [("lean_graph_copy", "lean_graph", False), ("lean_graph_reuse", "lean_graph", True),
                                ("blocks_graph_reuse", "lean_blocks_graph", True),
                                ("blocks_graph_copy", "lean_blocks_graph", False), ("dynunet_bf16", "dynunet_bf16", True)]:
        grad_reuse.ENABLED = reuse
        gt.free(); torch.cuda.reset_peak_memory_stats()
        n0 = grad_reuse.reused
        step = gt.make_step(config, 128)
        for _ in range(5): step()
        torch.cuda.synchronize()
        if not config.endswith("graph"):
            torch.cuda.reset_peak_memory_stats()
        t = cuda_times(step, 20, warmup=1)
        r = dict(ms=round(statistics.median(t), 2), peak_mib=round(torch.cuda.max_memory_allocated() / 2**20),
                 reused_in_eager_steps=grad_reuse.reused - n0)
        res.setdefault(name, []).append(r)
        print(rnd, name, r, flush=True)
        del step
out = {"card": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__},
       "what": __doc__, "rows": res}
slug = out["card"].replace(" ", "_").lower()
json.dump(out, open(os.environ["OUT"] + f"/train_grad_reuse_ab_{slug}.json", "w"), indent=1)
