"""The generation endpoints: an OpenAI request becomes one engine request per choice; outputs become a reply or SSE."""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import jinja2
import jinja2.meta

from lmconvert.errors import UserError
from lmconvert.runtime.engine import LLMEngine, RequestOutput
from lmconvert.runtime.openai_protocol import (ChatCompletionRequest, CompletionRequest, chat_logprobs, chat_message,
                                               completion_logprobs, envelope, error_body, new_id, now, usage)
from lmconvert.runtime.sampling import SamplingParams
from lmconvert.runtime.serve_engine import AsyncEngine, EngineFailure
from lmconvert.runtime.grammar import Guided
from lmconvert.runtime.serve_reasoning import ReasoningStream, prompt_opens_think, split_reasoning
from lmconvert.runtime.serve_tools import ToolCallStream, call_grammar, parse_tool_calls

# Exceptions from rendering or tokenizing a prompt that mean "bad request", not "server bug".
PROMPT_ERRORS = (UserError, ValueError, TypeError, jinja2.TemplateError)
RESERVED_TEMPLATE_KWARGS = ("tokenize", "conversation", "messages", "return_dict")


@dataclass(slots=True)
class ServeConfig:
    model_name: str
    reasoning_parser: str | None
    defaults: SamplingParams  # the model's generation_config, used where a request leaves a field out
    tool_parser: str | None = None  # serve --tool-call-parser, `auto` resolved against the chat template


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


@dataclass(slots=True)
class Job:
    """One HTTP request's engine requests; their outputs arrive on sink as (choice index, output or failure)."""
    aengine: AsyncEngine
    sink: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    done: set[int] = field(default_factory=set)
    opens_think: bool = False  # the chat prompt leaves <think> open
    tool_parser: str | None = None  # this request offered tools: calls are parsed out of its answers

    async def next(self) -> tuple[int, RequestOutput]:
        index, out = await self.sink.get()
        if isinstance(out, EngineFailure):
            self.done.update(range(len(self.request_ids)))  # the engine dropped them all already
            raise ApiError(out.status, str(out), "server_error")
        if out.finish_reason == "error":  # this request's logits held NaN; the others in the batch go on
            self.done.add(index)
            raise ApiError(500, "the model produced NaN logits for this request; it was stopped", "server_error")
        if out.finished:
            self.done.add(index)
        return index, out

    @property
    def running(self) -> bool:
        return len(self.done) < len(self.request_ids)

    def abort_unfinished(self) -> None:
        pending = [rid for i, rid in enumerate(self.request_ids) if i not in self.done]
        if pending:
            self.aengine.abort(pending)


def check_request(req: ChatCompletionRequest | CompletionRequest, cfg: ServeConfig) -> None:
    if req.model is not None and req.model != cfg.model_name:
        raise ApiError(404, f"model {req.model!r} not found; this server serves {cfg.model_name!r}",
                       param="model", code="model_not_found")
    feature = req.unsupported()
    if feature:
        raise ApiError(400, f"{feature} is not supported by this server", param=feature)
    if req.uses_tools and cfg.tool_parser is None:
        raise ApiError(400, "tools need a server started with --tool-call-parser (qwen3, qwen2.5, llama3 or auto)",
                       param="tools")


def choice_params(req, cfg: ServeConfig, engine: LLMEngine, ids: list[int],
                  guided: Guided | None = None) -> list[SamplingParams]:
    """One SamplingParams per choice; checks the prompt fits the session with room for max_tokens."""
    if not ids:
        raise UserError("the prompt is empty")
    if min(ids) < 0 or max(ids) >= engine.config.vocab_size:
        raise UserError(f"prompt token ids must lie in [0, {engine.config.vocab_size})")
    room = engine.session_len - len(ids)
    limit = req.token_limit if req.token_limit is not None else room
    if room < 1 or limit > room:
        raise UserError(f"the prompt has {len(ids)} tokens and max_tokens is {limit}: together over the session "
                        f"length of {engine.session_len} tokens; shorten the prompt or lower max_tokens")
    return [req.sampling_params(cfg.defaults, limit, choice, guided) for choice in range(req.n)]


async def _submit(job: Job, build: Callable[[LLMEngine], tuple[list[int], list[SamplingParams]]]) -> None:
    try:
        rids = await job.aengine.submit(build, job.sink, first_index=len(job.request_ids))
    except PROMPT_ERRORS as e:
        job.abort_unfinished()  # earlier prompts of a batch were already added
        raise ApiError(400, str(e).splitlines()[0] if str(e) else type(e).__name__, param="prompt") from None
    job.request_ids.extend(rids)


def render_chat(engine: LLMEngine, messages: list[dict], template_kwargs: dict, tools: list[dict] | None = None) -> str:
    template = getattr(engine.tokenizer, "chat_template", None)
    if not template:
        raise UserError("this model has no chat template; use /v1/completions")
    if tools and "tools" not in _template_variables(template):
        raise UserError("this model's chat template takes no tools; start the server with a template that does "
                        "(--chat-template chatml-tools, or a file of your own)")
    kwargs = {"add_generation_prompt": True,
              **{k: v for k, v in template_kwargs.items() if k not in RESERVED_TEMPLATE_KWARGS}}
    return engine.tokenizer.apply_chat_template(messages, tokenize=False, tools=tools, **kwargs)


@functools.lru_cache(maxsize=8)
def _template_variables(template: str) -> frozenset[str]:
    return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))


async def chat_grammar(req: ChatCompletionRequest, cfg: ServeConfig, aengine: AsyncEngine) -> Guided | None:
    """The grammar a chat answer must match: response_format's, or one call for tool_choice required / named.
    Compiled here, off the engine thread (a large schema takes a while; other requests' steps go on
    meanwhile); the engine then finds it in its cache. A schema it cannot take is a 400."""
    forced = req.forced_tools()
    param = "tools" if forced else "response_format"
    try:
        guided = call_grammar(forced, cfg.tool_parser) if forced else req.response_grammar
        if guided is not None:
            await asyncio.to_thread(aengine.engine.grammars.compile, guided)
    except UserError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None
    return guided


async def start_chat(req: ChatCompletionRequest, cfg: ServeConfig, aengine: AsyncEngine) -> Job:
    guided = await chat_grammar(req, cfg, aengine)
    job = Job(aengine, tool_parser=cfg.tool_parser if req.uses_tools else None)
    messages = [m.for_template() for m in req.messages]
    tools = req.tools_for_template()

    def build(engine: LLMEngine):
        text = render_chat(engine, messages, req.chat_template_kwargs or {}, tools)
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote the specials
        job.prompt_tokens, job.opens_think = len(ids), prompt_opens_think(text)
        return ids, choice_params(req, cfg, engine, ids, guided)

    await _submit(job, build)
    return job


async def start_completion(req: CompletionRequest, cfg: ServeConfig, aengine: AsyncEngine) -> Job:
    job = Job(aengine)
    prompts = req.prompts()
    if not prompts:
        raise ApiError(400, "the prompt is empty", param="prompt")
    for prompt in prompts:
        def build(engine: LLMEngine, prompt=prompt):
            ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
            choices = choice_params(req, cfg, engine, ids)
            job.prompt_tokens += len(ids)
            return ids, choices

        await _submit(job, build)
    return job


# ---- whole replies -------------------------------------------------------------------------------
async def collect(job: Job) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(job.request_ids)
    try:
        while job.running:
            index, out = await job.next()
            if out.finished:
                finals[index] = out
    finally:
        job.abort_unfinished()
    return finals


def _completion_tokens(outs: list[RequestOutput]) -> int:
    return sum(len(o.token_ids) for o in outs)


def chat_reply(job: Job, outs: list[RequestOutput], cfg: ServeConfig) -> dict:
    choices = []
    for index, out in enumerate(outs):
        reasoning, content = (split_reasoning(out.text, job.opens_think) if cfg.reasoning_parser
                              else (None, out.text))
        content, calls = parse_tool_calls(content, job.tool_parser) if job.tool_parser else (content, [])
        choices.append({"index": index, "message": chat_message(content, reasoning, calls),
                        "logprobs": None if out.logprobs is None else chat_logprobs(out.logprobs),
                        "finish_reason": _finish(out.finish_reason, bool(calls))})
    return envelope("chat.completion", new_id("chatcmpl"), now(), cfg.model_name, choices,
                    usage(job.prompt_tokens, _completion_tokens(outs)))


def _finish(reason: str | None, called: bool) -> str | None:
    """OpenAI's finish_reason: tool_calls when the answer ended (not cut) after calling tools."""
    return "tool_calls" if called and reason == "stop" else reason


def completion_reply(job: Job, outs: list[RequestOutput], cfg: ServeConfig) -> dict:
    choices = [{"index": i, "text": out.text,
                "logprobs": None if out.logprobs is None else completion_logprobs(out.logprobs, 0),
                "finish_reason": out.finish_reason} for i, out in enumerate(outs)]
    return envelope("text_completion", new_id("cmpl"), now(), cfg.model_name, choices,
                    usage(job.prompt_tokens, _completion_tokens(outs)))


# ---- streams -------------------------------------------------------------------------------------
def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _stream(job: Job, cfg: ServeConfig, kind: str, include_usage: bool, first: list[dict],
                  choice: Callable[[int, RequestOutput], dict | None],
                  logprobs: Callable[[list, int], dict]) -> AsyncIterator[str]:
    """SSE events: the `first` choices, one per output that carries text or a finish, usage if asked, [DONE].
    A choice's event carries the logprobs of its tokens since its last event (text held back for a possible
    stop string delays them with it): logprobs(entries, characters sent before them).
    A client that goes away cancels this generator at its await; `finally` then aborts what still runs."""
    rid, created, generated = new_id("chatcmpl" if kind.startswith("chat") else "cmpl"), now(), 0
    frame = lambda choices, usage_=None: _sse(  # noqa: E731
        envelope(kind, rid, created, cfg.model_name, choices, usage_, with_usage=include_usage))
    tokens_sent = [0] * len(job.request_ids)  # logprob entries already sent, per choice
    chars_sent = [0] * len(job.request_ids)
    try:
        if first:
            yield frame(first)
        while job.running:
            try:
                index, out = await job.next()
            except ApiError as e:
                yield _sse(e.body)
                break
            body = choice(index, out)
            if body is not None or out.finished:
                entries = None
                if out.logprobs is not None:
                    new = out.logprobs[tokens_sent[index]:]
                    entries = logprobs(new, chars_sent[index])
                    tokens_sent[index] += len(new)
                    chars_sent[index] += sum(len(e.text) for e in new)
                yield frame([{"index": index, "logprobs": entries,
                              "finish_reason": out.finish_reason if out.finished else None, **(body or {})}])
            if out.finished:
                generated += len(out.token_ids)
        else:
            if include_usage:
                yield frame([], usage(job.prompt_tokens, generated))
        yield "data: [DONE]\n\n"
    finally:
        job.abort_unfinished()


def chat_stream(job: Job, cfg: ServeConfig, include_usage: bool) -> AsyncIterator[str]:
    """Each delta's text goes through the reasoning parser (if any), then the tool-call parser (if tools)."""
    n = len(job.request_ids)
    parsers = [ReasoningStream(job.opens_think) for _ in range(n)] if cfg.reasoning_parser else None
    tool_streams = [ToolCallStream(job.tool_parser) for _ in range(n)] if job.tool_parser else None

    def choice(index: int, out: RequestOutput) -> dict | None:
        reasoning, content = (parsers[index].feed(out.delta, final=out.finished) if parsers
                              else (None, out.delta))
        calls = []
        if tool_streams is not None:
            content, calls = tool_streams[index].feed(content, final=out.finished)
        delta = {**({"reasoning_content": reasoning} if reasoning else {}), **({"content": content} if content else {}),
                 **({"tool_calls": calls} if calls else {})}
        if not delta and not out.finished:
            return None
        body = {"delta": delta}
        if out.finished and tool_streams is not None:
            body["finish_reason"] = _finish(out.finish_reason, tool_streams[index].calls > 0)
        return body

    first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
             for i in range(len(job.request_ids))]
    return _stream(job, cfg, "chat.completion.chunk", include_usage, first, choice,
                   lambda entries, _: chat_logprobs(entries))


def completion_stream(job: Job, cfg: ServeConfig, include_usage: bool) -> AsyncIterator[str]:
    def choice(index: int, out: RequestOutput) -> dict | None:
        return {"text": out.delta} if out.delta or out.finished else None

    return _stream(job, cfg, "text_completion", include_usage, [], choice, completion_logprobs)
