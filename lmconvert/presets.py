"""Model shapes for `convert --from-config PRESET --random-weights` (real sizes, no weights); no torch here,
so the CLI can list them in its help."""

_QWEN3 = dict(arch="qwen3", vocab_size=151936, head_dim=128, rope_theta=1e6, max_position_embeddings=40960,
              rms_norm_eps=1e-6, qk_norm=True, eos_token_ids=[151645, 151643])
PRESETS = {
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_layers=28, num_heads=16, num_kv_heads=8,
                       tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8),
    "qwen3-32b": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_layers=64, num_heads=64, num_kv_heads=8),
    "llama3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=5e5, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, eos_token_ids=[128001, 128009]),
    "qwen2.5-72b": dict(arch="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
                        num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=32768,
                        rms_norm_eps=1e-6, qkv_bias=True, eos_token_ids=[151645, 151643]),
}
# mixture of experts: Qwen3-MoE's dense intermediate_size is unused (no mlp_only_layers), kept as its config has it
PRESETS["qwen3-30b-a3b"] = dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
                                num_kv_heads=4, arch="qwen3_moe", num_experts=128, num_experts_per_tok=8,
                                moe_intermediate_size=768, norm_topk_prob=True)
PRESETS["qwen3-235b-a22b"] = dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_layers=94, num_heads=64,
                                  num_kv_heads=4, arch="qwen3_moe", num_experts=128, num_experts_per_tok=8,
                                  moe_intermediate_size=1536, norm_topk_prob=True)
PRESETS["mixtral-8x7b"] = dict(arch="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                               num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                               max_position_embeddings=32768, rms_norm_eps=1e-5, bos_token_id=1, eos_token_ids=[2],
                               num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336, norm_topk_prob=True)
# Qwen's own W4 releases of the 72B pad the MLP to 29696 (232 groups of 128): 29568 splits over no tp > 1 at g128
PRESETS["qwen2.5-72b-awq"] = dict(PRESETS["qwen2.5-72b"], intermediate_size=29696)
