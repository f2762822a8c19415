"""Exporters: verified ONNX export and the footprint report."""
