"""lmconvert.kernels: each public function runs Triton on CUDA tensors and its plain-torch reference on CPU."""

from .activation import silu_mul
from .kv_cache import store_kv
from .norm import rms_norm
from .qkv_store import rope_and_store
from .paged_attention import paged_attention
from .pending import PendingSum, take
from .quant_linear import prepare_w4, prepare_w8, w4a16_linear, w8a16_linear
from .rope import apply_rope, build_rope_cache
from .int8_linear import prepare_w8a8, quantize_per_token, w8a8_linear
from .moe import Experts, moe_experts, prepare_experts, route_topk

__all__ = ["Experts", "PendingSum", "apply_rope", "build_rope_cache", "paged_attention", "prepare_w4", "prepare_w8",
           "prepare_w8a8", "quantize_per_token", "rms_norm", "rope_and_store", "silu_mul", "store_kv", "take",
           "w4a16_linear", "w8a16_linear", "w8a8_linear", "moe_experts", "prepare_experts", "route_topk"]
