"""Building blocks of HMEDN (SPEC section 1): the residual dilated block and the dense block."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .dense_lean import is_buffer, lean_dense_buffer, lean_dense_forward
from .dense_lean import supported as lean_dense_supported
from ..ops.geometry import TapPacks
from ..ops.grad_meet import GradMeet
from .lean import MODES, RECOMPUTED, LeanBatchNormBlock, LeanResidualBlock, is_batch_norm, norm_relu, supports
from .layers import NormSpec, check_positive_int, check_spatial_dims, conv
from .layers import norm as norm_layer


class ResidualDilatedBlock(nn.Module):
    """Residual dilated block ``(C, d1, d2)`` of the HR pathway (paper III-B, Fig. 2).

    ``x -> conv3(dilation d1) -> norm -> ReLU -> conv3(dilation d2) -> norm -> (+ x) -> ReLU``, padding keeps
    the spatial size. The convolutions have no bias (each is followed by a norm).

    Args:
        channels: C, input and output channels.
        dilations: (d1, d2), dilation of the two convolutions.
        spatial_dims: 2 or 3.
        norm: "batch" (default), "instance", "group" or a ``(name, kwargs)`` tuple.
        kernel_size: odd kernel size (3 in the paper).
        checkpoint: what the backward pass keeps (see :mod:`hmedn_fast.nn.lean`): "none" (eager autograd),
            "lean" (block input and conv outputs; norm + ReLU recomputed), "middle" (block input and the second
            conv's output; the first conv recomputed too) or "blocks" (block input only; both convs recomputed).
            Gradients are the same in every mode. Settable as an attribute.

    Shapes: (N, C, *spatial) -> (N, C, *spatial), same dtype.
    """

    fusable_pairs = (("conv1", "norm1"), ("conv2", "norm2"))  # conv -> norm pairs for nn.fusion

    def __init__(self, channels: int, dilations: Sequence[int] = (2, 4), spatial_dims: int = 2,
                 norm: NormSpec = "batch", kernel_size: int = 3, checkpoint: str = "none") -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("channels", channels)
        self.checkpoint = checkpoint
        if len(dilations) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dilations):
            raise ValueError(f"dilations must be two positive ints (d1, d2), got {dilations!r}")
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        self.spatial_dims, self.channels = spatial_dims, channels
        self.dilations = tuple(int(d) for d in dilations)
        self.kernel_size = kernel_size
        self.conv1 = conv(spatial_dims, channels, channels, kernel_size, self.dilations[0])
        self.norm1 = norm_layer(norm, spatial_dims, channels)
        self.conv2 = conv(spatial_dims, channels, channels, kernel_size, self.dilations[1])
        self.norm2 = norm_layer(norm, spatial_dims, channels)

    @property
    def receptive_field(self) -> int:
        """Extent (voxels along each axis) of the input region one output voxel depends on."""
        return 1 + (self.kernel_size - 1) * sum(self.dilations)

    @property
    def checkpoint(self) -> str:
        """Backward-memory mode: "none" | "lean" | "middle" | "blocks"."""
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"checkpoint must be one of {MODES} for a block, got {mode!r}")
        self._checkpoint = mode

    def forward(self, x: torch.Tensor, packs: tuple[TapPacks, int, int] | None = None,
                meet: GradMeet | None = None) -> torch.Tensor:
        """``packs``: None, or this block's two convolution weights already packed for the CUDA kernel (a
        :class:`~hmedn_fast.ops.geometry.TapPacks` of this step and the indices of conv1's and conv2's weights in it);
        ``meet``: None, or where x's gradient meets another backward's (:class:`~hmedn_fast.ops.grad_meet.GradMeet`,
        the HR pathway's dense-fusion term of x). Both used by the lean BatchNorm block, ignored elsewhere."""
        if (self._checkpoint != "none" and torch.is_grad_enabled() and supports(self.norm1) and supports(self.norm2)
                and (x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            n1, n2 = self.norm1, self.norm2
            args = (x, self, RECOMPUTED[self._checkpoint], self.conv1.weight, n1.weight, n1.bias, self.conv2.weight,
                    n2.weight, n2.bias)
            if is_batch_norm(n1) and is_batch_norm(n2):
                return LeanBatchNormBlock.apply(*args, packs, meet)
            return LeanResidualBlock.apply(*args)
        y = torch.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return torch.relu(y + x)


class DenseLayer(nn.Module):
    """One DenseNet layer: norm -> ReLU -> conv3 producing ``growth_rate`` new channels."""

    def __init__(self, in_channels: int, growth_rate: int, spatial_dims: int, norm: NormSpec) -> None:
        super().__init__()
        self.norm = norm_layer(norm, spatial_dims, in_channels)
        self.conv = conv(spatial_dims, in_channels, growth_rate, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(norm_relu(self.norm, x))


class DenseBlock(nn.Module):
    """Dense block (DenseNet [33]): layer i sees the concatenation of the block input and every earlier
    layer's output; the block returns all of them concatenated.

    Args:
        in_channels: C_in.
        growth_rate: g, channels each layer adds.
        num_layers: n.
        spatial_dims: 2 or 3.
        norm: norm of each layer (pre-activation, as DenseNet).

    Shapes: (N, C_in, *spatial) -> (N, C_in + n * g, *spatial). ``out_channels`` gives C_in + n * g.

    ``lean = True`` (set by ``hmedn_fast.train.memory.set_checkpointing`` at the "lean" and "blocks" levels):
    training forwards of BatchNorm blocks run :class:`~hmedn_fast.nn.dense_lean.LeanDenseBlock` (one shared
    buffer, norm + ReLU recomputed in backward; same outputs, gradients and running statistics).
    ``group_channels`` (None; an int at the "stages" level): the lean block's backward takes a layer's input in
    groups of at most this many channels (replays and differentiates each group: the same results), so a layer's
    backward temporaries (its replayed activation, its input gradient) are group-wide instead of as wide as its
    whole input; more, narrower kernel launches. The forward is not grouped.
    """

    def __init__(self, in_channels: int, growth_rate: int, num_layers: int, spatial_dims: int = 2,
                 norm: NormSpec = "batch") -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        for name, v in (("in_channels", in_channels), ("growth_rate", growth_rate), ("num_layers", num_layers)):
            check_positive_int(name, v)
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, spatial_dims, norm) for i in range(num_layers))
        self.out_channels = in_channels + num_layers * growth_rate
        self.lean = False
        self._group_channels: int | None = None

    @property
    def in_channels(self) -> int:
        """C_in (the first layer's input channels)."""
        return self.layers[0].conv.in_channels

    @property
    def group_channels(self) -> int | None:
        """Channels per group of a layer's input in the lean block (None: the whole input at once; also for a block
        pickled before the option existed)."""
        return self.__dict__.get("_group_channels")

    @group_channels.setter
    def group_channels(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"group_channels must be None or a positive int, got {value!r}")
        self._group_channels = value

    def input_buffer(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """The block input made of ``parts`` along channels (C_in in all), for :meth:`forward`: ``torch.cat(parts,
        1)``, or, where the block runs lean, a buffer of the output's size (N, C_out, *spatial) whose first C_in
        channels hold the parts, which the lean block fills in place (no concatenated tensor is made). Pass the
        parts as a temporary list (``block(block.input_buffer([a, b]))``): nothing then holds them while the block
        runs. Under ``torch.compile`` always the concatenation: traced with graph breaks around it, the in-place
        buffer gave wrong gradients to the parts (CPU, float64; docs/decisions/train.md stop 22)."""
        parts = list(parts)
        if not parts or any(p.ndim != parts[0].ndim or p.ndim < 3 or p.shape[0] != parts[0].shape[0]
                            or p.shape[2:] != parts[0].shape[2:] for p in parts):
            raise ValueError(f"parts must be (N, C_i, *spatial) tensors of one N and spatial size, got shapes "
                             f"{[tuple(p.shape) for p in parts]}")
        if sum(p.shape[1] for p in parts) != self.in_channels:
            raise ValueError(f"parts must have {self.in_channels} channels in all, got "
                             f"{[p.shape[1] for p in parts]}")
        if self._runs_lean(any(p.requires_grad for p in parts)) and not torch.compiler.is_compiling():
            return lean_dense_buffer(self, parts)
        return torch.cat(parts, 1)

    def _runs_lean(self, input_requires_grad: bool) -> bool:
        return (self.lean and torch.is_grad_enabled() and lean_dense_supported(self)
                and (input_requires_grad or any(p.requires_grad for p in self.parameters())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean, buffer = self._runs_lean(x.requires_grad), is_buffer(x)
        if x.ndim < 3 or x.shape[1] != (self.out_channels if buffer else self.in_channels) or (buffer and not lean):
            raise ValueError(f"x must be (N, {self.in_channels}, *spatial) or, for a block running lean, this block's "
                             f"input_buffer; got shape {tuple(x.shape)}{' (a lean buffer)' if buffer else ''}")
        if lean:
            return lean_dense_forward(self, x)
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1)

