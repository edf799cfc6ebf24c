"""qdllm-export: 2-bit quantization and export of diffusion language models (LLaDA, Dream)."""

__version__ = "0.1.0"
