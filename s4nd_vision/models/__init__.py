from .convnext_s4nd import ConvNeXtS4ND
from .convnext_s4nd_3d import ConvNeXt3d
from .vit_s4nd import VisionTransformerS4ND
