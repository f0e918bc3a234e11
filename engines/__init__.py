"""Inference engines (ONNX Runtime, torch, TensorRT) behind one protocol; see DESIGN 3.5."""
