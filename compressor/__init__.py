"""compress: sensitivity-based pruning, real shrinking and verified ONNX export for PyTorch models."""

from .errors import CompressError

__all__ = ["CompressError"]
