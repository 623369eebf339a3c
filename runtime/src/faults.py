"""Test-only fault injection, so the server's handling of a failing engine can be tested end to end.

    LMCONVERT_INJECT_FAULT=raise@5         the engine's 5th step raises (once)
    LMCONVERT_INJECT_FAULT=raise-from@5    every step from the 5th on raises (a device that stays broken)
    LMCONVERT_INJECT_FAULT=nan@5           the 5th step's first sampled row gets NaN logits
Unset (always, outside tests) it costs one integer compare a step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lmconvert.errors import UserError

KINDS = ("raise", "raise-from", "nan")


class InjectedFault(RuntimeError):
    pass


@dataclass(slots=True)
class FaultInjector:
    kind: str | None = None
    at_step: int = 0
    steps: int = 0

    @classmethod
    def from_env(cls) -> FaultInjector:
        spec = os.environ.get("LMCONVERT_INJECT_FAULT", "").strip()
        if not spec:
            return cls()
        kind, _, step = spec.partition("@")
        if kind not in KINDS or not step.isdigit() or int(step) < 1:
            raise UserError(f"LMCONVERT_INJECT_FAULT={spec!r}: expected KIND@STEP with KIND one of {', '.join(KINDS)}")
        return cls(kind, int(step))

    def before_step(self, sampler) -> None:
        if self.kind is None:
            return
        self.steps += 1
        due = self.steps >= self.at_step if self.kind == "raise-from" else self.steps == self.at_step
        if not due:
            return
        if self.kind == "nan":
            sampler.inject_nan = True
        else:
            raise InjectedFault(f"fault injected at engine step {self.steps}")
