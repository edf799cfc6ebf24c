"""Torch-free file formats of qdllm-export: the quantized-tensor contract, model-family tables,
quantized checkpoints, GGUF and ONNX. Nothing in this package imports torch."""
