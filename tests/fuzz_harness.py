"""Mutation fuzzing of the loaders (issue #28): seeds, mutators, targets and a forked, memory-capped worker.

Every case mutates one file of a tiny valid seed (a GGUF file, an HF safetensors dir, an engine dir) and runs
the entry point a user hits on it, in a long-lived forked worker:

- `convert` (what `lmconvert convert auto SRC` runs) for GGUF files, safetensors, config.json and
  generation_config.json; on success the engine it wrote is opened and its tensors checked against its config;
- `lmconvert info` (+ --verify every other case), then every tensor of the engine, for engine manifests and
  engine config.json;
- `open_model(SRC).load_tokenizer()` and an encode / decode (what `lmconvert chat SRC` does first) for
  tokenizer.json and tokenizer_config.json.

Allowed outcomes: success (a model whose tensors fit its config) or lmconvert's UserError with a one-line
message. Anything else is a finding: another exception type, a multi-line message, a case over its time limit
(SIGALRM, then SIGKILL from the parent), a worker that died (signal / abort), or an allocation beyond the
worker's address-space cap (RLIMIT_AS = the warmed-up worker's size + MEMORY_BUDGET; the seeds are < 1 MiB, so
anything reaching the cap allocated far beyond the file's size).

A case is (target, seed integer): `mutate(target, random.Random(seed))` rebuilds the same bytes, so every
finding is reproducible with `python benchmarks/fuzz_loaders.py --target T --replay SEED`. The mutators take any
random.Random, so hypothesis' `st.randoms()` drives (and shrinks) the same mutations in tests.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

MEMORY_BUDGET = 256 << 20  # address space a case may add to the warmed-up worker
SOFT_TIMEOUT = 5.0  # seconds: SIGALRM in the worker
HARD_TIMEOUT = 15.0  # seconds: the parent kills the worker

# ---------------------------------------------------------------------------------------------------- seeds


def build_seeds(root: Path, hf: Path | None = None) -> dict[str, Path]:
    """Tiny valid inputs: an HF dir (tiny random qwen2 from tests/tiny_models.py: 2 layers, hidden 64, q/k/v
    biases, byte-level BPE of 320 tokens), the same model as a GGUF file (F32 / F16 / Q8_0 tensors, gpt2
    tokenizer metadata) and its converted engine. hf: an existing tiny qwen2 checkpoint to use."""
    from lmconvert.convert import convert

    root.mkdir(parents=True, exist_ok=True)
    if hf is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from tiny_models import build_checkpoint

        hf = build_checkpoint("qwen2", root / "hf")
    gguf_path = write_tiny_gguf(hf, root / "tiny.gguf")
    engine = convert(str(hf), str(root / "engine"), arch="auto")
    return {"hf": hf, "gguf": gguf_path, "engine": engine}


def write_tiny_gguf(hf: Path, dst: Path) -> Path:
    """The tiny qwen2 checkpoint as llama.cpp lays it out, with a few tensor types and a gpt2 tokenizer."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    cfg = json.loads((hf / "config.json").read_text())
    tok = json.loads((hf / "tokenizer.json").read_text())
    with safe_open(hf / "model.safetensors", "np") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    w = gguf.GGUFWriter(str(dst), "qwen2")
    for key, value in (("block_count", cfg["num_hidden_layers"]), ("context_length", cfg["max_position_embeddings"]),
                       ("embedding_length", cfg["hidden_size"]), ("feed_forward_length", cfg["intermediate_size"]),
                       ("attention.head_count", cfg["num_attention_heads"]),
                       ("attention.head_count_kv", cfg["num_key_value_heads"])):
        w.add_uint32(f"qwen2.{key}", value)
    w.add_float32("qwen2.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])
    w.add_float32("qwen2.rope.freq_base", 10000.0)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [added.get(i, t) for i, (t, _) in enumerate(vocab)]
    tokens += [added[i] for i in sorted(added) if i >= len(tokens)]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in added.values() else 1 for t in tokens])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg["num_hidden_layers"]):
        for h, g in layer.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{h}.{kind}"] = f"blk.{i}.{g}.{kind}"
    for k, v in sd.items():
        name, v = names[k], v.astype(np.float32)
        if name.endswith("ffn_up.weight"):  # a quantized type, as most GGUF files are
            w.add_tensor(name, gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif name.endswith("ffn_down.weight"):
            w.add_tensor(name, v.astype(np.float16))
        else:
            w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ------------------------------------------------------------------------------------------ byte mutations

U64 = (1 << 64) - 1


def interesting_ints(orig: int, file_size: int) -> list[int]:
    return [0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 4096, 65535, 65536, 2**20, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
            2**40, 2**53, 2**62, 2**63 - 1, 2**63, U64, U64 - 1, U64 - 7,  # U64: -1 as a signed value
            file_size, file_size - 1, file_size + 1, file_size * 2, orig + 1, orig - 1, orig * 2, orig // 2,
            orig << 8, orig << 32, orig ^ (1 << 63)]


def write_int(data: bytearray, offset: int, size: int, value: int) -> None:
    data[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def byte_mutation(rng: random.Random, data: bytes, start: int = 0, end: int | None = None) -> bytes:
    """One generic mutation inside data[start:end]: bit flips, interesting bytes / ints, truncation, insertion,
    deletion, duplication."""
    out = bytearray(data)
    end = len(out) if end is None else min(end, len(out))
    if end <= start:
        return bytes(out[: rng.randrange(len(out) + 1)])
    pos = rng.randrange(start, end)
    op = rng.randrange(8)
    if op == 0:  # flip a few bits
        for _ in range(rng.randint(1, 8)):
            p = rng.randrange(start, end)
            out[p] ^= 1 << rng.randrange(8)
    elif op == 1:  # interesting bytes
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(start, end)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, 0x22, 0x5C, 0x7B, 0x7D, 0x5B, 0x2C])
    elif op == 2:  # an integer at pos
        size = rng.choice([1, 2, 4, 8])
        orig = int.from_bytes(out[pos:pos + size].ljust(size, b"\0"), "little")
        write_int(out, pos, size, rng.choice(interesting_ints(orig, len(data))))
        del out[len(data):]
    elif op == 3:  # truncate
        del out[pos:]
    elif op == 4:  # insert random bytes
        out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 8, 64])))
    elif op == 5:  # delete a chunk
        del out[pos:pos + rng.choice([1, 2, 4, 8, 64, 1024])]
    elif op == 6:  # duplicate a chunk
        n = rng.choice([1, 4, 8, 64, 512])
        out[pos:pos] = out[pos:pos + n]
    else:  # random bytes over a span
        n = min(rng.choice([1, 4, 16, 256]), end - pos)
        out[pos:pos + n] = bytes(rng.randrange(256) for _ in range(n))
    return bytes(out)


# ------------------------------------------------------------------------------------------ GGUF structure


@dataclasses.dataclass(frozen=True)
class Slot:
    """An integer field of a binary header: where it is, its width, what it means and its region."""

    offset: int
    size: int
    kind: str  # count | len | type | dims | dim | offset | value | float | version | magic
    region: str  # header | kv | tensors


GGUF_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
                7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}


def gguf_slots(data: bytes) -> list[Slot]:
    """Every integer / float field of a (valid) GGUF v3 file's header, key-value table and tensor table."""
    slots = [Slot(0, 4, "magic", "header"), Slot(4, 4, "version", "header"), Slot(8, 8, "count", "tensors"),
             Slot(16, 8, "count", "kv")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(region):
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        slots.append(Slot(pos, 8, "len", region))
        pos += 8 + n

    def value(vtype, region):
        nonlocal pos
        if vtype == 8:
            string(region)
        elif vtype == 9:
            (etype, count) = struct.unpack_from("<IQ", data, pos)
            slots.extend([Slot(pos, 4, "type", region), Slot(pos + 4, 8, "count", region)])
            pos += 12
            for _ in range(count):
                value(etype, region)
        else:
            fmt, size = GGUF_SCALARS[vtype]
            slots.append(Slot(pos, size, "float" if fmt in "fd" else "value", region))
            pos += size

    for _ in range(n_kv):
        string("kv")
        (vtype,) = struct.unpack_from("<I", data, pos)
        slots.append(Slot(pos, 4, "type", "kv"))
        pos += 4
        value(vtype, "kv")
    for _ in range(n_tensors):
        string("tensors")
        (n_dims,) = struct.unpack_from("<I", data, pos)
        slots.append(Slot(pos, 4, "dims", "tensors"))
        pos += 4
        slots.extend(Slot(pos + 8 * d, 8, "dim", "tensors") for d in range(n_dims))
        pos += 8 * n_dims
        slots.extend([Slot(pos, 4, "type", "tensors"), Slot(pos + 4, 8, "offset", "tensors")])
        pos += 12
    return slots


def gguf_header_end(slots: list[Slot]) -> int:
    last = max(slots, key=lambda s: s.offset)
    return last.offset + last.size


def slot_mutation(rng: random.Random, data: bytes, slots: list[Slot]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        s = rng.choice(slots)
        if s.kind == "float":
            fmt = "<f" if s.size == 4 else "<d"
            out[s.offset:s.offset + s.size] = struct.pack(fmt, rng.choice(
                [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e38, 1e-45, 3.4e38, -1e30]))
            continue
        orig = int.from_bytes(out[s.offset:s.offset + s.size], "little")
        if s.kind == "type" and rng.random() < 0.6:
            new = rng.choice([*range(0, 42), 255, 2**31, 2**32 - 1])
        elif s.kind == "dims" and rng.random() < 0.6:
            new = rng.choice([0, 1, 2, 3, 4, 5, 8, 64, 2**31, 2**32 - 1])
        else:
            new = rng.choice(interesting_ints(orig, len(data)))
        write_int(out, s.offset, s.size, new)
    return bytes(out)


# ------------------------------------------------------------------------------------------ JSON mutations

SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
                      "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "C64", "f32", "", "X" * 300]


def deep(n: int):
    value: object = 1
    for _ in range(n):
        value = [value]
    return value


def interesting_json(rng: random.Random, orig=None):
    choices = [None, True, False, 0, -1, 1, 2, 3, 64, 2**31, 2**32, 2**63, 2**64, -(2**63), 10**30, 10**400,
               0.5, -0.0, 1e308, -1e308, 1e-320, math.nan, math.inf, -math.inf, "", "0", "64", "x", "auto",
               "\u0000", "\ud800", "é" * 3, "\u202e", "a" * 10000, [], {}, [1, 2], [[]], {"a": 1}, [None],
               deep(rng.choice([5, 50, 150]))]  # deeper: text_mutation's
    if isinstance(orig, bool):
        choices += [not orig, int(orig), str(orig)]
    elif isinstance(orig, (int, float)):
        choices += [str(orig), float(orig) if abs(orig) < 1e300 else orig, -orig, orig + 1, orig * 1000, [orig],
                    {"value": orig}]
    elif isinstance(orig, str):
        choices += [orig.upper(), orig[:-1], orig + "x", [orig], orig * 100, orig.encode("utf-8", "surrogatepass").hex()]
    elif isinstance(orig, list):
        choices += [orig[:-1], orig * 2, orig[::-1], {str(i): v for i, v in enumerate(orig)}]
    elif isinstance(orig, dict):
        choices += [list(orig.values()), list(orig), {k: None for k in orig}]
    return copy.deepcopy(rng.choice(choices))


def containers(node, path=()):
    """(path, container) for every dict / list in a JSON tree."""
    if isinstance(node, (dict, list)):
        yield path, node
        for key, child in (node.items() if isinstance(node, dict) else enumerate(node)):
            yield from containers(child, path + (key,))


def json_tree_mutation(rng: random.Random, tree, top_bias: float = 0.5):
    """One structural mutation of a parsed JSON value (a deep copy is mutated and returned)."""
    tree = copy.deepcopy(tree)
    nodes = [(p, c) for p, c in containers(tree) if c]
    if not nodes:
        return interesting_json(rng, tree)
    top = [n for n in nodes if len(n[0]) == 0]
    path, node = top[0] if top and rng.random() < top_bias else rng.choice(nodes)
    key = rng.choice(list(node) if isinstance(node, dict) else range(len(node)))
    op = rng.randrange(10)
    if op < 5:  # replace a value
        node[key] = interesting_json(rng, node[key])
    elif op == 5:  # delete it
        del node[key]
    elif op == 6 and isinstance(node, dict):  # rename the key
        node[rng.choice([key.upper(), key + "_", "", "\u0000" + key, "__proto__", key[:-1]])] = node.pop(key)
    elif op == 7:  # swap two values
        other = rng.choice(list(node) if isinstance(node, dict) else range(len(node)))
        node[key], node[other] = node[other], node[key]
    elif op == 8:  # wrap in a list / object
        node[key] = [node[key]] if rng.random() < 0.5 else {"value": node[key]}
    else:  # add an entry
        if isinstance(node, dict):
            node[rng.choice(["extra", "__metadata__", "format_version", "weight_map", "x" * 100])] = \
                interesting_json(rng)
        else:
            node.insert(rng.randrange(len(node) + 1), interesting_json(rng))
    if rng.random() < 0.05:  # whole-document replacement
        tree = interesting_json(rng, tree)
    return tree


def dump_json(tree) -> bytes:
    try:
        return json.dumps(tree, indent=1).encode("utf-8", "surrogatepass")
    except RecursionError:  # nested deeper than json.dumps goes: deep nesting as text
        return b"[" * 5000 + b"1" + b"]" * 5000


def text_mutation(rng: random.Random, data: bytes) -> bytes:
    """Raw JSON text damage: truncation, broken UTF-8, a BOM, trailing garbage, duplicated keys, empty."""
    op = rng.randrange(7)
    if op == 0:
        return data[: rng.randrange(len(data) + 1)]
    if op == 1:
        pos = rng.randrange(len(data) + 1)
        return data[:pos] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]) + data[pos:]
    if op == 2:
        return b"\xef\xbb\xbf" + data
    if op == 3:
        return data + rng.choice([b"}", b"garbage", b"\x00", b"{}"])
    if op == 4:
        return rng.choice([b"", b"null", b"[]", b"0", b'"x"', b"{", b"NaN", b"[" * 100000])
    if op == 5 and data.lstrip().startswith(b"{"):  # a duplicate key at the top (the later value wins)
        return b'{"hidden_size": "x", "num_hidden_layers": -1, "format_version": 99, ' + data.lstrip()[1:]
    return byte_mutation(rng, data)


def json_mutation(rng: random.Random, data: bytes, top_bias: float = 0.5) -> bytes:
    if rng.random() < 0.2:
        return text_mutation(rng, data)
    tree = json.loads(data)
    try:
        for _ in range(rng.choice([1, 1, 1, 2, 4])):
            tree = json_tree_mutation(rng, tree, top_bias)
    except RecursionError:  # nests inside nests: copy.deepcopy gives up
        return text_mutation(rng, data)
    return dump_json(tree)


# ----------------------------------------------------------------------------------- safetensors structure


def safetensors_mutation(rng: random.Random, data: bytes) -> bytes:
    (n,) = struct.unpack_from("<Q", data, 0)
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    op = rng.randrange(10)
    if op == 0:  # the header length
        out = bytearray(data)
        write_int(out, 0, 8, rng.choice(interesting_ints(n, len(data))))
        return bytes(out)
    if op == 1:
        return byte_mutation(rng, data, 0, 8 + n)
    if op == 2:
        return byte_mutation(rng, data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    if op == 3:
        entry["dtype"] = rng.choice(SAFETENSORS_DTYPES)
    elif op == 4:  # a dimension, the rank, or a transposed shape (same bytes: only the config can tell)
        shape = entry["shape"]
        choice = rng.randrange(4)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] = interesting_json(rng, shape[0])
        elif choice == 1:
            entry["shape"] = shape[::-1]
        elif choice == 2:
            entry["shape"] = [math.prod(shape)] if rng.random() < 0.5 else shape + [1]
        else:
            entry["shape"] = rng.choice([[], [0], [-1], [2**63], [2**32, 2**32], None, "64"])
    elif op == 5:  # data offsets
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[end, begin], [begin, begin], [0, end - begin], [begin, len(body) + 8],
                                            [begin + 1, end + 1], [begin, 2**64 - 1], [-1, end], [begin], None,
                                            [begin, end, 0], [str(begin), end]])
    elif op == 6:  # two tensors swap names (shapes may differ: only the config can tell)
        other = rng.choice(names)
        header[name], header[other] = header[other], header[name]
    elif op == 7:  # one tensor dropped
        del header[name]
    else:
        header = json_tree_mutation(rng, header, top_bias=0.2)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8", "surrogatepass")
    blob += b" " * (-len(blob) % 8)
    length = len(blob) if rng.random() < 0.9 else rng.choice(interesting_ints(len(blob), len(data)))
    return (length & U64).to_bytes(8, "little") + blob + body


# ------------------------------------------------------------------------------------------------ targets


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    seed: str  # "hf" | "gguf" | "engine": which seed it copies
    file: str  # the file mutated, relative to the seed dir ("" for the GGUF file itself)
    entry: str  # convert | engine | tokenizer
    about: str


TARGETS = {t.name: t for t in [
    Target("gguf_header", "gguf", "", "convert", "GGUF magic, version, counts and key-value metadata"),
    Target("gguf_tensors", "gguf", "", "convert", "GGUF tensor table: names, ranks, dims, types, offsets; data"),
    Target("safetensors", "hf", "model.safetensors", "convert", "safetensors header length, JSON header, data"),
    Target("config_json", "hf", "config.json", "convert", "an HF config.json"),
    Target("generation_config", "hf", "generation_config.json", "convert", "an HF generation_config.json"),
    Target("engine_manifest", "engine", "manifest.json", "engine", "an engine's manifest.json"),
    Target("engine_config", "engine", "config.json", "engine", "an engine's config.json (manifest re-stamped)"),
    Target("engine_tensors", "engine", "layers/layer_00001.safetensors", "engine",
           "an engine's layer file: safetensors header and data (manifest re-stamped)"),
    Target("tokenizer_json", "hf", "tokenizer.json", "tokenizer", "tokenizer.json"),
    Target("tokenizer_config", "hf", "tokenizer_config.json", "tokenizer", "tokenizer_config.json"),
]}


class Mutator:
    """target name + random.Random -> the mutated file's bytes (seed files read once)."""

    def __init__(self, seeds: dict[str, Path]):
        self.seeds = seeds
        self.originals = {t.name: seed_file(seeds, t).read_bytes() for t in TARGETS.values()}
        self.gguf_slots = gguf_slots(self.originals["gguf_header"])
        end = gguf_header_end(self.gguf_slots)
        self.gguf_kv = [s for s in self.gguf_slots if s.region in ("header", "kv")]
        self.gguf_tensor_slots = [s for s in self.gguf_slots if s.region == "tensors"]
        tensor_table = [s.offset for s in self.gguf_tensor_slots if s.region == "tensors" and s.kind != "count"]
        self.gguf_tensor_range = (min(tensor_table), end)

    def __call__(self, target: str, rng: random.Random) -> bytes:
        data = self.originals[target]
        if target == "gguf_header":
            op = rng.random()
            if op < 0.6:
                return slot_mutation(rng, data, self.gguf_kv)
            return byte_mutation(rng, data, 0, self.gguf_tensor_range[0])
        if target == "gguf_tensors":
            op = rng.random()
            if op < 0.6:
                return slot_mutation(rng, data, self.gguf_tensor_slots)
            if op < 0.85:
                return byte_mutation(rng, data, *self.gguf_tensor_range)
            return byte_mutation(rng, data, self.gguf_tensor_range[1])  # tensor data, truncation
        if target in ("safetensors", "engine_tensors"):
            return safetensors_mutation(rng, data)
        return json_mutation(rng, data, top_bias=0.3 if target.startswith("tokenizer") else 0.7)


def seed_file(seeds: dict[str, Path], target: Target) -> Path:
    return seeds[target.seed] / target.file if target.file else seeds[target.seed]


# ------------------------------------------------------------------------------------------- entry points


class FuzzTimeout(BaseException):
    """Raised by SIGALRM in a case over its time limit (BaseException: no loader's `except Exception` eats it)."""


class BadModel(Exception):
    """The entry point succeeded but what it produced does not work (a tensor that does not fit the config)."""


def expected_fp_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Engine tensor shapes of a dense floating-point engine (the seeds' kind), from its config."""
    H, I, V, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.q_size, cfg.kv_size
    shapes = {"embed_tokens.weight": (V, H), "norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        shapes.update({p + "input_norm.weight": (H,), p + "post_attn_norm.weight": (H,),
                       p + "qkv_proj.weight": (q + 2 * kv, H), p + "o_proj.weight": (H, q),
                       p + "gate_up_proj.weight": (2 * I, H), p + "down_proj.weight": (H, I)})
        if cfg.qkv_bias:
            shapes[p + "qkv_proj.bias"] = (q + 2 * kv,)
        if cfg.qk_norm:
            shapes.update({p + "q_norm.weight": (cfg.head_dim,), p + "k_norm.weight": (cfg.head_dim,)})
    return shapes


def check_working(model) -> None:
    """What a runtime needs of a loaded dense model: finite positive eps / theta, tensors of the config's shapes."""
    cfg = model.config
    tensors = dict(model.global_tensors())
    for i in range(cfg.num_layers):
        tensors.update({f"layers.{i}.{k}": v for k, v in model.layer_tensors(i).items()})
    for name in ("rms_norm_eps", "rope_theta"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise BadModel(f"config {name} = {value!r}")
    from lmconvert.runtime.sampling import SamplingParams, generation_defaults

    gen = model.generation_config  # what chat / serve make of it (runtime/src/engine.py, server.py)
    eos = gen.get("eos_token_id", [])
    set(cfg.eos_token_ids) | set(eos if isinstance(eos, list) else [eos])
    SamplingParams(max_tokens=1, **generation_defaults(gen))
    if cfg.quantization or cfg.num_experts:
        raise BadModel(f"a dense fp seed became quantized / MoE: {cfg.quantization} {cfg.num_experts}")
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    want = expected_fp_shapes(cfg)
    not_float = [k for k, v in tensors.items() if not v.is_floating_point()]
    if not_float:
        raise BadModel(f"tensor {not_float[0]} is not floating point")
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:2]
        raise BadModel(f"tensor shapes do not fit the config: {diff}")


def run_entry(target: Target, case_dir: Path, index: int) -> None:
    src = case_dir / "model.gguf" if target.seed == "gguf" else case_dir
    if target.entry == "selftest":  # the harness's own check: each finding kind on demand
        selftest((case_dir / target.file).read_bytes())
    elif target.entry == "convert":
        from lmconvert.convert import convert
        from lmconvert.engine import open_engine

        dst = convert(str(src), str(case_dir.parent / "out"), arch="auto")
        check_working(open_engine(dst))
    elif target.entry == "engine":
        from rich.console import Console

        from lmconvert.engine import open_model
        from lmconvert.engine.info import print_info

        print_info(str(src), verify=bool(index % 2), console=Console(file=open(os.devnull, "w")))
        check_working(open_model(str(src)))
    else:
        from lmconvert.engine import open_model

        tok = open_model(str(src)).load_tokenizer()
        ids = tok("Hello, how are you? 1000 é")["input_ids"]
        tok.decode(ids)


SELFTEST = Target("selftest", "hf", "selftest.txt", "selftest", "the harness detects every kind of finding")


def selftest(command: bytes) -> None:
    from lmconvert.errors import UserError

    if command == b"alloc":  # 1 GiB: over the address-space cap
        bytearray(1 << 30)
    elif command == b"loop":  # a Python loop: SIGALRM stops it
        while True:
            pass
    elif command == b"hang":  # deaf to SIGALRM: the parent kills the worker
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    elif command == b"abort":
        os.abort()
    elif command == b"raise":
        raise KeyError("weights")
    elif command == b"two lines":
        raise UserError("first\nsecond")
    elif command == b"error":
        raise UserError("a one-line error")


# ------------------------------------------------------------------------------------------------- worker


@dataclasses.dataclass
class Outcome:
    kind: str  # ok | error (a one-line UserError) | finding kinds: exception, multiline, timeout, hang, crash, memory, bad_model
    message: str = ""
    where: str = ""  # innermost lmconvert frame, then the innermost frame
    seconds: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.kind in ("ok", "error")

    @property
    def signature(self) -> str:
        head = self.message.split(":")[0][:60] if self.kind == "exception" else ""
        return f"{self.kind} {head} @ {self.where}"


def frames(tb) -> str:
    stack = traceback.extract_tb(tb)
    ours = [f for f in stack if "/lmconvert/" in f.filename or "/runtime/src/" in f.filename]
    fmt = lambda f: f"{'/'.join(Path(f.filename).parts[-2:])}:{f.lineno}"  # noqa: E731
    return " | ".join(fmt(f) for f in ([ours[-1]] if ours else []) + ([stack[-1]] if stack else []))


def classify(e: BaseException) -> Outcome:
    from lmconvert.errors import UserError

    text = str(e)
    if isinstance(e, FuzzTimeout):
        return Outcome("timeout", "over the soft time limit", frames(e.__traceback__))
    if isinstance(e, UserError):
        if "\n" in text.strip() or not text.strip():
            return Outcome("multiline", text[:300], frames(e.__traceback__))
        return Outcome("error", text[:300])
    if isinstance(e, BadModel):
        return Outcome("bad_model", text[:300], frames(e.__traceback__))
    kind = "memory" if isinstance(e, MemoryError) or "can't allocate memory" in text or "bad_alloc" in text \
        else "exception"
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return Outcome(kind, f"{type(e).__name__}: {first}", frames(e.__traceback__))


def materialize(target: Target, seeds: dict[str, Path], data: bytes, case_dir: Path) -> None:
    """case_dir = the target's seed (hard links) with the mutated file written in place of its original."""
    if case_dir.parent.exists():
        shutil.rmtree(case_dir.parent)
    case_dir.mkdir(parents=True)
    if target.seed == "gguf":
        (case_dir / "model.gguf").write_bytes(data)
        return
    root = seeds[target.seed]
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_dir():
            (case_dir / rel).mkdir(parents=True, exist_ok=True)
        elif str(rel) != target.file:
            (case_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, case_dir / rel)
            except OSError:  # another file system
                shutil.copyfile(p, case_dir / rel)
    (case_dir / target.file).write_bytes(data)
    if target.seed == "engine" and target.file != "manifest.json":  # as if written so: the manifest agrees
        import hashlib

        manifest = json.loads((root / "manifest.json").read_text())
        manifest["files"][target.file] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (case_dir / "manifest.json").unlink()
        (case_dir / "manifest.json").write_text(json.dumps(manifest))


def address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_main(conn, seeds: dict[str, Path], work: Path, memory_budget: int, soft_timeout: float) -> None:
    import ctypes
    import faulthandler

    import torch

    faulthandler.disable()  # pytest's stack dump on a deliberate abort is noise: the parent records the crash
    torch.set_num_threads(1)
    try:  # one malloc arena: each extra arena reserves 64 MiB of address space
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX
    except OSError:
        pass
    import warnings

    warnings.simplefilter("ignore")  # numpy's overflow warnings on garbage data are not outcomes

    def alarm(signum, frame):
        raise FuzzTimeout()

    signal.signal(signal.SIGALRM, alarm)
    mutator_originals = {name: seed_file(seeds, t).read_bytes() for name, t in TARGETS.items()}
    case_dir = work / "case" / "src"
    try:
        for name, t in TARGETS.items():  # warm up: imports, lazy inits; every seed must load as it is
            materialize(t, seeds, mutator_originals[name], case_dir)
            run_entry(t, case_dir, 1)
    except BaseException:  # noqa: B902 - a seed that does not load: the parent says so
        conn.send(f"seed {name} does not load: {traceback.format_exc()}")
        return
    if memory_budget:
        limit = address_space() + memory_budget
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, index, data = msg
        t = SELFTEST if name == SELFTEST.name else TARGETS[name]
        start = time.perf_counter()
        try:
            materialize(t, seeds, data, case_dir)
            signal.setitimer(signal.ITIMER_REAL, soft_timeout)
            try:
                run_entry(t, case_dir, index)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            outcome = Outcome("ok")
        except BaseException as e:  # noqa: B902 - the harness records every outcome
            outcome = classify(e)
        outcome.seconds = time.perf_counter() - start
        conn.send(outcome)


class Runner:
    """Runs cases in a forked worker; restarts it after a hang or a crash."""

    def __init__(self, seeds: dict[str, Path], work: Path | None = None, memory_budget: int = MEMORY_BUDGET,
                 soft_timeout: float = SOFT_TIMEOUT, hard_timeout: float = HARD_TIMEOUT):
        import multiprocessing

        self.ctx = multiprocessing.get_context("fork")
        self.seeds, self.memory_budget = seeds, memory_budget
        self.soft_timeout, self.hard_timeout = soft_timeout, hard_timeout
        self.work = Path(work or tempfile.mkdtemp(prefix="lmfuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        self.proc = None
        self.restarts = 0

    def _start(self) -> None:
        import lmconvert.convert  # noqa: F401 - imported once here, shared by every forked worker
        import lmconvert.engine.info  # noqa: F401
        import transformers  # noqa: F401

        parent, child = self.ctx.Pipe()
        work = self.work / f"w{self.restarts}"
        self.proc = self.ctx.Process(target=worker_main, args=(child, self.seeds, work, self.memory_budget, self.soft_timeout),
                                     daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        answer = self.conn.recv() if self.conn.poll(300) else "no answer in 300 s"
        if answer != "ready":
            raise RuntimeError(f"fuzz worker did not start: {answer}")

    def run(self, target: str, index: int, data: bytes) -> Outcome:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        start = time.perf_counter()
        self.conn.send((target, index, data))
        try:
            if self.conn.poll(self.hard_timeout):
                return self.conn.recv()
            outcome = Outcome("hang", f"no answer in {self.hard_timeout:.0f} s")
        except EOFError:
            self.proc.join(5)
            outcome = Outcome("crash", f"worker died, exit code {self.proc.exitcode}")
        self._kill()
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
            self.proc = None
            self.restarts += 1

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(10)
            except (BrokenPipeError, OSError):
                pass
        self._kill()
        shutil.rmtree(self.work, ignore_errors=True)
