"""A request as the scheduler sees it: token ids, how many of them have K/V in the cache, its blocks."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from lmconvert.runtime.sampling import SamplingParams

_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    num_cached_prefix: int = 0  # of those, how many came from the prefix cache (stats)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    matcher: object | None = None  # structured outputs: the grammar matcher the sampler asks for a mask

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int = 0, end: int | None = None) -> list[int]:
        n_prompt = len(self.prompt_ids)
        end = self.num_tokens if end is None else end
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - n_prompt):end - n_prompt]

    def completes(self, n: int) -> bool:
        """Whether computing its next n tokens puts every known token in the cache: the step then samples."""
        return self.num_computed + n == self.num_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
