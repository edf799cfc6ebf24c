"""Runtime weight grids (ggml types, MatMulNBits) and the one calibrated driver that fits them (DESIGN section 9)."""

from .base import Grid, GridConfig, GridResult, grid_quantize

__all__ = ["Grid", "GridConfig", "GridResult", "grid_quantize"]
