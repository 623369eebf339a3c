"""Calibration-free quantization of one layer: W4 round-to-nearest (the AWQ baseline) and INT8 W8A16."""

from __future__ import annotations

import torch

from lmconvert.quant.layer import LINEARS
from lmconvert.quant.primitives import quantize_w4, quantize_w8


def quantize_layer_plain(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None, symmetric: bool,
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Engine tensors of one layer with every decoder linear rounded to nearest; the rest cast to dtype."""
    out = {}
    for name, t in tensors.items():
        module, attr = name.rsplit(".", 1)
        if module not in LINEARS or attr != "weight":
            out[name] = t.to(dtype)
        elif bits == 4:
            out.update(zip((f"{module}.qweight", f"{module}.scales", f"{module}.zeros"),
                           quantize_w4(t, group_size, symmetric, dtype)))
        else:
            qweight, scales = quantize_w8(t, group_size, dtype)
            out.update({f"{module}.qweight": qweight.contiguous(), f"{module}.scales": scales})
    return out
