"""Deployment: export S4ND models with dynamic input sizes or one fixed size (torch.export, ONNX) and check the
exported files; share weights in timm's Hugging Face Hub format with a model card that says to install and import
this package."""
from .export import export_onnx, onnx_latency
from .hub import model_card, push_to_hub, save_for_hf

__all__ = ['export_onnx', 'onnx_latency', 'model_card', 'save_for_hf', 'push_to_hub']
