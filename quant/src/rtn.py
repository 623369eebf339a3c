"""Calibration-free quantization of one layer: W4 round-to-nearest (the AWQ baseline) and INT8 W8A16."""

from __future__ import annotations

import torch

from lmconvert.arch import EXPERT_LINEARS, SHARED_EXPERT_LINEARS
from lmconvert.quant.layer import LINEARS
from lmconvert.quant.primitives import quantize_w4, quantize_w8


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, dtype: torch.dtype,
                    chunk_rows: int | None = None) -> dict[str, torch.Tensor]:
    """One nn.Linear weight [N, K] rounded to nearest -> its engine tensors (qweight, scales[, zeros]), N last.
    chunk_rows: output rows quantized at a time (an lm_head's 150k rows in fp32 temporaries would take GBs)."""
    parts = []
    for rows in w.split(chunk_rows or w.shape[0]):
        if bits == 4:
            parts.append(dict(zip(("qweight", "scales", "zeros"), quantize_w4(rows, group_size, symmetric, dtype))))
        else:
            qweight, scales = quantize_w8(rows, group_size, dtype)
            parts.append({"qweight": qweight, "scales": scales})
    return {k: torch.cat([p[k] for p in parts], dim=-1).contiguous() for k in parts[0]}


def quantize_layer_plain(tensors: dict[str, torch.Tensor], bits: int, group_size: int | None, symmetric: bool,
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Engine tensors of one layer with every decoder linear (each expert's too) rounded to nearest; the rest
    (norms, biases, the router) cast to dtype."""
    out = {}
    for name, t in tensors.items():
        module, attr = name.rsplit(".", 1)
        if module in LINEARS + SHARED_EXPERT_LINEARS and attr == "weight":
            out.update({f"{module}.{k}": v for k, v in quantize_weight(t, bits, group_size, symmetric, dtype).items()})
        elif module in EXPERT_LINEARS and attr == "weight":
            per_expert = [quantize_weight(w, bits, group_size, symmetric, dtype) for w in t]
            out.update({f"{module}.{k}": torch.stack([p[k] for p in per_expert]) for k in per_expert[0]})
        else:
            out[name] = t.to(dtype)
    return out
