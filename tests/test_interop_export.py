"""`lmconvert export`: W4 engines -> AutoAWQ / compressed-tensors checkpoints, loaded back and compared."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lmconvert.cli import main
from lmconvert.convert import convert
from lmconvert.engine import open_engine
from lmconvert.errors import UserError
from lmconvert.export import export
from test_interop import engine_logits, engine_weights, hf_logits
from test_interop_packers import load_ct_dequantized, write_awq, write_gptq


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
    # independent check of the AWQ packing: compressed-tensors' own AutoAWQ converter reads our files
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    tensors = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(f))
    ct = AutoAWQConverter(group_size=32).process(tensors)
    want = engine_weights(awq_engine)
    for name, w in want.items():
        prefix = name.removesuffix(".weight")
        N, K = w.shape
        q = unpack_from_int32(ct[f"{prefix}.weight_packed"], 4, torch.Size([N, K])).float()
        z = unpack_from_int32(ct[f"{prefix}.weight_zero_point"], 4, torch.Size([N, K // 32]), packed_dim=0).float()
        s = ct[f"{prefix}.weight_scale"].float()
        assert torch.equal((q - z.repeat_interleave(32, 1)) * s.repeat_interleave(32, 1), w), name


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
