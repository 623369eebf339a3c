"""Tool calls in model text -> OpenAI `tool_calls` (`serve --tool-call-parser`), whole or streamed.

Formats, by the family that writes them:
- qwen3 / qwen2.5 (and Hermes, and the shipped chatml-tools template): each call is a JSON object
  {"name": ..., "arguments": {...}} between <tool_call> and </tool_call>; text outside the tags is content.
- llama3 (Llama 3.1 / 3.2 JSON tool calling): the whole answer is one JSON object {"name": ..., "parameters":
  {...}} (or several separated by ';'), optionally after <|python_tag|>.
A call that does not parse stays in the content (logged): the client sees what the model wrote, never a 500.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

from lmconvert.errors import UserError
from lmconvert.runtime.grammar import Guided, xgrammar_message

log = logging.getLogger("lmconvert.serve")

PARSERS = ("qwen3", "qwen2.5", "llama3", "auto")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def resolve_parser(name: str, chat_template: str | None) -> str:
    """`auto`: the format the model's chat template teaches (its tool-call tag, or Llama 3's python tag)."""
    if name != "auto":
        return name
    template = chat_template or ""
    if OPEN in template:
        return "qwen3"
    if PYTHON_TAG in template or "parameters" in template:
        return "llama3"
    return "qwen3"


def call_grammar(tools: list[dict], parser: str) -> Guided:
    """tool_choice required (any of tools) or a named function (tools holds it alone): the answer must be one
    call in the parser's format, its arguments valid under the function's `parameters` schema."""
    import xgrammar

    key = "parameters" if parser == "llama3" else "arguments"
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               key: t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", key]} for t in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    try:
        grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema))
    except (RuntimeError, ValueError) as e:  # a tool's parameters xgrammar cannot take
        raise UserError(xgrammar_message(e)) from None
    if parser != "llama3":
        grammar = xgrammar.Grammar.concat(xgrammar.Grammar.from_ebnf(f'root ::= "{OPEN}\\n"'), grammar,
                                          xgrammar.Grammar.from_ebnf(f'root ::= "\\n{CLOSE}"'))
    return Guided("ebnf", str(grammar))


def _call(obj) -> dict | None:
    """An OpenAI tool call from a parsed JSON object, or None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _parse_block(text: str) -> dict | None:
    try:
        return _call(json.loads(text))
    except json.JSONDecodeError:
        return None


def parse_tool_calls(text: str, parser: str) -> tuple[str, list[dict]]:
    """(content, tool calls) of a whole answer."""
    if parser == "llama3":
        body = text.strip().removeprefix(PYTHON_TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls = [_parse_block(part) for part in body.split(";") if part.strip()]
        if calls and all(calls):
            return "", calls
        log.warning("a tool call did not parse; returned as content")
        return text, []
    content, calls, _ = _scan_tagged(text, final=True)
    return (content.strip() if calls else content), calls


def _scan_tagged(text: str, final: bool) -> tuple[str, list[dict], str]:
    """(content, complete calls, rest) of <tool_call>-tagged text: the rest is what must wait for more text (an
    unclosed call, or a tail that may begin a tag); when final, everything left is content."""
    content, calls = [], []
    while (start := text.find(OPEN)) != -1 and (end := text.find(CLOSE, start + len(OPEN))) != -1:
        call = _parse_block(text[start + len(OPEN):end].strip())
        if call is None:
            log.warning("a tool call did not parse; returned as content")
            content.append(text[:end + len(CLOSE)])
        else:
            content.append(text[:start])
            calls.append(call)
        text = text[end + len(CLOSE):]
    if final:  # an unclosed call at the end (cut by max_tokens): the model's text as it is
        return "".join(content) + text, calls, ""
    start = text.find(OPEN)
    cut = start if start != -1 else len(text) - _tag_prefix_len(text, OPEN)
    return "".join(content) + text[:cut], calls, text[cut:]


@dataclass(slots=True)
class ToolCallStream:
    """Splits streamed text into content deltas and tool-call deltas as OpenAI streams them: a call's id and
    name first (arguments ""), then its arguments, `index` counting the calls. A call is sent once its closing
    tag has arrived; text that may be the start of a tag is held back, so no half tag reaches the content."""
    parser: str
    pending: str = ""
    calls: int = 0
    plain: bool = False  # llama3: the answer began as text, not as a call: it streams as it comes

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        if self.parser == "llama3":
            return self._feed_json(text, final)
        content, calls, self.pending = _scan_tagged(self.pending + text, final)
        deltas = [d for i, call in enumerate(calls, self.calls) for d in _call_deltas(call, i)]
        self.calls += len(calls)
        return content, deltas

    def _feed_json(self, text: str, final: bool) -> tuple[str, list[dict]]:
        """Llama 3 answers with calls only, as a whole: held until the answer ends, unless it begins as text."""
        if self.plain:
            return text, []
        self.pending += text
        head = self.pending.lstrip()
        if head and not (head.startswith("{") or head.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(head)):
            self.plain, whole, self.pending = True, self.pending, ""
            return whole, []
        if not final:
            return "", []
        content, calls = parse_tool_calls(self.pending, "llama3")
        self.pending, self.calls = "", len(calls)
        return content, [d for i, call in enumerate(calls) for d in _call_deltas(call, i)]


def _call_deltas(call: dict, index: int) -> list[dict]:
    fn = call["function"]
    return [{"index": index, "id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}},
            {"index": index, "function": {"arguments": fn["arguments"]}}]


def _tag_prefix_len(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper prefix of tag."""
    return max((k for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)
