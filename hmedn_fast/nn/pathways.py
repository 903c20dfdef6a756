"""The two pathways of HMEDN (SPEC section 1): the high-resolution (HR) pathway and the distilling pathway."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops import conv_mma
from ..ops.conv import compute_dtype
from ..ops.geometry import TapPacks
from ..ops.grad_meet import GradMeet
from .blocks import DenseBlock, ResidualDilatedBlock
from .lean import DenseFusionSum, LeanConv, is_batch_norm, norm_relu
from .offload import HostParking, parking_for
from .recompute import recomputed
from .layers import (ConvNormReLU, NormSpec, check_positive_int, check_spatial_dims, conv, conv_transpose,
                     max_pool, upsample_to)
from .layers import dropout as dropout_layer


CHECKPOINT_MODES = ("none", "lean", "middle", "blocks", "auto")


def _capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s forward is being captured into a CUDA graph (on its device's current stream)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class HRPathway(nn.Module):
    """High-resolution pathway: densely connected residual dilated blocks with deep supervision.

    ``x -> conv3 + norm + ReLU (projection to L channels) -> num_blocks x ResidualDilatedBlock(L, d1, d2)``;
    with ``dense=True`` a 1x1 fusion convolution (+ norm + ReLU) sees the concatenation of the projected
    input and every block's output (the dense connections of the paper) and maps it back to L channels;
    with ``dense=False`` the last block's output is returned (the plain DilNet of Fig. 3).
    When ``num_classes`` is given, a 1x1 head gives deep-supervision logits at the pathway's resolution.

    Args:
        in_channels: C_in of the input features.
        channels: L, the pathway width.
        num_blocks: number of residual dilated blocks (9 in the paper, 6 in DilNet3).
        dilations: (d1, d2) of every block, or a sequence of ``num_blocks`` such pairs.
        num_classes: K for the deep-supervision head, or None for no head.
        spatial_dims: 2 or 3.
        norm: "batch", "instance", "group" or a ``(name, kwargs)`` tuple.
        dense: use the dense fusion (True) or return the last block (False).
        checkpoint: what the blocks keep for backward (:mod:`hmedn_fast.nn.lean`): "none" (eager autograd),
            "lean" (block inputs + conv outputs; norm + ReLU recomputed), "middle" (block inputs + second conv
            outputs; the first conv recomputed too), "blocks" (block inputs only; both convs recomputed) or "auto".
            Outside "none" the projection's convolution runs on :class:`hmedn_fast.nn.lean.LeanConv` (our
            convolution kernels where they take it), and the dense fusion is computed as a sum of
            per-input 1x1 convolutions added inside the block loop (no concatenation kept, and backward holds one
            feature's fusion gradient at a time: :class:`hmedn_fast.nn.lean.DenseFusionSum`); "none"
            concatenates (one wide 1x1 convolution, ``(num_blocks + 1) L`` channels kept). ``dense_sum`` forces
            either. Gradients are the same in every mode.
        memory_budget: bytes for "auto" (default: half the CUDA device's free memory at forward time;
            unlimited on CPU). Rule: the fastest mode whose kept activations fit in the budget. Run eagerly, that is
            "none" (kept: about ``(4 * num_blocks + 5) * N * L * prod(spatial)`` elements of the compute dtype, plus
            ``num_blocks + 1`` such tensors for the dense fusion's concatenation), then "lean" (about
            ``3 * num_blocks + 4`` of them), "middle" (``2 * num_blocks + 4``), else "blocks": un-graphed, our lean
            blocks are bound by the host's launch and Python cost and slower than eager autograd on the GPU hosts
            measured (``benchmarks/results/blocks_nvidia_h200_s27.json``: 34.7 vs 13.1 ms). While a CUDA graph is
            captured (``torch.cuda.make_graphed_callables``, a whole-step graph) "lean" comes first (7.0 ms at 0.74x
            the memory of eager's 10.8 ms graphed there), else "middle", else "blocks". "none" when gradients are off.

    Shapes: forward((N, C_in, *spatial)) -> ``(features, logits)`` with features (N, L, *spatial) and logits
    (N, K, *spatial) or None. Spatial sizes are kept (no striding).
    """

    def __init__(self, in_channels: int, channels: int, num_blocks: int = 9,
                 dilations: Sequence[int] | Sequence[Sequence[int]] = (2, 4), num_classes: int | None = None,
                 spatial_dims: int = 2, norm: NormSpec = "batch", dense: bool = True, checkpoint: str = "none",
                 memory_budget: int | None = None) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        check_positive_int("channels", channels)
        check_positive_int("num_blocks", num_blocks)
        if num_classes is not None:
            check_positive_int("num_classes", num_classes)
        schedule = _dilation_schedule(dilations, num_blocks)
        self.spatial_dims, self.in_channels, self.channels = spatial_dims, in_channels, channels
        self.dense = dense
        self.proj = ConvNormReLU(spatial_dims, in_channels, channels, 3, norm_spec=norm)
        self.blocks = nn.ModuleList(ResidualDilatedBlock(channels, d, spatial_dims, norm) for d in schedule)
        self.fuse = (ConvNormReLU(spatial_dims, channels * (num_blocks + 1), channels, 1, norm_spec=norm)
                     if dense else None)
        self.head = conv(spatial_dims, channels, num_classes, 1, bias=True) if num_classes else None
        self.checkpoint = checkpoint
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                          or memory_budget < 0):
            raise ValueError(f"memory_budget must be a non-negative int (bytes) or None, got {memory_budget!r}")
        self.memory_budget = memory_budget
        self.dense_sum: bool | None = None  # None: sum of 1x1 convs in "lean" / "blocks"; True/False force it

    @property
    def checkpoint(self) -> str:
        """Backward-memory mode: "none" | "lean" | "blocks" | "auto"."""
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, mode: str) -> None:
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {mode!r}")
        self._checkpoint = mode
        for block in self.blocks:
            block.checkpoint = "none" if mode == "auto" else mode

    def resolve_checkpoint(self, x: torch.Tensor) -> str:
        """The mode the blocks use for input ``x`` ("auto" resolved by the rule of the class docstring)."""
        if self._checkpoint != "auto":
            return self._checkpoint
        if not torch.is_grad_enabled():
            return "none"
        dev = x.device.type
        itemsize = (torch.finfo(torch.get_autocast_dtype(dev)).bits // 8 if torch.is_autocast_enabled(dev)
                    else x.element_size())
        unit = x.shape[0] * self.channels * x[0, 0].numel() * itemsize  # one (N, L, *spatial) tensor
        budget = self.memory_budget
        if budget is None:
            budget = torch.cuda.mem_get_info(x.device)[0] // 2 if x.is_cuda else float("inf")
        n = len(self.blocks)
        order = ("lean", "middle", "blocks") if _capturing(x) else ("none", "lean", "middle", "blocks")
        kept = {"none": (4 * n + 5 + (n + 1 if self.dense else 0)) * unit, "lean": (3 * n + 4) * unit,
                "middle": (2 * n + 4) * unit, "blocks": 0}
        return next(mode for mode in order if kept[mode] <= budget)

    def _project(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """The projection (conv + norm + ReLU); outside "none" with autograd on, its bias-free convolution through
        :class:`LeanConv` (our kernels' gradients) and its norm + ReLU through :func:`norm_relu`."""
        conv, norm = self.proj[0], self.proj[1]
        if mode == "none" or conv.bias is not None or not torch.is_grad_enabled():
            return self.proj(x)
        return norm_relu(norm, LeanConv.apply(x, conv.weight, conv))

    def _tap_packs(self, x: torch.Tensor, mode: str) -> TapPacks | None:
        """Every block's two 3x3x3 weights packed at once for the CUDA convolution kernel (conv1 and conv2 of block i at
        2 i and 2 i + 1; :class:`~hmedn_fast.ops.geometry.TapPacks`), where the lean BatchNorm blocks run 32 -> 32
        convolutions in bf16/fp16 on a device the kernels run on; else None."""
        if mode == "none" or not x.is_cuda or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        weights = [w for b in self.blocks for w in (b.conv1.weight, b.conv2.weight)]
        dt = compute_dtype(x, weights[0])
        if (dt not in (torch.bfloat16, torch.float16) or not conv_mma.available(x.device)
                or any(tuple(w.shape) != (conv_mma.CHANNELS, conv_mma.CHANNELS, 3, 3, 3) or w.device != x.device
                       for w in weights)
                or not all(is_batch_norm(b.norm1) and is_batch_norm(b.norm2) for b in self.blocks)):
            return None
        return TapPacks(weights, dt)

    @property
    def receptive_field(self) -> int:
        """Extent (voxels per axis) of the input region that one output voxel of the pathway depends on."""
        return 1 + 2 + sum(b.receptive_field - 1 for b in self.blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mode = self.resolve_checkpoint(x)
        y = self._project(x, mode)
        summed = self.fuse is not None and (mode != "none" if self.dense_sum is None else self.dense_sum)
        fusion = DenseFusionSum(self.fuse[0]) if summed else None
        outs = [y]
        packs = self._tap_packs(x, mode)
        for i, block in enumerate(self.blocks):
            meet = None
            if fusion is not None:  # the feature's gradients from its term and the block meet (GradMeet): no add
                meet = GradMeet()
                fusion.add(y, meet)  # each term before the block that consumes its feature: see DenseFusionSum
            block.checkpoint = mode
            y = block(y, packs=None if packs is None else (packs, 2 * i, 2 * i + 1), meet=meet)
            if fusion is None:
                outs.append(y)
        if fusion is not None:
            fusion.add(y)
            feats = norm_relu(self.fuse[1], fusion.result())
        elif self.fuse is None:
            feats = y
        else:
            feats = self.fuse(torch.cat(outs, 1))
        return feats, (self.head(feats) if self.head is not None else None)


class DistillingPathway(nn.Module):
    """Distilling pathway (DstNet): a U-Net of dense blocks with HED-style side outputs, optionally bridged
    by an HR pathway at one stage (HRDN / HMEDN).

    A stem (conv3 + norm + ReLU) maps the input to ``widths[0]`` channels. Stage s (0 = full resolution) of
    the encoder: dense block -> 1x1 transition (norm, ReLU) to
    ``widths[s]`` channels -> dropout; then 2x max pooling to stage s+1. The decoder mirrors it: a 2x2
    stride-2 transposed convolution, concatenation with the encoder's stage-s features (and the HR
    pathway's features when it bridges stage s), dense block, transition. ``side_stages`` (3 of them)
    get 1x1 logit heads whose logits are upsampled to full resolution and fused with the main logits by
    a 1x1 convolution (HED fusion).

    Args:
        in_channels: input channels (image channels).
        num_classes: K.
        widths: channels per stage, ``len(widths) = depth + 1`` (depth 4 for DstNet1, 3 for DstNet2).
        growth_rates: dense-block growth rate per stage (an int for all).
        num_layers: dense-block layers per stage (an int for all).
        spatial_dims: 2 or 3.
        norm: norm spec.
        side_stages: decoder stages with HED side outputs (stage ``depth`` is the bottleneck).
        dropout: dropout probability at the end of each stage (3D HMEDN uses it).
        hr_pathway: an :class:`HRPathway` bridging encoder and decoder at ``hr_stage`` (0-based), or None.
        hr_stage: the stage the HR pathway bridges.

    Attributes ``recompute_stages`` (0; 2 at the ``"stages"`` checkpointing level of
    :func:`hmedn_fast.train.memory.set_checkpointing`) and ``recompute_hr`` (False; True there): in training with
    autograd on, the dense block and transition of that many encoder stages (the stem too in the first), and the
    whole HR pathway, keep only their input for backward and run again there (BatchNorm running statistics updated
    once); same outputs and gradients. ``park_stages`` (0) and ``park_hr`` (False): on CUDA, in training, that many
    encoder stages (from the first) and the HR pathway are not recomputed (nor kept): what they save for backward
    waits in pinned host memory (:mod:`hmedn_fast.nn.offload`), copied out while the forward goes on, off the device
    from the full-resolution decoder stage on (the first stage's) or from the start of the backward (the others'),
    and copied back once that stage's backward (where the step peaks) is done.

    Shapes: forward((N, C, *spatial)) with each spatial size divisible by ``2 ** depth`` ->
    ``(features, logits, aux)``: features (N, widths[0], *spatial) of the last decoder stage, logits
    (N, K, *spatial) (fused), aux: the side logits at their stages' resolutions followed by the HR
    pathway's logits (when it has a head).
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 128, 256, 512),
                 growth_rates: int | Sequence[int] = 16, num_layers: int | Sequence[int] = 4,
                 spatial_dims: int = 2, norm: NormSpec = "batch", side_stages: Sequence[int] = (1, 2, 3),
                 dropout: float = 0.0, hr_pathway: HRPathway | None = None, hr_stage: int | None = None) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_classes", num_classes)
        depth = len(widths) - 1
        if depth < 1:
            raise ValueError(f"widths needs at least 2 stages, got {widths!r}")
        growth = _per_stage("growth_rates", growth_rates, depth + 1)
        layers = _per_stage("num_layers", num_layers, depth + 1)
        if any(not 1 <= s <= depth for s in side_stages):
            raise ValueError(f"side_stages must lie in [1, {depth}], got {side_stages!r}")
        if (hr_pathway is None) != (hr_stage is None):
            raise ValueError("hr_pathway and hr_stage must be given together")
        if hr_pathway is not None:
            if not 0 <= hr_stage < depth:
                raise ValueError(f"hr_stage must lie in [0, {depth - 1}], got {hr_stage!r}")
            if hr_pathway.in_channels != widths[hr_stage]:
                raise ValueError(f"hr_pathway.in_channels={hr_pathway.in_channels} must equal "
                                 f"widths[{hr_stage}]={widths[hr_stage]}")
        self.depth, self.widths, self.side_stages = depth, tuple(widths), tuple(side_stages)
        self.hr_stage, self.hr = hr_stage, hr_pathway
        self.pool = max_pool(spatial_dims)
        self.stem = ConvNormReLU(spatial_dims, in_channels, widths[0], 3, norm_spec=norm)

        def stage(cin: int, s: int) -> nn.Sequential:
            block = DenseBlock(cin, growth[s], layers[s], spatial_dims, norm)
            return nn.Sequential(block, ConvNormReLU(spatial_dims, block.out_channels, widths[s], 1, norm_spec=norm),
                                 dropout_layer(spatial_dims, dropout))

        self.enc = nn.ModuleList(stage(widths[max(s - 1, 0)], s) for s in range(depth + 1))
        self.up = nn.ModuleList(conv_transpose(spatial_dims, widths[s + 1], widths[s]) for s in range(depth))
        hr_extra = [hr_pathway.channels if s == hr_stage else 0 for s in range(depth)] if hr_pathway else [0] * depth
        self.dec = nn.ModuleList(stage(2 * widths[s] + hr_extra[s], s) for s in range(depth))
        self.main_head = conv(spatial_dims, widths[0], num_classes, 1, bias=True)
        self.side_heads = nn.ModuleList(conv(spatial_dims, widths[s], num_classes, 1, bias=True) for s in side_stages)
        self.fuse = conv(spatial_dims, num_classes * (1 + len(side_stages)), num_classes, 1, bias=True)
        self.recompute_stages, self.recompute_hr, self.park_stages, self.park_hr = 0, False, 0, False

    def _encode(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """Encoder stage s without its dropout: the stem (s = 0), the dense block and its transition."""
        block, transition, _ = self.enc[s]
        return transition(block(self.stem(x) if s == 0 else x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        recompute = self.training and torch.is_grad_enabled()
        park_stages, park_hr = self.__dict__.get("park_stages", 0), self.__dict__.get("park_hr", False)
        parking = recompute and x.is_cuda and not torch.compiler.is_compiling()
        # this step's parked parts in forward order: the first encoder stage's (released before the full-resolution
        # decoder stage) and the later ones (released when the backward starts)
        early: list[HostParking] = []
        late: list[HostParking] = []
        skips = []
        for s, enc in enumerate(self.enc):
            if s:
                x = self.pool(x)  # outside the recomputed part: it would keep the larger stage output
            if parking and s < park_stages:
                x = _parked(enc, late if s else early, self._encode, s, x)
            elif recompute and s < self.__dict__.get("recompute_stages", 0):
                x = recomputed(self._encode, (self.stem, enc) if s == 0 else (enc,), s, x,
                               preserve_rng_state=False)  # no RNG inside
            else:
                x = self._encode(s, x)
            x = enc[2](x)  # dropout
            skips.append(x)
        hr_feats = hr_logits = None
        if self.hr is not None:
            if parking and park_hr:
                hr_feats, hr_logits = _parked(self.hr, late, self.hr, skips[self.hr_stage])
            elif recompute and self.__dict__.get("recompute_hr", False):
                hr_feats, hr_logits = recomputed(self.hr, (self.hr,), skips[self.hr_stage],
                                                 preserve_rng_state=False)  # no RNG inside
            else:
                hr_feats, hr_logits = self.hr(skips[self.hr_stage])
        by_stage = {self.depth: x}
        for s in reversed(range(self.depth)):
            # The stage's input (upsampled features, skip, HR features) goes straight into a lean dense block's
            # buffer (no concatenated tensor alive while the block runs), else it is concatenated. The parts' list
            # is a temporary: the upsampled features are freed once copied, not held while the stage runs (at full
            # resolution of hmedn_3d_l2 at 128^3 in bf16: 64 MiB, and 128 MiB of concatenation, at the forward's peak)
            block = self.dec[s][0]
            x = self.dec[s](block.input_buffer(self._stage_input(s, x, skips, hr_feats, early, late)))
            by_stage[s] = x
        if late and x.requires_grad:  # (frozen parts: nothing to run backward through here)
            x.register_hook(lambda grad: _release(late))  # the backward starts
        size = x.shape[2:]
        main = self.main_head(x)
        sides = [head(by_stage[s]) for s, head in zip(self.side_stages, self.side_heads)]
        logits = self.fuse(torch.cat([main] + [upsample_to(z, size) for z in sides], 1))
        aux = sides + ([hr_logits] if hr_logits is not None else [])
        return x, logits, aux

    def _stage_input(self, s: int, x: torch.Tensor, skips: list[torch.Tensor | None], hr_feats: torch.Tensor | None,
                     early: list[HostParking], late: list[HostParking]) -> list[torch.Tensor]:
        """Decoder stage s's input parts (its upsampled features, the skip, the HR features at the HR stage). The
        skip leaves ``skips`` (the returned list holds its only reference then: nothing saves it for backward, as
        dropout keeps its mask and pooling one byte per output, so it is freed once copied into the stage's buffer
        instead of sitting beside the full-resolution block's forward: 64 MiB at 128^3 in bf16). At
        the full-resolution stage the first encoder stage's parked tensors (``early``) leave the device first (the
        other parked parts, ``late``, leave when the backward starts: their copies end during this stage's forward, whose
        peak is below its backward's); all come back, the last parked first, once this stage's backward is done
        (where the step peaks), while the lower stages' backward runs."""
        up = self.up[s](x)
        skip, skips[s] = skips[s], None
        if s == 0 and (early or late):
            _release(early)
            if up.requires_grad:  # else the parked parts' backward (if any) copies back as it unpacks
                up.register_hook(lambda grad: _fetch(early + late))
        return [up, skip] + ([hr_feats] if s == self.hr_stage else [])


def _parked(part: nn.Module, parks: list[HostParking], fn, *args):
    """``fn(*args)`` with the tensors it saves for backward parked by ``part``'s :class:`HostParking` (appended to
    ``parks``)."""
    park = parking_for(part)
    with park.saving():
        out = fn(*args)
    parks.append(park)
    return out


def _release(parks: list[HostParking]) -> None:
    for park in parks:
        park.release()


def _fetch(parks: list[HostParking]) -> None:
    for park in reversed(parks):  # one side stream: the copies run in this order, the first needed first
        park.fetch()


def _per_stage(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) else tuple(value)
    if len(values) != n:
        raise ValueError(f"{name} needs one value per stage ({n}), got {value!r}")
    for v in values:
        check_positive_int(name, v)
    return values


def _dilation_schedule(dilations, num_blocks: int) -> list[tuple[int, int]]:
    if len(dilations) == 2 and all(isinstance(d, int) for d in dilations):
        return [tuple(dilations)] * num_blocks
    schedule = [tuple(d) for d in dilations]
    if len(schedule) != num_blocks:
        raise ValueError(f"dilations must be one (d1, d2) pair or {num_blocks} pairs, got {dilations!r}")
    return schedule
