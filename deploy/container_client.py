"""The client half of deploy/container_check.sh: talks to `lmconvert serve` running in a container.

    python deploy/container_client.py ready URL --since EPOCH [--timeout S]   # /health 503 -> 200, timed
    python deploy/container_client.py ask URL                                 # openai client, one question
    python deploy/container_client.py warm URL                  # 48 tokens: starts the CPU decode step's compile
    python deploy/container_client.py drain URL --container NAME [--podman podman]
        # a long stream; SIGTERM to the container mid-stream; the stream must still end with finish_reason + [DONE]

Each prints one human line per fact and exits non-zero (with a one-line reason) when a check fails.
Needs lmconvert installed with its `test` extra (httpx, openai): the stream parsing is lmconvert.runtime.serve_client's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import httpx

from lmconvert.runtime.serve_client import DONE, health, sse_event


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def cmd_ready(args) -> None:
    """Polls /health every 0.1 s until 200; reports when it first listened (503) and when it was ready."""
    seen: dict[str, float] = {}
    status = None
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        status = health(args.url)
        now = time.time() - args.since
        if status == 503 and "503" not in seen:
            seen["503"] = now
            print(f"/health 503 (loading) at {now:.1f} s after `run`", flush=True)
        elif status == 200:
            if "503" not in seen:
                fail(f"/health went straight to 200 at {now:.1f} s: no 503 while loading was seen")
            print(f"/health 200 (ready) at {now:.1f} s after `run`", flush=True)
            print(f"READY_S={now:.1f}")
            return
        elif isinstance(status, int) and status != 503:
            fail(f"/health answered {status} while starting")
        time.sleep(0.1)
    fail(f"/health not 200 within {args.timeout:.0f} s (last: {status or 'no answer'})")


def served_model(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def cmd_ask(args) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{args.url}/v1", api_key="none")
    model = served_model(args.url)
    t0 = time.time()
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=64)
    answer = reply.choices[0].message.content
    print(f"model {model!r} answered in {time.time() - t0:.1f} s: {answer!r}", flush=True)
    if "paris" not in answer.lower():
        fail("the answer does not name Paris")


def cmd_warm(args) -> None:
    """One 48-token stream (ignore_eos): more than the 32 decode steps after which a CPU server starts compiling
    its decode step in the background."""
    model = served_model(args.url)
    body = {"model": model, "messages": [{"role": "user", "content": "Count to one hundred."}],
            "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
    t0, chunks = time.time(), 0
    with httpx.stream("POST", f"{args.url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            event = sse_event(line)
            chunks += isinstance(event, dict) and any(c.get("delta", {}).get("content") for c in event["choices"])
    print(f"warm-up stream: {chunks} chunks in {time.time() - t0:.1f} s", flush=True)


def cmd_drain(args) -> None:
    """Streams --max-tokens tokens (ignore_eos, so the stream is long) and sends SIGTERM to the container mid-stream:
    after at least --after chunks, once the rest of the stream would take --drain-budget seconds at the rate of the
    last 8 chunks (a shared CPU may decode slowly; the drain allows 30 s). While the drain runs, /health and a new
    request must answer 503; the stream must still finish with its finish_reason and [DONE]."""
    model = served_model(args.url)
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    times: list[float] = []
    chunks, finish, done, t_term, t_last, chunks_at_term = 0, None, False, None, None, 0
    during: dict[str, object] = {}

    def probe_during_drain() -> None:
        time.sleep(0.5)  # let the server see the signal
        during["health"] = health(args.url) or "no answer"
        with httpx.Client() as c:
            try:
                r = c.post(f"{args.url}/v1/chat/completions", timeout=10,
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                during["new_request"] = r.status_code
            except httpx.TransportError as e:
                during["new_request"] = "refused" if isinstance(e, httpx.ConnectError) else type(e).__name__

    prober = threading.Thread(target=probe_during_drain, daemon=True)
    t0 = time.time()
    try:
        with httpx.stream("POST", f"{args.url}/v1/chat/completions", json=body, timeout=args.timeout) as r:
            if r.status_code != 200:
                fail(f"stream request answered {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                event = sse_event(line)
                if event is None:
                    continue
                if event == DONE:
                    done = True
                    continue
                if "error" in event and t_term is None:
                    fail(f"the stream carried an error before SIGTERM: {event['error'].get('message')!r}")
                if "error" in event:
                    stalled = f", the last {t_last - t_term:.1f} s after it" if t_term and t_last else ""
                    fail(f"the stream ended with an error {time.time() - (t_term or t0):.1f} s after SIGTERM, "
                         f"after {chunks} content chunks ({chunks - chunks_at_term} after SIGTERM{stalled}): "
                         f"{event['error'].get('message')!r}")
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        chunks += 1
                        t_last = time.time()
                        times.append(t_last)
                    finish = choice.get("finish_reason") or finish
                left = args.max_tokens - chunks
                rate = 7 / max(times[-1] - times[-8], 1e-6) if len(times) >= 8 else 0.0
                if t_term is None and chunks >= args.after and (left <= rate * args.drain_budget or left <= 16):
                    subprocess.run([args.podman, "kill", "--signal", "TERM", args.container], check=True,
                                   stdout=subprocess.DEVNULL)
                    t_term = time.time()
                    chunks_at_term = chunks
                    print(f"SIGTERM sent after {chunks} of {args.max_tokens} chunks ({t_term - t0:.1f} s into the "
                          f"stream, decoding {rate:.1f} tok/s)", flush=True)
                    print(f"TERM_AT={t_term:.3f}", flush=True)
                    prober.start()
    except ValueError as e:
        fail(f"the stream was not an OpenAI event stream after {chunks} chunks: {e}")
    except httpx.TransportError as e:
        fail(f"the stream broke after {chunks} chunks: {type(e).__name__}: {e}")
    t_end = time.time()
    if t_term is None:
        fail(f"the stream ended after {chunks} chunks, before SIGTERM could be sent mid-stream")
    prober.join(timeout=15)
    print(f"DRAIN_S={t_end - t_term:.1f}")
    print(f"stream finished {t_end - t_term:.1f} s after SIGTERM: {chunks} chunks, finish_reason={finish!r}, "
          f"[DONE] {'seen' if done else 'MISSING'}", flush=True)
    print(f"during the drain: /health -> {during.get('health')}, new request -> {during.get('new_request')}",
          flush=True)
    problems = []
    if not done or finish is None:
        problems.append("the in-flight stream did not finish (no finish_reason / [DONE])")
    if during.get("health") != 503:
        problems.append(f"/health answered {during.get('health')} during the drain, not 503")
    if during.get("new_request") != 503:
        problems.append(f"a new request got {during.get('new_request')} during the drain, not 503")
    if problems:
        fail("; ".join(problems))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ready")
    r.add_argument("url")
    r.add_argument("--since", type=float, required=True, help="epoch seconds when the container was started")
    r.add_argument("--timeout", type=float, default=600)
    a = sub.add_parser("ask")
    a.add_argument("url")
    w = sub.add_parser("warm")
    w.add_argument("url")
    d = sub.add_parser("drain")
    d.add_argument("url")
    d.add_argument("--container", required=True)
    d.add_argument("--podman", default="podman")
    d.add_argument("--max-tokens", type=int, default=200)
    d.add_argument("--after", type=int, default=8, help="content chunks to read before SIGTERM")
    d.add_argument("--drain-budget", type=float, default=10,
                   help="at most this many seconds of stream left at SIGTERM, at the current rate (a third of the "
                        "30 s drain: a shared CPU's rate varies)")
    d.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()
    {"ready": cmd_ready, "ask": cmd_ask, "warm": cmd_warm, "drain": cmd_drain}[args.cmd](args)


if __name__ == "__main__":
    main()
