"""OpenAI-compatible HTTP server over the continuously batched engine (`lmconvert serve`).

    app = create_app(lambda: LLMEngine("./engine"), model_name="smol")   # the model loads after startup
    uvicorn.run(app, port=23333)

/health answers 503 until the model is loaded, so a readiness probe can watch a slow load, and again from the
moment a drain starts (SIGTERM, see serve_launch.DrainingServer), so the balancer stops sending work.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lmconvert.errors import debug_enabled, one_line
from lmconvert.runtime.engine import LLMEngine
from lmconvert.runtime.openai_protocol import ChatCompletionRequest, CompletionRequest, error_body
from lmconvert.runtime.sampling import SamplingParams, generation_defaults as sampling_defaults
from lmconvert.runtime.serve_admission import DEFAULT_MAX_QUEUE, Admission
from lmconvert.runtime.serve_engine import AsyncEngine, EngineFailure
from lmconvert.runtime.serve_metrics import prometheus_text
from lmconvert.runtime.serve_tools import resolve_parser
from lmconvert.runtime.serve_routes import (ApiError, ServeConfig, chat_reply, chat_stream, check_request, collect,
                                            completion_reply, completion_stream, start_chat, start_completion)

log = logging.getLogger("lmconvert.serve")
MAX_BODY_BYTES = 8 * 1024 * 1024
DRAIN_TIMEOUT_S = 30.0  # Kubernetes' default grace period is 30 s; the shipped manifest gives 45


@dataclass(slots=True)
class ServerState:
    model_name: str
    reasoning_parser: str | None
    tool_call_parser: str | None = None
    admission: Admission = None
    aengine: AsyncEngine | None = None
    cfg: ServeConfig | None = None
    load_error: str | None = None
    created: int = 0

    async def drain(self, timeout_s: float) -> None:
        """SIGTERM's first half: readiness and admission close at once; the requests in flight get timeout_s
        to finish, then end with a 503 error event. The caller then shuts the server down."""
        self.admission.draining = True
        aengine = self.aengine
        if aengine is None or not aengine.alive:
            return
        log.info("draining: /health answers 503, new requests 503; waiting up to %g s for the requests in flight",
                 timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (aengine.idle and self.admission.entering == 0) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not aengine.idle:
            log.warning("drain timeout (%g s): ending the requests still in flight", timeout_s)
            try:
                await aengine.fail_all(f"the server is shutting down (its {timeout_s:g} s drain ended)", 503)
            except EngineFailure:  # the engine stopped meanwhile: its requests ended with it
                pass
        else:
            log.info("drained: every request in flight finished")


def generation_defaults(engine: LLMEngine) -> SamplingParams:
    """The model's generation_config as SamplingParams, exactly as `chat` and `generate` read it."""
    return SamplingParams(max_tokens=1, **sampling_defaults(engine.generation_config))


def _load(state: ServerState, load: Callable[[], LLMEngine], on_error: Callable[[str], None] | None) -> None:
    """on_error(message) on a failed load, and later if the engine breaks (the server should then exit)."""
    try:
        engine = load()
        engine.reserve_kv_cache()
        tools = state.tool_call_parser and resolve_parser(state.tool_call_parser, engine.tokenizer.chat_template)
        cfg = ServeConfig(state.model_name, state.reasoning_parser, generation_defaults(engine), tools or None)
        on_fatal = on_error and (lambda reason: on_error(f"the engine failed: {reason}"))
        aengine = AsyncEngine(engine, on_fatal=on_fatal)
        aengine.start()
    except Exception as e:  # reported as one line, as the CLI reports errors; the traceback with --debug
        if debug_enabled():
            log.exception("loading the model failed")
        state.load_error = one_line(e)
        if on_error is not None:
            on_error(f"could not load the model: {state.load_error}")
        return
    state.cfg, state.aengine = cfg, aengine  # cfg first: handlers check aengine
    log.info("model %s loaded; ready", state.model_name)


class RequestGate:
    """Before any parsing: the API key on /v1/ routes (401), then the body read up to max_bytes (413 beyond) and
    replayed to the app. Later receive() calls go to the server, so a handler still hears the client leave."""

    def __init__(self, app, api_keys: tuple[str, ...], max_bytes: int):
        self.app, self.keys, self.max_bytes = app, [key.encode() for key in api_keys], max_bytes

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare against every key, so the time taken does not tell which prefix matched
        matches = [secrets.compare_digest(token.strip(), key) for key in self.keys]
        return scheme.lower() == b"bearer" and any(matches)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.keys and scope["path"].startswith("/v1/") and not self._authorized(scope):
            message = "missing or invalid API key: send 'Authorization: Bearer <key>'"
            return await JSONResponse(error_body(message, code="invalid_api_key"), status_code=401,
                                      headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await JSONResponse(error_body(f"request body is over {self.max_bytes} bytes"),
                                          status_code=413)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class EventStream(StreamingResponse):
    """SSE that also listens for the client leaving while no token is due, and always closes its generator,
    whose `finally` then aborts the engine requests (freeing their KV blocks) at once."""

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as group:
            async def stream():
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away mid-write
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        await self.body_iterator.aclose()


async def until_disconnect(request: Request, work):
    """Awaits work unless the client disconnects first; then cancels it (its `finally` aborts) and returns None.
    An error from work is raised as itself (not wrapped in the task group's ExceptionGroup), so its handler
    answers it."""
    result, errors = [], []
    async with anyio.create_task_group() as group:
        async def run():
            try:
                result.append(await work)
            except Exception as e:
                errors.append(e)
            group.cancel_scope.cancel()

        group.start_soon(run)
        while (await request.receive())["type"] != "http.disconnect":
            pass
        group.cancel_scope.cancel()
    if errors:
        raise errors[0]
    return result[0] if result else None


def _param(error: dict) -> str | None:
    """The field a validation error is about, e.g. "messages.0.role", without pydantic's union-member tags."""
    parts = []
    for part in error.get("loc", ())[1:]:  # loc starts with "body"
        if isinstance(part, str) and not part.isidentifier():  # "list[str]", "function-after[...]"
            break
        if part in ("str", "int", "float", "bool", "list", "dict") and parts:
            break
        parts.append(str(part))
    return ".".join(parts) or None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        errors = e.errors()
        if not errors or errors[0].get("type") == "json_invalid":
            return JSONResponse(error_body("request body is not valid JSON"), status_code=400)
        param = _param(errors[0])
        # a union field fails once per member ("valid string", "valid list"): say all of them
        reasons = list(dict.fromkeys(err.get("msg", "invalid value") for err in errors if _param(err) == param))
        message = f"{param}: {' or '.join(reasons)}" if param else "the request body must be a JSON object"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):  # logged with its traceback; the client sees one line
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


def create_app(load: Callable[[], LLMEngine] | LLMEngine, model_name: str, *, reasoning_parser: str | None = None,
               tool_call_parser: str | None = None, api_keys: tuple[str, ...] = (), max_body_bytes: int = MAX_BODY_BYTES,
               max_queue: int = DEFAULT_MAX_QUEUE, on_error: Callable[[str], None] | None = None) -> FastAPI:
    """The app; `load` builds the engine on a thread after startup (or is an engine already built).
    on_error(message): the model failed to load, or the engine broke later; the server should stop."""
    state = ServerState(model_name, reasoning_parser, tool_call_parser, Admission(max_queue), created=int(time.time()))
    loader = load if callable(load) else (lambda: load)

    async def lifespan(app: FastAPI):
        threading.Thread(target=_load, args=(state, loader, on_error), name="lmconvert-load", daemon=True).start()
        yield
        if state.aengine is not None:
            await asyncio.to_thread(state.aengine.shutdown)

    # /openapi.json is published (clients and API fuzzers read it); the docs pages would fetch scripts from a CDN
    app = FastAPI(title="lmconvert", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    app.add_middleware(RequestGate, api_keys=tuple(api_keys), max_bytes=max_body_bytes)
    _install_error_handlers(app)

    def ready() -> tuple[ServeConfig, AsyncEngine]:
        if state.aengine is None or not state.aengine.alive:
            if state.aengine is not None and state.aengine.fatal:
                message = f"the engine failed: {state.aengine.fatal}"
            else:
                message = f"model failed to load: {state.load_error}" if state.load_error else "model is loading"
            raise ApiError(503, message, "server_error")
        return state.cfg, state.aengine

    @app.get("/health")
    async def health():
        ready()
        if state.admission.draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        cfg, aengine = ready()
        return PlainTextResponse(prometheus_text(aengine.engine, aengine.stats, state.admission, cfg.model_name),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        _, aengine = ready()
        card = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "lmconvert",
                "max_model_len": aengine.engine.session_len}
        return {"object": "list", "data": [card]}

    async def generate(body, request: Request, start, stream, reply):
        cfg, aengine = ready()
        check_request(body, cfg)
        with state.admission.enter(aengine):
            job = await start(body, cfg, aengine)
        if body.stream:
            return EventStream(stream(job, cfg, body.include_usage))
        outs = await until_disconnect(request, collect(job))
        return reply(job, outs, cfg) if outs is not None else Response(status_code=499)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generate(body, request, start_chat, chat_stream, chat_reply)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generate(body, request, start_completion, completion_stream, completion_reply)

    return app
