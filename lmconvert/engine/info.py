"""`lmconvert info`: what an engine directory holds."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lmconvert.engine.reader import Engine


def print_info(path: str, verify: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    engine = Engine(path, verify=verify)
    c = engine.config
    files = engine.files()
    total = sum(f["size"] for f in files.values())
    quant = ", ".join(f"{k}={v}" for k, v in c.quantization.items()) or "none (floating point)"
    summary = Table.grid(padding=(0, 2))
    experts = []
    if c.num_experts:
        dense = f", dense layers {c.dense_layers}" if c.dense_layers else ""
        experts = [("experts", f"{c.num_experts} x {c.moe_intermediate_size} wide, top-{c.num_experts_per_tok}"
                               f"{' renormalized' if c.norm_topk_prob else ''}{dense}")]
    for key, value in [
        ("engine", str(engine.path)), ("architecture", c.arch), ("dtype", c.dtype), ("quantization", quant),
        ("layers", c.num_layers), ("hidden / intermediate", f"{c.hidden_size} / {c.intermediate_size}"), *experts,
        ("heads / kv heads / head dim", f"{c.num_heads} / {c.num_kv_heads} / {c.head_dim}"),
        ("vocab", c.vocab_size), ("max positions", c.max_position_embeddings),
        ("rope", f"theta={c.rope_theta:g}" + (f", scaling={c.rope_scaling}" if c.rope_scaling else "")),
        ("sliding window", c.sliding_window or "none"), ("tied embeddings", c.tie_word_embeddings),
        ("eos ids", c.eos_token_ids), ("size on disk", f"{total / 2**20:.1f} MiB in {len(files)} files"),
        ("checksums", "verified (sha256)" if verify else "sizes checked (use --verify for sha256)"),
    ]:
        summary.add_row(f"[bold]{key}", str(value))
    console.print(summary)
    table = Table("file", "bytes", "sha256")
    for rel, entry in sorted(files.items()):
        if not rel.startswith("layers/") or rel.endswith(("00000.safetensors", f"{c.num_layers - 1:05d}.safetensors")):
            table.add_row(rel, f"{entry['size']:,}", entry["sha256"][:16] + "…")
    console.print(table)
    if c.num_layers > 2:
        console.print(f"(layers 1..{c.num_layers - 2} omitted)")
