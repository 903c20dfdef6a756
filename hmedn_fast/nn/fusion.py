"""Inference fusion: fold eval-mode BatchNorm into the convolution that precedes it.

``fuse_for_inference(model)`` returns a fused deep copy in eval mode. Every ``conv -> BatchNorm`` pair (inside
``nn.Sequential`` containers such as :class:`~hmedn_fast.nn.layers.ConvNormReLU`, and the ``conv1/norm1`` and
``conv2/norm2`` pairs of :class:`~hmedn_fast.nn.blocks.ResidualDilatedBlock`) becomes one convolution with a
bias::

    scale = gamma / sqrt(running_var + eps)
    W'    = W * scale[:, None, ...]            (per output channel)
    b'    = (b - running_mean) * scale + beta  (b = 0 when the conv had no bias)

and the BatchNorm is replaced by ``nn.Identity``. What cannot be folded is left as it is: InstanceNorm and
GroupNorm (their statistics depend on the input), BatchNorm without running statistics, and pre-activation
BatchNorm (``norm -> ReLU -> conv`` in dense layers: the ReLU sits between them). ReLU and residual additions
stay plain PyTorch ops, so the fused model traces and exports to ONNX with standard operators only.

The fused model computes the same function as ``model.eval()`` (within float rounding: 1e-5 relative in
float32). Its ``state_dict`` differs from the original (norms removed, conv biases added): keep the original
for training and checkpoints, fuse at load time for inference.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """True when ``norm`` is a BatchNorm with running statistics that directly follows ``conv``."""
    return (isinstance(conv, _CONVS) and isinstance(norm, _BATCH_NORMS) and norm.track_running_stats
            and norm.running_mean is not None and norm.num_features == conv.out_channels)


@torch.no_grad()
def fold_batch_norm(conv: nn.Module, norm: nn.Module) -> nn.Module:
    """A new convolution equal to ``norm(conv(x))`` with ``norm`` in eval mode.

    Args:
        conv: ``nn.Conv{1,2,3}d`` (any dilation, padding, groups; with or without bias).
        norm: ``nn.BatchNorm{1,2,3}d`` with running statistics, ``num_features == conv.out_channels``.

    Returns:
        A convolution with the same hyper-parameters, a bias, and weights/bias of the dtype and device of
        ``conv.weight``; the fold itself is computed in float64.
    """
    if not foldable(conv, norm):
        raise TypeError(f"cannot fold {type(norm).__name__} into {type(conv).__name__}: need a Conv followed by a "
                        "BatchNorm with running statistics and matching channels")
    w = conv.weight.double()
    mean, var = norm.running_mean.double(), norm.running_var.double()
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(mean)
    beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + norm.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    fused = copy.deepcopy(conv)
    if fused.bias is None:
        fused.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))
    fused.weight.copy_(w * scale.reshape(-1, *([1] * (w.ndim - 1))))
    fused.bias.copy_((bias - mean) * scale + beta)
    return fused


def _fuse_children(module: nn.Module) -> None:
    """Fold in place the foldable pairs of ``module``'s direct children, then recurse."""
    pairs = list(getattr(module, "fusable_pairs", ()))
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        pairs += [(a, b) for a, b in zip(names, names[1:])]
    for conv_name, norm_name in pairs:
        conv, norm = getattr(module, conv_name), getattr(module, norm_name)
        if foldable(conv, norm):
            setattr(module, conv_name, fold_batch_norm(conv, norm))
            setattr(module, norm_name, nn.Identity())
    for child in module.children():
        _fuse_children(child)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A fused, eval-mode deep copy of ``model`` for fast and export-friendly inference.

    Args:
        model: any ``nn.Module`` (every model of :func:`hmedn_fast.models.list_models` is covered). The input
            model is not modified.

    Returns:
        The fused copy, in eval mode, with ``requires_grad=False`` parameters and ``hmedn_fused = True``.
        Outputs equal ``model.eval()``'s within float rounding for every input shape and dtype the original
        accepts.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fused = copy.deepcopy(model).eval()
    _fuse_children(fused)
    for p in fused.parameters():
        p.requires_grad_(False)
    fused.hmedn_fused = True
    return fused
