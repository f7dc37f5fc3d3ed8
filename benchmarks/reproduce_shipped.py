"""Re-run a shipped model's documented training command and compare its first steps' losses with the
shipped metrics.jsonl, record by record (same machine kind and thread count as the original run:
bits differ across CPU kinds, since the kernels MKL picks do).

    python benchmarks/reproduce_shipped.py --model mini --data data/ts-bpe4096 --steps 500
    python benchmarks/reproduce_shipped.py --model tiny --data data/ts-bpe4096 --steps 20 --no-append

The command is `tinystories train --preset P --data D --out TMP` with a `--set` for every field in
which the shipped config.json differs from its preset (`RunConfig.preset_differences`), so the
learning-rate schedule is the original one; the run is stopped with SIGTERM once step `--steps` is
logged. The re-run's threads are pinned (`--threads`, default every usable core, as the shipped runs
had): left to itself, `train` takes only the cores free when it starts, and a different thread count
changes the last bits from the first step on. `--data` is a `tinystories data prepare --tokenizer bpe:4096` directory (the bundled corpus
gives the same shards as ../shared's files). Exits 1 if any compared loss differs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE] + [str(HERE)]
sys.path.insert(0, str(HERE.parent / "src"))

from common import append_results, markdown_table  # noqa: E402

from tinystories.checkpoint import load_run_config, shipped_model_path  # noqa: E402
from tinystories.devices import pinned_threads, usable_cores  # noqa: E402
from tinystories.runlog import iter_metrics  # noqa: E402

COMPARED = ("train_loss", "val_loss")


def train_command(model: Path, data: Path, out: Path) -> list[str]:
    config = load_run_config(model)
    if config.preset is None:
        raise SystemExit(f"{model}: config.json names no preset, so there is no documented command to re-run")
    command = [sys.executable, "-m", "tinystories", "train", "--preset", config.preset, "--data", str(data),
               "--out", str(out)]
    for assignment in config.preset_differences():
        command += ["--set", assignment]
    return command


def records(run: Path, up_to: int) -> dict[int, dict]:
    """{step: the merged records of that step} for steps <= up_to (train and eval lines share a step)."""
    merged: dict[int, dict] = {}
    for record in iter_metrics(run) if (run / "metrics.jsonl").exists() else []:
        if record.get("step", up_to + 1) <= up_to:
            merged.setdefault(record["step"], {}).update(record)
    return merged


def logged_step(run: Path) -> int:
    return max(records(run, 10**9), default=0)


def rerun(command: list[str], out: Path, steps: int, timeout: float, threads: int) -> None:
    """Run the command until step `steps` is logged, then SIGTERM (it finishes the step and saves)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + timeout
    while process.poll() is None and logged_step(out) < steps and time.monotonic() < deadline:
        time.sleep(0.5)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    if logged_step(out) < steps:
        raise SystemExit(f"the re-run stopped at step {logged_step(out)} of {steps}: {stderr.strip()[-1000:]}")


def compare(shipped: dict[int, dict], again: dict[int, dict]) -> list[list[object]]:
    rows = []
    for step in sorted(shipped):
        for key in COMPARED:
            if key in shipped[step]:
                theirs, ours = shipped[step][key], again.get(step, {}).get(key)
                difference = "-" if ours is None else f"{abs(ours - theirs) / abs(theirs):.1e}"
                rows.append([step, key, f"{theirs:.6f}", "-" if ours is None else f"{ours:.6f}", difference,
                             "yes" if ours == theirs else "NO"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mini", help="a shipped model's name (or a run directory)")
    parser.add_argument("--data", type=Path, required=True, help="prepared shards (tinystories data prepare)")
    parser.add_argument("--steps", type=int, default=500, help="compare the records up to this step (default 500)")
    parser.add_argument("--threads", type=int, default=pinned_threads() or usable_cores(),
                        help="the re-run's CPU threads (default OMP_NUM_THREADS, else every usable core)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the re-run is given up")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args(argv)
    model = shipped_model_path(args.model) or Path(args.model)
    if not (args.data / "train.bin").exists():
        raise SystemExit(f"--data {args.data}: no train.bin (make it with `tinystories data prepare`)")
    shipped = records(model, args.steps)
    with tempfile.TemporaryDirectory(prefix="reproduce-") as scratch:
        out = Path(scratch) / "run"
        command = train_command(model, args.data, out)
        print("re-running:", " ".join(command[1:]), file=sys.stderr)
        started = time.monotonic()
        rerun(command, out, args.steps, args.timeout, args.threads)
        again, minutes = records(out, args.steps), (time.monotonic() - started) / 60
    rows = compare(shipped, again)
    equal = sum(row[-1] == "yes" for row in rows)
    body = markdown_table(["step", "loss", "shipped metrics.jsonl", "re-run", "relative difference", "equal"], rows)
    notes = (f"\n\n`{args.model}`: {equal} of {len(rows)} logged losses up to step {args.steps} equal bit for bit "
             f"(re-run {minutes:.1f} min, threads: {args.threads}); command `{' '.join(command[3:])}`.")
    print(body + notes)
    if not args.no_append:
        append_results(f"Shipped model re-run: {args.model} (benchmarks/reproduce_shipped.py)", body + notes)
    return 0 if rows and equal == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
