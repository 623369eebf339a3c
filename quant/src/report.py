"""The summary printed after `lmconvert quantize`."""

from __future__ import annotations

from rich.console import Console

from lmconvert.quant.moe_layer import MIN_EXPERT_TOKENS
from lmconvert.quant.quantize import QuantResult


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_summary(result: QuantResult, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{result.scheme or result.method}[/bold] engine written to {result.path}")
    console.print(f"  time        {result.seconds:.1f} s")
    console.print(f"  size        {_mib(result.bytes_before)} -> {_mib(result.bytes_after)}  "
                  f"({result.compression:.2f}x smaller)")
    if result.layers:
        rtn = sum(s.loss_rtn for s in result.layers) / len(result.layers)
        ours = sum(s.loss for s in result.layers) / len(result.layers)
        console.print(f"  layer error mean relative output error: round-to-nearest {rtn:.2e} -> {result.method} {ours:.2e}")
        fallbacks = sum(s.expert_fallbacks for s in result.layers)
        if fallbacks:
            console.print(f"  experts     {fallbacks} expert(s) got fewer than {MIN_EXPERT_TOKENS} calibration tokens: "
                          "rounded on a plain min/max grid (more --calib-samples routes tokens to more experts)")
