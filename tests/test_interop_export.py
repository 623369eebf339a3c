"""`lmconvert export`: W4 engines -> AutoAWQ / compressed-tensors checkpoints, loaded back and compared."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_interop import engine_logits, engine_weights, hf_logits
from test_interop_packers import load_ct_dequantized, write_awq, write_gptq
from tiny_models import MOE_ARCHS

from lmconvert.cli import main
from lmconvert.convert import convert
from lmconvert.engine import open_engine
from lmconvert.errors import UserError
from lmconvert.export import export


@pytest.fixture(scope="module")
def awq_engine(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    ckpt, _ = write_awq(tiny_checkpoint("qwen2"), tmp / "awq")
    return convert(str(ckpt), str(tmp / "engine"))


@pytest.fixture(scope="module")
def sym_engine(tiny_engine, tmp_path_factory):
    """A symmetric RTN W4 engine made by lmconvert's own quantizer (integer zero points 8)."""
    from lmconvert.quant import QuantConfig, quantize

    dst = tmp_path_factory.mktemp("sym") / "engine"
    qc = QuantConfig(bits=4, group_size=32, symmetric=True, search_scale=False, clip=False)
    quantize(str(tiny_engine("qwen3")), str(dst), qc)
    return dst


@pytest.fixture(scope="module")
def intzero_engine(tiny_engine, tmp_path_factory):
    """lmconvert's default AWQ (scale search, grid fit) kept to integer zero points: `quantize --integer-zeros`."""
    from lmconvert.quant import QuantConfig, quantize

    dst = tmp_path_factory.mktemp("intzero") / "engine"
    result = quantize(str(tiny_engine("qwen3")), str(dst), QuantConfig(bits=4, group_size=32, integer_zeros=True))
    # the fit still beats round-to-nearest on every layer's output, with zero points it may not move freely
    assert all(stats.loss < stats.loss_rtn for stats in result.layers), [(s.loss, s.loss_rtn) for s in result.layers]
    return dst


def test_default_awq_engine_names_integer_zeros_when_it_cannot_export(tiny_engine, tmp_path):
    from lmconvert.quant import QuantConfig, quantize

    quantize(str(tiny_engine("qwen3")), str(tmp_path / "awq"), QuantConfig(bits=4, group_size=32))
    result = CliRunner().invoke(main, ["export", str(tmp_path / "awq"), "--format", "autoawq",
                                       "--dst-path", str(tmp_path / "out")])
    assert result.exit_code == 1 and "quantize with --integer-zeros to export" in result.stderr
    assert not (tmp_path / "out").exists()


def same_engines(a, b):
    ea, eb = open_engine(a), open_engine(b)
    for i in range(ea.config.num_layers):
        ta, tb = ea.layer_tensors(i), eb.layer_tensors(i)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (i, k)


@pytest.mark.parametrize("which", ["awq_engine", "sym_engine", "intzero_engine"])
def test_export_compressed_tensors_loads_in_transformers(which, request, tmp_path):
    engine = request.getfixturevalue(which)
    result = CliRunner().invoke(main, ["export", str(engine), "--format", "compressed-tensors",
                                       "--dst-path", str(tmp_path / "ct")])
    assert result.exit_code == 0, result.output
    model = load_ct_dequantized(tmp_path / "ct")
    state = model.state_dict()
    for name, w in engine_weights(engine).items():
        assert torch.equal(state[name].float(), w), name
    torch.testing.assert_close(hf_logits(model), engine_logits(engine), rtol=1e-4, atol=1e-4)
    same_engines(engine, convert(str(tmp_path / "ct"), str(tmp_path / "again")))  # round trip, bit for bit


def test_export_autoawq_round_trip(awq_engine, tmp_path):
    dst = export(awq_engine, "autoawq", tmp_path / "awq")
    again = convert(str(dst), str(tmp_path / "again"))
    same_engines(awq_engine, again)
    torch.testing.assert_close(engine_logits(again), engine_logits(awq_engine), rtol=0, atol=0)
    assert_awq_files_hold(dst, 32, engine_weights(awq_engine))


def read_safetensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_awq_files_hold(dst, G, want: dict[str, torch.Tensor]):
    """Independent check of the AWQ packing: compressed-tensors' own AutoAWQ converter reads our files and every
    linear of `want` ({HF weight name: W [N, K]}) comes out bit for bit."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    ct = AutoAWQConverter(group_size=G).process(read_safetensors(dst))
    for name, w in want.items():
        prefix = name.removesuffix(".weight")
        N, K = w.shape
        q = unpack_from_int32(ct[f"{prefix}.weight_packed"], 4, torch.Size([N, K])).float()
        z = unpack_from_int32(ct[f"{prefix}.weight_zero_point"], 4, torch.Size([N, K // G]), packed_dim=0).float()
        s = ct[f"{prefix}.weight_scale"].float()
        assert torch.equal((q - z.repeat_interleave(G, 1)) * s.repeat_interleave(G, 1), w.float()), name


def assert_ct_files_hold(dst, G, want: dict[str, torch.Tensor]):
    """compressed-tensors' own decompressor on each linear of `want` (transformers 5 cannot load per-expert
    pack-quantized experts into its fused expert parameters, so MoE files are checked linear by linear)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=G)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors = read_safetensors(dst)
    for name, w in want.items():
        prefix = name.removesuffix(".weight")
        state = {k: tensors[f"{prefix}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                        "weight_shape")}
        assert torch.equal(PackedQuantizationCompressor.decompress(state, scheme)["weight"].float(), w.float()), name


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_export_moe_round_trip(tiny_checkpoint, tmp_path, arch):
    """A W4 mixture-of-experts engine (imported AutoAWQ; routers and Qwen2-MoE's shared_expert_gate in full
    precision) -> both formats: every expert back under its own HF name, read bit for bit by compressed-tensors'
    code, and imported again into the same engine and config."""
    ckpt, refs = write_awq(tiny_checkpoint(arch), tmp_path / "awq", not_convert=["gate", "shared_expert_gate"])
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    for fmt, check in (("autoawq", assert_awq_files_hold), ("compressed-tensors", assert_ct_files_hold)):
        dst = CliRunner().invoke(main, ["export", str(engine), "--format", fmt, "--dst-path", str(tmp_path / fmt)])
        assert dst.exit_code == 0, dst.output
        check(tmp_path / fmt, 32, refs)
        again = convert(str(tmp_path / fmt), str(tmp_path / f"{fmt}-again"))
        same_engines(engine, again)
        ours, back = open_engine(engine).config, open_engine(again).config
        assert replace(back, quantization={}) == replace(ours, quantization={})  # the method names the importer
        config = json.loads((tmp_path / fmt / "config.json").read_text())
        assert config["architectures"] == json.loads((ckpt / "config.json").read_text())["architectures"]


def test_export_own_moe_quantization(tiny_engine, tmp_path):
    """lmconvert's own MoE AWQ kept to integer zero points (experts calibrated on their routed tokens) exports
    to compressed-tensors and comes back as the same engine."""
    from lmconvert.quant import QuantConfig, quantize

    qc = QuantConfig(bits=4, group_size=32, integer_zeros=True, calib_samples=4, calib_seqlen=32, loss_tokens=64)
    src = quantize(str(tiny_engine("qwen3_moe")), str(tmp_path / "w4"), qc).path
    dst = export(src, "compressed-tensors", tmp_path / "ct")
    same_engines(src, convert(str(dst), str(tmp_path / "again")))


def test_export_refuses_bad_input(tiny_engine, awq_engine, tmp_path):
    with pytest.raises(UserError, match="not a W4 engine"):
        export(tiny_engine("llama"), "autoawq", tmp_path / "x")
    with pytest.raises(UserError, match="unknown export format"):
        export(awq_engine, "gguf", tmp_path / "y")
    (tmp_path / "z").mkdir()
    with pytest.raises(UserError, match="already exists"):
        export(awq_engine, "autoawq", tmp_path / "z")


def test_export_refuses_act_order_engine(tiny_checkpoint, tmp_path):
    """An imported act-order engine keeps an input permutation that neither format can store."""
    ckpt, _ = write_gptq(tiny_checkpoint("llama"), tmp_path / "gptq", act_order=("q_proj.weight", "k_proj.weight",
                                                                                 "v_proj.weight"))
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    for fmt in ("autoawq", "compressed-tensors"):
        result = CliRunner().invoke(main, ["export", str(engine), "--format", fmt, "--dst-path", str(tmp_path / fmt)])
        assert result.exit_code == 1 and "act-order input permutation" in result.output, result.output
        assert result.output.count("\n") == 1 and not (tmp_path / fmt).exists()
