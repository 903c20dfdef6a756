"""Tests of ``hmedn demo`` (hmedn_fast.demo, hmedn_fast.cli): the quick CLI run on the phantom, the MSD path and
argument errors. Reported numbers are recomputed from the saved predictions with independent formulas."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from hmedn_fast.cli import main
from hmedn_fast.demo import run_demo

HMEDN_QUICK_DICE = 0.80  # stated threshold: HMEDN's mean foreground Dice on held-out phantom images, --quick


def _dice64(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    p, t = (pred == k).astype(np.float64), (truth == k).astype(np.float64)
    return 2.0 * (p * t).sum() / (p.sum() + t.sum())


def _monai_assd(pred: np.ndarray, truth: np.ndarray, k: int, spacing) -> float:
    from monai.metrics import compute_average_surface_distance

    one_hot = [torch.from_numpy(np.stack([a != k, a == k]))[None].float() for a in (pred, truth)]
    return float(compute_average_surface_distance(*one_hot, symmetric=True, spacing=list(spacing)).item())


def _check_against_predictions(out: Path, summary: dict) -> None:
    """Per-structure Dice (float64 formula) and ASSD (MONAI) of the saved predictions equal the JSON means."""
    saved = np.load(out / "predictions.npz")
    classes = summary["classes"]
    for model in ("hmedn_2d", "unet_2d"):
        for k, name in enumerate(classes[1:], start=1):
            dices, assds = [], []
            for case in summary["test_cases"]:
                truth, pred = saved[f"{case}/truth"], saved[f"{case}/{model}"]
                if truth.shape[0] == 1:
                    truth, pred = truth[0], pred[0]
                dices.append(_dice64(pred, truth, k))
                if (pred == k).any() and (truth == k).any():
                    assds.append(_monai_assd(pred, truth, k, summary["spacing_mm"][case]))
            entry = summary["models"][model]["metrics"][name]
            assert entry["dice"] == pytest.approx(np.mean(dices), abs=1e-9)
            if assds:
                assert entry["assd"] == pytest.approx(np.mean(assds), rel=1e-5)


def test_demo_quick_cli_on_phantom(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "hmedn_fast", "demo", "--quick", "--device", "cpu", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "prostate" in proc.stdout and "Dice hmedn/unet" in proc.stdout
    summary = json.loads((out / "results.json").read_text())
    hmedn, unet = summary["models"]["hmedn_2d"], summary["models"]["unet_2d"]
    assert hmedn["steps"] == unet["steps"] > 0, "same optimisation budget"
    assert summary["classes"] == ["background", "prostate", "bladder", "rectum"]
    assert hmedn["metrics"]["mean"]["dice"] > HMEDN_QUICK_DICE, summary["table"]
    for model in (hmedn, unet):
        for name in ("prostate", "bladder", "rectum"):
            m = model["metrics"][name]
            assert 0 <= m["dice"] <= 1 and m["assd"] >= 0 and m["hd95"] >= 0
    _check_against_predictions(out, summary)
    figure = matplotlib.image.imread(out / "comparison.png")
    assert figure.ndim == 3 and figure.shape[0] > 300 and figure.shape[1] > 800 and figure.std() > 0.05


@pytest.mark.data
def test_demo_on_msd_folder(shared_data, tmp_path):
    summary = run_demo(tmp_path, data=shared_data / "msd_hippocampus", epochs=1, max_cases=3, device="cpu",
                       seed=3, progress=False)
    assert summary["classes"] == ["background", "class 1", "class 2"]
    assert len(summary["test_cases"]) == 1 and len(summary["spacing_mm"][summary["test_cases"][0]]) == 3
    saved = np.load(tmp_path / "predictions.npz")
    case = summary["test_cases"][0]
    assert saved[f"{case}/truth"].ndim == 3 and saved[f"{case}/hmedn_2d"].shape == saved[f"{case}/truth"].shape
    _check_against_predictions(tmp_path, summary)


@pytest.mark.cuda
def test_demo_quick_on_gpu(tmp_path):
    summary = run_demo(tmp_path, quick=True, device="cuda", progress=False)
    assert summary["device"].startswith("cuda")
    assert summary["models"]["hmedn_2d"]["metrics"]["mean"]["dice"] > HMEDN_QUICK_DICE


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--epochs", "0"], "epochs"),
        (["demo", "--max-cases", "3"], "max_cases"),
        (["demo", "--device", "tpu"], "device"),
        (["demo", "--seed", "-1"], "seed"),
        (["demo", "--width-divisor", "0"], "width_divisor"),
        (["demo", "--data", "/nonexistent/msd_folder"], "/nonexistent/msd_folder"),
    ],
)
def test_demo_bad_arguments_exit_2_with_message(argv, message, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_demo_cuda_requested_without_gpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
