"""A tiny per-shape autotuner: time each candidate launch once per key, remember the fastest.

Triton's @autotune keys on exact argument values and cannot prune by our own rules (a block must divide
the quant group), so the linears pick from their own candidate lists here. Off CUDA (the interpreter)
the first candidate is taken without timing.
"""

from dataclasses import dataclass, field

import torch

from ._triton import INTERPRET


@dataclass(slots=True)
class Autotuner:
    chosen: dict = field(default_factory=dict)  # key -> config, for the life of the process
    times: dict = field(default_factory=dict)  # key -> {config: ms} as measured (for benchmark logs)
    timing: bool = True  # False: take the first candidate (quick correctness runs)

    def pick(self, key, candidates, launch, after_timing=None):
        """launch(config) runs the kernel; returns the cached or newly timed best config for key.
        after_timing(): called once the candidates have been timed (to undo what the timing runs left)."""
        if key in self.chosen:
            return self.chosen[key]
        best = candidates[0]
        if self.timing and len(candidates) > 1 and torch.cuda.is_available() and not INTERPRET:
            from triton.testing import do_bench_cudagraph

            times = {}
            for cfg in candidates:
                try:  # graph replays: a few-us kernel timed with launches would measure the launch
                    times[cfg] = do_bench_cudagraph(lambda: launch(cfg), rep=20, return_mode="median")
                except Exception:  # out of shared memory / registers on this card: skip the candidate
                    continue
            best = min(times, key=times.get)
            self.times[key] = times
            if after_timing is not None:
                after_timing()
        self.chosen[key] = best
        return best

