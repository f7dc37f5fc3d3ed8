"""Tokenization speed on the shared TinyStories train file.

    .venv/bin/python benchmarks/tokenize_throughput.py [--repeats 3] [--data DIR]

Measures (1) seconds to train the default bpe:4096 tokenizer on the whole train file (reading and
decompressing included) and (2) MB/s of `tinystories.data.prepare` with an existing tokenizer
(read + encode + write train.bin and val.bin), for bpe:4096, gpt2 and bytes, plus the naive
Hugging Face `encode_batch` loop for comparison. MB = 10^6 bytes of story text (UTF-8, the `bytes`
of meta.json). Prints a markdown table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "src"))  # run from a checkout without `pip install -e .`

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

from common import cpu_model  # noqa: E402
from tinystories.data import prepare, read_stories  # noqa: E402
from tinystories.tokenizer import BPETokenizer, available_cpus, make_tokenizer  # noqa: E402

RESULTS = _HERE / "RESULTS.md"
RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Each benchmark script appends its own dated section (machine, command, table); newest last.\n"
)
PREPARE_TARGET_MB_S = 8.0
TRAIN_TARGET_S = 15.0


def timed(function: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return seconds


def prepare_speed(train: Path, valid: Path, spec: str, scratch: Path, repeats: int) -> tuple[float, float, int]:
    """(best MB/s, median MB/s, story bytes) of prepare into a fresh folder each time."""
    out = scratch / "shards"
    story_bytes = 0

    def run() -> None:
        nonlocal story_bytes
        shutil.rmtree(out, ignore_errors=True)  # else the second run is "up to date"
        meta = prepare([train], out, spec, [valid], progress=False)
        story_bytes = meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]

    seconds = timed(run, repeats)
    return story_bytes / 1e6 / min(seconds), story_bytes / 1e6 / statistics.median(seconds), story_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best and median reported)")
    parser.add_argument(
        "--data", type=Path,
        default=Path(os.environ.get("TINYSTORIES_DATA") or _HERE.parent / ".." / "shared" / "data" / "tinystories"),
        help="folder with train.txt.gz and valid.txt.gz (default: $TINYSTORIES_DATA or ../shared/data/tinystories)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append to (default: %(default)s)")
    args = parser.parse_args()
    train, valid = args.data / "train.txt.gz", args.data / "valid.txt.gz"
    load_before = os.getloadavg()[0]
    rows: list[tuple[str, str, str]] = []

    train_seconds = timed(lambda: make_tokenizer("bpe:4096", read_stories(train)), args.repeats)
    rows.append((
        "train bpe:4096 on train.txt.gz (13.6 MB of stories)",
        f"{min(train_seconds):.2f} s (median {statistics.median(train_seconds):.2f} s)",
        f"< {TRAIN_TARGET_S:.0f} s",
    ))

    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        tokenizer = make_tokenizer("bpe:4096", read_stories(train))
        tokenizer.save(scratch / "bpe4096")
        for label, spec, target in [
            ("prepare, existing bpe:4096 tokenizer", str(scratch / "bpe4096"), f">= {PREPARE_TARGET_MB_S:.0f} MB/s"),
            ("prepare, gpt2", "gpt2", ""),
            ("prepare, bytes", "bytes", ""),
        ]:
            best, median, story_bytes = prepare_speed(train, valid, spec, scratch, args.repeats)
            rows.append((f"{label} (train + valid, {story_bytes / 1e6:.1f} MB)", f"{best:.1f} MB/s (median {median:.1f})", target))

        # For comparison: Hugging Face `tokenizers` alone, one `encode_batch` over the story list.
        assert isinstance(tokenizer, BPETokenizer)
        stories = list(read_stories(train))
        story_bytes = sum(len(story.encode("utf-8")) for story in stories)
        baseline = timed(lambda: tokenizer._hf.encode_batch(stories), args.repeats)
        rows.append((
            "baseline: tokenizers `encode_batch(stories)`, encode only",
            f"{story_bytes / 1e6 / min(baseline):.1f} MB/s (median {story_bytes / 1e6 / statistics.median(baseline):.1f})",
            "",
        ))

    load_after = os.getloadavg()[0]
    table = "\n".join(
        ["| measurement | result | target |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    )
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    section = (
        f"\n## Tokenization (benchmarks/tokenize_throughput.py), {now}\n\n"
        f"Machine: {os.cpu_count()} cores ({available_cpus()} usable), {cpu_model()}; "
        f"Python {platform.python_version()}. Command: `{command}`\n\n"
        f"{table}\n\n"
        f"Notes: best of {args.repeats} runs (median in brackets); wall-clock time. The cores are shared "
        f"with other engineers' jobs (1-minute load average {load_before:.1f} before, {load_after:.1f} "
        "after), so figures vary between runs. `prepare` MB = story-text bytes (UTF-8, no separators) of "
        "train + valid; its time includes reading and gunzipping, hashing the inputs, encoding (tiktoken "
        "engine on all cores, chunks of joined stories) and writing the shards. Training time includes "
        "reading the gzip file.\n"
    )
    print(section)
    if not args.results.exists():
        args.results.write_text(RESULTS_HEADER, encoding="utf-8")
    with args.results.open("a", encoding="utf-8") as results:
        results.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
