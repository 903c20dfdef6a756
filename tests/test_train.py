"""Trainer: short runs that learn (phantom, 6 hippocampus cases), logs and checkpoints, non-finite losses,
bad configuration and bad data errors, the CLI."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_models import TINY_2D
from hmedn_fast.models.io import load_model
from hmedn_fast.train import NonFiniteLossError, TrainConfig, Trainer
from hmedn_fast.train.checkpoint import load_checkpoint
from hmedn_fast.train.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Training runs use threads=1 (fast on a shared 2-core machine); restore the caller's setting."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(data="phantom", out=str(tmp_path / "run"), model="hmedn_2d", overrides=TINY_2D, phantom_cases=6,
                phantom_size=32, epochs=1, steps_per_epoch=2, batch_size=2, threads=1, progress=False)
    return TrainConfig(**{**base, **kw})


def test_phantom_run_learns_and_writes_its_files(tmp_path):
    cfg = _config(tmp_path, phantom_cases=16, phantom_size=48, epochs=4, steps_per_epoch=10, batch_size=8, lr=3e-3,
                  schedule="constant", val_every=2)
    result = Trainer(cfg).fit()
    history = result["history"]
    first, last = history[1], history[-1]
    # measured here: mean Dice 0.03 before training, 0.79 after these 40 steps (prostate/bladder/rectum
    # 0.81 / 0.91 / 0.66)
    assert last["val_dice_mean"] > 0.6 and min(last[f"val_dice_{c}"] for c in (1, 2, 3)) > 0.4
    assert history[0]["train_loss"] > last["train_loss"]
    assert "val_dice_mean" not in history[0] and first["val_dice_mean"] < last["val_dice_mean"]
    assert all(math.isfinite(last[f"val_{m}_{c}"]) for m in ("assd", "hd95") for c in (1, 2, 3))
    run = tmp_path / "run"
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    log = json.loads((run / "log.json").read_text())
    assert log["best"] == {"score": last["val_dice_mean"], "epoch": 4} and log["config"]["lr"] == 3e-3
    assert (run / "curves.png").stat().st_size > 1000 and set(json.loads((run / "split.json").read_text())) >= {
        "train", "val"}
    model, record = load_model(run / "best.pt")
    assert record["best"]["epoch"] == 4 and model.num_classes == 4


@pytest.mark.data
def test_six_hippocampus_cases_learn(tmp_path, shared_data):
    cfg = _config(tmp_path, data=str(shared_data / "msd_hippocampus"), max_cases=6, val_fraction=0.34, epochs=10,
                  steps_per_epoch=10, batch_size=8, lr=3e-3, schedule="constant", foreground_prob=0.5, val_every=2)
    trainer = Trainer(cfg)
    assert (trainer.in_channels, trainer.num_classes, len(trainer.val_volumes)) == (5, 3, 2)
    result = trainer.fit()
    dice = [r["val_dice_mean"] for r in result["history"] if "val_dice_mean" in r]
    # 2D model on 5-slice stacks, 100 steps; measured here: mean Dice 0.05 after 20 steps, best 0.62
    # (anterior / posterior hippocampus 0.68 / 0.56)
    assert dice[0] < 0.3 and result["best"]["score"] > 0.45
    best = result["history"][result["best"]["epoch"] - 1]
    assert best["val_dice_1"] > 0.3 and best["val_dice_2"] > 0.3
    assert best["val_hd95_1"] < 20 and best["val_hd95_2"] < 20


def test_3d_phantom_run(tmp_path):
    cfg = _config(tmp_path, model="hmedn_3d_l2", phantom_cases=3, phantom_size=32, batch_size=1,
                  overrides=dict(widths=(4, 8, 8, 8), growth_rates=4, num_layers=1, hr_channels=4, hr_blocks=1))
    trainer = Trainer(cfg)
    assert trainer.patch_size == (32, 32, 32) and trainer.in_channels == 1
    row = trainer.fit()["history"][0]
    assert math.isfinite(row["train_loss"]) and 0 <= row["val_dice_mean"] <= 1


def _write_png(root):
    rng = np.random.default_rng(0)
    for d in ("images", "labels"):
        (root / d).mkdir(parents=True)
    for i in range(3):
        inst = np.zeros((40, 40), np.uint16)
        inst[5:15, 5:15], inst[20:35, 18:30] = 1, 2
        img = (inst > 0) * 120 + rng.integers(0, 60, (40, 40))
        Image.fromarray(img.astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(inst).save(root / "labels" / f"{i}.png")


def test_png_folder_run(tmp_path):
    _write_png(tmp_path / "png")
    trainer = Trainer(_config(tmp_path, data=str(tmp_path / "png"), overrides={**TINY_2D, "contour": False}))
    assert (trainer.in_channels, trainer.num_classes, trainer.patch_size) == (1, 3, (48, 48))
    assert math.isfinite(trainer.fit()["history"][0]["train_loss"])


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path):
    trainer = Trainer(_config(tmp_path, steps_per_epoch=6, max_nonfinite=2))
    real_forward = trainer.net.forward
    calls = []

    def poisoned(x):
        calls.append(1)
        out = real_forward(x)
        if len(calls) in (2, 4, 5):
            out.seg = out.seg * float("nan")
        return out

    trainer.net.forward = poisoned
    before = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}
    images, labels = torch.randn(2, 5, 32, 32), torch.randint(0, 4, (2, 32, 32), dtype=torch.uint8)
    assert trainer.train_step(images, labels) is not None
    after_first = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}
    assert any(not torch.equal(before[n], after_first[n]) for n in before)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        assert trainer.train_step(images, labels) is None
    assert all(torch.equal(after_first[n], p) for n, p in trainer.net.named_parameters())  # step skipped
    steps = {int(st["step"]) for st in trainer.optimizer.state.values()}
    assert steps == {1}  # AdamW skipped its update on the device (found_inf), step counts included
    assert trainer.train_step(images, labels) is not None
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert trainer.train_step(images, labels) is None
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteLossError, match="max_nonfinite=2"):
        trainer.train_step(images, labels)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["nonfinite"] == 3


@pytest.mark.parametrize("model, overrides, shape", [
    ("hmedn_2d", TINY_2D, (2, 5, 32, 32)),
    ("hmedn_3d_l2", dict(widths=(4, 8, 8, 8), growth_rates=4, num_layers=1, hr_channels=4, hr_blocks=1, dropout=0.0),
     (1, 1, 32, 32, 32))])
def test_channels_last_steps_equal_contiguous_steps(tmp_path, model, overrides, shape):
    """memory_format changes the layout only: same losses and weights after two steps as contiguous (float64
    equal up to summation order), and the weights stay channels-last through the optimiser."""
    torch.manual_seed(0)
    images = torch.randn(*shape)
    labels = torch.randint(0, 4, (shape[0], *shape[2:]), dtype=torch.uint8)
    runs = {}
    for fmt in ("contiguous", "channels_last"):
        trainer = Trainer(_config(tmp_path / fmt, model=model, overrides=overrides, phantom_size=32, phantom_cases=3,
                                  num_classes=4, memory_format=fmt, augment=False))
        trainer.net.double()
        parts = [trainer.train_step(images.double(), labels) for _ in range(2)]
        runs[fmt] = (parts, {n: p.detach().clone() for n, p in trainer.net.named_parameters()}, trainer)
    (parts_a, weights_a, _), (parts_b, weights_b, cl) = runs["contiguous"], runs["channels_last"]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    convs = [p for p in cl.net.parameters() if p.ndim == len(shape)]
    assert convs and all(p.is_contiguous(memory_format=fmt) for p in convs)
    for a, b in zip(parts_a, parts_b):
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12) for k in a)
    for name, w in weights_a.items():
        torch.testing.assert_close(weights_b[name], w, rtol=1e-9, atol=1e-12, msg=name)


def test_compiled_training_steps_equal_eager_steps(tmp_path):
    """compile=True runs the steps through torch.compile (inductor on the CPU here): in float64 the first step's
    gradients and both steps' losses equal the eager ones (inductor's own BatchNorm backward sums in another
    order; in float32 that alone moves these gradients by ~1e-3 of their range through the BatchNorm layers).
    Weights are not compared: AdamW's first update is ~lr * sign(grad), so a gradient that is zero up to
    rounding moves by +-lr."""
    torch.manual_seed(0)
    images = torch.randn(2, 5, 32, 32, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 32, 32), dtype=torch.uint8)
    runs = []
    for compiled in (False, True):
        trainer = Trainer(_config(tmp_path / str(compiled), compile=compiled, num_classes=4, augment=False))
        assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule) == compiled
        trainer.net.double()
        first = trainer.train_step(images, labels)["loss"]
        grads = [p.grad.clone() for p in trainer.net.parameters()]
        runs.append(([first, trainer.train_step(images, labels)["loss"]], grads))
    (loss_a, g_a), (loss_b, g_b) = runs
    assert loss_b == pytest.approx(loss_a, rel=1e-9)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9 * a.abs().max().item())


@pytest.mark.parametrize("kw, match", [
    ({"model": "resnet"}, "model must be one of"), ({"batch_size": 0}, "batch_size"), ({"epochs": 1.5}, "epochs"),
    ({"schedule": "step"}, "schedule"), ({"precision": "fp8"}, "precision"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"lr": 0}, "lr"), ({"slices": 4}, "slices"), ({"checkpointing": "all"}, "checkpointing"),
    ({"num_classes": 1}, "num_classes"), ({"memory_budget": "8GiB", "checkpointing": "lean"}, "not both"),
    ({"foreground_prob": 2.0}, "foreground_prob"), ({"grad_clip": -1.0}, "grad_clip"),
    ({"memory_format": "nhwc"}, "memory_format"), ({"cuda_graph": True, "compile": True}, "exclude each other"),
    ({"cuda_graph": True, "precision": "fp16"}, "cuda_graph supports precision")])
def test_bad_configuration(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kw)


def test_cuda_graph_needs_a_cuda_device(tmp_path):
    with pytest.raises(ValueError, match="cuda_graph needs one process on a CUDA device, got device cpu"):
        Trainer(_config(tmp_path, cuda_graph=True, device="cpu"))


def test_cuda_graph_option_must_be_bool_or_none(tmp_path):
    with pytest.raises(TypeError, match="cuda_graph must be True, False or None"):
        _config(tmp_path, cuda_graph="yes")


@pytest.mark.parametrize("kw, precision, world, expected", [
    ({}, "bf16", 1, True), ({}, "fp32", 1, True), ({}, "fp16", 1, False), ({}, "bf16", 2, False),
    ({"compile": True}, "bf16", 1, False), ({"memory_budget": "8GiB"}, "bf16", 1, True),
    ({"cuda_graph": False}, "bf16", 1, False), ({"cuda_graph": True}, "fp32", 1, True)])
def test_cuda_graph_is_on_by_default_where_it_can_run(tmp_path, kw, precision, world, expected):
    """The trainer's automatic choice (cuda_graph=None) on a CUDA device: on for one process with fp32 / bf16, no
    compile (a memory budget included); an explicit option wins. Never on the CPU."""
    from hmedn_fast.train.config import automatic_cuda_graph, default_checkpointing
    cfg = _config(tmp_path, **kw)
    assert automatic_cuda_graph(cfg, torch.device("cuda", 0), world, precision) is expected
    if cfg.cuda_graph is None:
        assert automatic_cuda_graph(cfg, torch.device("cpu"), 1, "fp32") is False
    assert default_checkpointing(torch.device("cuda", 0)) == "lean"
    assert default_checkpointing(torch.device("cpu")) == "none"


def test_cpu_trainer_defaults_and_the_cli_flag(tmp_path):
    """On the CPU the defaults resolve to eager steps without checkpointing, and the epoch log says so;
    ``--cuda-graph`` / ``--no-cuda-graph`` / nothing parse to True / False / None (automatic)."""
    trainer = Trainer(_config(tmp_path, device="cpu", val_every=5))
    assert trainer.cuda_graph is False and trainer.checkpoint_level == "none"
    assert trainer.step_fn == trainer._step_tensors
    trainer.fit()
    row = json.loads((tmp_path / "run" / "log.json").read_text())["history"][-1]
    assert row["checkpointing"] == "none" and row["cuda_graph"] is False
    import argparse
    from hmedn_fast.train.cli import configure
    parser = argparse.ArgumentParser()
    configure(parser)
    assert parser.parse_args([]).cuda_graph is None
    assert parser.parse_args(["--cuda-graph"]).cuda_graph is True
    assert parser.parse_args(["--no-cuda-graph"]).cuda_graph is False


def test_resume_takes_this_runs_cuda_graph_setting_for_the_optimizer(tmp_path):
    """cuda_graph may differ between a run and its resumption: the optimizer groups loaded from the checkpoint carry
    the saved run's ``capturable`` flag, which must follow this run's (AdamW refuses to be captured otherwise)."""
    Trainer(_config(tmp_path, device="cpu")).fit()
    path = tmp_path / "run" / "last.pt"
    record = load_checkpoint(path)
    record["optimizer"]["param_groups"][0]["capturable"] = True  # as a CUDA-graph run saves it
    torch.save(record, path)
    trainer = Trainer(_config(tmp_path, device="cpu", resume=True, epochs=2))
    assert trainer.cuda_graph is False
    assert all(group["capturable"] is False for group in trainer.optimizer.param_groups)
    trainer.fit()


def test_resume_a_checkpoint_from_before_an_option_existed(tmp_path):
    """A checkpoint written before an option existed (sync_bn here) resumes when this run keeps the option's default
    (the old run behaved as the default), and not when it sets another value."""
    Trainer(_config(tmp_path, device="cpu")).fit()
    path = tmp_path / "run" / "last.pt"
    record = load_checkpoint(path)
    del record["config"]["sync_bn"]
    torch.save(record, path)
    with pytest.raises(ValueError, match="sync_bn"):
        Trainer(_config(tmp_path, device="cpu", resume=True, epochs=2, sync_bn=False))
    Trainer(_config(tmp_path, device="cpu", resume=True, epochs=2)).fit()


def test_configuration_that_does_not_fit_the_data(tmp_path):
    _write_png(tmp_path / "png")
    with pytest.raises(ValueError, match="3D but the data"):
        Trainer(_config(tmp_path, data=str(tmp_path / "png"), model="hmedn_3d_l2", overrides={}))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(_config(tmp_path, memory_budget="1GiB"))
    with pytest.raises(ValueError, match="phantom.*in_channels=3"):
        Trainer(_config(tmp_path, overrides={**TINY_2D, "in_channels": 3}))
    with pytest.raises(FileNotFoundError, match="last.pt"):
        Trainer(_config(tmp_path, out=str(tmp_path / "fresh"), resume=True))
    Trainer(_config(tmp_path)).fit()
    with pytest.raises(ValueError, match="lr"):
        Trainer(_config(tmp_path, resume=True, lr=0.5))


def _write_msd(root, labels):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    for i, label in enumerate(labels):
        image = rng.normal(size=(12, 12, 12)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "imagesTr" / f"case{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / "labelsTr" / f"case{i}.nii.gz"))


def test_label_values_beyond_num_classes_name_the_file(tmp_path):
    good = np.zeros((12, 12, 12), np.uint8)
    good[3:8, 3:8, 3:8] = 1
    bad = good.copy()
    bad[0, 0, 0] = 3
    _write_msd(tmp_path / "msd", [good, good, bad])
    with pytest.raises(ValueError, match=r"case2\.nii\.gz holds value 3, beyond num_classes=3"):
        Trainer(_config(tmp_path, data=str(tmp_path / "msd"), num_classes=3))


def test_cli_reports_bad_data_and_trains(tmp_path, capsys):
    good = np.zeros((12, 12, 12), np.uint8)
    good[3:8, 3:8, 3:8] = 1
    _write_msd(tmp_path / "msd", [good, good, good[:, :, :6]])
    args = ["--data", str(tmp_path / "msd"), "--model", "hmedn_2d", "--out", str(tmp_path / "cli"), "--threads", "1",
            "--no-progress", "--epochs", "1", "--steps-per-epoch", "1", "--slices", "3"]
    args += [x for k, v in TINY_2D.items() for x in ("--set", f"{k}={v}")]
    assert main(args) == 2
    assert "case2.nii.gz" in capsys.readouterr().err
    (tmp_path / "msd" / "imagesTr" / "case2.nii.gz").unlink()
    (tmp_path / "msd" / "labelsTr" / "case2.nii.gz").unlink()
    assert main(args) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "hmedn train: hmedn_2d on cpu, fp32, contiguous, checkpointing none, CUDA graph off, patch (" in captured.err
    assert summary["last_epoch"]["epoch"] == 1 and summary["out"] == str(tmp_path / "cli")
    record = load_checkpoint(tmp_path / "cli" / "last.pt")
    assert record["overrides"]["widths"] == (8, 16, 32, 32) and record["slices"] == 3 and record["spatial_dims"] == 2


def test_ddp_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 2 each, against 1 process with batch 4. Instance norm and
    no dropout: per-sample computations, so only the gradient all-reduce differs (float rounding)."""
    args = ["--data", "phantom", "--model", "hmedn_2d", "--phantom-cases", "6", "--phantom-size", "32",
            "--epochs", "2", "--steps-per-epoch", "3", "--threads", "1", "--no-progress", "--val-every", "2"]
    args += [x for k, v in {**TINY_2D, "norm": "instance"}.items() for x in ("--set", f"{k}={v!r}")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "hmedn_fast.train.cli", *args, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = subprocess.run([sys.executable, "-m", "hmedn_fast.train.cli", *args, "--batch-size", "4", "--out",
                             str(tmp_path / "one")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out, _ = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, out
    assert single.returncode == 0, single.stderr
    curves = [np.loadtxt(tmp_path / d / "steps.csv", delimiter=",", skiprows=1) for d in ("one", "ddp")]
    assert curves[0].shape == curves[1].shape == (6, 5)
    np.testing.assert_allclose(curves[1][:, 3], curves[0][:, 3], rtol=1e-5)
    assert curves[0][0, 3] != curves[0][-1, 3]
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in ("one", "ddp"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_resolve_device_gives_cuda_devices_their_index(monkeypatch):
    """"cuda" / "auto" resolve to the current CUDA device with its index (``set_per_process_memory_fraction``, used
    by the memory budget, rejects an index-less device); an index beyond the visible devices is a ValueError."""
    from hmedn_fast.device import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize("sync_bn", [True, False])
def test_multi_gpu_norms_follow_sync_bn(sync_bn):
    """Several processes on CUDA: BatchNorm becomes SyncBatchNorm with sync_bn (the default), which the lean dense
    blocks cannot run (a warning says so and names --no-sync-bn when a lean level is set); sync_bn=False keeps
    BatchNorm and the lean blocks. One process, or the CPU, never converts. (The conversion only swaps modules,
    so it is checked here without GPUs on a two-process CUDA context.)"""
    import warnings
    from hmedn_fast.nn.blocks import DenseBlock
    from hmedn_fast.nn.dense_lean import supported
    from hmedn_fast.train.distributed import DistContext, sync_norms
    from hmedn_fast.models import create_model

    def model():
        return create_model("hmedn_3d_l2", widths=(4, 8, 8, 8), growth_rates=4, num_layers=2, hr_stage=1,
                            hr_channels=4, hr_blocks=2)

    two_gpus = DistContext(rank=0, world_size=2, device=torch.device("cuda", 0))
    for ctx in (DistContext(0, 1, torch.device("cuda", 0)), DistContext(0, 2, torch.device("cpu"))):
        m = sync_norms(model(), ctx, True, "lean")
        assert not any(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules())
    if sync_bn:
        with pytest.warns(RuntimeWarning, match="--no-sync-bn"):
            m = sync_norms(model(), two_gpus, True, "lean")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sync_norms(model(), two_gpus, True, "none")  # no lean blocks to lose: no warning
    else:
        m = sync_norms(model(), two_gpus, False, "lean")
    dense = [x for x in m.modules() if isinstance(x, DenseBlock)]
    assert dense and all(supported(b) != sync_bn for b in dense)
    assert any(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules()) == sync_bn
    assert m.hmedn_config["name"] == "hmedn_3d_l2"


def test_sync_bn_flag():
    from hmedn_fast.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["train", "--data", "phantom", "--out", "x", "--no-sync-bn"]).sync_bn is False
    assert parser.parse_args(["train", "--data", "phantom", "--out", "x"]).sync_bn is True


def test_describe_names_the_batch_norm_of_multi_gpu_runs():
    from types import SimpleNamespace
    from hmedn_fast.train.distributed import DistContext
    for sync_bn, words in ((True, "SyncBatchNorm"), (False, "per-GPU BatchNorm")):
        run = SimpleNamespace(config=SimpleNamespace(model="hmedn_3d_l2", sync_bn=sync_bn),
                              device=torch.device("cuda", 0), precision="bf16", memory_format=torch.channels_last_3d,
                              checkpoint_level="lean", cuda_graph=False, patch_size=(64, 64, 64), batch_size=2,
                              ctx=DistContext(0, 2, torch.device("cuda", 0)))
        assert Trainer.describe(run).endswith(f"batch 2 x 2 processes, {words}")
    run.ctx = DistContext(0, 1, torch.device("cuda", 0))
    assert Trainer.describe(run).endswith("batch 2")
