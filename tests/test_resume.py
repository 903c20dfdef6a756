"""A run killed with SIGKILL mid-epoch and resumed ends with exactly the weights of an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hmedn_fast.models.io import load_model
from hmedn_fast.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--data", "phantom", "--model", "hmedn_2d", "--phantom-cases", "6", "--phantom-size", "32",
        "--set", "widths=(8,8,16,16)", "--set", "growth_rates=4", "--set", "num_layers=2", "--set", "hr_stage=2",
        "--set", "hr_channels=8", "--set", "hr_blocks=2", "--set", "dropout=0.2",
        "--epochs", "2", "--steps-per-epoch", "8", "--batch-size", "2", "--checkpoint-every", "2",
        "--threads", "1", "--no-progress"]


def _train(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "hmedn_fast.train.cli", *ARGS, "--out", str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:  # only the processes this test started
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, procs):
    reference = _train(tmp_path / "ref")
    killed = _train(tmp_path / "run")
    procs += [reference, killed]
    last = tmp_path / "run" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert killed.poll() is None, f"run ended before it could be killed:\n{killed.communicate()[0]}"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    position = load_checkpoint(last)["position"]
    assert position["epoch"] == 0 and 0 < position["step"] < 8  # killed mid-epoch

    resumed = _train(tmp_path / "run", "--resume")
    procs.append(resumed)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"at epoch 0 step {position['step']}" in out
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out

    a, b = load_checkpoint(tmp_path / "ref" / "last.pt"), load_checkpoint(last)
    assert a["position"]["epoch"] == b["position"]["epoch"] == 2
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert a["history"][-1]["val_dice_mean"] == b["history"][-1]["val_dice_mean"]
    steps = [(tmp_path / d / "steps.csv").read_text() for d in ("ref", "run")]
    assert steps[0] == steps[1] and len(steps[0].splitlines()) == 17
    model, record = load_model(last)  # the training checkpoint is a model file for load_model / hmedn infer
    assert record["model"] == "hmedn_2d" and model.in_channels == 5
