from .convnext_s4nd import ConvNeXtS4ND
