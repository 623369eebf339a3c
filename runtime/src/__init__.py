"""The runtime: a paged-KV, continuously batched engine over one llama-family decoder."""

from lmconvert.runtime.engine import LLMEngine, RequestOutput
from lmconvert.runtime.sampling import SamplingParams

__all__ = ["LLMEngine", "RequestOutput", "SamplingParams"]
