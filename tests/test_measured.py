"""Backend choice by measurement (hmedn_fast.ops.measured): the fastest runner is taken and remembered per
signature, nothing is timed when timing is not possible (static default instead), bad defaults raise; on CUDA the
real timer and the CUDA-graph / cudnn.benchmark conditions."""
from __future__ import annotations

import pytest
import torch

from _simulated_gpu import SimulatedDevices, on_gpu
from hmedn_fast.ops import measured


@pytest.fixture(autouse=True)
def _fresh():
    measured.forget()
    yield
    measured.forget()


def _fake_timer(monkeypatch, times: dict[str, float]) -> list[str]:
    """Replace the CUDA timer: each runner's time is times[its name]; returns the log of timed names."""
    timed: list[str] = []

    def fake(run, reps):
        name = run()
        timed.append(name)
        return times[name]

    monkeypatch.setattr(measured, "_time_ms", fake)
    monkeypatch.setattr(measured, "can_measure", lambda *t: True)
    return timed


def test_fastest_runner_is_taken_and_remembered(monkeypatch):
    timed = _fake_timer(monkeypatch, {"a": 2.0, "b": 1.0})
    runners = {"a": lambda: "a", "b": lambda: "b"}
    assert measured.choice(("op", 1), runners, "a", ()) == "b"
    assert sorted(timed) == ["a", "b"]
    assert measured.choice(("op", 1), runners, "a", ()) == "b" and len(timed) == 2  # remembered, not re-timed
    assert measured.remembered() == {("op", 1): "b"}
    assert measured.timings() == {("op", 1): {"a": 2.0, "b": 1.0}}  # what the choice was made from
    assert measured.choice(("op", 2), runners, "b", ()) == "b" and len(timed) == 4  # a new signature is timed
    measured.forget()
    assert measured.remembered() == {} and measured.timings() == {}


def test_without_timing_the_default_is_used_and_nothing_remembered(monkeypatch):
    monkeypatch.setattr(measured, "_time_ms", lambda run, reps: pytest.fail("timed"))
    x = torch.randn(3)
    for benchmark in (False, True):  # CPU tensors: never timed
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", benchmark)
        assert not measured.can_measure(x)
        assert measured.choice(("op",), {"a": lambda: 0, "b": lambda: 0}, "b", (x,)) == "b"
    assert measured.remembered() == {}


def test_a_remembered_choice_is_used_even_when_timing_is_not_possible(monkeypatch):
    _fake_timer(monkeypatch, {"a": 1.0, "b": 3.0})
    runners = {"a": lambda: "a", "b": lambda: "b"}
    assert measured.choice("k", runners, "b", ()) == "a"
    monkeypatch.setattr(measured, "can_measure", lambda *t: False)
    assert measured.choice("k", runners, "b", ()) == "a"


def test_default_must_be_a_runner():
    with pytest.raises(ValueError, match="default must be one of"):
        measured.choice("k", {"a": lambda: 0}, "c", ())


@pytest.mark.cuda
def test_cuda_timer_counts_gpu_time_not_host_time():
    """A call whose host side takes 0.3 ms (a sleep) around a ~us kernel times as the kernel: the GPU is held busy
    while the host queues the timed calls."""
    import time

    x = torch.randn(1 << 10, device="cuda")
    ms = measured._time_ms(lambda: time.sleep(3e-4) or x.add(1), 3)
    assert 0 < ms < 0.3, ms


@pytest.mark.cuda
def test_cuda_timer_and_conditions(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    x = torch.randn(1 << 22, device="cuda")
    assert measured.can_measure(x)
    assert measured.choice("cuda", {"slow": lambda: [x.sin() for _ in range(20)], "fast": lambda: x.add(1)},
                           "slow", (x,)) == "fast"
    assert measured._time_ms(lambda: x.add(1), 3) > 0
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert not measured.can_measure(x)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seen = []
    g = torch.cuda.CUDAGraph()
    y = x * 2  # warm the kernel before capture
    with torch.cuda.graph(g):
        seen.append(measured.can_measure(x))
        y = x * 2
    assert seen == [False]  # never time (synchronise) inside a capture


def test_out_of_memory_while_timing_falls_back_to_the_default(monkeypatch):
    monkeypatch.setattr(measured, "can_measure", lambda *t: True)

    def oom(run, reps):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(measured, "_time_ms", oom)
    assert measured.choice("k", {"a": lambda: 0, "b": lambda: 0}, "a", ()) == "a"
    assert measured.remembered() == {}  # timed again next time


def test_timing_runs_with_the_inputs_device_current(monkeypatch):
    """The capture check, the CUDA events and the GPU hold of a timing act on the current device: inputs on cuda:1
    while cuda:0 is current must be timed with cuda:1 current (else the events time an idle device), and the current
    device is restored. Devices are simulated (tests/_simulated_gpu.py)."""
    devices = SimulatedDevices(monkeypatch)
    seen = []
    monkeypatch.setattr(measured, "can_measure", lambda *t: seen.append(("check", devices.current)) or True)

    def timer(run, reps):
        seen.append(("time", devices.current))
        return {"a": 2.0, "b": 1.0}[run()]

    monkeypatch.setattr(measured, "_time_ms", timer)
    assert measured.choice(("op", 9), {"a": lambda: "a", "b": lambda: "b"}, "a", (on_gpu(1),)) == "b"
    assert seen == [("check", 1), ("time", 1), ("time", 1)] and devices.current == 0
