"""Mixture-of-experts models (issue #26): tiny random Qwen3-MoE (with a dense layer) and Mixtral built with
transformers, through convert, the runtime, continuous batching, quantization, GGUF and tensor parallelism."""

from __future__ import annotations

import json

import pytest
import torch

from lmconvert.engine import open_engine
from lmconvert.runtime import LLMEngine, SamplingParams
from tiny_models import MOE_ARCHS

GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_config_and_engine_layout(tiny_checkpoint, tiny_engine):
    """Experts are stored fused per layer ([E, 2I, H] gate ‖ up, [E, H, I] down) next to the router, in format 4;
    Qwen3-MoE's mlp_only_layers keep a dense MLP."""
    engine = open_engine(tiny_engine("qwen3_moe"), verify=True)
    cfg = engine.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 32)
    assert cfg.norm_topk_prob and cfg.dense_layers == [1]
    assert json.loads((engine.path / "config.json").read_text())["format_version"] == 4
    sd = hf_model(tiny_checkpoint("qwen3_moe")).state_dict()
    moe, dense = engine.layer_tensors(0), engine.layer_tensors(1)
    assert torch.equal(moe["router.weight"], sd["model.layers.0.mlp.gate.weight"])
    assert torch.equal(moe["experts.gate_up_proj.weight"], sd["model.layers.0.mlp.experts.gate_up_proj"])
    assert torch.equal(moe["experts.down_proj.weight"], sd["model.layers.0.mlp.experts.down_proj"])
    assert "gate_up_proj.weight" not in moe and "router.weight" not in dense
    assert dense["gate_up_proj.weight"].shape == (2 * 128, 64)

    mixtral = open_engine(tiny_engine("mixtral")).config
    assert mixtral.norm_topk_prob and mixtral.dense_layers == [] and mixtral.moe_intermediate_size == 64
    assert mixtral.sliding_window == 8


def test_dense_engine_config_has_no_moe_fields(tiny_engine):
    """A dense engine's config.json is what readers without MoE read (format 1, no new fields)."""
    config = json.loads((tiny_engine("qwen3") / "config.json").read_text())
    assert config["format_version"] == 1 and "num_experts" not in config


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_logits_match_transformers(arch, tiny_checkpoint, tiny_engine):
    engine = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=1024)
    ids = random_ids(40, seed=1)
    with torch.no_grad():
        ref = hf_model(tiny_checkpoint(arch))(torch.tensor([ids])).logits[0]
    assert (engine.logits(ids) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_tokens_match_transformers(arch, tiny_checkpoint, tiny_engine):
    engine = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=1024, block_size=4)
    prompt = random_ids(12, seed=2)
    with torch.no_grad():
        ref = hf_model(tiny_checkpoint(arch)).generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(prompt):]
    assert engine.generate([prompt], GREEDY)[0].token_ids == ref.tolist()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_batched_equals_solo(arch, tiny_engine):
    """Ragged prompts batched with chunked prefill and a shared prefix (prefix cache) give each one's solo tokens:
    routing is per token, so a token's experts never depend on its batch."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 33, 9)]
    prompts.append(prompts[2][:24] + [7, 8, 9])  # shares 3 blocks of 8 with prompt 2
    solo = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=2048, block_size=8)
    expected = [solo.generate([p], GREEDY)[0].token_ids for p in prompts]
    batched = LLMEngine(str(tiny_engine(arch)), device="cpu", num_cache_tokens=2048, block_size=8,
                        max_num_batched_tokens=24)
    assert [o.token_ids for o in batched.generate(prompts, GREEDY)] == expected


def test_checkpoint_runs_without_converting(tiny_checkpoint, tiny_engine):
    ids = random_ids(20, seed=4)
    from_ckpt = LLMEngine(str(tiny_checkpoint("mixtral")), device="cpu", dtype="fp32", num_cache_tokens=256)
    from_engine = LLMEngine(str(tiny_engine("mixtral")), device="cpu", num_cache_tokens=256)
    assert torch.equal(from_ckpt.logits(ids), from_engine.logits(ids))


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    from tiny_models import SENTENCES

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(SENTENCES * 6))
    return path


def _quantize(src, dst, calib_text, **kw):
    from lmconvert.quant import QuantConfig, quantize

    qc = QuantConfig(calib_data=str(calib_text), calib_samples=4, calib_seqlen=32, loss_tokens=64, device="cpu", **kw)
    return quantize(src, dst, qc)


def _logit_error(fp, q, ids) -> float:
    ref, out = fp.logits(ids), q.logits(ids)
    return ((out - ref).norm() / (ref - ref.mean(-1, keepdim=True)).norm()).item()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_quantized_moe_close_to_fp(arch, tiny_engine, tmp_path, calib_text):
    """W4 g32 with experts calibrated on their routed tokens beats round-to-nearest (measured: AWQ 3.8-8.9%,
    RTN 8.0-10.4% relative logit error); W8 per channel stays under 1% (0.6-0.7%)."""
    from lmconvert.quant.eval import open_for_eval

    ids = [5 + (7 * i) % 300 for i in range(48)]
    fp = open_for_eval(str(tiny_engine(arch)), 64)
    awq = _quantize(tiny_engine(arch), tmp_path / "awq", calib_text, bits=4, group_size=32)
    rtn = _quantize(tiny_engine(arch), tmp_path / "rtn", calib_text, bits=4, group_size=32, search_scale=False,
                    clip=False)
    w8 = _quantize(tiny_engine(arch), tmp_path / "w8", calib_text, bits=8)
    err_awq, err_rtn = (_logit_error(fp, open_for_eval(str(r.path), 64), ids) for r in (awq, rtn))
    assert err_awq < 0.10 and err_awq < err_rtn
    assert _logit_error(fp, open_for_eval(str(w8.path), 64), ids) < 0.01
    cfg = open_engine(awq.path).config
    # these texts route to most experts; Qwen2-MoE's decisive top-3 router leaves 2 of 8 a layer under-fed
    assert all(s.loss <= s.loss_rtn and s.expert_fallbacks <= cfg.num_experts // 4 for s in awq.layers)
    layer = open_engine(awq.path).layer_tensors(0)
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert layer["experts.gate_up_proj.qweight"].shape == (E, H // 8, 2 * I)
    assert layer["experts.down_proj.scales"].shape == (E, I // 32, H)
    assert layer["router.weight"].dtype == torch.float32 and "router.qweight" not in layer
    # the quantized engine runs batched like the fp one
    engine = LLMEngine(str(awq.path), device="cpu", num_cache_tokens=1024, block_size=8)
    prompts = [random_ids(n, seed=n) for n in (7, 19)]
    solo = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == solo


def test_experts_without_calibration_tokens_fall_back(tiny_engine, tmp_path, calib_text, monkeypatch):
    """An expert with too few routed tokens is rounded on the plain grid, counted, and reported."""
    from rich.console import Console

    from lmconvert.quant import moe_layer
    from lmconvert.quant.report import print_summary

    monkeypatch.setattr(moe_layer, "MIN_EXPERT_TOKENS", 10**9)
    result = _quantize(tiny_engine("qwen3_moe"), tmp_path / "w4", calib_text, bits=4, group_size=32)
    assert [s.expert_fallbacks for s in result.layers] == [8, 0]  # layer 1 is dense
    console = Console(record=True, width=200)
    print_summary(result, console)
    assert "8 expert(s) got fewer than" in console.export_text()


def test_w8a8_refuses_moe(tiny_engine, tmp_path):
    from lmconvert.errors import UserError
    from lmconvert.quant import QuantConfig, quantize

    with pytest.raises(UserError, match="mixture-of-experts"):
        quantize(tiny_engine("mixtral"), tmp_path / "w8a8", QuantConfig(bits=8, activation_bits=8, device="cpu"))
    assert not (tmp_path / "w8a8").exists()


def write_gguf(ckpt_dir, dst):
    """The tiny HF MoE checkpoint as llama.cpp's converter lays it out (F32): experts stacked per layer
    (ffn_{gate,up,down}_exps), router ffn_gate_inp; Mixtral as a "llama" with an expert count and permuted q/k;
    Qwen2-MoE with q/k/v biases and a shared expert (*_shexp, its gate a vector)."""
    import gguf
    from safetensors import safe_open

    hf = json.loads((ckpt_dir / "config.json").read_text())
    mixtral = hf["model_type"] == "mixtral"
    arch = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}[hf["model_type"]]
    with safe_open(ckpt_dir / "model.safetensors", "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    w = gguf.GGUFWriter(str(dst), arch)
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    n_experts = hf.get("num_local_experts") or hf["num_experts"]  # transformers writes either, by model
    for key, value in (("block_count", hf["num_hidden_layers"]), ("context_length", hf["max_position_embeddings"]),
                       ("embedding_length", hf["hidden_size"]), ("feed_forward_length", hf["intermediate_size"]),
                       ("attention.head_count", heads), ("attention.head_count_kv", kv_heads),
                       ("expert_count", n_experts), ("expert_used_count", hf["num_experts_per_tok"])):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", hf["rms_norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", hf["rope_parameters"]["rope_theta"])
    if not mixtral:
        w.add_uint32(f"{arch}.expert_feed_forward_length", hf["moe_intermediate_size"])
    if hf.get("head_dim"):
        w.add_uint32(f"{arch}.attention.key_length", hf["head_dim"])
    if hf.get("shared_expert_intermediate_size"):
        w.add_uint32(f"{arch}.expert_shared_feed_forward_length", hf["shared_expert_intermediate_size"])

    def permute(t, n):  # llama.cpp's rope layout for llama-arch q/k rows (what the loader undoes)
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    moe = "block_sparse_moe" if mixtral else "mlp"
    parts = {"w1": "gate", "w3": "up", "w2": "down"} if mixtral else {p: p[:-5] for p in ("gate_proj", "up_proj", "down_proj")}
    tensors = {names[k]: v for k, v in sd.items() if k in names}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate_inp": f"{moe}.gate",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                 "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                 "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
        for g, h in layer.items():
            for kind in ("weight", "bias"):
                if f"{p}{h}.{kind}" in sd:
                    t = sd[f"{p}{h}.{kind}"]
                    if mixtral and g in ("attn_q", "attn_k"):
                        t = permute(t, heads if g == "attn_q" else kv_heads)
                    tensors[f"blk.{i}.{g}.{kind}"] = t.flatten() if g == "ffn_gate_inp_shexp" else t
        if p + f"{moe}.gate.weight" in sd:
            for src, dst_name in parts.items():
                stacked = torch.stack([sd[p + f"{moe}.experts.{e}.{src}.weight"] for e in range(n_experts)])
                tensors[f"blk.{i}.ffn_{dst_name}_exps.weight"] = stacked
    for name, t in tensors.items():
        w.add_tensor(name, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_gguf_moe_round_trip(arch, tiny_checkpoint, tiny_engine, tmp_path):
    """HF -> GGUF (llama.cpp's MoE layout) -> lmconvert: the same config and the same engine tensors, bit for bit."""
    from lmconvert.convert import ConvertedModel
    from lmconvert.load import GGUFCheckpoint

    gguf_model = ConvertedModel(GGUFCheckpoint(write_gguf(tiny_checkpoint(arch), tmp_path / "m.gguf")), "fp32")
    engine = open_engine(tiny_engine(arch))
    assert gguf_model.ckpt.arch.name == arch
    for field in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "dense_layers",
                  "shared_expert_intermediate_size"):
        assert getattr(gguf_model.config, field) == getattr(engine.config, field), field
    for i in range(engine.config.num_layers):
        got, want = gguf_model.layer_tensors(i), engine.layer_tensors(i)
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (i, name)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_tp2_matches_tp1(arch, tiny_engine):
    """Every expert's intermediate dim split over 2 ranks (gloo), router replicated: tp=1's logits and tokens."""
    path = str(tiny_engine(arch))
    kw = dict(device="cpu", num_cache_tokens=512, block_size=4, max_num_batched_tokens=16)
    prompts = [random_ids(21, seed=1), random_ids(9, seed=2)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    one = LLMEngine(path, **kw)
    ids = random_ids(40, seed=3)
    ref_logits, ref_out = one.logits(ids), one.generate(prompts, params)
    two = LLMEngine(path, tp=2, **kw)
    try:
        assert (two.logits(ids) - ref_logits).abs().max().item() <= 1e-5
        assert [o.token_ids for o in two.generate(prompts, params)] == [o.token_ids for o in ref_out]
    finally:
        two.close()


def test_tp2_w4_experts_match_tp1(tmp_path):
    """W4 g32 experts: the row split of down_proj falls on group boundaries (I 64 / 2 ranks = one group each)."""
    from lmconvert.config import ModelConfig
    from lmconvert.convert import write_engine
    from lmconvert.load.random_weights import RandomModel

    cfg = ModelConfig(arch="qwen3_moe", vocab_size=321, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True, dtype="fp32", max_position_embeddings=512,
                      eos_token_ids=[256], num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      norm_topk_prob=True, dense_layers=[1])
    path = str(write_engine(RandomModel(cfg, {"bits": 4, "group_size": 32}), tmp_path / "e", False, "tiny moe w4"))
    ids = random_ids(30, seed=4)
    ref = LLMEngine(path, device="cpu", num_cache_tokens=256).logits(ids)
    two = LLMEngine(path, tp=2, device="cpu", num_cache_tokens=256)
    try:
        assert (two.logits(ids) - ref).abs().max().item() <= 1e-5
    finally:
        two.close()


def test_quantize_takes_a_model_source(tiny_engine, tmp_path):
    """quantize() reads any model source, e.g. random weights generated a layer at a time (how
    benchmarks/quantize_moe.py quantizes Qwen3-30B-A3B without a 61 GB bf16 engine on disk first)."""
    from lmconvert.load.random_weights import RandomModel
    from lmconvert.quant import QuantConfig, quantize

    cfg = open_engine(tiny_engine("qwen3_moe")).config
    qc = QuantConfig(bits=4, group_size=32, calib_samples=2, calib_seqlen=32, loss_tokens=32)
    result = quantize(RandomModel(cfg), tmp_path / "w4", qc)
    engine = open_engine(result.path, verify=True)
    assert engine.config.quantization["bits"] == 4 and len(result.layers) == cfg.num_layers
    assert engine.layer_tensors(0)["experts.down_proj.qweight"].shape[0] == cfg.num_experts


def test_moe_export_errors_name_the_expert(tiny_engine, tmp_path):
    """A random W4 MoE engine's scales are not exact in fp16: AutoAWQ export says which expert linear, and
    compressed-tensors (any scales) exports it (round trips: tests/test_interop_export.py)."""
    from lmconvert.convert import write_engine
    from lmconvert.errors import UserError
    from lmconvert.export import export
    from lmconvert.load.random_weights import RandomModel

    cfg = open_engine(tiny_engine("qwen3_moe")).config
    w4 = write_engine(RandomModel(cfg, {"bits": 4, "group_size": 32}), tmp_path / "w4", False, "w4")
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.experts\.0\.\w+_proj: scales are not exact in fp16"):
        export(w4, "autoawq", tmp_path / "awq")
    assert not (tmp_path / "awq").exists()
    assert (export(w4, "compressed-tensors", tmp_path / "ct") / "config.json").is_file()


def test_cli_random_moe_w4_bench_and_quantize(tiny_checkpoint, tmp_path):
    """The issue's commands at toy size: a random W4 MoE engine from a config (largest fitting group), benched;
    `quantize --w4` of an MoE checkpoint; `generate` on the result."""
    from cli_helpers import run

    result = run("convert", "qwen3_moe", "--from-config", tiny_checkpoint("qwen3_moe"), "--random-weights", "--w4",
                 "--dst-path", tmp_path / "r")
    assert result.exit_code == 0, result.output
    quant = json.loads((tmp_path / "r" / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4 and quant["group_size"] == 32  # moe_intermediate 32 allows no larger group
    result = run("bench", tmp_path / "r", "--mode", "latency", "--input-len", "16", "--output-len", "8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["decode_tok_s"] > 0
    result = run("quantize", "--w4", tiny_checkpoint("qwen3_moe"), "--dst-path", tmp_path / "q", "--calib-samples",
                 "4", "--calib-seqlen", "32")
    assert result.exit_code == 0, result.output
    assert "awq W4 g32" in result.output
    result = run("info", tmp_path / "q")
    assert "8 x 32 wide, top-2 renormalized, dense layers [1]" in result.output
    result = run("generate", tmp_path / "q", "--prompt", "The quick brown fox", "--max-new-tokens", "4",
                 "--temperature", "0")
    assert result.exit_code == 0 and result.stdout.strip(), result.output


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_experts_run_packed(bits, tiny_engine, tmp_path, calib_text, monkeypatch):
    """On CPU a W4 / W8 engine's experts are repacked at load for ATen's packed matmuls (no expert dequantized
    per call): the same logits as the engine layout through the reference (dequantize, then matmul), and the
    same greedy tokens."""
    from lmconvert import kernels
    from lmconvert.runtime import SamplingParams

    q = _quantize(tiny_engine("qwen3_moe"), tmp_path / "q", calib_text, bits=bits,
                  **({"group_size": 32, "search_scale": False, "clip": False} if bits == 4 else {}))
    kw = {"device": "cpu", "num_cache_tokens": 512, "block_size": 8}
    packed = LLMEngine(str(q.path), **kw)
    experts = packed.runner.model.layers[0].mlp.gate_up_proj.experts
    assert experts.packed and (experts.qweight.dtype == torch.uint8 if bits == 4 else experts.scales.dim() == 2)
    monkeypatch.setattr(kernels, "prepare_experts", lambda w: w)
    reference = LLMEngine(str(q.path), **kw)
    assert not reference.runner.model.layers[0].mlp.gate_up_proj.experts.packed
    ids = [5 + (7 * i) % 300 for i in range(40)]
    ref, out = reference.logits(ids), packed.logits(ids)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert packed.generate([ids[:8]], params)[0].token_ids == reference.generate([ids[:8]], params)[0].token_ids
