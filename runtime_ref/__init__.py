"""Torch-free reference runtime: NumPy forward passes, onnxruntime sessions and the diffusion
samplers shared by every backend. Nothing in this package imports torch."""
