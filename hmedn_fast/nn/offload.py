"""Saved activations parked in pinned host memory between forward and backward, copied on a side stream while the
GPU computes (instead of recomputing them: the ``stages`` level's first encoder stage of hmedn_3d_l2 at 128^3 keeps
463 MiB for backward, whose recomputation costs 4.1 ms of a 57.7 ms step on an H200, while the host link moves
55 GB/s each way beside the convolutions without slowing them: ``benchmarks/results/host_link_nvidia_h200.json``).

Use::

    park = HostParking()
    with park.saving():            # forward of the part whose saved tensors go to the host
        y = part(x)
    ...                            # more forward: the device-to-host copies run beside it
    park.release()                 # the compute stream waits for the copies; the device copies are freed
    ...                            # backward of the later parts
    park.fetch()                   # host-to-device copies start (e.g. from a gradient hook)
    ...                            # the part's backward waits for each tensor's copy when it unpacks it

Only CUDA tensors of at least ``min_bytes`` that autograd saves go to the host (parameters and smaller tensors
stay); one host copy per (storage pointer, shape, strides, dtype), so a tensor saved by two functions moves once.
Pinned buffers are kept per position and reused by the next steps (none is allocated while a CUDA graph is
captured once a step has run eagerly: the trainer's graphed step warms up eagerly). Without ``release`` the device
copies are dropped when the forward's references go, without ``fetch`` the unpack copies synchronously on the
current stream: correct either way, only slower. Stream safety without ``record_stream``: a device tensor read by
the side stream is freed only after the compute stream has waited for that read (``release``), and a fetched tensor
is allocated on the compute stream before the side stream writes it and used only after the compute stream waited
for the write.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import Tensor, nn

from ..device import memory_format_of

_PARKING: "weakref.WeakKeyDictionary[nn.Module, HostParking]" = weakref.WeakKeyDictionary()
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def parking_for(module: nn.Module) -> "HostParking":
    """The :class:`HostParking` of ``module`` (made on first use; kept outside the module's state, so models still
    pickle and copy)."""
    if module not in _PARKING:
        _PARKING[module] = HostParking()
    return _PARKING[module]


class _Slot:
    """One parked tensor: its pinned host copy, the device tensor until released, the device copy once fetched."""

    def __init__(self, host: Tensor) -> None:
        self.host = host
        self.device: Tensor | None = None  # the saved tensor, held until release()
        self.fetched: Tensor | None = None
        self.uses = 0  # saved tensors packed into this slot, each unpacked once in backward
        self.stored = self.loaded = None  # events: device-to-host copy done, host-to-device copy done


class HostParking:
    """Saved-tensor hooks that park large CUDA tensors in pinned host memory (module doc).

    Args:
        min_bytes: smaller tensors stay on the device (default 1 MiB).
    """

    def __init__(self, min_bytes: int = 2**20) -> None:
        self.min_bytes = min_bytes
        self._pinned: list[Tensor] = []  # reused across steps by position
        self._slots: list[_Slot] = []
        self._keys: dict[tuple, int] = {}

    def saving(self) -> contextlib.AbstractContextManager:
        """Context of the forward whose saved tensors are parked; starts a new step (the previous step's slots
        are dropped: its backward is done)."""
        self.release()
        self._slots, self._keys = [], {}
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @staticmethod
    def _side() -> torch.cuda.Stream:
        """The current device's side stream, one for every parking: parts parked one after another copy in that
        order, each at the link's full speed, so the first part's copies end first."""
        dev = torch.cuda.current_device()
        if dev not in _SIDE_STREAMS:
            _SIDE_STREAMS[dev] = torch.cuda.Stream()
        return _SIDE_STREAMS[dev]

    def _pack(self, t: Tensor):
        if (not t.is_cuda or isinstance(t, torch.nn.Parameter) or t.numel() * t.element_size() < self.min_bytes
                or not t.is_contiguous(memory_format=memory_format_of(t))):  # the host copy is one block
            return t
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key in self._keys:
            self._slots[self._keys[key]].uses += 1
            return self._keys[key]
        i = len(self._slots)
        host = self._pinned[i] if i < len(self._pinned) else None  # the previous step's buffer at this position
        if host is None or (host.shape, host.stride(), host.dtype) != (t.shape, t.stride(), t.dtype):
            host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=True)
            self._pinned[i:i + 1] = [host]
        slot = _Slot(host)
        side, current = self._side(), torch.cuda.current_stream()
        side.wait_stream(current)  # t is complete
        with torch.cuda.stream(side):
            host.copy_(t, non_blocking=True)
            slot.stored = torch.cuda.Event()
            slot.stored.record(side)
        slot.device, slot.uses = t, 1
        self._slots.append(slot)
        self._keys[key] = i
        return i

    def release(self) -> None:
        """The compute stream waits for every device-to-host copy, then the device tensors are dropped (freed once
        the forward holds no other reference)."""
        for slot in self._slots:
            if slot.device is not None:
                torch.cuda.current_stream().wait_event(slot.stored)
                slot.device = None

    def fetch(self) -> None:
        """Start the host-to-device copies of every parked tensor (allocated now, on the compute stream), the last
        parked first: backward unpacks in about the reverse order of the forward's packing."""
        if not self._slots:
            return
        self.release()
        side, current = self._side(), torch.cuda.current_stream()
        pending = [s for s in reversed(self._slots) if s.fetched is None and s.uses > 0]  # not fetched, not used up
        for slot in pending:
            slot.fetched = torch.empty_strided(slot.host.shape, slot.host.stride(), dtype=slot.host.dtype,
                                               device=current.device)
        side.wait_stream(current)  # the allocations (stream-ordered on the compute stream) precede the writes
        with torch.cuda.stream(side):
            for slot in pending:
                slot.fetched.copy_(slot.host, non_blocking=True)
                slot.loaded = torch.cuda.Event()
                slot.loaded.record(side)

    def _unpack(self, packed):
        if isinstance(packed, Tensor):
            return packed
        slot = self._slots[packed]
        current = torch.cuda.current_stream()
        if slot.device is not None:  # not released: still on the device
            current.wait_event(slot.stored)  # (freed on the compute stream after the read)
            return slot.device
        if slot.fetched is None:
            self.fetch()
        current.wait_event(slot.loaded)
        t = slot.fetched
        slot.uses -= 1
        if slot.uses == 0:
            slot.fetched = None  # freed once autograd is done with it, not held until the next step
        return t


__all__ = ["HostParking", "parking_for"]
