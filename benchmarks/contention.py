"""Training speed on a busy machine: `tinystories train --preset tiny` alone, and beside one busy process.

A user's laptop always runs something else. With one of two cores taken, OpenMP threads that spin
while they wait for each other can make a 2-thread step several times slower than it needs to be.
For each threading setting this runs the same short training twice, alone and beside
`python -c "while True: pass"`, and reports the steady training tokens/s (the median of the logged
intervals after compilation) and how much the busy process costs.

    python benchmarks/contention.py                       # every setting, 2 rounds
    python benchmarks/contention.py --settings default,passive --rounds 1 --no-append

Settings: 'default' sets nothing: what a user gets (the package picks the training threads from the
cores no other program is keeping busy, and sets GOMP_SPINCOUNT=10000 before torch loads; see
devices.use_free_cores and tinystories/__init__.py); 'before' is the package before that: every core,
libgomp's own spinning (GOMP_SPINCOUNT=300000, ~0.1-1 ms before a waiting thread sleeps); 'passive' every
core with OMP_WAIT_POLICY=PASSIVE (sleep at once); '1thread' OMP_NUM_THREADS=1. Settings and conditions
take turns within each round; the best round counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE] + [str(HERE)]

from common import append_results, load_average, markdown_table  # noqa: E402

sys.path.insert(0, str(REPO / "src"))
from tinystories import DEFAULT_OPENMP_WAIT  # noqa: E402  (importing it sets nothing the runs inherit)

PACKAGE_DEFAULT = ("(nothing set: threads = free cores; the package sets "
                   + " ".join(f"{k}={v}" for k, v in DEFAULT_OPENMP_WAIT.items()) + ")")

THREADING_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "KMP_BLOCKTIME")
ALL_CORES = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
SETTINGS = {
    "default": {},
    "before": {"OMP_NUM_THREADS": ALL_CORES, "GOMP_SPINCOUNT": "300000"},
    "passive": {"OMP_NUM_THREADS": ALL_CORES, "OMP_WAIT_POLICY": "PASSIVE"},
    "1thread": {"OMP_NUM_THREADS": "1"},
}
BUSY_LOOP = "while True: pass"


def environment(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREADING_VARIABLES}
    env.update(SETTINGS[setting])
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def steady_tokens_per_second(run_dir: Path, skip_steps: int) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_second"] for r in records if "train_loss" in r and r["step"] > skip_steps]
    return statistics.median(rates)


def train_once(data: Path, setting: str, busy: bool, steps: int, skip_steps: int) -> float:
    """Steady tokens/s of one short `tinystories train --preset tiny` run."""
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, "-m", "tinystories", "train", "--preset", "tiny", "--data", str(data),
                       "--out", str(Path(folder) / "run"), "--max-steps", str(steps), "--eval-every", str(10 * steps),
                       "--device", "cpu", "--no-progress", "--set", "log_every=5", "--set", "sample_tokens=0"]
            subprocess.run(command, env=environment(setting), check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            return steady_tokens_per_second(Path(folder) / "run", skip_steps)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


def default_data() -> Path:
    """Shards of the bundled demo corpus (or $TINYSTORIES_DATA), prepared once under benchmarks/out."""
    from tinystories.data import prepare

    out = HERE / "out" / "shards-bpe4096"
    prepare(None, out, "bpe:4096", progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="prepared shards (default: the demo corpus, prepared once)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    parser.add_argument("--skip-steps", type=int, default=20, help="steps of warm-up and compiling not counted")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="print only; don't append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    data = args.data or default_data()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    best: dict[tuple[str, bool], float] = {}
    started, load_before = time.perf_counter(), load_average()
    for round_index in range(args.rounds):
        for setting in settings:
            for busy in (False, True):
                rate = train_once(data, setting, busy, args.steps, args.skip_steps)
                best[setting, busy] = max(best.get((setting, busy), 0.0), rate)
                print(f"round {round_index + 1}: {setting:8s} {'busy' if busy else 'quiet'} {rate:8.0f} tokens/s",
                      file=sys.stderr, flush=True)
    rows = [[f"`{setting}`", " ".join(f"{k}={v}" for k, v in SETTINGS[setting].items()) or PACKAGE_DEFAULT,
             f"{best[setting, False]:,.0f}", f"{best[setting, True]:,.0f}",
             f"{100 * (best[setting, True] / best[setting, False] - 1):+.0f}%"] for setting in settings]
    table = markdown_table(["setting", "environment", "quiet tokens/s", "beside a busy process", "change"], rows)
    notes = (f"Notes: `tinystories train --preset tiny` (compiled, Muon, batch 16 x 256) for {args.steps} steps; "
             f"steady tokens/s = median of the 5-step log intervals after step {args.skip_steps}; best of "
             f"{args.rounds} rounds, settings and conditions taking turns. The busy process is `python -c "
             f"\"{BUSY_LOOP}\"` (one core). {time.perf_counter() - started:.0f} s in all; load average before "
             f"{load_before[0] if load_before else float('nan'):.1f}.")
    body = table + "\n\n" + notes
    print(body)
    if not args.no_append:
        append_results("Training beside a busy process (benchmarks/contention.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
