"""Load test of `tinystories serve` on loopback: latency percentiles, tokens/s and errors (must be 0).

    python benchmarks/serve_load.py [--run RUN] [--requests 200] [--concurrency 16] [--max-tokens 32]

The script starts the server itself (`python -m tinystories serve RUN --port P`, a subprocess on
127.0.0.1 with a free port), waits for /health, sends a fixed number of completions with bounded
concurrency (every other one streamed), then stops the server with SIGTERM (a graceful shutdown,
which must exit 0). Without --run it builds a run directory with the `tiny` preset's architecture
and random weights (a bpe:4096 tokenizer trained on a slice of $TINYSTORIES_DATA/valid.txt.gz, or the
bytes tokenizer when the data is missing): the server's cost does not depend on what the weights say.
As a baseline the same requests' model work is timed in-process, one `generate` call at a time.
The markdown table is printed and appended to benchmarks/RESULTS.md with date, machine and command.
"""

from __future__ import annotations

import os
import sys


import argparse
import asyncio
import datetime
import itertools
import json
import platform
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from tinystories.checkpoint import save_checkpoint  # noqa: E402
from tinystories.config import RunConfig  # noqa: E402
from tinystories.generate import load_model  # noqa: E402
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


def machine() -> str:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{os.cpu_count()} cores ({usable} usable), {model}; torch {torch.__version__}, Python {platform.python_version()}"


def build_random_run(directory: Path) -> tuple[Path, str]:
    """A run dir with the `tiny` preset's architecture and random weights. Returns (dir, tokenizer note)."""
    run_config = RunConfig.from_preset("tiny")
    valid = Path(os.environ.get("TINYSTORIES_DATA", REPO_ROOT.parent / "shared" / "data" / "tinystories")) / "valid.txt.gz"
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


async def one_request(client: httpx.AsyncClient, index: int, max_tokens: int) -> dict:
    body = {"prompt": PROMPTS[index % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40,
            "seed": index, "stream": index % 2 == 1}
    started = time.perf_counter()
    result = {"stream": body["stream"], "ok": False, "tokens": 0, "first": None}
    try:
        if body["stream"]:
            body["stream_options"] = {"include_usage": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    result["error"] = f"HTTP {response.status_code}"
                    return result
                done = False
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if event.get("choices") and result["first"] is None:
                        result["first"] = time.perf_counter() - started
                    if event.get("usage"):
                        result["tokens"] = event["usage"]["completion_tokens"]
                result["ok"] = done
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
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def bounded(index: int) -> dict:
            async with semaphore:
                return await one_request(client, index, max_tokens)

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        return list(results), time.perf_counter() - started


def wait_for_health(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited early with code {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not become healthy within {timeout} s")


def baseline_tokens_per_second(run: Path, max_tokens: int, count: int = 12, rounds: int = 3) -> tuple[float, float]:
    """The model alone: the same kind of requests, one generate call at a time, in this process.

    Best of `rounds` after a warm-up call: on shared cores single rounds vary several-fold.
    """
    language_model = load_model(run)

    def best_rate() -> float:
        language_model.generate(PROMPTS[0], max_new_tokens=max_tokens)  # warm-up
        best = 0.0
        for _ in range(rounds):
            tokens, started = 0, time.perf_counter()
            for index in range(count):
                (completion,) = language_model.generate(PROMPTS[index % len(PROMPTS)], max_new_tokens=max_tokens,
                                                        temperature=0.8, top_k=40, seed=index)
                tokens += len(completion.token_ids)
            best = max(best, tokens / (time.perf_counter() - started))
        return best

    # On a worker thread, as the server runs the model, and on the main thread, as a script would.
    with ThreadPoolExecutor(max_workers=1) as pool:
        on_worker_thread = pool.submit(best_rate).result()
    return on_worker_thread, best_rate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a trained run directory (default: random weights, tiny preset)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if not (1 <= args.requests <= 5000 and 1 <= args.concurrency <= 256 and 1 <= args.max_tokens <= 1024):
        parser.error("keep the load bounded: 1..5000 requests, 1..256 concurrent, 1..1024 max tokens")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        if args.run:
            run, model_note = args.run, f"run {args.run}"
        else:
            run, spec = build_random_run(Path(scratch) / "random-tiny")
            model_note = f"`tiny` preset architecture, random weights, {spec} tokenizer"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "tinystories", "serve", str(run), "--port", str(port),
                   "--max-tokens-limit", str(max(args.max_tokens, 64))]
        environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"))
        log_path = Path(scratch) / "server.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            try:
                wait_for_health(url, server)
                results, wall = asyncio.run(run_load(url, args.requests, args.concurrency, args.max_tokens))
            finally:
                server.send_signal(signal.SIGTERM)  # graceful shutdown
                try:
                    exit_code = server.wait(30)
                except subprocess.TimeoutExpired:
                    server.kill()
                    exit_code = "killed after 30 s"
        baseline = baseline_tokens_per_second(run, args.max_tokens)
        server_log = log_path.read_text()

    # uvicorn drains connections, runs the app's shutdown, then re-raises the signal: exit -SIGTERM.
    graceful = exit_code in (0, -signal.SIGTERM) and "Application shutdown complete" in server_log
    errors = [r for r in results if not r["ok"]]
    latencies = [r["latency"] for r in results if r["ok"]]
    firsts = [r["first"] for r in results if r["ok"] and r["first"] is not None]
    tokens = sum(r["tokens"] for r in results)
    if not latencies:
        print(server_log[-3000:], file=sys.stderr)
        raise SystemExit(f"every request failed, e.g. {errors[0].get('error')}")
    rows = [
        ("requests (half streamed) / concurrency / max_tokens", f"{args.requests} / {args.concurrency} / {args.max_tokens}"),
        ("errors", f"{len(errors)}"),
        ("wall time", f"{wall:.2f} s"),
        ("throughput", f"{len(latencies) / wall:.1f} requests/s"),
        ("completion tokens/s (all clients)", f"{tokens / wall:.0f}"),
        ("latency p50 / p99", f"{percentile(latencies, 50) * 1000:.0f} / {percentile(latencies, 99) * 1000:.0f} ms"),
        ("streamed: first token p50 / p99", f"{percentile(firsts, 50) * 1000:.0f} / {percentile(firsts, 99) * 1000:.0f} ms"
         if firsts else "n/a"),
        ("baseline: model alone, one generate at a time, on a worker thread / the main thread (best of 3)",
         f"{baseline[0]:.0f} / {baseline[1]:.0f} tokens/s"),
        ("SIGTERM: graceful shutdown", "yes" if graceful else f"no (exit {exit_code})"),
    ]
    table = "| measurement | result |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    invocation = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]])
    section = (f"\n## Serving load (benchmarks/serve_load.py), {when}\n\n"
               f"Machine: {machine()}. Command: `{invocation}`\n\n"
               f"Model: {model_note}. Server: `tinystories serve` on 127.0.0.1 (one model thread, requests "
               f"queued); client: httpx in a second process on the same cores.\n\n{table}\n")
    print(section)
    if errors:
        print(f"{len(errors)} requests failed, e.g. {errors[0].get('error')}", file=sys.stderr)
        print(server_log[-3000:], file=sys.stderr)
        return 1
    with open(args.results, "a") as results_file:
        results_file.write(section)
    return 0 if graceful else 1


if __name__ == "__main__":
    raise SystemExit(main())
