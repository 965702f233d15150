"""S4ND (multidimensional state-space global convolutions) for the timm ecosystem.

Importing the package registers its models with timm.
"""
from . import layers, models
from .layers import S4ND

__version__ = '0.1.0'
