"""Server counters and their Prometheus text exposition (format 0.0.4), written by hand: a few lines, no dependency."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many recent seconds


class ServeStats:
    """Counters written by the engine thread and read by /metrics; one lock keeps the pair consistent."""

    def __init__(self):
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter[str] = Counter()
        self.failed_steps = 0
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic time, tokens generated in that step)
        self._finish_times: deque[float] = deque()  # monotonic times of recent finishes (for Retry-After)

    def add_prompt(self, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += tokens

    def add_generated(self, tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.generation_tokens += tokens
            self._recent.append((now, tokens))
            self._trim(now)

    def step_failed(self) -> None:
        with self._lock:
            self.failed_steps += 1

    def finish(self, reason: str | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.finished[reason or "unknown"] += 1
            self._finish_times.append(now)
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        while self._finish_times and self._finish_times[0] < now - RATE_WINDOW_S:
            self._finish_times.popleft()

    def finishes_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return len(self._finish_times) / RATE_WINDOW_S

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def snapshot(self) -> dict:
        with self._lock:
            return {"prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
                    "finished": dict(self.finished), "failed_steps": self.failed_steps}


def prometheus_text(engine, stats: ServeStats, admission, model_name: str) -> str:
    """The engine's queue and cache gauges, the admission's (what an autoscaler keys on) and the server's counters.
    The scheduler's lists are read from the event loop while the engine thread may be changing them: len() is
    atomic, and a gauge one step stale is fine."""
    label = f'model_name="{_escape(model_name)}"'
    snap = stats.snapshot()
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP lmconvert_{name} {help_}", f"# TYPE lmconvert_{name} {kind}"])
        lines.extend(f"lmconvert_{name}{{{labels}}} {value:g}" for labels, value in samples)

    metric("requests_running", "gauge", "Sequences in the running batch.", [(label, len(engine.scheduler.running))])
    metric("requests_waiting", "gauge", "Sequences queued for admission.", [(label, len(engine.scheduler.waiting))])
    metric("requests_queued", "gauge", "Requests waiting for the engine, counted against --max-queue.",
           [(label, admission.queued(engine))])
    metric("queue_limit", "gauge", "--max-queue: requests beyond it are answered 429.", [(label, admission.max_queue)])
    metric("draining", "gauge", "1 once SIGTERM started the drain.", [(label, int(admission.draining))])
    used, total = engine.block_manager.num_used, len(engine.block_manager.blocks)
    metric("kv_blocks_used", "gauge", "KV cache blocks held by sequences.", [(label, used)])
    metric("kv_blocks_total", "gauge", "KV cache blocks in the pool.", [(label, total)])
    metric("kv_cache_usage_ratio", "gauge", "Fraction of KV cache blocks held.", [(label, used / max(total, 1))])
    metric("generation_tokens_per_second", "gauge", f"Generated tokens per second over the last {RATE_WINDOW_S:g} s.",
           [(label, stats.tokens_per_second())])
    metric("prompt_tokens_total", "counter", "Prompt tokens admitted.", [(label, snap["prompt_tokens"])])
    metric("generation_tokens_total", "counter", "Tokens generated.", [(label, snap["generation_tokens"])])
    metric("requests_finished_total", "counter", "Finished sequences by reason (stop, length, abort).",
           [(f'{label},finish_reason="{_escape(reason)}"', count) for reason, count in sorted(snap["finished"].items())])
    metric("requests_rejected_total", "counter", "Requests refused at admission (queue_full: 429, draining: 503).",
           [(f'{label},reason="{reason}"', admission.rejected[reason]) for reason in ("queue_full", "draining")])
    metric("engine_failed_steps_total", "counter", "Engine steps that raised (their requests ended with an error).",
           [(label, snap["failed_steps"])])
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
