"""Running the app under uvicorn: `run_server` for `lmconvert serve`, `BackgroundServer` for tests and scripts."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from lmconvert.errors import UserError
from lmconvert.runtime.compiled_decode import compiling
from lmconvert.runtime.serve_reasoning import check_reasoning_parser
from lmconvert.runtime.serve_admission import DEFAULT_MAX_QUEUE
from lmconvert.runtime.server import DRAIN_TIMEOUT_S, create_app

log = logging.getLogger("lmconvert.serve")
SHUTDOWN_GRACE_S = 5  # after the drain: for responses still being written when uvicorn closes the connections
# Idle keep-alive connections live longer than a load balancer's idle timeout (60 s on the common ones; nginx's own
# default is 75): else it may reuse a connection the server is closing, and its client gets a reset (uvicorn: 5 s)
KEEP_ALIVE_S = 75


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM drains before the usual shutdown (ServerState.drain: readiness off, no new
    work, the requests in flight get drain_timeout_s) and the process then exits 0 — uvicorn would re-raise the
    SIGTERM it caught and die of it. A second SIGTERM, or Ctrl-C, shuts down at once as uvicorn does."""

    def __init__(self, config: uvicorn.Config, drain_timeout_s: float = DRAIN_TIMEOUT_S):
        super().__init__(config)
        self.state = config.app.state.serve  # the app's ServerState (server.create_app)
        self.drain_timeout_s = drain_timeout_s
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        """A signal handler (main thread), also called from other threads by tests: only schedules the drain."""
        if sig == signal.SIGTERM and not self.draining and not self.should_exit and self._loop is not None:
            self.draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        async def drain_then_exit():
            try:
                await self.state.drain(self.drain_timeout_s)
            finally:
                self.should_exit = True

        self._drain_task = self._loop.create_task(drain_then_exit())


def default_model_name(model: str) -> str:
    """An engine dir's or checkpoint's base name (a file's stem); a model id as given."""
    path = Path(model)
    if not path.exists():
        return model
    return path.stem if path.is_file() else path.resolve().name


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything else starts: a port in use is one line, not uvicorn's exit 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --server-port)") from None
    return sock


def log_config(log_level: str) -> dict:
    """uvicorn's logging, with lmconvert's own server messages (loaded, listening, warnings) in the same format."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["lmconvert"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    return config


def run_server(model: str, build_engine, *, host: str, port: int, model_name: str | None = None,
               reasoning_parser: str | None = None, tool_call_parser: str | None = None,
               api_keys: tuple[str, ...] = (), max_queue: int = DEFAULT_MAX_QUEUE,
               drain_timeout_s: float = DRAIN_TIMEOUT_S, log_level: str = "info", check_model=None) -> None:
    """Serves until interrupted or drained (SIGTERM); the model loads after the port opens. check_model() runs
    first (a cheap look at the model: a missing or broken engine is reported before the server starts). A failed
    load, or an engine that breaks while serving, stops the server and raises UserError with the reason."""
    check_reasoning_parser(reasoning_parser)
    sock = listening_socket(host, port)
    if check_model is not None:
        try:
            check_model()
        except BaseException:
            sock.close()
            raise
    holder: dict = {}

    def stop(reason: str) -> None:
        holder["error"] = reason
        holder["server"].should_exit = True

    app = create_app(build_engine, model_name or default_model_name(model), reasoning_parser=reasoning_parser,
                     tool_call_parser=tool_call_parser, api_keys=api_keys, max_queue=max_queue, on_error=stop)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=log_config(log_level),
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S, timeout_keep_alive=KEEP_ALIVE_S)
    server = holder["server"] = DrainingServer(config, drain_timeout_s)
    log.info("lmconvert serve: http://%s:%d/v1 (OpenAI API); the model loads now, /health answers 503 until "
             "it is ready", host, port)
    if not api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s with no API key: anyone who can reach this port can use the model "
                    "(--api-keys or LMCONVERT_API_KEYS to require one)", host)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once its graceful shutdown is done
        pass
    if "error" in holder:
        raise UserError(f"{model}: {holder['error']}")
    if compiling():  # a first CPU compile takes minutes: a drained server must not outlast its grace period
        log.info("exiting without waiting for the CPU decode step's compile (it starts over next time)")
        logging.shutdown()
        os._exit(0)  # no interpreter teardown: Python would join the compile thread (compiled_decode.py)


class BackgroundServer:
    """`with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")`: uvicorn on a thread, on a free
    127.0.0.1 port chosen by the OS, entered once the model is loaded; leaving the block stops it."""

    def __init__(self, app, host: str = "127.0.0.1", start_timeout_s: float = 60.0,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S):
        self.app, self.host, self.start_timeout_s, self.drain_timeout_s = app, host, start_timeout_s, drain_timeout_s
        self.server: DrainingServer | None = None

    def __enter__(self) -> "BackgroundServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        self.server = DrainingServer(config, self.drain_timeout_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        state = self.app.state.serve
        while not (self.server.started and (state.aengine is not None or state.load_error)):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        if state.load_error:
            self.__exit__()
            raise RuntimeError(f"the model did not load: {state.load_error}")
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def sigterm(self) -> None:
        """What SIGTERM does to `lmconvert serve` (signals reach only the main thread; this server runs on another)."""
        self.server.handle_exit(signal.SIGTERM, None)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
