"""Matrix-level quantizers: Quant-dLLM (DAQ + ABMP + block compensation), RTN and GPTQ.

Every method returns a :class:`formats.qtensor.QuantizedTensor` (binary planes). See
``docs/quantizer.md`` for the math, the measured choices and the API.
"""

from .abmp import abmp_assign, abmp_assign_pooled, uniform_planes
from .api import QuantResult, error_stats, quantize_weight
from .config import QuantConfig
from .daq import block_scores, daq_block, daq_quantize
from .hessian import HessianAccumulator, inverse_hessian_factor
from .uniform import gptq_quantize, rtn_quantize

__all__ = [
    "QuantConfig",
    "QuantResult",
    "HessianAccumulator",
    "quantize_weight",
    "rtn_quantize",
    "gptq_quantize",
    "daq_quantize",
    "daq_block",
    "block_scores",
    "abmp_assign",
    "abmp_assign_pooled",
    "uniform_planes",
    "inverse_hessian_factor",
    "error_stats",
]
