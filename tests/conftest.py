import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    """Skip `cuda` tests without a GPU; `interpreted` tests (Triton kernels on the CPU) run only in the
    TRITON_INTERPRET=1 subprocess of `interpreter_suite`, `not_interpreted` ones only outside it."""
    skips = {"interpreted": None if INTERPRET else pytest.mark.skip(reason="runs in the TRITON_INTERPRET=1 subprocess"),
             "not_interpreted": pytest.mark.skip(reason="runs outside the interpreter") if INTERPRET else None,
             "cuda": None if torch.cuda.is_available() else
             pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/run_gpu.sh on a GPU machine)")}
    for item in items:
        for name, skip in skips.items():
            if skip is not None and name in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/data; skips the test with a message when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _uncapped_gpu(request):
    """A CUDA test that trains under a memory budget caps the process (``set_per_process_memory_fraction``); lift
    the cap afterwards so that the tests after it get the whole GPU."""
    yield
    if "cuda" in request.keywords and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(1.0)  # the budgeted tests train on the current device


@pytest.fixture
def interpreter_suite():
    """Run a test file's non-cuda tests again in a subprocess with TRITON_INTERPRET=1 (it must be set before
    triton is imported, which other test modules of this process may already have done) and assert they pass."""
    import subprocess
    import sys

    def run(test_file: str) -> None:
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider", "-m", "not cuda"]
        done = subprocess.run(cmd, env=env, cwd=Path(test_file).parents[1], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        assert " passed" in done.stdout and " failed" not in done.stdout

    return run
