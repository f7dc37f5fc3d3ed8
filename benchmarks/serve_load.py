"""Load test of `tinystories serve` on loopback: the batching server against the one-at-a-time server.

    python benchmarks/serve_load.py [--run RUN] [--requests 64] [--concurrency 16] [--max-tokens 32] [--rounds 3]

Two servers start as subprocesses on 127.0.0.1 (free ports): `tinystories serve RUN --max-batch 16`
(continuous batching: every running request a row of one decode step) and the same with
`--max-batch 1` (one request at a time). Each compiles its decode step before it answers /health.
Then, in each of `--rounds` rounds, the same `--requests` completions (half streamed, seeded,
temperature 0.8, top-k 40) go to one server and then the other with `--concurrency` clients; the two
take turns so that a busy machine slows both alike, and each server's best round counts. Both are
stopped with SIGTERM at the end (a graceful shutdown must exit cleanly). Without --run a run
directory with the `tiny` preset's architecture and random weights is built (bpe:4096 trained on a
slice of the validation text, or the bytes tokenizer when that is missing): the server's cost does
not depend on what the weights say. The table is printed and appended to benchmarks/RESULTS.md.
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
import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
import torch  # noqa: E402
from common import append_results, markdown_table  # noqa: E402

from tinystories.checkpoint import save_checkpoint  # noqa: E402
from tinystories.config import RunConfig  # noqa: E402
from tinystories.model import GPT  # noqa: E402
from tinystories.tokenizer import make_tokenizer  # noqa: E402

PROMPTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom and his dog went to the park.",
    "One day, a big red ball rolled into the garden.",
    "The sun was shining and the birds were singing.",
    "Mia wanted to bake a cake for her mom.",
    "A small cat found a shiny key under the bed.",
]
MODES = {"batched (--max-batch 16)": 16, "one at a time (--max-batch 1)": 1}


def build_random_run(directory: Path) -> tuple[Path, str]:
    """A run dir with the `tiny` preset's architecture and random weights. Returns (dir, tokenizer spec)."""
    run_config = RunConfig.from_preset("tiny")
    data = os.environ.get("TINYSTORIES_DATA", REPO_ROOT.parent / "shared" / "data" / "tinystories")
    valid = Path(data) / "valid.txt.gz"
    if valid.exists():
        from tinystories.data import read_stories

        tokenizer = make_tokenizer("bpe:4096", itertools.islice(read_stories(valid), 3000))
    else:
        tokenizer = make_tokenizer("bytes")
    run_config.tokenizer = tokenizer.spec
    run_config.model.vocab_size = max(tokenizer.vocab_size, 257)
    run_config.model.validate()
    directory.mkdir(parents=True, exist_ok=True)
    run_config.save(directory / "config.json")
    tokenizer.save(directory)
    torch.manual_seed(0)
    save_checkpoint(directory / "checkpoints" / "best", GPT(run_config.model))
    return directory, tokenizer.spec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def streamed_request(client: httpx.AsyncClient, body: dict, result: dict, started: float) -> None:
    body["stream_options"] = {"include_usage": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            result["error"] = f"HTTP {response.status_code}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                result["ok"] = True
                continue
            event = json.loads(data)
            if event.get("choices") and result["first"] is None:
                result["first"] = time.perf_counter() - started
            if event.get("usage"):
                result["tokens"] = event["usage"]["completion_tokens"]


async def one_request(client: httpx.AsyncClient, index: int, max_tokens: int) -> dict:
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40,
            "seed": index, "stream": index % 2 == 1}
    started = time.perf_counter()
    result = {"ok": False, "tokens": 0, "first": None}
    try:
        if body["stream"]:
            await streamed_request(client, body, result, started)
        else:
            response = await client.post("/v1/completions", json=body)
            result["ok"] = response.status_code == 200
            if result["ok"]:
                result["tokens"] = response.json()["usage"]["completion_tokens"]
            else:
                result["error"] = f"HTTP {response.status_code}: {response.text[:200]}"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as error:
        result["error"] = f"{type(error).__name__}: {error}"
    result["latency"] = time.perf_counter() - started
    return result


async def run_load(url: str, requests: int, concurrency: int, max_tokens: int) -> tuple[list[dict], float]:
    """`requests` completions with at most `concurrency` in flight; the results and the wall time."""
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def bounded(index: int) -> dict:
            async with semaphore:
                return await one_request(client, index, max_tokens)

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return list(results), time.perf_counter() - started


def start_server(run: Path, slots: int, max_tokens: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "tinystories", "serve", str(run), "--port", str(port),
               "--max-tokens-limit", str(max(max_tokens, 64)), "--max-batch", str(slots)]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    return process, f"http://127.0.0.1:{port}"


def wait_for_health(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 900) -> None:
    """Until /health answers (the server compiles its decode step first: a minute or more when cold)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited early with code {process.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not become healthy within {timeout} s")


def stop_server(process: subprocess.Popen, log_path: Path) -> bool:
    """SIGTERM and wait; True when the shutdown was graceful."""
    process.send_signal(signal.SIGTERM)
    try:
        exit_code = process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return False
    # uvicorn drains connections, runs the app's shutdown, then re-raises the signal: exit -SIGTERM.
    return exit_code in (0, -signal.SIGTERM) and "Application shutdown complete" in log_path.read_text()


def summarize(rounds: list[tuple[list[dict], float]]) -> dict:
    """The best round (most tokens/s) of one server, with its latencies and every round's errors."""
    def rate(round_: tuple[list[dict], float]) -> float:
        return sum(r["tokens"] for r in round_[0]) / round_[1]

    results, wall = max(rounds, key=rate)
    ok = [r for r in results if r["ok"]]
    firsts = [r["first"] for r in ok if r["first"] is not None]
    errors = [r for round_ in rounds for r in round_[0] if not r["ok"]]
    return {"tokens_per_second": rate((results, wall)), "requests_per_second": len(ok) / wall,
            "p50": percentile([r["latency"] for r in ok], 50) if ok else float("nan"),
            "p99": percentile([r["latency"] for r in ok], 99) if ok else float("nan"),
            "first_p50": percentile(firsts, 50) if firsts else float("nan"), "errors": errors}


def measure(run: Path, args: argparse.Namespace, scratch: Path) -> tuple[dict[str, dict], dict[str, bool]]:
    servers = {}
    try:
        for name, slots in MODES.items():
            log_path = scratch / f"server-{slots}.log"
            process, url = start_server(run, slots, args.max_tokens, log_path)
            servers[name] = (process, url, log_path)
            wait_for_health(url, process, log_path)
        rounds: dict[str, list] = {name: [] for name in MODES}
        for _ in range(args.rounds):
            for name, (_, url, _) in servers.items():  # taking turns: the machine's load falls on both
                rounds[name].append(asyncio.run(run_load(url, args.requests, args.concurrency, args.max_tokens)))
    finally:
        graceful = {name: stop_server(process, log_path) for name, (process, _, log_path) in servers.items()}
    return {name: summarize(values) for name, values in rounds.items()}, graceful


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run directory (default: random weights, tiny preset)")
    parser.add_argument("--requests", type=int, default=64, help="requests per round and server (default 64)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server, taking turns; the best counts")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if not (1 <= args.requests <= 2000 and 1 <= args.concurrency <= 256 and 1 <= args.max_tokens <= 1024
            and 1 <= args.rounds <= 10):
        parser.error("keep the load bounded: 1..2000 requests, 1..256 concurrent, 1..1024 max tokens, 1..10 rounds")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        if args.run:
            run, model_note = args.run, f"run {args.run}"
        else:
            run, spec = build_random_run(Path(scratch) / "random-tiny")
            model_note = f"`tiny` preset architecture, random weights, {spec} tokenizer"
        results, graceful = measure(run, args, Path(scratch))
    body = report(results, graceful, args, model_note)
    print(body)
    errors = sum(len(r["errors"]) for r in results.values())
    if errors:
        print(f"{errors} requests failed, e.g. {next(r for v in results.values() for r in v['errors']).get('error')}",
              file=sys.stderr)
        return 1
    if not args.no_append:
        append_results("Serving load: batched vs one at a time (benchmarks/serve_load.py)", body)
    return 0 if all(graceful.values()) else 1


def report(results: dict[str, dict], graceful: dict[str, bool], args: argparse.Namespace, model_note: str) -> str:
    rows = [[name, f"{r['tokens_per_second']:,.0f}", f"{r['requests_per_second']:.1f}", f"{r['p50'] * 1000:,.0f}",
             f"{r['p99'] * 1000:,.0f}", f"{r['first_p50'] * 1000:,.0f}", len(r["errors"]),
             "yes" if graceful[name] else "no"] for name, r in results.items()]
    batched, single = results.values()
    table = markdown_table(["server", "completion tokens/s", "requests/s", "latency p50 (ms)", "p99 (ms)",
                            "streamed first token p50 (ms)", "errors", "graceful SIGTERM"], rows)
    return (f"{table}\n\nBatched / one at a time: {batched['tokens_per_second'] / single['tokens_per_second']:.2f}x "
            f"tokens/s, p50 latency {batched['p50'] / single['p50']:.2f}x.\n\nNotes: {args.requests} requests per "
            f"round ({args.concurrency} concurrent clients, half streamed, {args.max_tokens} max tokens, temperature "
            f"0.8, top-k 40, seeded), {args.rounds} rounds per server taking turns, the best round of each; model: "
            f"{model_note}; both servers `tinystories serve` subprocesses on 127.0.0.1 with their decode step "
            f"compiled; the client (httpx) in this process on the same cores.")


if __name__ == "__main__":
    raise SystemExit(main())
