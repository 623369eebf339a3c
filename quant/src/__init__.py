"""lmconvert.quant: AWQ W4A16 (+ GPTQ rounding), round-to-nearest W4 and INT8 W8A16 engines; perplexity eval."""

from lmconvert.quant.config import QuantConfig
from lmconvert.quant.quantize import QuantResult, quantize

__all__ = ["QuantConfig", "QuantResult", "quantize"]
