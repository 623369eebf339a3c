"""Who gets in: a bound on the requests waiting for the engine (429 with Retry-After beyond it) and the drain
that SIGTERM starts (503 for new requests while the ones in flight finish). Used on the event loop only."""

from __future__ import annotations

import contextlib
import math
from collections import Counter

from lmconvert.runtime.serve_routes import ApiError

DEFAULT_MAX_QUEUE = 512  # four default batches (max_batch_size 128) waiting behind the running one
RETRY_AFTER_MAX_S = 60


class Admission:
    def __init__(self, max_queue: int = DEFAULT_MAX_QUEUE):
        self.max_queue = max_queue
        self.entering = 0  # admitted, not yet in the scheduler's queue (grammar compiling, prompt rendering)
        self.draining = False
        self.rejected: Counter[str] = Counter()

    def queued(self, engine) -> int:
        """Requests admitted that the engine has not started: entering, plus its scheduler's waiting sequences."""
        return self.entering + len(engine.scheduler.waiting)

    @contextlib.contextmanager
    def enter(self, aengine):
        """Counts a request as queued from admission until the engine holds it; refuses it when the queue is
        full (429) or the server is draining (503). Checked and counted in one go on the event loop, so a
        burst of requests cannot all pass the check before any is counted."""
        if self.draining:
            self.rejected["draining"] += 1
            raise ApiError(503, "the server is shutting down; send the request to another replica", "server_error",
                           code="shutting_down")
        queued = self.queued(aengine.engine)
        if queued >= self.max_queue:
            self.rejected["queue_full"] += 1
            rate = aengine.stats.finishes_per_second()  # the queue moves about this fast
            wait = RETRY_AFTER_MAX_S if rate <= 0 else min(RETRY_AFTER_MAX_S, max(1, math.ceil(queued / rate)))
            raise ApiError(429, f"the server is at capacity: {queued} requests are waiting (--max-queue "
                           f"{self.max_queue}); retry after {wait} s", "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(wait)})
        self.entering += 1
        try:
            yield
        finally:
            self.entering -= 1
