"""Measure (and with --ship, package) the model shipped as `tinystories generate --model tiny`.

    python benchmarks/shipped_model.py --run out/ship/a/run --data out/ship/a/data \\
        [--repeat out/ship/b/run] [--ship src/tinystories/assets/models/tiny]

For the trained `--run`: loss and bits per byte on the WHOLE validation split of `--data`, the
training tokens/s and minutes from its metrics.jsonl. With `--repeat` (a second run of the same
documented command), the same for it and the relative difference of the two val losses: the
reproducibility check (the issue asks for <= 2%). With `--ship DIR`: the run's best checkpoint is
exported as float16 safetensors + tokenizer + config into DIR (replacing it), its metrics.jsonl is
copied beside them (so `docs/make_figures.py --run tiny` can draw the loss curve), and the shipped
float16 model is evaluated again, so the table shows what users actually get. Finally: generation
tokens/s of the model at batch 1 (KV cache, greedy, best of 3). The table is printed and appended to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch  # noqa: E402
from common import append_results, markdown_table  # noqa: E402

from tinystories.checkpoint import load_run_config  # noqa: E402
from tinystories.evaluate import evaluate_shards  # noqa: E402
from tinystories.export import export  # noqa: E402
from tinystories.generate import load_model  # noqa: E402
from tinystories.runlog import iter_metrics  # noqa: E402

GENERATION_PROMPT = "Once upon a time"


def training_summary(run: Path) -> dict:
    """Steps, tokens, minutes and the mean logged tokens/s of a finished run (from metrics.jsonl)."""
    records = list(iter_metrics(run))
    train_records = [r for r in records if "train_loss" in r]
    last = records[-1]
    speeds = [r["tokens_per_second"] for r in train_records[1:]]  # the first includes compilation
    return {"steps": last["step"], "tokens": last["tokens"], "minutes": last["elapsed_seconds"] / 60,
            "tokens_per_second": sum(speeds) / len(speeds), "dtype": load_run_config(run).train.dtype}


def whole_val(model_path: str | Path, data: Path) -> dict:
    return evaluate_shards(load_model(model_path), data)


def generation_speed(model_path: str | Path, threads: int, new_tokens: int = 256, repeats: int = 3) -> float:
    """Best-of-`repeats` tokens/s at batch 1 (temperature 0.8, KV cache; prefill included) on `threads` threads."""
    torch.set_num_threads(threads)
    lm = load_model(model_path)
    lm.generate(GENERATION_PROMPT, max_new_tokens=16, temperature=0)  # warm-up
    best = 0.0
    for seed in range(repeats):
        lm.generate(GENERATION_PROMPT, max_new_tokens=new_tokens, temperature=0.8, seed=seed)
        best = max(best, lm.last_stats["tokens_per_second"])
    return best


def ship(run: Path, target: Path) -> Path:
    export(run, "safetensors", target, dtype="float16", force=True)
    shutil.copyfile(run / "metrics.jsonl", target / "metrics.jsonl")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="the trained run to measure (and ship)")
    parser.add_argument("--data", type=Path, required=True, help="its prepared shards (val.bin is evaluated)")
    parser.add_argument("--repeat", type=Path, help="a second run of the same command: reproducibility")
    parser.add_argument("--ship", type=Path, metavar="DIR", help="write the float16 package-data model here")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)

    rows = []
    runs = [("trained run", args.run)] + ([("repeat of the same command", args.repeat)] if args.repeat else [])
    losses = {}
    for label, run in runs:
        summary, result = training_summary(run), whole_val(run, args.data)
        losses[label] = result["val_loss"]
        rows.append([f"{label} (`{run}`, train.dtype {summary['dtype']})", f"{summary['steps']:,}", f"{summary['tokens'] / 1e6:.1f}M",
                     f"{summary['minutes']:.1f}", f"{summary['tokens_per_second']:,.0f}",
                     f"{result['val_loss']:.4f}", f"{result['bits_per_byte']:.4f}"])
        print(rows[-1], flush=True)
    speed_source = args.run
    if args.ship:
        shipped = ship(args.run, args.ship)
        result = whole_val(shipped, args.data)
        rows.append([f"shipped (`{args.ship}`, float16)", "", "", "", "", f"{result['val_loss']:.4f}",
                     f"{result['bits_per_byte']:.4f}"])
        speed_source = shipped
    table = markdown_table(["model", "steps", "tokens", "train minutes", "train tokens/s", "val loss (nats/token)",
                            "val bits per byte"], rows)
    notes = [f"Whole validation split of `{args.data}`."]
    if args.repeat:
        first, second = losses.values()
        notes.append(f"Reproducibility: the repeat's val loss differs by {abs(second - first) / first:.3%}.")
    # A 1.3M-parameter model at batch 1 is too small to share among threads: one is often faster.
    speeds = {threads: generation_speed(speed_source, threads) for threads in (1, 2)}
    notes.append(f"Generation, batch 1, KV cache, up to 256 new tokens from {GENERATION_PROMPT!r} (best of 3): "
                 + ", ".join(f"{speed:,.0f} tokens/s on {threads} thread{'s' * (threads > 1)}"
                             for threads, speed in speeds.items()) + ".")
    body = table + "\n\n" + "\n".join(notes)
    print(body)
    if not args.no_append:
        append_results("Shipped model", body)


if __name__ == "__main__":
    sys.exit(main())
