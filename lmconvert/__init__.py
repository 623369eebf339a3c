"""lmconvert: load → convert → quantize → engine directory → runtime → kernels."""

__version__ = "0.1.0"
