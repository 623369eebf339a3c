"""quantize(src, dst, QuantConfig): a model source in, a quantized engine directory out, one layer at a time.

Memory holds the calibration set's residual stream [tokens, hidden] and one decoder layer; the layer's
input is the previous quantized layer's output, so each layer corrects for the errors made before it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import TextColumn

from lmconvert import kernels
from lmconvert.config import LM_HEAD_QUANT
from lmconvert.devices import resolve_device
from lmconvert.engine import open_model
from lmconvert.engine.writer import EngineWriter, check_destination
from lmconvert.progress import progress
from lmconvert.quant.awq import QuantSpec
from lmconvert.quant.calib import calibration_windows, load_texts
from lmconvert.quant.config import QuantConfig
from lmconvert.quant.layer import CalibLayer
from lmconvert.quant.rtn import quantize_layer_plain, quantize_weight
from lmconvert.quant.smooth import quantize_layer_w8a8
from lmconvert.quant.w4_layer import LayerStats, quantize_layer_w4


LM_HEAD_CHUNK = 8192  # vocab rows of lm_head quantized at a time: bounded fp32 temporaries


@dataclass(slots=True)
class QuantResult:
    path: Path
    method: str
    seconds: float
    bytes_before: int  # tensors of the source in its dtype
    bytes_after: int  # tensors of the quantized engine
    layers: list[LayerStats] = field(default_factory=list)
    scheme: str = ""  # what was done, e.g. "awq W4 g64 (integer zeros)"

    @property
    def compression(self) -> float:
        return self.bytes_before / max(1, self.bytes_after)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere). Without it peak RSS grew
    ~40 MiB a layer: as big temporaries come and go glibc raises its mmap threshold, later ones are carved
    from the heap, and the heap's free holes stay resident (peak 1831 MiB on the 1.5 GB model; 1371 with this)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _title(qc: QuantConfig) -> str:
    if qc.activation_bits == 8:
        return f"{qc.method} W8A8 alpha {qc.alpha}"
    groups = f"g{qc.group_size}" if qc.group_size else "per-channel"
    return f"{qc.method} W{qc.bits} {groups}" + (" (integer zeros)" if qc.integer_zeros else "")


def quantize(src: str | os.PathLike, dst: str | os.PathLike, qc: QuantConfig, overwrite: bool = False,
             arch: str = "auto", model_source: str | None = None) -> QuantResult:
    """Quantize SRC (engine dir or checkpoint, or a model source object such as RandomModel) into a new engine
    at dst. Bad input raises UserError first."""
    start = time.monotonic()
    check_destination(dst, overwrite)
    source = open_model(src, arch=arch, model_source=model_source)
    cfg = source.config
    qc = qc.for_model(cfg)
    device = resolve_device(qc.device)
    dtype = cfg.torch_dtype
    spec = QuantSpec(qc.bits, qc.group_size, qc.symmetric, dtype, integer_zero=qc.integer_zeros)
    windows = None
    if qc.needs_calibration:  # read and check the calibration text before anything is written
        windows = calibration_windows(source.load_tokenizer(), load_texts(qc.calib_data), qc.calib_samples,
                                      qc.calib_seqlen, qc.seed)
    out_cfg = dataclasses.replace(cfg, eos_token_ids=list(cfg.eos_token_ids), quantization=qc.block())
    result = QuantResult(Path(dst), qc.method, 0.0, 0, 0, scheme=_title(qc))

    with EngineWriter(dst, overwrite) as writer, progress(TextColumn("{task.fields[loss]}")) as bar:
        source.save_tokenizer(writer.tokenizer_dir)
        glob = source.global_tensors()
        h = None
        if windows is not None:
            h = F.embedding(windows.flatten(), glob["embed_tokens.weight"]).to(device=device, dtype=torch.float32)
        result.bytes_before = _nbytes(glob)
        if qc.quantize_lm_head:  # a tied head becomes its own quantized tensors; the embedding stays as it is
            head = glob.pop("lm_head.weight", glob["embed_tokens.weight"])
            bits, group = LM_HEAD_QUANT["bits"], LM_HEAD_QUANT["group_size"]
            glob.update({f"lm_head.{k}": v
                         for k, v in quantize_weight(head, bits, group, True, dtype, LM_HEAD_CHUNK).items()})
            del head
        result.bytes_after = _nbytes(glob)
        writer.write_globals(glob)  # the embedding (and an unquantized lm_head) in the engine dtype
        del glob
        rope = kernels.build_rope_cache(cfg.head_dim, max(qc.calib_seqlen, 2), cfg.rope_theta, cfg.rope_scaling, device)
        task = bar.add_task(_title(qc), total=cfg.num_layers, loss="")
        for i in range(cfg.num_layers):
            tensors = source.layer_tensors(i)
            result.bytes_before += _nbytes(tensors)
            if h is None:
                out = quantize_layer_plain(tensors, qc.bits, qc.group_size, qc.symmetric, dtype)
                loss = ""
            else:
                layer = CalibLayer(cfg, tensors, device, rope, qc.calib_seqlen, index=i)
                del tensors
                if qc.activation_bits == 8:
                    out, h, stats = quantize_layer_w8a8(layer, h, qc, dtype)
                else:
                    out, h, stats = quantize_layer_w4(layer, h, qc, spec)
                result.layers.append(stats)
                loss = f"layer {i} output error: rtn {stats.loss_rtn:.2e} -> {qc.method} {stats.loss:.2e}"
                del layer
            writer.write_layer(i, out)
            result.bytes_after += _nbytes(out)
            del out
            _return_freed_memory()
            bar.update(task, advance=1, loss=loss)
        writer.write_config(out_cfg, source.generation_config)
    result.path = writer.dst
    result.seconds = time.monotonic() - start
    return result
