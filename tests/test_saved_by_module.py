"""benchmarks/saved_by_module.py: what a training forward keeps for backward, by module (CPU)."""
import sys
from pathlib import Path

import torch

from hmedn_fast.models import create_model
from hmedn_fast.train.memory import set_checkpointing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from saved_by_module import saved_by_module  # noqa: E402


def test_levels_and_recomputed_parts():
    """Every saved storage is listed once under a module; "stages" saves less than "none" in total and nothing
    under the recomputed HR pathway, the stem or the first two encoder stages' dense blocks."""
    model = create_model("hmedn_3d_l2", widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_stage=2,
                         hr_channels=4, hr_blocks=2).train()
    x = torch.randn(1, 4, 16, 16, 16)
    totals = {}
    for level in ("none", "stages"):
        set_checkpointing(model, level)
        by = saved_by_module(model, x, depth=4)
        ptrs = [t.untyped_storage().data_ptr() for ts in by.values() for t in ts]
        assert len(ptrs) == len(set(ptrs)) and ptrs
        totals[level] = sum(t.untyped_storage().nbytes() for ts in by.values() for t in ts)
        if level == "stages":
            assert not [k for k in by if k.startswith(("net.hr", "net.stem", "net.enc.0.0", "net.enc.1.0"))], by.keys()
        else:
            assert any(k.startswith("net.hr") for k in by) and any(k.startswith("net.enc.0.0") for k in by)
    assert totals["stages"] < totals["none"]
