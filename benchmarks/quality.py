"""Quality per wall-clock: train a preset (default `tiny`) for a fixed time and report val loss and bits/byte.

    python benchmarks/quality.py [--minutes 15] [--data DIR] [--preset tiny] [--throughput-steps N]

Without --data, shards are prepared (once; later runs find them up to date) from $TINYSTORIES_DATA
(train.txt.gz, valid.txt.gz) with a bpe:4096 tokenizer into benchmarks/out/shards-bpe4096. The run goes
to benchmarks/out/quality-<preset>-<time>. The time budget is TrainConfig.max_minutes, so the lr schedule
anneals within it; compilation and evaluation count against it. With --throughput-steps N, the
training throughput of the preset is first measured eager and compiled (N steps each, after warm-up).
The markdown table is printed and appended to benchmarks/RESULTS.md with date, machine and command.
"""

from __future__ import annotations

import os
import sys


import argparse
import dataclasses
import datetime
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from common import append_results  # noqa: E402
from tinystories import batching  # noqa: E402
from tinystories.config import RunConfig  # noqa: E402
from tinystories.batching import adapt_to_data  # noqa: E402
from tinystories.optim import build_optimizer  # noqa: E402
from tinystories.runlog import iter_metrics  # noqa: E402
from tinystories.train import accumulate_gradients, train  # noqa: E402
from tinystories.train_setup import create_model  # noqa: E402


def default_shards() -> Path:
    """benchmarks/out/shards-bpe4096, prepared from $TINYSTORIES_DATA if not there yet."""
    from tinystories.data import prepare

    source = Path(os.environ.get("TINYSTORIES_DATA") or REPO_ROOT.parent / "shared" / "data" / "tinystories")
    train_file, valid_file = source / "train.txt.gz", source / "valid.txt.gz"
    if not train_file.is_file() or not valid_file.is_file():
        sys.exit(f"quality.py: no --data and no train.txt.gz/valid.txt.gz in {source}; set TINYSTORIES_DATA")
    out = HERE / "out" / "shards-bpe4096"
    prepare([train_file], out, "bpe:4096", [valid_file], progress=True)
    return out


def measure_throughput(run_config: RunConfig, data: Path, steps: int, compile_model: bool) -> float:
    """Training tokens per second of the preset (fwd + bwd + AdamW step), after 3 warm-up steps."""
    from tinystories.data import load_tokens

    config = run_config.train
    torch.manual_seed(0)
    model = create_model(run_config.model)
    runnable = torch.compile(model) if compile_model else model
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    sampler = batching.WindowBatches(load_tokens(data, "train"), run_config.model.context_length,
                                     config.batch_size * config.grad_accum, seed=0)
    tokens, start = 0, 0.0
    for index in range(3 + steps):
        if index == 3:
            tokens, start = 0, time.perf_counter()
        x, y = sampler.next_batch()
        _, _, count = accumulate_gradients(runnable, model, x, y, config.grad_accum, config.grad_clip,
                                           torch.device("cpu"), None)
        optimizer.step()
        optimizer.zero_grad()
        tokens += count
    return tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget (default 15)")
    parser.add_argument("--data", type=Path, help="prepared shards (default: prepare bpe:4096 into benchmarks/out)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: the preset's choice)")
    parser.add_argument("--throughput-steps", type=int, default=0,
                        help="first measure eager and compiled tokens/s over this many steps (0: skip)")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()

    data = args.data or default_shards()
    run_config, notes = adapt_to_data(RunConfig.from_preset(args.preset), data)
    train_config = dataclasses.replace(run_config.train, max_minutes=args.minutes, max_steps=10**7,
                                       device="cpu" if not torch.cuda.is_available() else "auto")
    if args.compile is not None:
        train_config = dataclasses.replace(train_config, compile=args.compile)
    run_config = dataclasses.replace(run_config, train=train_config)
    load_before = os.getloadavg()[0]

    throughput = {}
    if args.throughput_steps > 0:
        torch.set_num_threads(os.cpu_count() or 1)
        for label, compiled in (("eager", False), ("compiled", True)):
            throughput[label] = measure_throughput(run_config, data, args.throughput_steps, compiled)
            print(f"throughput {label}: {throughput[label]:,.0f} tokens/s", file=sys.stderr)

    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = HERE / "out" / f"quality-{args.preset}-{stamp:%Y%m%d-%H%M%S}"
    summary = train(run_config, out, resume=False, progress=sys.stderr.isatty())
    load_after = os.getloadavg()[0]
    records = list(iter_metrics(out))
    rates = [r["tokens_per_second"] for r in records if "train_loss" in r]
    mfu = [r["mfu"] for r in records if "mfu" in r]

    rows = [
        ("preset", f"{args.preset} ({run_config.model.num_parameters() / 1e6:.2f}M parameters, "
                   f"{run_config.tokenizer}, compile={'on' if train_config.compile else 'off'})"),
        ("budget", f"{args.minutes:g} min ({summary['seconds'] / 60:.2f} min used, stop: {summary['stop_reason']})"),
        ("steps / tokens", f"{summary['steps']:,} / {summary['tokens']:,}"),
        ("val loss (nats/token)", f"{summary['best_val_loss']:.4f}" if summary["best_val_loss"] else "n/a"),
        ("val bits per byte", f"{summary['best_val_bpb']:.4f}" if summary["best_val_bpb"] else "n/a"),
        ("train tokens/s (median of log intervals)", f"{np.median(rates):,.0f}" if rates else "n/a"),
        ("MFU vs measured fp32 matmul peak (median)", f"{100 * np.median(mfu):.1f}%" if mfu else "n/a"),
    ]
    for label, value in throughput.items():
        rows.append((f"throughput, {label} ({args.throughput_steps} steps)", f"{value:,.0f} tokens/s"))
    table = "\n".join(["| measurement | result |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])
    notes = (f"Notes: data {data} ({', '.join(notes) or 'as preset'}); the time budget includes torch.compile "
             f"warm-up and evaluations ({run_config.train.eval_tokens:,} val tokens each). 1-minute load average "
             f"{load_before:.1f} before, {load_after:.1f} after (2 cores: above ~0.5, something else shared the CPU).")
    print(table + "\n\n" + notes)
    append_results("Training quality per wall-clock (benchmarks/quality.py)", table + "\n\n" + notes, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
