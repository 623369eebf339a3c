"""Helpers shared by the kernel tests."""

import torch

FP32_UNIT_ROUNDOFF = 2.0 ** -24
# The int8-KV decode kernel dots fp16 codes offset by 1152 (exact, _fp16_codes) and removes the offset after
# the sums: its sums run over operands up to 1152 + 128 where the codes themselves are at most 128.
INT8_DECODE_OFFSET_GAIN = (1152 + 128) / 128


def attention_fp32_tol(head_dim: int, max_context: int, int8_kv: bool = False) -> float:
    """Relative error an fp32 attention may show against the exact result, whatever its summation order.
    An n-term fp32 sum rounds to within n * u of the sum of its terms' magnitudes (Higham, Accuracy and
    Stability of Numerical Algorithms, 3.1); a score sums head_dim products and an output max_context
    weighted values, and for the tests' random data signed and absolute sums are within a small factor.
    Measured errors sit 10-50x below this; a wrong page, mask, scale or zero point costs >= 1e-3."""
    tol = (head_dim + max_context) * FP32_UNIT_ROUNDOFF
    return tol * INT8_DECODE_OFFSET_GAIN if int8_kv else tol


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


class LaunchingTuner:
    """An Autotuner stand-in for CPU tests of the timing path, which only runs on CUDA: launches every
    candidate as timing would (the launcher runs them over cold weight copies), counts the launches, runs
    after_timing, and picks the first candidate."""

    def __init__(self):
        self.launched = 0

    def pick(self, key, candidates, launch, after_timing=None):
        for cfg in candidates:
            launch(cfg)
            self.launched += 1
        if after_timing is not None:
            after_timing()
        return candidates[0]
