"""The trainer on a CUDA GPU beyond the CUDA-graph tests of ``test_graphed.py``: the default fast path learns,
fp16 with the gradient scaler, and resuming a run planned under a memory budget."""
from __future__ import annotations

import math

import pytest

from _tiny_models import TINY_2D
from hmedn_fast.train import TrainConfig, Trainer

pytestmark = pytest.mark.cuda



def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(data="phantom", out=str(tmp_path / "run"), model="hmedn_2d", overrides=TINY_2D, phantom_cases=16,
                phantom_size=48, epochs=4, steps_per_epoch=10, batch_size=8, lr=3e-3, schedule="constant",
                val_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


def test_default_fast_path_learns_the_phantom(tmp_path):
    """The CPU suite's learning run (tests/test_train.py, 0.79 mean Dice there in fp32) on the GPU's defaults:
    bf16, channels-last, lean blocks, steps replayed from a CUDA graph."""
    trainer = Trainer(_config(tmp_path))
    assert trainer.device.type == "cuda" and trainer.cuda_graph and trainer.checkpoint_level == "lean"
    assert trainer.precision == "bf16"
    history = trainer.fit()["history"]
    last = history[-1]
    assert trainer.step_fn.captures >= 1
    assert last["val_dice_mean"] > 0.6 and min(last[f"val_dice_{c}"] for c in (1, 2, 3)) > 0.4
    assert history[0]["train_loss"] > last["train_loss"]


def test_fp16_trains_with_the_gradient_scaler(tmp_path):
    """fp16 keeps eager steps (no CUDA graph) and scales the loss; the run learns like bf16."""
    trainer = Trainer(_config(tmp_path, precision="fp16"))
    assert trainer.cuda_graph is False and trainer.scaler.is_enabled()
    history = trainer.fit()["history"]
    assert trainer.scaler.get_scale() > 0
    assert history[-1]["val_dice_mean"] > 0.6 and history[0]["train_loss"] > history[-1]["train_loss"]


def test_resuming_a_budgeted_run_keeps_its_plan(tmp_path):
    """A run planned under a memory budget and resumed: the plan, level, patch and batch come from the
    checkpoint (no second planning), the cap is set again on the run's CUDA device, and training goes on."""
    kw = dict(epochs=1, steps_per_epoch=3, val_every=1, memory_budget="2GiB")
    first = Trainer(_config(tmp_path, **kw))
    first.fit()
    plan = first.memory_plan
    assert plan is not None and plan["budget_bytes"] == 2 * 2**30
    resumed = Trainer(_config(tmp_path, **{**kw, "epochs": 2}, resume=True))
    assert resumed.memory_plan == plan and resumed.checkpoint_level == first.checkpoint_level
    assert (tuple(resumed.patch_size), resumed.batch_size) == (tuple(first.patch_size), first.batch_size)
    history = resumed.fit()["history"]
    assert [row["epoch"] for row in history] == [1, 2] and math.isfinite(history[-1]["train_loss"])
