"""The OpenAI wire format: request models (validated by pydantic) and builders for replies, chunks and errors."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from lmconvert.runtime.grammar import Guided
from lmconvert.runtime.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob

MAX_CHOICES = 8  # n > 1 runs n sequences sharing the prompt's cached blocks; cap it to keep one request bounded
MAX_INT32 = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64 - 1 - MAX_CHOICES)  # what torch.Generator.manual_seed takes, choice i adding i


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": ErrorInfo(message=message, type=type_, param=param, code=code).model_dump()}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions; unknown fields are ignored, as OpenAI's are."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # Python's json reads NaN and Infinity

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)  # -1 or 0: disabled
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> str | None:
        """Name of a requested feature this server does not implement (answered with a 400, not ignored)."""
        return None

    @property
    def logprob_count(self) -> int | None:
        """SamplingParams.logprobs: None for none, else how many top alternatives each token reports."""
        return None

    @property
    def uses_tools(self) -> bool:
        """Tools go into the prompt and calls are parsed out of the answer (chat only)."""
        return False

    def sampling_params(self, defaults: SamplingParams, max_tokens: int, choice: int,
                        guided: Guided | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick(self.temperature, defaults.temperature),
            top_p=pick(self.top_p, defaults.top_p), top_k=max(0, pick(self.top_k, defaults.top_k)),
            repetition_penalty=pick(self.repetition_penalty, defaults.repetition_penalty),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            # n seeded choices would otherwise be n copies of one answer
            seed=None if self.seed is None else self.seed + choice, stop=[s for s in stop if s],
            ignore_eos=self.ignore_eos, logprobs=self.logprob_count, guided=guided)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... go to the chat template untouched

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {**(self.model_extra or {}), "role": role, "content": content or ""}


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_goes_with_its_type(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema.schema")
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, value, info: ValidationInfo):
        tools = info.data.get("tools") or []
        if value not in (None, "none") and not tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {value.function.name!r}, which is not among the tools")
        return value

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def tools_for_template(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.uses_tools else None

    def forced_tools(self) -> list[dict] | None:
        """The tools a call must come from: all for tool_choice required, the named one; None otherwise."""
        if not self.uses_tools or self.tool_choice in (None, "auto"):
            return None
        tools = self.tools_for_template()
        if isinstance(self.tool_choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == self.tool_choice.function.name]
        return tools

    @property
    def response_grammar(self) -> Guided | None:
        """response_format as a grammar: json_object, or json_schema (its `schema`); None for text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return Guided.json()
        return Guided.json(fmt.json_schema.schema_)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value, info: ValidationInfo):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a batch: one string, a list of strings, token ids, or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# ---- replies ---------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_message(content: str, reasoning: str | None, tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
        message["content"] = content or None
    return message


def envelope(kind: str, rid: str, created: int, model: str, choices: list[dict], usage_: dict | None,
             with_usage: bool = True) -> dict:
    """The frame shared by replies and stream chunks; kind is "chat.completion", "chat.completion.chunk" or
    "text_completion"."""
    body = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if with_usage:
        body["usage"] = usage_
    return body


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """A chat choice's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.text, e.logprob),
                         "top_logprobs": [item(t, v) for t, (_, v) in zip(e.top_texts, e.top)]} for e in entries]}


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    """A completion choice's `logprobs` (the legacy shape); offset: characters of text before the first entry."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(zip(e.top_texts, (v for _, v in e.top))) for e in entries], "text_offset": offsets}
