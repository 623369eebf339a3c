"""Importing AutoAWQ / GPTQ / compressed-tensors mixture-of-experts checkpoints (issue #26): tiny random
Qwen3-MoE (with a dense layer), Mixtral and Qwen2-MoE (shared expert), every expert and attention linear 4-bit,
router and shared_expert_gate left in full precision as the real tools leave them. The imported engine's
dequantized experts equal the source's bit for bit and its logits equal those of transformers running the same
dequantized weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lmconvert.convert import convert
from lmconvert.engine import open_engine
from lmconvert.errors import UserError
from lmconvert.quant.primitives import unpack_int4
from test_interop import engine_logits, hf_logits
from test_interop_packers import write_awq, write_compressed_tensors_moe, write_gptq
from tiny_models import MOE_ARCHS

# canonical expert linear -> the HF name of one expert's (prefix "model.layers.{i}.", "{e}" the expert)
EXPERT_HF = {"qwen3_moe": ("mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
             "qwen2_moe": ("mlp.experts.{e}.", "gate_proj", "up_proj", "down_proj"),
             "mixtral": ("block_sparse_moe.experts.{e}.", "w1", "w3", "w2")}
WRITERS = {"awq": lambda src, dst: write_awq(src, dst, not_convert=["gate", "shared_expert_gate"]),
           "gptq": lambda src, dst: write_gptq(src, dst, sym=False),
           "compressed-tensors": write_compressed_tensors_moe}
METHODS = {"awq": "awq-import", "gptq": "gptq-import", "compressed-tensors": "compressed-tensors-import"}


def dequant(t: dict, module: str, G: int, e: int | None = None) -> torch.Tensor:
    """An engine W4 linear (one expert's when e is given) dequantized in fp32: W [N, K]."""
    pick = (lambda x: x[e]) if e is not None else (lambda x: x)
    q = unpack_int4(pick(t[f"{module}.qweight"])).float()
    s = pick(t[f"{module}.scales"]).float().repeat_interleave(G, 0)
    z = pick(t[f"{module}.zeros"]).float().repeat_interleave(G, 0)
    return ((q - z) * s).t()


def reference_model(src, refs: dict, dst):
    """transformers on the fp checkpoint with every quantized linear replaced by its dequantized weight (written
    back per expert: transformers 5 fuses the experts itself when loading)."""
    import transformers

    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    tensors.update({k: v.to(tensors[k].dtype).contiguous() for k, v in refs.items()})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_import_is_lossless(tiny_checkpoint, tmp_path, fmt, arch):
    src = tiny_checkpoint(arch)
    ckpt, refs = WRITERS[fmt](src, tmp_path / "src")
    check_import(arch, src, ckpt, refs, tmp_path, METHODS[fmt], 32)


@pytest.mark.parametrize("arch,G", [("qwen3_moe", 32), ("mixtral", 64)])
def test_compressed_tensors_channel_symmetric_moe(tiny_checkpoint, tmp_path, arch, G):
    """Per-channel scales (one group spanning K): the engine takes the largest group dividing every input size
    (Qwen3-MoE's experts are 32 wide), scale rows repeated."""
    src = tiny_checkpoint(arch)
    ckpt, refs = write_compressed_tensors_moe(src, tmp_path / "src", G=None, sym=True)
    check_import(arch, src, ckpt, refs, tmp_path, METHODS["compressed-tensors"], G)


def check_import(arch, src, ckpt, refs, tmp_path, method, G):
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    eng = open_engine(engine)
    c = eng.config
    assert (c.quantization["method"], c.quantization["bits"], c.quantization["group_size"]) == (method, 4, G)
    expert, gate, up, down = EXPERT_HF[arch]
    for i in range(c.num_layers):
        t = eng.layer_tensors(i)
        assert not any(k.endswith("input_perm") for k in t)
        if not c.is_moe_layer(i):  # Qwen3-MoE's mlp_only layer: a dense W4 MLP
            assert "gate_up_proj.qweight" in t and "router.weight" not in t
            continue
        assert t["router.weight"].dtype == torch.float32 and "experts.gate_up_proj.weight" not in t
        E, H, I = c.num_experts, c.hidden_size, c.moe_intermediate_size
        assert t["experts.gate_up_proj.qweight"].shape == (E, H // 8, 2 * I)
        assert t["experts.down_proj.scales"].shape == (E, I // G, H)
        for e in range(E):  # bit-exact per expert: gate rows, then up rows, like lmconvert's own W4 experts
            p = f"model.layers.{i}.{expert.format(e=e)}"
            gu = dequant(t, "experts.gate_up_proj", G, e)
            assert torch.equal(gu, torch.cat([refs[f"{p}{gate}.weight"], refs[f"{p}{up}.weight"]]).float())
            assert torch.equal(dequant(t, "experts.down_proj", G, e), refs[f"{p}{down}.weight"].float())
        if c.shared_expert_intermediate_size:
            p = f"model.layers.{i}.mlp.shared_expert."
            assert torch.equal(dequant(t, "shared_expert.down_proj", G), refs[f"{p}down_proj.weight"].float())
            assert t["shared_expert_gate.weight"].dtype == torch.float32
    reference = reference_model(src, refs, tmp_path / "ref")
    torch.testing.assert_close(engine_logits(engine), hf_logits(reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_gptq_act_order_moe(tiny_checkpoint, tmp_path, arch):
    """Act-order on attention, every down_proj (experts' folded into their gate/up rows) and the shared expert's
    gate/up (input_perm, a dense Linear's): logits still equal the reference's."""
    src = tiny_checkpoint(arch)
    act_order = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "down_proj.weight", "w2.weight",
                 "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight")
    ckpt, refs = write_gptq(src, tmp_path / "gptq", act_order=act_order)
    engine = convert(str(ckpt), str(tmp_path / "engine"))
    perms = {k for k in open_engine(engine).layer_tensors(0) if k.endswith("input_perm")}
    assert perms == {"qkv_proj.input_perm", "o_proj.input_perm"} | (
        {"shared_expert.gate_up_proj.input_perm"} if arch == "qwen2_moe" else set())
    reference = reference_model(src, refs, tmp_path / "ref")
    torch.testing.assert_close(engine_logits(engine), hf_logits(reference), rtol=1e-4, atol=1e-4)


def test_unrepresentable_moe_checkpoints_are_one_line_errors(tiny_checkpoint, tmp_path):
    """Act-order on an expert's gate/up (the engine's experts have no input permutation), a quantized router,
    an expert left in full precision."""
    from lmconvert.cli import main

    src = tiny_checkpoint("qwen3_moe")
    act, _ = write_gptq(src, tmp_path / "act", act_order=("experts.3.gate_proj.weight", "experts.3.up_proj.weight"))
    router, _ = write_awq(src, tmp_path / "router")
    tensors = load_file(router / "model.safetensors")
    tensors["model.layers.0.mlp.gate.qweight"] = tensors.pop("model.layers.0.mlp.gate.weight").to(torch.int32)
    save_file(tensors, router / "model.safetensors")
    fp, _ = write_awq(src, tmp_path / "fp")
    tensors = load_file(fp / "model.safetensors")
    prefix = "model.layers.0.mlp.experts.5.up_proj"
    for k in ("qweight", "qzeros", "scales"):
        tensors.pop(f"{prefix}.{k}")
    tensors[f"{prefix}.weight"] = load_file(src / "model.safetensors")[f"{prefix}.weight"]
    save_file(tensors, fp / "model.safetensors")
    cases = {act: "experts have no input permutation", router: "mlp.gate is quantized",
             fp: "experts.5.up_proj is not quantized"}
    for ckpt, needle in cases.items():
        result = CliRunner().invoke(main, ["convert", "auto", str(ckpt), "--dst-path", str(tmp_path / "e")])
        assert result.exit_code == 1 and needle in result.output and result.output.count("\n") == 1, result.output
    with pytest.raises(UserError, match="experts have no input permutation"):
        convert(str(act), str(tmp_path / "e2"))
