"""HMEDN model family: DilNet, DstNet, HRDN, HMEDN (2D/3D) and the U-Net baselines."""
from .base import SegmentationModel
from .dilnet import DilNet
from .hmedn import HMEDN
from .output import SegmentationOutput
from .registry import MODELS, count_parameters, create_model, list_models
from .unet import UNet

__all__ = ["create_model", "list_models", "count_parameters", "MODELS", "SegmentationOutput", "SegmentationModel",
           "HMEDN", "DilNet", "UNet"]
