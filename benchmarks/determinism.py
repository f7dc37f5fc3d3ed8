"""What bit-exact training costs: `tiny`'s compiled training step with torch's deterministic mode (the
default, `TrainConfig.deterministic`) and without, side by side in one process, and whether each
repeats: two fresh processes per mode train the same steps and their losses are compared bit for bit.

    python benchmarks/determinism.py                 # batch 16 (the preset's), 4 rounds
    python benchmarks/determinism.py --rounds 2 --no-append
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE] + [str(HERE)]
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from common import append_results, best_times, markdown_table  # noqa: E402
from tinystories.config import get_preset  # noqa: E402
from tinystories.model import GPT  # noqa: E402
from tinystories.optim import build_optimizer  # noqa: E402
from tinystories.train_state import deterministic_algorithms  # noqa: E402

CPU = torch.device("cpu")


def training_step(deterministic: bool, batch_size: int):
    """tiny's compiled forward + backward + Muon/AdamW step; compiled and run in (or out of) deterministic mode."""
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = GPT(preset.model)
    compiled = torch.compile(model)
    optimizer = build_optimizer(model, preset.train, CPU)
    idx = torch.randint(0, preset.model.vocab_size, (batch_size, preset.model.context_length),
                        generator=torch.Generator().manual_seed(0))
    targets = torch.roll(idx, -1, dims=1)

    def step() -> None:
        with deterministic_algorithms(deterministic, CPU):
            compiled(idx, targets)[1].backward()
            optimizer.step()
            optimizer.zero_grad()

    return step


def best_step_seconds(rounds: int, batch_size: int) -> dict[bool, float]:
    return best_times({mode: training_step(mode, batch_size) for mode in (True, False)}, rounds, warmups=2)


def losses_of_a_run(deterministic: bool, data: Path) -> list[float]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        subprocess.run([sys.executable, "-m", "tinystories", "train", "--preset", "tiny", "--data", str(data),
                        "--out", str(out), "--max-steps", "20", "--eval-every", "1000", "--batch-size", "8",
                        "--device", "cpu", "--no-progress", "--set", "log_every=5", "--set", "sample_tokens=0",
                        "--set", f"deterministic={str(deterministic).lower()}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), OMP_NUM_THREADS=str(os.cpu_count() or 1)))
        return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "train_loss" in line]


def repeat_verdict(first: list[float], second: list[float]) -> str:
    """'yes', or where two runs' logged losses (every 5 steps) first differ."""
    if first == second:
        return "yes"
    index = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b) if len(first) == len(second) else 0
    return f"no (step-{5 * (index + 1)} loss {first[index]!r} vs {second[index]!r})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-repeat-check", dest="repeat_check", action="store_false")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    seconds = best_step_seconds(args.rounds, args.batch_size)
    tokens = args.batch_size * get_preset("tiny").model.context_length
    repeats = {}
    if args.repeat_check:
        from tinystories.data import prepare

        data = HERE / "out" / "shards-bpe4096"
        prepare(None, data, "bpe:4096", progress=False)
        for mode in (True, False):
            first, second = losses_of_a_run(mode, data), losses_of_a_run(mode, data)
            repeats[mode] = repeat_verdict(first, second)
    rows = [[("on (default)" if mode else "off"), f"{tokens / seconds[mode]:,.0f}",
             f"{seconds[False] / seconds[mode]:.3f}x", repeats.get(mode, "not checked")] for mode in (True, False)]
    body = markdown_table(["deterministic mode", "tokens/s", "speed vs off", "two runs bit-identical"], rows)
    body += (f"\n\nNotes: `tiny` (compiled, Muon), batch {args.batch_size} x 256, forward + backward + optimizer "
             f"step on one random batch, best of {args.rounds} rounds with the two modes taking turns; "
             f"{torch.get_num_threads()} threads. Repeat check: two `tinystories train --preset tiny --batch-size 8 "
             "--max-steps 20` processes per mode, their logged train losses compared exactly.")
    print(body)
    if not args.no_append:
        append_results("Deterministic mode: cost and effect (benchmarks/determinism.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
