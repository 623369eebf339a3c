"""GGUF files (llama.cpp): hyper-parameters from the metadata, tensors dequantized by the `gguf` package."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import torch

from lmconvert.arch import resolve_arch
from lmconvert.config import ModelConfig, check_tensor
from lmconvert.errors import UserError, first_line
from lmconvert.load.hparams import as_id_list, merge_ids

# stored as-is; every other type is dequantized to float32 by gguf.quants
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16}
# what a file whose weights are all of one plain type converts to by default; anything quantized -> bf16
DEFAULT_DTYPE = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}


def f32(value) -> float:
    """GGUF stores floats as float32: print 1e-05, not 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head, rows interleaved (d/2, 2) -> halves (2, d/2)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _plain_ndarray_maps():
    """gguf.GGUFReader slices its np.memmap about a million times while parsing a 49k-token vocabulary; each slice
    of a memmap subclass runs __array_finalize__ (4.2 s for SmolLM2). A plain ndarray view of the same mapping
    parses in 1 s and is still backed by the file. (A context: gguf's module sees this numpy while it is open.)"""
    import types

    import gguf.gguf_reader

    fast = types.ModuleType("numpy_with_plain_memmap")
    fast.__dict__.update(np.__dict__)
    fast.memmap = lambda *args, **kwargs: np.memmap(*args, **kwargs).view(np.ndarray)
    return mock.patch.object(gguf.gguf_reader, "np", fast)


GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # by GGUF value type
GGUF_STRING, GGUF_ARRAY = 8, 9


def check_layout(path: Path) -> None:
    """Walk a GGUF file's header and key-value table with every length and count checked against the bytes
    left, before gguf.GGUFReader parses it: the reader trusts them, and reads past the end of the file come back
    empty, so a damaged count (2**40 strings, arrays of arrays) keeps it looping for hours."""
    import mmap
    import os
    import struct

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a readable GGUF file: {why}")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise bad(f"{size} bytes")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise bad(f"magic {bytes(data[:4])!r}, not b'GGUF'")
            n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
            pos = 24

            def take(n: int) -> int:
                nonlocal pos
                if n > size - pos:
                    raise bad(f"a length or count at byte {pos} runs past the end of the file")
                pos += n
                return pos - n

            def string() -> None:
                take(struct.unpack_from("<Q", data, take(8))[0])

            def value(vtype: int, depth: int) -> None:
                if vtype in GGUF_SCALAR_SIZES:
                    take(GGUF_SCALAR_SIZES[vtype])
                elif vtype == GGUF_STRING:
                    string()
                elif vtype == GGUF_ARRAY and depth < 2:
                    etype, count = struct.unpack_from("<IQ", data, take(12))
                    if etype in GGUF_SCALAR_SIZES:
                        take(count * GGUF_SCALAR_SIZES[etype])
                        return
                    if count > (size - pos) // 8:  # a string or an array takes at least 8 bytes
                        raise bad(f"an array of {count} elements at byte {pos} is longer than the file")
                    for _ in range(count):
                        value(etype, depth + 1)
                else:
                    raise bad(f"unsupported value type {vtype} at byte {pos}")

            for _ in range(n_kv):  # each entry takes bytes: a damaged n_kv ends at the end of the file
                string()
                value(struct.unpack_from("<I", data, take(4))[0], 0)
            if n_tensors > (size - pos) // 24:  # name length, rank, type, offset: 24 bytes at least
                raise bad(f"{n_tensors} tensors do not fit in the file")


class GGUFCheckpoint:
    def __init__(self, path: Path, arch: str = "auto"):
        import gguf

        check_layout(path)
        try:
            with _plain_ndarray_maps():
                self.reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError / struct errors on damaged files
            raise UserError(f"{path} is not a readable GGUF file: {e}") from None
        self.path = path
        self.tensors = {t.name: t for t in self.reader.tensors}
        model_type = self.meta("general.architecture")
        # llama.cpp writes Mixtral as a "llama" with experts
        declared = "mixtral" if model_type == "llama" and self.meta("llama.expert_count") else model_type
        self.arch = resolve_arch(arch, declared)
        if "token_embd.weight" not in self.tensors:
            raise UserError(f"{path.name}: GGUF file lacks tensor token_embd.weight")
        try:
            self.config = self._model_config(model_type)
        except (TypeError, ValueError, OverflowError, ZeroDivisionError, IndexError) as e:  # int("x"), int(inf), ...
            raise UserError(f"{path.name}: bad GGUF metadata value: {e}") from None
        self.config.check()
        if not self.has(f"layers.{self.config.num_layers - 1}.input_norm.weight"):
            raise UserError(f"{path.name}: the metadata says {self.config.num_layers} layers, the file has no "
                            f"tensors for layer {self.config.num_layers - 1}")
        self.generation_config = {k: v for k, v in (("bos_token_id", self.config.bos_token_id),
                                                    ("eos_token_id", self.config.eos_token_ids)) if v}
        self._tokenizer = None

    def meta(self, key: str, default=None):
        field = self.reader.get_field(key)
        return field.contents() if field is not None else default

    def _model_config(self, prefix: str) -> ModelConfig:
        def hp(key, default=None):
            value = self.meta(f"{prefix}.{key}", default)
            if value is None:
                raise UserError(f"{self.path.name}: GGUF metadata lacks {prefix}.{key}")
            return value

        if "rope_freqs.weight" in self.tensors:
            raise UserError(f"{self.path.name}: GGUF rope frequency factors (llama3 rope scaling) are not supported yet")
        hidden, heads = int(hp("embedding_length")), int(hp("attention.head_count"))
        scaling_type = self.meta(f"{prefix}.rope.scaling.type", "none")
        scaling = None
        if scaling_type not in ("none", None):
            scaling = {"rope_type": scaling_type, "factor": float(hp("rope.scaling.factor")),
                       "original_max_position_embeddings": int(hp("rope.scaling.original_context_length", 0))}
        bos = self.meta("tokenizer.ggml.bos_token_id")
        weight_types = {t.tensor_type.name for name, t in self.tensors.items() if len(t.shape) == 2}
        dtype = DEFAULT_DTYPE.get(weight_types.pop(), "bf16") if len(weight_types) == 1 else "bf16"
        return ModelConfig(
            arch=self.arch.name,
            vocab_size=int(self.tensors["token_embd.weight"].shape[-1]),
            hidden_size=hidden,
            intermediate_size=int(hp("feed_forward_length")),
            num_layers=int(hp("block_count")),
            num_heads=heads,
            num_kv_heads=int(hp("attention.head_count_kv", heads)),
            head_dim=int(self.meta(f"{prefix}.attention.key_length") or hidden // heads),
            rms_norm_eps=f32(hp("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=f32(hp("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(hp("context_length", 4096)),
            tie_word_embeddings="output.weight" not in self.tensors,
            qkv_bias=self.arch.qkv_bias,
            qk_norm=self.arch.qk_norm,
            sliding_window=None,  # llama.cpp does not record one for the llama family
            dtype=dtype,
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=merge_ids(as_id_list(self.meta("tokenizer.ggml.eos_token_id")),
                                    as_id_list(self.meta("tokenizer.ggml.eot_token_id"))),
            **self._moe_fields(prefix, hp),
        )

    def _moe_fields(self, prefix: str, hp) -> dict:
        """Experts from the metadata; a layer without a router tensor has a dense FFN."""
        if not self.arch.moe:
            return {}
        layers = int(hp("block_count"))
        if not self.has(f"layers.{layers - 1}.input_norm.weight"):  # before a list as long as the layer count
            raise UserError(f"{self.path.name}: the metadata says {layers} layers, the file has no tensors for "
                            f"layer {layers - 1}")
        return dict(
            num_experts=int(hp("expert_count")),
            num_experts_per_tok=int(hp("expert_used_count")),
            moe_intermediate_size=int(self.meta(f"{prefix}.expert_feed_forward_length") or hp("feed_forward_length")),
            # llama.cpp's default per architecture (Mixtral, Qwen3-MoE renormalize; Qwen2-MoE does not)
            norm_topk_prob=bool(self.meta(f"{prefix}.expert_weights_norm", self.arch.gguf_moe_renormalize)),
            dense_layers=[i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in self.tensors],
            shared_expert_intermediate_size=int(self.meta(f"{prefix}.expert_shared_feed_forward_length") or 0)
            if self.arch.shared_expert else 0,
        )

    def has(self, name: str) -> bool:
        return self.arch.gguf_name(name) in self.tensors

    def get(self, name: str) -> torch.Tensor:
        import gguf

        source = self.arch.gguf_name(name)
        if source not in self.tensors:
            raise UserError(f"{self.path.name} lacks tensor {source}")
        t = self.tensors[source]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        kind = t.tensor_type.name
        if kind in PLAIN_TYPES:
            out = torch.from_numpy(np.array(t.data, dtype=t.data.dtype)).reshape(shape)
        else:
            try:
                out = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)
            except NotImplementedError:
                raise UserError(f"{self.path.name}: tensor {source} has unsupported GGUF type {kind}") from None
            except ValueError as e:  # a size that is no whole number of blocks
                raise UserError(f"{self.path.name}: cannot dequantize tensor {source} ({kind}): {e}") from None
        if name.endswith("shared_expert_gate.weight") and out.dim() == 1:  # llama.cpp stores this [1, hidden] row as a vector
            out = out.unsqueeze(0)
        check_tensor(self.config, name, out, self.path.name)
        if self.arch.gguf_permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config.num_heads if name.endswith("q_proj.weight") else self.config.num_kv_heads
            out = unpermute_rows(out, heads)
        return out

    def load_tokenizer(self):
        """transformers rebuilds the tokenizer from the GGUF vocabulary (slow: parses the whole token list)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                with self._reader_reused():
                    tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
            except Exception as e:  # transformers raises assorted errors for vocabularies it cannot rebuild
                raise UserError(f"cannot build a tokenizer from {self.path.name}: {first_line(e)}") from None
            template = self.meta("tokenizer.chat_template")
            if template and not tok.chat_template:
                tok.chat_template = template
            self._tokenizer = tok
        return self._tokenizer

    def _reader_reused(self):
        """transformers opens the file with gguf.GGUFReader again (config, then vocabulary): ~3 s of Python per
        parse for SmolLM2's 49k-token vocabulary. Hand it the reader this checkpoint already holds."""
        import gguf

        real = gguf.GGUFReader

        def reader(path, *args, **kwargs):
            same = Path(path).resolve() == self.path.resolve() and not args and not kwargs
            return self.reader if same else real(path, *args, **kwargs)

        return mock.patch.object(gguf, "GGUFReader", reader)

    def save_tokenizer(self, dst: Path) -> None:
        self.load_tokenizer().save_pretrained(dst)
