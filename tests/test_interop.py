"""Importing AutoAWQ / GPTQ / compressed-tensors checkpoints: bit-exact dequantized weights and logits."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lmconvert.convert import convert
from lmconvert.engine import open_engine
from lmconvert.errors import UserError
from lmconvert.quant.primitives import unpack_int4
from test_interop_packers import (LINEAR_SUFFIXES, load_ct_dequantized, write_awq, write_compressed_tensors,
                                  write_gptq)

IDS = [1, 5, 17, 42, 99, 7, 3, 250, 11, 64]
SPLITS = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o_proj": ("self_attn", ("o_proj",)),
          "gate_up_proj": ("mlp", ("gate_proj", "up_proj")), "down_proj": ("mlp", ("down_proj",))}


def engine_weights(path) -> dict[str, torch.Tensor]:
    """Engine W4 linears dequantized in fp32, split back to HF names: {name: W [N, K]}."""
    eng = open_engine(path)
    G = eng.config.quantization["group_size"]
    out = {}
    for i in range(eng.config.num_layers):
        t = eng.layer_tensors(i)
        for module, (block, parts) in SPLITS.items():
            q = unpack_int4(t[f"{module}.qweight"]).float()
            s = t[f"{module}.scales"].float().repeat_interleave(G, 0)
            z = t[f"{module}.zeros"].float().repeat_interleave(G, 0)
            w = ((q - z) * s).t()
            if f"{module}.input_perm" in t:  # act-order: engine input column k is the source's column perm[k]
                perm, w_sorted = t[f"{module}.input_perm"].long(), w
                w = torch.empty_like(w_sorted)
                w[:, perm] = w_sorted
            sizes = [eng.config.q_size, eng.config.kv_size, eng.config.kv_size] if module == "qkv_proj" else (
                [eng.config.intermediate_size] * 2 if module == "gate_up_proj" else [w.shape[0]])
            for part, piece in zip(parts, w.split(sizes)):
                out[f"model.layers.{i}.{block}.{part}.weight"] = piece
    return out


def engine_logits(path) -> torch.Tensor:
    from lmconvert.runtime import LLMEngine

    return LLMEngine(str(path), device="cpu").logits(IDS)


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float()


def reference_model(src, refs: dict):
    """The fp checkpoint with every quantized linear replaced by its reference dequantized weight."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, w in refs.items():
            state[name].copy_(w)
    return model


def check(engine, refs, reference, exact=True):
    got = engine_weights(engine)
    assert set(got) == set(refs)
    for name, w in refs.items():
        assert torch.equal(got[name], w.float()), name
    torch.testing.assert_close(engine_logits(engine), hf_logits(reference), rtol=1e-4, atol=1e-4)


def test_awq_gemm_import(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2")
    ckpt, refs = write_awq(src, tmp_path / "awq")
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    q = open_engine(engine).config.quantization
    assert (q["method"], q["bits"], q["group_size"], q["zero_point"]) == ("awq-import", 4, 32, True)
    check(engine, refs, reference_model(src, refs))


@pytest.mark.parametrize("sym,fmt", [(True, "gptq"), (False, "gptq"), (False, "gptq_v2")])
def test_gptq_import(tiny_checkpoint, tmp_path, sym, fmt):
    src = tiny_checkpoint("llama")
    ckpt, refs = write_gptq(src, tmp_path / "gptq", sym=sym, fmt=fmt)
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    assert open_engine(engine).config.quantization["zero_point"] is (not sym)
    check(engine, refs, reference_model(src, refs))


def undo_intermediate_order(got: dict, refs: dict) -> dict:
    """down_proj's act-order sort reorders the intermediate channels (gate/up rows, down_proj columns) alike:
    find that order from gate_proj's rows and undo it."""
    out = dict(got)
    for gate in (k for k in got if k.endswith("gate_proj.weight")):
        order = torch.tensor([torch.nonzero((refs[gate] == row).all(1))[0, 0] for row in got[gate]])
        prefix = gate.removesuffix("gate_proj.weight")
        for part, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            name = f"{prefix}{part}.weight"
            out[name] = torch.empty_like(got[name]).index_copy_(dim, order, got[name])
    return out


@pytest.mark.parametrize("arch,act_order", [("qwen3", ("down_proj.weight",)), ("llama", LINEAR_SUFFIXES),
                                            ("qwen3", LINEAR_SUFFIXES), ("qwen2", LINEAR_SUFFIXES)])
def test_gptq_act_order_imports_exactly(tiny_checkpoint, tmp_path, arch, act_order):
    """Random act-order g_idx: input rows sorted by group, input_perm on q/k/v, o_proj and gate/up; down_proj's
    order folded into gate/up's output rows. Dequantized weights equal the source's once the orders are undone."""
    src = tiny_checkpoint(arch)
    ckpt, refs = write_gptq(src, tmp_path / "gptq", act_order=act_order)
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    perms = {k for k in open_engine(engine).layer_tensors(0) if k.endswith("input_perm")}
    full = act_order == LINEAR_SUFFIXES
    assert perms == ({"qkv_proj.input_perm", "o_proj.input_perm", "gate_up_proj.input_perm"} if full else set())
    assert json.loads((engine / "config.json").read_text())["format_version"] == (2 if full else 1)
    got = undo_intermediate_order(engine_weights(engine), refs)
    assert got.keys() == refs.keys()
    for name, w in refs.items():
        assert torch.equal(got[name], w), name
    torch.testing.assert_close(engine_logits(engine), hf_logits(reference_model(src, refs)), rtol=1e-4, atol=1e-4)


def test_gptq_act_order_that_differs_between_fused_linears_is_refused(tiny_checkpoint, tmp_path):
    ckpt, _ = write_gptq(tiny_checkpoint("llama"), tmp_path / "gptq", act_order=("q_proj.weight", "k_proj.weight"),
                         shared=False)
    with pytest.raises(UserError, match="act-order g_idx differs"):
        convert(str(ckpt), str(tmp_path / "engine"))


def test_input_perm_engine_is_refused_by_a_version_1_reader(tiny_checkpoint, tmp_path, monkeypatch):
    from lmconvert.engine import format as fmt

    ckpt, _ = write_gptq(tiny_checkpoint("llama"), tmp_path / "gptq", act_order=("o_proj.weight",))
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    monkeypatch.setattr(fmt, "READ_VERSIONS", (1,))
    with pytest.raises(UserError, match="engine format 2 is not supported"):
        open_engine(engine)


def test_gptq_act_order_tensor_parallel(tiny_checkpoint, tmp_path):
    """tp=2: q/k/v and gate/up perms stay whole (column-parallel); o_proj's splits when it keeps each rank's
    half of the heads in place, and is refused otherwise."""
    from lmconvert.runtime import LLMEngine
    from lmconvert.runtime.tp import ShardedSource

    src = tiny_checkpoint("qwen3")
    gen = torch.Generator().manual_seed(1)
    halves = torch.cat([torch.randperm(32, generator=gen), torch.randperm(32, generator=gen) + 32])
    ckpt, _ = write_gptq(src, tmp_path / "ok", act_order=LINEAR_SUFFIXES, perms={"o_proj.weight": halves})
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    ref = LLMEngine(str(engine), device="cpu", num_cache_tokens=256).logits(IDS)
    two = LLMEngine(str(engine), device="cpu", num_cache_tokens=256, tp=2)
    try:
        assert (two.logits(IDS) - ref).abs().max().item() <= 1e-5
    finally:
        two.close()
    ckpt, _ = write_gptq(src, tmp_path / "bad", act_order=LINEAR_SUFFIXES)
    crossing = convert(str(ckpt), str(tmp_path / "crossing"))
    with pytest.raises(UserError, match="crosses the --tp 2 shard boundaries"):
        ShardedSource(open_engine(crossing), 0, 2).layer_tensors(0)


@pytest.mark.parametrize("G,sym", [(32, False), (32, True), (None, False), (None, True)])
def test_compressed_tensors_import(tiny_checkpoint, tmp_path, G, sym):
    ckpt = write_compressed_tensors(tiny_checkpoint("qwen2"), tmp_path / "ct", G=G, sym=sym)
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    q = open_engine(engine).config.quantization
    assert (q["method"], q["zero_point"], q["group_size"]) == ("compressed-tensors-import", not sym, 32 if G else 64)
    reference = load_ct_dequantized(ckpt)  # decompressed by transformers + compressed-tensors
    refs = {k: v for k, v in reference.state_dict().items() if k.endswith("_proj.weight") and "layers" in k}
    check(engine, refs, reference)


def test_bad_inputs_are_one_line_errors(tiny_checkpoint, tmp_path):
    from lmconvert.cli import main

    src = tiny_checkpoint("llama")
    cases = {"3-bit": write_gptq(src, tmp_path / "g3", bits=3)[0],
             "GEMM": write_awq(src, tmp_path / "gemv", version="gemv")[0]}
    for needle, ckpt in cases.items():
        result = CliRunner().invoke(main, ["convert", "auto", str(ckpt), "--dst-path", str(tmp_path / "e")])
        assert result.exit_code == 1 and needle in result.output and result.output.count("\n") == 1, result.output


def test_dtype_that_loses_scales_is_refused(tiny_checkpoint, tmp_path):
    ckpt, _ = write_awq(tiny_checkpoint("llama"), tmp_path / "awq")
    with pytest.raises(UserError, match="not exact"):
        convert(str(ckpt), str(tmp_path / "engine"), dtype="bf16")
