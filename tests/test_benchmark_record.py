"""benchmarks/record.py: every GPU record names its card, versions and git commit."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import record  # noqa: E402


def test_environment_on_cpu_names_versions_and_commit(monkeypatch):
    monkeypatch.setenv("HMEDN_GIT_COMMIT", "0123abc")
    env = record.environment("cpu")
    assert env["git_commit"] == "0123abc" and env["torch"] == torch.__version__ and env["cudnn"] is None
    assert set(env) == {"card", "date", "git_commit", "python", "torch", "cuda", "cudnn", "triton"}
    assert env["card"] and env["date"].endswith("+00:00")


def test_git_commit_reads_the_checkout(monkeypatch):
    monkeypatch.delenv("HMEDN_GIT_COMMIT", raising=False)
    if shutil.which("git") is None or not (record.REPO / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=record.REPO, capture_output=True, text=True).stdout.strip()
    assert record.git_commit().removesuffix("-dirty") == head


def test_card_slug():
    assert record.card_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert record.card_slug("NVIDIA H200") == "nvidia_h200"


@pytest.mark.parametrize("text, want", [
    ("32,2,1", ((32, 32), 2, True, 0, False)), ("48/none,2,1,2,1", ((48, None), 2, True, 2, True)),
    ("none,0,0,1", ((None, None), 0, False, 1, False)), ("48/32,1,0,1,0", ((48, 32), 1, False, 1, False))])
def test_stages_ab_variants(text, want):
    """benchmarks/stages_ab.py's ``--variants`` syntax: decoder[/encoder] group channels, recomputed stages, HR
    recomputed, stages parked, HR parked."""
    import stages_ab
    assert stages_ab.variant(text) == want
