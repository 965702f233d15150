from ._base import input_size_args
from .convnext_base import PAPER_SSM
from .convnext_s4nd import ConvNeXtS4ND
from .convnext_s4nd_3d import ConvNeXt3d
from .iso_s4nd import IsoS4ND
from .s4_seq import SeqS4ND
from .vit_s4nd import VisionTransformerS4ND
