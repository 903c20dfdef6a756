"""Simulated CUDA devices for CPU tests of device handling: a current-device variable that a stand-in
``torch.cuda.device`` sets and restores (counting switches) and ``torch._C._cuda_getDevice`` reads, and CPU tensors
that report a CUDA device."""
from __future__ import annotations

import contextlib

import torch


class SimulatedDevices:
    """Patches ``torch.cuda.device`` and ``torch._C._cuda_getDevice`` (absent in CPU builds) for one test."""

    def __init__(self, monkeypatch, current: int = 0) -> None:
        self.current, self.switches = current, 0
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: self.current, raising=False)

    @contextlib.contextmanager
    def device(self, dev):
        before, self.current = self.current, dev if isinstance(dev, int) else torch.device(dev).index
        self.switches += 1
        try:
            yield
        finally:
            self.current = before


class _OnGpu(torch.Tensor):
    gpu = 0

    def get_device(self):
        return self.gpu

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", self.gpu)


def on_gpu(index: int, n: int = 8) -> torch.Tensor:
    """A random CPU tensor that reports living on ``cuda:index`` (get_device, is_cuda, device)."""
    t = torch.randn(n).as_subclass(_OnGpu)
    t.gpu = index
    return t
