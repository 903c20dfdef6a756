"""Drop-in HMEDN layers for 2D and 3D networks."""
from .blocks import DenseBlock, ResidualDilatedBlock
from .layers import ConvNormReLU, xavier_init
from .pathways import DistillingPathway, HRPathway

__all__ = ["ResidualDilatedBlock", "DenseBlock", "HRPathway", "DistillingPathway", "ConvNormReLU", "xavier_init"]
