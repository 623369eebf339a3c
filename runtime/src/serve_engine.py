"""AsyncEngine: one thread owns the LLMEngine and steps it; coroutines reach it through a command queue.

The engine, its scheduler and its tokenizer are not thread-safe, so everything that touches them (tokenizing,
adding, aborting, stepping) runs on that one thread. Each request's outputs go back to the asyncio queue it was
submitted with, one `call_soon_threadsafe` per step for all of them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import defaultdict
from typing import Callable

from lmconvert.devices import release_free_heap
from lmconvert.runtime.engine import LLMEngine, RequestOutput
from lmconvert.runtime.sampling import SamplingParams
from lmconvert.runtime.serve_metrics import ServeStats

log = logging.getLogger("lmconvert.serve")
# Failing steps in a row after which the engine is taken for broken (the device, not one request's input):
# its thread stops, /health turns 503 and the server exits non-zero so the orchestrator restarts it.
MAX_FAILED_STEPS = 3

# build(engine) -> (prompt token ids, one SamplingParams per choice); runs on the engine thread
PromptBuilder = Callable[[LLMEngine], tuple[list[int], list[SamplingParams]]]


class EngineFailure(Exception):
    """Put on a request's queue when a step failed or the server stops; the request is over.
    status: the HTTP status its client sees (500: the engine failed; 503: the server is shutting down)."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


def _device_lost(error: Exception) -> bool:
    """A CUDA error poisons its context: no later step can succeed, so there is no point in retrying."""
    return type(error).__name__ == "AcceleratorError" or "CUDA error" in str(error)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for sink, item in items:
        sink.put_nowait(item)


def _send(items: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, object]]) -> None:
    """Hands items to their queues with one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
    for loop, sink, item in items:
        by_loop[loop].append((sink, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_fatal: Callable[[str], None] | None = None):
        self.engine = engine
        self.on_fatal = on_fatal  # called (on the engine thread) once the engine is taken for broken
        self.fatal: str | None = None
        self.stats = ServeStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # request id -> (event loop, queue, choice index)
        self._sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmconvert-engine", daemon=True)

    # ---- called from the event loop -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put((lambda engine: None, None))  # wake an idle loop
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def idle(self) -> bool:
        """No request in the engine and none being added (read from the event loop: a step stale at most)."""
        return not self._sinks and not self.engine.has_unfinished()

    def fail_all(self, message: str, status: int) -> asyncio.Future:
        """Ends every request in flight with this error (the drain's deadline)."""
        return self.call(lambda engine: self._fail_all(EngineFailure(message, status)))

    def call(self, fn: Callable[[LLMEngine], object]) -> asyncio.Future:
        """Runs fn(engine) on the engine thread between two steps; await the result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stop.is_set() or not self.alive:
            future.set_exception(EngineFailure("the engine is not running"))
        else:
            self._commands.put((fn, future))
        return asyncio.wrap_future(future)

    async def submit(self, build: PromptBuilder, sink: asyncio.Queue, first_index: int = 0) -> list[int]:
        """Adds one engine request per choice; (first_index + choice, RequestOutput) items then arrive on sink.
        Errors from build (bad prompt, over the session length) are raised here."""
        loop = asyncio.get_running_loop()

        def add(engine: LLMEngine) -> list[int]:
            ids, choices = build(engine)
            request_ids = [engine.add_request(ids, params) for params in choices]
            for index, rid in enumerate(request_ids, start=first_index):
                self._sinks[rid] = (loop, sink, index)
            self.stats.add_prompt(len(ids) * len(request_ids))
            return request_ids

        return await self.call(add)

    def abort(self, request_ids: list[int]) -> None:
        """Stops these requests and frees their KV blocks before the next step; finished ones are ignored."""
        self._commands.put((lambda engine: [self._abort(engine, rid) for rid in request_ids], None))

    # ---- the engine thread ----------------------------------------------------------------------
    def _abort(self, engine: LLMEngine, rid: int) -> None:
        if self._sinks.pop(rid, None) is not None:
            engine.abort(rid)
            self.stats.finish("abort")

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = command
            try:
                result = fn(self.engine)
            except Exception as e:  # handed to the awaiting coroutine, which turns it into an HTTP error
                if future is not None:
                    future.set_exception(e)
            else:
                if future is not None:
                    future.set_result(result)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug outside a step: nobody may be left waiting on a dead engine
            log.exception("the engine thread failed")
            self._die(f"engine thread failed: {type(e).__name__}: {e}")
        ending = EngineFailure(f"the engine stopped: {self.fatal}" if self.fatal else "the server is shutting down",
                               500 if self.fatal else 503)
        self._fail_all(ending)
        while True:  # nobody will run what is still queued: release whoever awaits it
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None:
                future.set_exception(ending)

    def _loop(self) -> None:
        failed_in_a_row = 0
        while not self._stop.is_set():
            self._run_commands(block=not self.engine.has_unfinished())
            if self._stop.is_set() or not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                failed_in_a_row += 1
                self.stats.step_failed()
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(e)
                if failed_in_a_row >= MAX_FAILED_STEPS or _device_lost(e):
                    self._die(f"{failed_in_a_row} step(s) in a row failed, the last with {type(e).__name__}: {e}")
                    return
                continue
            failed_in_a_row = 0
            self._deliver(outputs)
            if not self.engine.has_unfinished():  # busy -> idle: what the burst freed goes back to the OS
                release_free_heap()

    def _die(self, reason: str) -> None:
        self.fatal = reason
        self._stop.set()
        log.error("the engine is broken (%s); stopping the server", reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        items = []
        for out in outputs:
            target = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if target is None:
                continue
            loop, sink, index = target
            items.append((loop, sink, (index, out)))
            if out.finished:
                self.stats.finish(out.finish_reason)
        self.stats.add_generated(len(outputs))
        _send(items)

    def _fail_all(self, error: Exception) -> None:
        failure = error if isinstance(error, EngineFailure) else EngineFailure(f"engine error: {type(error).__name__}")
        items = [(loop, sink, (index, failure)) for loop, sink, index in self._sinks.values()]
        for rid in list(self._sinks):
            self._abort(self.engine, rid)
        _send(items)
