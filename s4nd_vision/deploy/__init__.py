"""Deployment: export S4ND models with dynamic input sizes (torch.export, ONNX) and check the exported files."""
from .export import export_onnx, onnx_latency

__all__ = ['export_onnx', 'onnx_latency']
