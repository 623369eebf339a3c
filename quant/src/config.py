"""What to quantize and how: QuantConfig, its checks against a model, and the engine's `quantization` block."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmconvert.config import W4_GROUP_SIZES, ModelConfig, largest_group_size, with_quantized_head
from lmconvert.errors import UserError



@dataclass(slots=True)
class QuantConfig:
    bits: int = 4  # 4: AWQ / RTN W4A16, 8: INT8 W8A16 (or W8A8 with activation_bits 8)
    activation_bits: int = 16  # 8: SmoothQuant W8A8, dynamic per-token int8 activations
    alpha: float = 0.5  # SmoothQuant migration strength: s = max|x|^alpha / max|w|^(1 - alpha)
    group_size: int | None = None  # W4: None = the largest of W4_GROUP_SIZES that fits; W8: None = per channel
    integer_zeros: bool = False  # W4: zero points on the integer grid 0..15, as AutoAWQ / compressed-tensors store
    symmetric: bool = False  # W4 only; W8 is always symmetric
    search_scale: bool = True  # AWQ per-input-channel scale search
    clip: bool = True  # AWQ weight-clipping search
    gptq: bool = False  # error-compensating rounding (GPTQ) on the AWQ grid, instead of nearest (see docs)
    quantize_lm_head: bool = False  # lm_head too: INT8 per output channel, round to nearest (engine format 3)
    calib_data: str | None = None  # .txt / .jsonl / dir; None = the shipped lmconvert.calibration_data
    calib_samples: int = 16
    calib_seqlen: int = 512
    loss_tokens: int = 512  # calibration tokens the scale search evaluates block outputs on
    grid: int = 10  # scale-search points (exponents 0, 1/grid, ...); the grid fit's range search: grid // 2 cuts per end
    device: str = "cpu"
    seed: int = 0

    @property
    def method(self) -> str:
        if self.activation_bits == 8:
            return "smoothquant"
        if self.bits == 8:
            return "int8"
        return "awq" if self.needs_calibration else "rtn"

    @property
    def needs_calibration(self) -> bool:
        return self.activation_bits == 8 or (self.bits == 4 and (self.search_scale or self.clip))

    def for_model(self, cfg: ModelConfig) -> "QuantConfig":
        """This config with its defaults that depend on the model filled in (W4's group size), checked."""
        qc = self
        if self.bits == 4 and self.activation_bits == 16 and self.group_size is None:
            fits = largest_group_size(cfg)
            if fits is None:
                raise UserError(f"no W4 group size ({', '.join(map(str, W4_GROUP_SIZES))}) divides every linear's "
                                f"input size ({', '.join(f'{k} {v}' for k, v in cfg.linear_input_dims.items())})")
            qc = dataclasses.replace(self, group_size=fits)
        qc.validate(cfg)
        return qc

    def validate(self, cfg: ModelConfig) -> None:
        """Raise UserError for a combination that cannot be quantized; checked before anything is written."""
        if self.bits not in (4, 8):
            raise UserError("choose --w4 or --w8")
        if self.activation_bits not in (8, 16):
            raise UserError(f"activation bits {self.activation_bits}: 16, or 8 with --w8a8")
        if self.activation_bits == 8:
            self._validate_w8a8()
            if cfg.num_experts:
                raise UserError("--w8a8 does not take mixture-of-experts models yet (the experts' kernels are "
                                "weight-only): use --w4 or --w8")
        if self.quantize_lm_head and self.activation_bits == 8:
            raise UserError("--quant-lm-head goes with --w4 or --w8: W8A8 keeps lm_head in 16 bits")
        if cfg.quantization:
            raise UserError(f"the source is already quantized ({cfg.quantization.get('method', '?')}, "
                            f"{cfg.quantization.get('bits', '?')} bits): quantize the full-precision model")
        if self.bits == 4 and self.group_size not in W4_GROUP_SIZES:
            raise UserError(f"--group-size {self.group_size}: W4 supports {', '.join(map(str, W4_GROUP_SIZES))}")
        if self.group_size is not None and self.group_size <= 0:
            raise UserError(f"--group-size must be positive, got {self.group_size}")
        if self.calib_samples <= 0 or self.calib_seqlen < 2:
            raise UserError("--calib-samples must be positive and --calib-seqlen at least 2")
        if self.integer_zeros and (self.bits != 4 or self.symmetric):
            raise UserError("--integer-zeros goes with asymmetric --w4 (a symmetric grid's zero point is 8 already)")
        for name, dim in cfg.linear_input_dims.items():
            if self.group_size and dim % self.group_size:
                fits = [g for g in (W4_GROUP_SIZES if self.bits == 4 else (128, 64, 32, 16)) if dim % g == 0]
                hint = f"use --group-size {fits[0]}" if fits else "no supported group size divides it"
                raise UserError(f"--group-size {self.group_size} does not divide {name}'s input size {dim}: {hint}")
            if self.bits == 4 and dim % 8:
                raise UserError(f"{name}'s input size {dim} is not a multiple of 8: W4 packing needs one")

    def _validate_w8a8(self) -> None:
        if self.bits != 8:
            raise UserError("--w8a8 quantizes weights to 8 bits: drop --w4")
        if self.group_size is not None:
            raise UserError("--w8a8 uses one weight scale per output channel: drop --group-size")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha must lie in [0, 1], got {self.alpha}")

    def block(self) -> dict:
        """The `quantization` entry of the engine's config.json."""
        if self.activation_bits == 8:
            return {"method": "smoothquant", "bits": 8, "activation_bits": 8, "activation_scheme": "dynamic_per_token",
                    "group_size": None, "zero_point": False, "alpha": self.alpha, "modules_not_converted": ["lm_head"]}
        block = {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                 "zero_point": self.bits == 4 and not self.symmetric, "modules_not_converted": ["lm_head"]}
        return with_quantized_head(block) if self.quantize_lm_head else block

