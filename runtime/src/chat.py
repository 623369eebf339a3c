"""`lmconvert chat`: a REPL over the engine, or one answer per stdin line when stdin is not a terminal."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

from rich.console import Console

from lmconvert.runtime.engine import LLMEngine
from lmconvert.runtime.sampling import SamplingParams

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
HELP = "/help shows this, /reset clears the conversation, /exit quits; Ctrl-C stops a reply, Ctrl-D quits."


class ThinkSplitter:
    """Splits streamed text into (reasoning, answer) pieces at <think>…</think>, tags split across chunks too."""

    def __init__(self):
        self.in_think = False
        self.pending = ""

    def feed(self, text: str, final: bool = False) -> list[tuple[bool, str]]:
        self.pending += text
        pieces = []
        while self.pending:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            at = self.pending.find(tag)
            if at != -1:
                pieces.append((self.in_think, self.pending[:at]))
                self.pending = self.pending[at + len(tag):]
                self.in_think = not self.in_think
                continue
            keep = 0 if final else max((k for k in range(len(tag)) if self.pending.endswith(tag[:k])), default=0)
            pieces.append((self.in_think, self.pending[:len(self.pending) - keep]))
            self.pending = self.pending[len(self.pending) - keep:]
            break
        return [(think, s) for think, s in pieces if s]


class ChatSession:
    def __init__(self, engine: LLMEngine, params: SamplingParams, enable_thinking: bool | None, system: str | None):
        self.engine, self.params, self.enable_thinking, self.system = engine, params, enable_thinking, system
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, prompt: str, interactive: bool) -> None:
        messages = self.messages + [{"role": "user", "content": prompt}]
        ids = self.engine.apply_chat_template(messages, self.enable_thinking)
        room = self.engine.session_len - len(ids)
        if room <= 1:
            self.err.print(f"[yellow]session length reached ({self.engine.session_len} tokens): /reset to start over[/]")
            return
        params = SamplingParams(**{**_as_dict(self.params), "max_tokens": min(self.params.max_tokens, room)})
        splitter, answer = ThinkSplitter(), []
        reasoning_console = self.out if interactive else self.err
        finish = None
        with _ctrl_c_stops() as stopped:
            for out in self.engine.stream(ids, params):  # leaving the loop early aborts the request
                for think, piece in splitter.feed(out.delta, final=out.finished):
                    if think:
                        reasoning_console.print(piece, end="", style="dim", markup=False)
                    else:
                        answer.append(piece)
                        self.out.print(piece, end="", markup=False)
                finish = out.finish_reason
                if stopped.is_set():
                    break
        self.out.print()
        if stopped.is_set():
            self.err.print("[yellow](reply stopped; it is not kept in the conversation)[/]")
            return
        if finish == "length" and len(ids) + params.max_tokens >= self.engine.session_len:
            self.err.print(f"[yellow]session length reached ({self.engine.session_len} tokens): /reset to start over[/]")
        elif finish == "length":
            self.err.print(f"[yellow](reply cut at {params.max_tokens} tokens: --max-new-tokens)[/]")
        self.messages = messages + [{"role": "assistant", "content": "".join(answer).strip()}]


@contextlib.contextmanager
def _ctrl_c_stops():
    """While a reply streams, Ctrl-C sets the event instead of raising: the reply stops between two steps
    and the session goes on (a KeyboardInterrupt inside a step could leave the engine half-updated)."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stopped.set())
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGINT, previous)


def _as_dict(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__slots__}


def run_chat(engine: LLMEngine, params: SamplingParams, enable_thinking: bool | None = None,
             system: str | None = None) -> None:
    session = ChatSession(engine, params, enable_thinking, system)
    interactive = sys.stdin.isatty()
    if interactive:
        session.out.print(f"[bold]lmconvert chat[/] — {HELP}")
    while True:
        if interactive:
            try:
                line = session.out.input("[bold green]>>> [/]")
            except (EOFError, KeyboardInterrupt):
                session.out.print()
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/help":
            session.out.print(HELP)
            continue
        if line == "/reset":
            session.reset()
            if interactive:
                session.out.print("[dim](conversation cleared)[/]")
            continue
        session.ask(line, interactive)
