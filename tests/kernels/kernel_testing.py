"""Helpers shared by the kernel tests."""

import torch


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


class LaunchingTuner:
    """An Autotuner stand-in for CPU tests of the timing path, which only runs on CUDA: launches every
    candidate as timing would (the launcher runs them over cold weight copies), counts the launches, runs
    after_timing, and picks the first candidate."""

    def __init__(self):
        self.launched = 0

    def pick(self, key, candidates, launch, after_timing=None):
        for cfg in candidates:
            launch(cfg)
            self.launched += 1
        if after_timing is not None:
            after_timing()
        return candidates[0]
