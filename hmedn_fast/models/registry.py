"""Named model configurations (one per row of the paper's tables) and ``create_model`` / ``list_models``.

The widths and growth rates were chosen so that the parameter counts land within 5% of the paper's
(SPEC section 4); ``docs/DECISIONS.md`` lists the measured counts.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

from torch import nn

from .dilnet import DilNet
from .hmedn import HMEDN
from .unet import UNet

W2D = (32, 64, 128, 256, 512)
G2D = (12, 16, 24, 32, 48)
W3D = (16, 32, 64, 128, 256)
HR_CHANNELS_2D = {1: 32, 2: 40, 3: 56, 4: 72}


class ModelSpec(NamedTuple):
    cls: Callable[..., nn.Module]
    defaults: dict[str, Any]
    spatial_dims: int
    paper_params_m: float | None
    description: str


def _twod(**kw) -> dict[str, Any]:
    return dict(in_channels=5, num_classes=4, spatial_dims=2, **kw)


def _threed(**kw) -> dict[str, Any]:
    return dict(in_channels=4, num_classes=4, spatial_dims=3, **kw)


_DST2D = dict(widths=W2D, growth_rates=G2D, num_layers=4)

MODELS: dict[str, ModelSpec] = {
    "dilnet1": ModelSpec(DilNet, _twod(num_blocks=9, dilations=(3, 5)), 2, None, "9 residual dilated blocks (3, 5)"),
    "dilnet2": ModelSpec(DilNet, _twod(num_blocks=9, dilations=(2, 4)), 2, None, "9 residual dilated blocks (2, 4)"),
    "dilnet3": ModelSpec(DilNet, _twod(num_blocks=6, dilations=(3, 5)), 2, None, "6 residual dilated blocks (3, 5)"),
    "dstnet1": ModelSpec(HMEDN, _twod(**_DST2D), 2, 3.2, "distilling network, 4 downsamplings"),
    "dstnet2": ModelSpec(HMEDN, _twod(widths=W2D[:4], growth_rates=G2D[:4], num_layers=4), 2, None,
                         "distilling network, 3 downsamplings"),
    **{f"hrdn_l{s}": ModelSpec(HMEDN, _twod(**_DST2D, hr_stage=s, hr_channels=HR_CHANNELS_2D[s]), 2,
                               3.38 if s == 1 else None, f"DstNet1 + HR pathway (L={HR_CHANNELS_2D[s]}) at stage {s}")
       for s in (1, 2, 3, 4)},
    "hmedn_2d": ModelSpec(HMEDN, _twod(**_DST2D, hr_stage=3, hr_channels=56, contour=True), 2, 3.78,
                          "HRDN-L3 + contour head (train with HMEDNLoss)"),
    "hmedn_3d_l2": ModelSpec(HMEDN, _threed(widths=W3D, growth_rates=(16, 16, 24, 32, 40), num_layers=4, hr_stage=2,
                                            hr_channels=32, contour=True, dropout=0.1), 3, 4.39,
                             "3D HMEDN, HR pathway (L=32) at stage 2"),
    "hmedn_3d_l3": ModelSpec(HMEDN, _threed(widths=W3D, growth_rates=(16, 32, 48, 48, 64), num_layers=4, hr_stage=3,
                                            hr_channels=64, contour=True, dropout=0.1), 3, 9.64,
                             "3D HMEDN, HR pathway (L=64) at stage 3"),
    "unet_2d": ModelSpec(UNet, _twod(widths=(52, 104, 208, 416, 832)), 2, 20.54, "U-Net baseline"),
    "unet_3d": ModelSpec(UNet, _threed(widths=W3D), 3, None, "3D U-Net baseline"),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODELS)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a named model with the paper's defaults, any constructor argument overridable.

    Example: ``create_model("hmedn_2d", in_channels=1, num_classes=3, norm="instance")``.

    The returned model carries ``model.hmedn_config = {"name": ..., "overrides": {...}}`` so that
    :func:`hmedn_fast.models.io.save_model` can rebuild it.

    Raises:
        ValueError: unknown name.
        TypeError: an override the model's constructor does not take.
    """
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; available: {', '.join(list_models())}")
    spec = MODELS[name]
    accepted = set(inspect.signature(spec.cls).parameters)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(f"create_model({name!r}) got unexpected override(s) {unknown}; "
                        f"accepted: {sorted(accepted)}")
    model = spec.cls(**{**spec.defaults, **overrides})
    model.hmedn_config = {"name": name, "overrides": dict(overrides)}
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
