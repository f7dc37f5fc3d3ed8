"""Fault sweep of `tinystories serve`: valid requests mixed with bad input and clients that hang up.

    python benchmarks/serve_faults.py [--requests 500] [--concurrency 32] [--no-compile] [--no-append]

A real server runs in a subprocess (`tinystories serve --model tiny` on a free loopback port, its
stdout and stderr captured to files). `--requests` requests go to it with at most `--concurrency` in
flight, in a fixed shuffled mix: valid completions (greedy and seeded sampling, plain and streamed),
100 KB prompts (longer than the context: valid, the end is kept; with echo + logprobs: a documented
400), invalid JSON, wrong types, huge `max_tokens`, non-UTF-8 bytes and unpaired surrogate escapes,
and early disconnects (mid-stream, and before the answer: after the request or in the middle of its
body). Afterwards the server must answer /health with nothing pending, and then shut down cleanly
on SIGTERM. A valid request is correct when it gets 200 and exactly the text that
`load_model('tiny').generate(...)` gives for it in this process (same prompt, options and seed); a
bad one when it gets a 4xx in OpenAI's error shape naming the expected field; a disconnect when the
client got what it asked for before hanging up. The server's log must hold no traceback. The table
is printed and appended to benchmarks/RESULTS.md. Bounded: at most 2,000 requests and `--timeout`
seconds; loopback only.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE] + [str(HERE)]
sys.path.insert(0, str(REPO_ROOT / "src"))  # run from a checkout without `pip install -e .`

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import httpx  # noqa: E402
from common import append_results, markdown_table  # noqa: E402
from serve_load import PROMPTS, free_port, percentile, stop_server, wait_for_health  # noqa: E402

MAX_TOKENS_LIMIT = 256  # the server's --max-tokens-limit
LONG_PROMPT_CHARS = 100_000
ANY = object()  # an expected error's param that is not checked
# kind -> its share of the requests (out of 20)
MIX = {"valid greedy": 5, "valid sampled": 3, "100 KB prompt": 2, "invalid JSON": 2, "wrong types": 2,
       "huge max_tokens": 1, "non-UTF-8 text": 2, "disconnect mid-stream": 2, "disconnect before answer": 1}
VALID_KINDS = ("valid greedy", "valid sampled")


@dataclass
class Case:
    """One request: its body as sent and what a correct answer is.

    expected: the generate() call whose text a valid answer must equal, as (prompt, options) with options
    a sorted tuple of keyword items; error_param: for a refusal, the field its error must name (ANY: not
    checked); disconnect: 'mid-stream', 'after request' or 'mid-body' for a client that hangs up.
    """

    kind: str
    body: bytes
    stream: bool = False
    expected: tuple | None = None
    error_param: object = None
    disconnect: str | None = None
    expected_prompt_tokens: int | None = None


@dataclass
class Outcome:
    kind: str
    status: str  # an HTTP status, or 'hung up' for a client that closed the connection on purpose
    correct: bool
    latency: float
    detail: str = ""


def _json(body: dict) -> bytes:
    return json.dumps(body).encode("utf-8")


def long_prompts() -> list[str]:
    """Two ~100 KB story prompts (many times the 256-token context)."""
    stories = [" ".join(PROMPTS[i:] + PROMPTS[:i]) for i in range(2)]
    return [(story + " ") * (LONG_PROMPT_CHARS // (len(story) + 1) + 1) for story in stories]


def valid_case(kind: str, i: int) -> Case:
    """Greedy or seeded sampling over the benchmark prompts, plain and streamed in turn."""
    prompt, max_tokens = PROMPTS[i % len(PROMPTS)], (8, 16, 24)[(i // len(PROMPTS)) % 3]
    options = {"temperature": 0.0} if kind == "valid greedy" else {"temperature": 0.8, "top_k": 40, "top_p": 0.95,
                                                                   "seed": i % 4}
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": i % 2 == 1, **options}
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    key = (prompt, tuple(sorted(dict(options, max_new_tokens=max_tokens).items())))
    return Case(kind, _json(body), body["stream"], expected=key)


def long_prompt_case(i: int, prompts: list[str], context_length: int) -> Case:
    """Even: a valid 100 KB prompt (its last context_length tokens are read); odd: the same with echo +
    logprobs, which needs the whole prompt in one window: a 400 naming 'prompt' (as README says)."""
    prompt = prompts[(i // 2) % len(prompts)]
    if i % 2:
        return Case("100 KB prompt", _json({"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}),
                    error_param="prompt")
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0.0, "stream": i % 4 == 2}
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    key = (prompt, (("max_new_tokens", 4), ("temperature", 0.0)))
    return Case("100 KB prompt", _json(body), body["stream"], expected=key, expected_prompt_tokens=context_length)


INVALID_JSON = [b"{", b'{"prompt": "x",}', b"", b'{"prompt": "x"', b"[1, 2", b'{"prompt": NaN}', b"nul",
                b'{"prompt": "x"}}', b"{'prompt': 'x'}", b"[" * 40_000 + b"]" * 40_000]
WRONG_TYPES = [({"prompt": 5}, "prompt"), ({"prompt": "x", "max_tokens": "16"}, "max_tokens"),
               ({"prompt": "x", "temperature": "hot"}, "temperature"), ({"prompt": "x", "n": []}, "n"),
               ({"prompt": "x", "stream": "yes"}, "stream"), ({"prompt": ["a", 1]}, "prompt"),
               ({"prompt": "x", "stop": 7}, "stop"), ({"prompt": "x", "logprobs": True}, "logprobs"),
               ({"prompt": "x", "top_k": 1.5}, "top_k"), ({"prompt": [[]]}, "prompt"),
               (["prompt", "x"], None), ({"prompt": "x", "stream": True, "stream_options": "yes"}, "stream_options"),
               ({"prompt": "x", "repetition_penalty": 1e300}, "repetition_penalty"), ({"prompt": [[1, 1e9]]}, "prompt")]
HUGE_MAX_TOKENS = [_json({"prompt": "x", "max_tokens": value}) for value in
                   (MAX_TOKENS_LIMIT + 1, 10**6, 2**62, 10**30, 2**200)] + [b'{"prompt": "x", "max_tokens": 1e400}']
NON_UTF8 = [b'{"prompt": "\xff\xfe"}', b"\xc3\x28", b'{"prompt": "caf\xe9 au lait"}', b'{"prompt": "\xed\xa0\x80"}',
            b'{"prompt": "\\ud800 and then", "max_tokens": 2}', b'{"prompt": "x", "echo": true, "stop": "\\udfff"}',
            b'{"\\ud800": 1}', b'{"prompt": "x", "model": "\\udc00"}']


def refusal_case(kind: str, i: int) -> Case:
    if kind == "invalid JSON":
        return Case(kind, INVALID_JSON[i % len(INVALID_JSON)], error_param=None)
    if kind == "wrong types":
        body, param = WRONG_TYPES[i % len(WRONG_TYPES)]
        return Case(kind, _json(body), error_param=param)
    if kind == "huge max_tokens":
        return Case(kind, HUGE_MAX_TOKENS[i % len(HUGE_MAX_TOKENS)], error_param="max_tokens")
    return Case(kind, NON_UTF8[i % len(NON_UTF8)], error_param=None)  # non-UTF-8 text


def disconnect_case(kind: str, i: int) -> Case:
    """Streams of 200 tokens left after 3 events; plain requests of 200 tokens left before the answer,
    after the whole request or half-way through its body."""
    body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 200, "temperature": 0.8, "seed": i}
    if kind == "disconnect mid-stream":
        return Case(kind, _json(dict(body, stream=True)), True, disconnect="mid-stream")
    return Case(kind, _json(body), disconnect=("after request", "mid-body")[i % 2])


def plan(requests: int, seed: int, context_length: int) -> list[Case]:
    """`requests` cases in MIX's proportions (every kind once there are 20 or more), shuffled."""
    kinds = [kind for kind, share in MIX.items() for _ in range(share)]
    chosen = [kinds[i % len(kinds)] for i in range(requests)]
    counts: Counter = Counter()
    prompts = long_prompts()
    cases = []
    for kind in chosen:
        i = counts[kind]
        counts[kind] += 1
        if kind in VALID_KINDS:
            cases.append(valid_case(kind, i))
        elif kind == "100 KB prompt":
            cases.append(long_prompt_case(i, prompts, context_length))
        elif kind.startswith("disconnect"):
            cases.append(disconnect_case(kind, i))
        else:
            cases.append(refusal_case(kind, i))
    random.Random(seed).shuffle(cases)
    return cases


# ----------------------------------------------------------------------------------------------
# Sending the cases and judging the answers

JSON_HEADERS = {"Content-Type": "application/json"}


def error_problem(status: int, payload: object, expected_param: object) -> str:
    """'' for a 4xx in OpenAI's error shape naming `expected_param`, else what is wrong with it."""
    if not 400 <= status < 500:
        return f"status {status}, expected a 4xx"
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"not OpenAI's error shape: {str(payload)[:120]}"
    if not isinstance(error["message"], str) or not error["message"]:
        return "the error has no message"
    if expected_param is not ANY and error["param"] != expected_param:
        return f"param {error['param']!r}, expected {expected_param!r}"
    return ""


def stream_result(lines: list[str]) -> tuple[str, dict | None, str]:
    """(text, usage, problem) of a complete server-sent-events stream of one choice."""
    payloads = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    if not payloads or payloads[-1] != "[DONE]":
        return "", None, "the stream did not end with [DONE]"
    events = [json.loads(payload) for payload in payloads[:-1]]
    if any("error" in event for event in events):
        return "", None, f"an error in the stream: {events[-1]}"
    text = "".join(choice["text"] for event in events for choice in event["choices"])
    return text, next((event["usage"] for event in events if event.get("usage")), None), ""


def valid_problem(case: Case, text: str, usage: dict | None, expected: dict[tuple, str]) -> str:
    if text != expected[case.expected]:
        return f"text {text[:60]!r} != generate()'s {expected[case.expected][:60]!r}"
    if case.expected_prompt_tokens is not None and (usage or {}).get("prompt_tokens") != case.expected_prompt_tokens:
        return f"usage {usage}, expected prompt_tokens {case.expected_prompt_tokens}"
    return ""


async def send_streamed(client: httpx.AsyncClient, case: Case, expected: dict[tuple, str]) -> tuple[str, str]:
    """A streamed request read to its end (or, for a mid-stream disconnect, left after 3 events)."""
    async with client.stream("POST", "/v1/completions", content=case.body, headers=JSON_HEADERS) as response:
        if response.status_code != 200:
            return str(response.status_code), f"status {response.status_code}: {(await response.aread())[:120]!r}"
        lines = []
        async for line in response.aiter_lines():
            lines.append(line)
            if case.disconnect and sum(1 for kept in lines if kept.startswith("data: ")) == 3:
                return "hung up", ""  # leaving the block closes the connection mid-stream
        if case.disconnect:
            return "200", "the stream ended before the client could hang up"
    text, usage, problem = stream_result(lines)
    return "200", problem or valid_problem(case, text, usage, expected)


async def send_plain(client: httpx.AsyncClient, case: Case, expected: dict[tuple, str]) -> tuple[str, str]:
    response = await client.post("/v1/completions", content=case.body, headers=JSON_HEADERS)
    try:
        payload = response.json()
    except ValueError:
        return str(response.status_code), f"not JSON: {response.text[:120]!r}"
    if case.expected is None:
        return str(response.status_code), error_problem(response.status_code, payload, case.error_param)
    if response.status_code != 200:
        return str(response.status_code), f"status {response.status_code}: {response.text[:120]}"
    return "200", valid_problem(case, payload["choices"][0]["text"], payload.get("usage"), expected)


async def hang_up(port: int, case: Case) -> tuple[str, str]:
    """A client that sends the request (or half of its body) and closes the connection unanswered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(case.body)}\r\n\r\n").encode("ascii")
    body = case.body if case.disconnect == "after request" else case.body[:len(case.body) // 2]
    writer.write(head + body)
    await writer.drain()
    await asyncio.sleep(0.05)  # long enough for the server to start on it
    writer.close()
    await writer.wait_closed()
    return "hung up", ""


async def send(client: httpx.AsyncClient, port: int, case: Case, expected: dict[tuple, str]) -> Outcome:
    started = time.perf_counter()
    try:
        if case.disconnect in ("after request", "mid-body"):
            status, problem = await hang_up(port, case)
        elif case.stream:
            status, problem = await send_streamed(client, case, expected)
        else:
            status, problem = await send_plain(client, case, expected)
    except (httpx.HTTPError, OSError, json.JSONDecodeError) as error:
        status, problem = "no answer", f"{type(error).__name__}: {error}"
    return Outcome(case.kind, status, not problem, time.perf_counter() - started, problem)


async def run_cases(url: str, cases: list[Case], concurrency: int, expected: dict[tuple, str]) -> list[Outcome]:
    port = int(url.rsplit(":", 1)[1])
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def bounded(case: Case) -> Outcome:
            async with semaphore:
                return await send(client, port, case, expected)

        return list(await asyncio.gather(*(bounded(case) for case in cases)))


# ----------------------------------------------------------------------------------------------
# The server, the expected texts, the sweep


def start_server(scratch: Path, compile_step: bool) -> tuple[subprocess.Popen, str, list[Path]]:
    """`tinystories serve --model tiny` on a free loopback port; (process, url, [stdout log, stderr log])."""
    port = free_port()
    command = [sys.executable, "-m", "tinystories", "serve", "--model", "tiny", "--host", "127.0.0.1",
               "--port", str(port), "--max-tokens-limit", str(MAX_TOKENS_LIMIT)] + ([] if compile_step else
                                                                                     ["--no-compile"])
    logs = [scratch / "server.stdout.log", scratch / "server.stderr.log"]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=environment)
    return process, f"http://127.0.0.1:{port}", logs


def load_tiny(compile_step: bool):
    from tinystories.generate import load_model

    return load_model("tiny", compile=None if compile_step else False)


def expected_texts(model, cases: list[Case]) -> dict[tuple, str]:
    """What `load_model('tiny').generate(...)` gives in this process for every valid case."""
    texts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "prompt longer than the context": expected here
        for prompt, options in {case.expected for case in cases if case.expected is not None}:
            (completion,) = model.generate(prompt, **dict(options))
            texts[(prompt, options)] = completion.text
    return texts


def wait_until_idle(url: str, timeout: float = 60) -> tuple[bool, int | None]:
    """(whether /health answered, its `pending` once it is 0 or when the time is up)."""
    deadline, pending = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            pending = httpx.get(url + "/health", timeout=5).json()["pending"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False, None
        if pending == 0:
            return True, 0
        time.sleep(0.2)
    return True, pending


def count_tracebacks(logs: list[Path]) -> int:
    text = "".join(log.read_text(errors="replace") for log in logs)
    return text.count("Traceback (most recent call last)") + text.count("Exception in ASGI application")


@dataclass
class Sweep:
    outcomes: list[Outcome]
    wall: float
    crashed: bool  # the server exited before it was told to
    health_ok: bool
    pending_after: int | None
    graceful: bool  # SIGTERM ended it cleanly
    tracebacks: int
    log_tail: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (not self.crashed and self.health_ok and self.pending_after == 0 and self.graceful
                and self.tracebacks == 0 and all(outcome.correct for outcome in self.outcomes))


def run_sweep(requests: int, concurrency: int, scratch: Path, compile_step: bool = True, seed: int = 0,
              timeout: float = 900) -> Sweep:
    """Start the server, send the planned mix, check the server afterwards, stop it (see the docstring)."""
    process, url, logs = start_server(scratch, compile_step)
    try:
        model = load_tiny(compile_step)  # while the server starts
        cases = plan(requests, seed, model.context_length)
        texts = expected_texts(model, cases)
        wait_for_health(url, process, logs[1])
        started = time.perf_counter()
        outcomes = asyncio.run(asyncio.wait_for(run_cases(url, cases, concurrency, texts), timeout))
        wall = time.perf_counter() - started
        crashed = process.poll() is not None
        health_ok, pending_after = (False, None) if crashed else wait_until_idle(url)
    finally:
        graceful = process.poll() is None and stop_server(process, logs[1])
    tail = logs[1].read_text(errors="replace")[-3000:]
    return Sweep(outcomes, wall, crashed, health_ok, pending_after, graceful, count_tracebacks(logs), tail)


# ----------------------------------------------------------------------------------------------
# The report


def kind_rows(outcomes: list[Outcome]) -> list[list[object]]:
    rows = []
    for kind in list(MIX) + ["all"]:
        chosen = [o for o in outcomes if kind in ("all", o.kind)]
        if not chosen:
            continue
        statuses = Counter(o.status for o in chosen)
        latencies = [o.latency for o in chosen]
        rows.append([kind, len(chosen), ", ".join(f"{status} x{count}" for status, count in sorted(statuses.items())),
                     sum(o.correct for o in chosen), sum(not o.correct for o in chosen),
                     f"{percentile(latencies, 50) * 1000:,.0f}", f"{percentile(latencies, 99) * 1000:,.0f}"])
    return rows


def report(sweep: Sweep, requests: int, concurrency: int, compile_step: bool) -> str:
    table = markdown_table(["requests of kind", "count", "status codes seen", "correct", "wrong", "latency p50 (ms)",
                            "p99 (ms)"], kind_rows(sweep.outcomes))
    summary = markdown_table(
        ["server crashes", "tracebacks in its log", "/health after", "pending after", "graceful SIGTERM",
         "wall time (s)"],
        [[int(sweep.crashed), sweep.tracebacks, "200" if sweep.health_ok else "no answer", sweep.pending_after,
          "yes" if sweep.graceful else "no", f"{sweep.wall:.1f}"]])
    return (f"{table}\n\n{summary}\n\nNotes: {requests} requests, {concurrency} in flight, against `tinystories "
            f"serve --model tiny --max-tokens-limit {MAX_TOKENS_LIMIT}` ({'decode step compiled' if compile_step else '--no-compile'}) "
            f"in a subprocess on 127.0.0.1; correct = a valid request's text equals `load_model('tiny').generate(...)` "
            f"in-process (greedy, and seeded sampling), a bad one got an OpenAI-shaped 4xx naming the expected field, a "
            f"disconnecting client hung up as planned; 'hung up' = the client closed the connection on purpose. "
            f"Latencies are per request, client side.")


def wrong_examples(sweep: Sweep, limit: int = 5) -> str:
    wrong = [o for o in sweep.outcomes if not o.correct][:limit]
    return "\n".join(f"  {o.kind}: {o.status}: {o.detail}" for o in wrong)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="requests in the sweep (default 500)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="the shuffle of the mix (default 0)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds the sweep may take (default 900)")
    parser.add_argument("--no-compile", action="store_true", help="serve and generate without compiling the step")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if not (1 <= args.requests <= 2000 and 1 <= args.concurrency <= 256 and 1 <= args.timeout <= 3600):
        parser.error("keep the sweep bounded: 1..2000 requests, 1..256 in flight, a timeout of 1..3600 s")
    with tempfile.TemporaryDirectory(prefix="serve-faults-") as scratch:
        sweep = run_sweep(args.requests, args.concurrency, Path(scratch), not args.no_compile, args.seed, args.timeout)
    body = report(sweep, args.requests, args.concurrency, not args.no_compile)
    print(body)
    if not sweep.passed:
        print(f"the sweep failed:\n{wrong_examples(sweep)}\nserver log (end):\n{sweep.log_tail}", file=sys.stderr)
    if not args.no_append:
        append_results("Serving under faults: bad input and disconnects (benchmarks/serve_faults.py)", body)
    return 0 if sweep.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
