"""Tool calls (issue #25, part 1): the parsers on recorded model texts, whole and streamed at every boundary,
and the real `openai` client against SmolLM2 served with the shipped chatml-tools template."""

from __future__ import annotations

import json

import openai
import pytest

from lmconvert.runtime import LLMEngine
from lmconvert.runtime.serve_launch import BackgroundServer
from lmconvert.runtime.serve_tools import ToolCallStream, parse_tool_calls, resolve_parser
from lmconvert.runtime.server import create_app
from lmconvert.templates import read_chat_template

# fp32 compute: what these tests check exactly (logprobs vs the forward pass, batched == solo tokens) holds in
# fp32; CPUs with native bf16 now run a bf16 engine in bf16 by default
FP32 = "fp32"

QWEN3 = ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
LLAMA3 = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def names_and_args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_qwen3_calls_and_content():
    content, calls = parse_tool_calls(QWEN3, "qwen3")
    assert content == "I will check both."
    assert names_and_args(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_llama3_calls_and_plain_text():
    assert names_and_args(parse_tool_calls(LLAMA3, "llama3")[1]) == [("get_weather", {"city": "Paris"}),
                                                                    ("get_time", {})]
    assert names_and_args(parse_tool_calls("<|python_tag|>" + LLAMA3, "llama3")[1])[0][0] == "get_weather"
    assert parse_tool_calls("Paris is sunny.", "llama3") == ("Paris is sunny.", [])


@pytest.mark.parametrize("text", ['<tool_call>\n{"name": "f", "arguments": {broken</tool_call>',
                                  '<tool_call>\n{"arguments": {}}\n</tool_call>',
                                  'cut short <tool_call>\n{"name": "f", "argu'])
def test_calls_that_do_not_parse_stay_content(text):
    assert parse_tool_calls(text, "qwen3") == (text, [])


@pytest.mark.parametrize("parser, text", [("qwen3", QWEN3), ("llama3", LLAMA3), ("qwen3", "no calls at all <tool"),
                                          ("qwen3", "<think>hm</think>" + QWEN3)])
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_streaming_at_every_boundary_equals_the_whole(parser, text, piece):
    stream, content, deltas = ToolCallStream(parser), [], []
    chunks = [text[i:i + piece] for i in range(0, len(text), piece)]
    for i, chunk in enumerate(chunks):
        c, d = stream.feed(chunk, final=i == len(chunks) - 1)
        assert "<tool_call" not in c and "</tool_call" not in c  # no (half) tag leaks into the content
        content.append(c)
        deltas += d
    whole_content, whole_calls = parse_tool_calls(text, parser)
    assert "".join(content).strip() == whole_content.strip()
    calls = {}
    for d in deltas:  # as an OpenAI client accumulates them
        call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
        call["name"] += d.get("function", {}).get("name", "")
        call["arguments"] += d.get("function", {}).get("arguments", "")
        if "id" in d:
            assert d["function"]["arguments"] == "" and d["type"] == "function"  # id and name come first
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == names_and_args(whole_calls)


def test_auto_parser_follows_the_template():
    assert resolve_parser("auto", read_chat_template("chatml-tools")) == "qwen3"
    assert resolve_parser("auto", "{{ '<|python_tag|>' }}") == "llama3"
    assert resolve_parser("llama3", None) == "llama3"


# ---- through the server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(smollm2_engine):
    engine = LLMEngine(str(smollm2_engine), device="cpu", dtype=FP32, session_len=2048,
                       chat_template=read_chat_template("chatml-tools"))
    with BackgroundServer(create_app(engine, "smollm2", tool_call_parser="auto")) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


CALL = [{"role": "user", "content": "Call get_weather for Berlin."}]


@pytest.mark.slow
def test_tool_call_plain_and_streamed(client):
    reply = client.chat.completions.create(model="smollm2", messages=CALL, tools=TOOLS, temperature=0,
                                           max_tokens=96, stop=["\n\n"])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)
    chunks = list(client.chat.completions.create(model="smollm2", messages=CALL, tools=TOOLS, temperature=0,
                                                 max_tokens=96, stop=["\n\n"], stream=True))
    streamed = {"name": "", "arguments": ""}
    for chunk in chunks:
        for tc in chunk.choices[0].delta.tool_calls or []:
            streamed["name"] += tc.function.name or ""
            streamed["arguments"] += tc.function.arguments or ""
        assert "<tool_call" not in (chunk.choices[0].delta.content or "")
    assert streamed == {"name": call.function.name, "arguments": call.function.arguments}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.slow
def test_two_step_loop_goes_back_through_the_template(client):
    """call -> tool result -> final answer: the assistant's tool_calls and the tool message render."""
    first = client.chat.completions.create(model="smollm2", messages=CALL, tools=TOOLS, temperature=0,
                                           max_tokens=96, stop=["\n\n"]).choices[0].message
    messages = CALL + [first.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"celsius": 21}'}]
    final = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, temperature=0,
                                           max_tokens=24)
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_requests_that_cannot_be_served_are_400(tiny_engine):
    """No parser configured; a template without tools; tool_choice that needs constrained decoding."""
    engine = LLMEngine(str(tiny_engine("qwen3")), device="cpu", num_cache_tokens=256)
    body = dict(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, max_tokens=2)
    with BackgroundServer(create_app(engine, "m")) as server:
        plain = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
            plain.chat.completions.create(**body)
        with pytest.raises(openai.BadRequestError, match="tool_choice needs tools"):
            plain.chat.completions.create(**{**body, "tools": None}, tool_choice="auto")
        for malformed in ([{"type": "function"}], [{"type": "retrieval", "function": {"name": "f"}}],
                          [{"type": "function", "function": {"name": ""}}]):
            with pytest.raises(openai.BadRequestError) as failed:
                plain.chat.completions.create(**{**body, "tools": malformed})
            assert failed.value.body["param"].startswith("tools"), failed.value.body
    with BackgroundServer(create_app(engine, "m", tool_call_parser="qwen3")) as server:
        parsing = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="takes no tools"):  # the tiny model's own template
            parsing.chat.completions.create(**body)
        with pytest.raises(openai.BadRequestError, match="not among the tools"):
            parsing.chat.completions.create(**body, tool_choice={"type": "function", "function": {"name": "nope"}})
        with pytest.raises(openai.BadRequestError, match="takes no tools"):
            parsing.chat.completions.create(**body, tool_choice="required")
        bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "strnig"}}}]
        with pytest.raises(openai.BadRequestError, match='tools: Unsupported type "strnig"') as failed:
            parsing.chat.completions.create(**{**body, "tools": bad}, tool_choice="required")
        assert failed.value.body["param"] == "tools"


TWO_TOOLS = TOOLS + [{"type": "function", "function": {
    "name": "convert_currency", "description": "Convert an amount of money",
    "parameters": {"type": "object", "properties": {"amount": {"type": "number"},
                                                    "to": {"type": "string", "enum": ["EUR", "USD", "JPY"]}},
                   "required": ["amount", "to"], "additionalProperties": False}}}]


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "convert_currency"}}])
def test_required_and_named_tool_choice_give_a_schema_valid_call(client, choice):
    """Constrained decoding: the call is there, names a given tool, and its arguments fit that tool's schema."""
    import jsonschema

    for question in ("How much is 20 dollars in euros?", "Is it raining in Oslo?"):
        reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                               tools=TWO_TOOLS, tool_choice=choice, temperature=0, max_tokens=96)
        assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0]
        call = reply.choices[0].message.tool_calls[0].function
        tool = next(t["function"] for t in TWO_TOOLS if t["function"]["name"] == call.name)
        if isinstance(choice, dict):
            assert call.name == "convert_currency"
        jsonschema.validate(json.loads(call.arguments), tool["parameters"])
