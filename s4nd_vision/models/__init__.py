from .convnext_s4nd import ConvNeXtS4ND
from .vit_s4nd import VisionTransformerS4ND
