"""Small helpers shared by the benchmark scripts: describe the machine, print a markdown table, and
append a dated section to benchmarks/RESULTS.md.

    from common import append_results, best_times, machine_description, markdown_table
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path
import time
from typing import Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
    """1-, 5- and 15-minute load averages (None where the OS does not say)."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def machine_description() -> str:
    """One line: CPU model, cores, Python and torch versions (torch only if already imported)."""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable)", f"Python {platform.python_version()}"]
    torch = sys.modules.get("torch")
    if torch is not None:
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    return "; ".join(parts)


def command_line() -> str:
    """The exact command that ran this script, ready to paste into a shell, with the threading variables
    (OMP_*, GOMP_*, KMP_*, MKL_*) that were set, since they change CPU timings."""
    variables = [f"{name}={shlex.quote(value)}" for name, value in sorted(os.environ.items())
                 if name.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))]
    return " ".join(variables + ["python"] + [shlex.quote(arg) for arg in sys.argv])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, body: str, path: Path = RESULTS) -> None:
    """Append a section '## title, <UTC date>' with the machine, the command and `body` (append only)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title}, {stamp}\n\nMachine: {machine_description()}. "
               f"Command: `{command_line()}`\n\n{body.strip()}\n")
    with open(path, "a", encoding="utf-8") as file:  # one write: sections of concurrent scripts don't interleave
        file.write(section)


def best_times(functions: dict[str, Callable[[], object]], rounds: int, warmups: int = 1,
               synchronize: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Best wall time of each function over `rounds`, the functions taking turns in each round (so a
    change in the machine's load hits them alike), after `warmups` untimed calls each (allocations,
    lazy initialisation, compiling). `synchronize` waits for an accelerator around each timing."""
    for function in functions.values():
        for _ in range(warmups):
            function()
    synchronize()
    best = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            synchronize()
            started = time.perf_counter()
            function()
            synchronize()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def peers_model_config(name: str):
    """Preset `name`'s ModelConfig as the peers can build it: HF's Llama and nanoGPT have no value
    embeddings (tiny's recipe has), so comparisons turn them off and every side is the same model."""
    import dataclasses

    from tinystories.config import get_preset

    return dataclasses.replace(get_preset(name).model, value_embedding=False)
