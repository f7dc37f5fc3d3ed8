"""Tokenization speed on the TinyStories train file, and how fast the hub fallback fails offline.

    .venv/bin/python benchmarks/tokenize_throughput.py [--repeats 3] [--data DIR] [--no-append]

Measures (1) seconds to train the default bpe:4096 tokenizer on the whole train file (reading and
decompressing included), (2) MB/s of `tinystories.data.prepare` with an existing tokenizer
(read + encode + write train.bin and val.bin), for bpe:4096, gpt2 and bytes, plus the naive
Hugging Face `encode_batch` loop for comparison, and (3) seconds until `tinystories.data.download`
gives up with HF_HUB_OFFLINE=1 and with an unreachable hub (loopback port 9: connection refused).
MB = 10^6 bytes of story text (UTF-8, the `bytes` of meta.json). The data defaults to
$TINYSTORIES_DATA, else the slice bundled with the package. Prints a markdown table and appends it to
benchmarks/RESULTS.md (unless --no-append).
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "src"))  # run from a checkout without `pip install -e .`

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

from common import append_results, load_average, markdown_table  # noqa: E402
from tinystories.data import DataError, bundled_corpus_dir, download, prepare, read_stories  # noqa: E402
from tinystories.tokenizer import BPETokenizer, make_tokenizer  # noqa: E402

PREPARE_TARGET_MB_S = 8.0
TRAIN_TARGET_S = 15.0
HUB_FAIL_TARGET_S = 10.0


def timed(function: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    """Wall-clock seconds of `repeats` calls, and the last call's result."""
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return seconds, result


def best_and_median(seconds: list[float]) -> str:
    return f"{min(seconds):.2f} s (median {statistics.median(seconds):.2f} s)"


def prepare_fresh(train: Path, valid: Path, spec: str, out: Path) -> int:
    """Prepare into an emptied `out` (else a rerun is "up to date"); the story bytes of both splits."""
    shutil.rmtree(out, ignore_errors=True)
    meta = prepare([train], out, spec, [valid], progress=False)
    return meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]


def prepare_rows(train: Path, valid: Path, repeats: int) -> list[tuple[str, str, str]]:
    """MB/s of prepare for three tokenizers, and of Hugging Face `encode_batch` alone."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        tokenizer = make_tokenizer("bpe:4096", read_stories(train))
        tokenizer.save(scratch / "bpe4096")
        for label, spec, target in [
            ("prepare, existing bpe:4096 tokenizer", str(scratch / "bpe4096"), f">= {PREPARE_TARGET_MB_S:.0f} MB/s"),
            ("prepare, gpt2", "gpt2", ""),
            ("prepare, bytes", "bytes", ""),
        ]:
            seconds, story_bytes = timed(lambda: prepare_fresh(train, valid, spec, scratch / "shards"), repeats)
            mb = story_bytes / 1e6
            rows.append((f"{label} (train + valid, {mb:.1f} MB)",
                         f"{mb / min(seconds):.1f} MB/s (median {mb / statistics.median(seconds):.1f})", target))
        # For comparison: Hugging Face `tokenizers` alone, one `encode_batch` over the story list.
        assert isinstance(tokenizer, BPETokenizer)
        stories = list(read_stories(train))
        mb = sum(len(story.encode("utf-8")) for story in stories) / 1e6
        seconds, _ = timed(lambda: tokenizer._hf.encode_batch(stories), repeats)
        rows.append(("baseline: tokenizers `encode_batch(stories)`, encode only",
                     f"{mb / min(seconds):.1f} MB/s (median {mb / statistics.median(seconds):.1f})", ""))
    return rows


def download_failure_seconds(offline: bool) -> float:
    """Seconds until `download` raises its one-line DataError, offline or against a refused port."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
    try:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            try:
                download(out_dir=folder, endpoint=None if offline else "http://127.0.0.1:9", timeout=3,
                         progress=False)
            except DataError:
                return time.perf_counter() - start
            raise RuntimeError("download did not fail")
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def hub_failure_rows(repeats: int) -> list[tuple[str, str, str]]:
    rows = []
    for label, offline in [("`data download` with HF_HUB_OFFLINE=1: time to the one-line error", True),
                           ("`data download`, hub unreachable (127.0.0.1:9): time to the one-line error", False)]:
        seconds, _ = timed(lambda: download_failure_seconds(offline), repeats)
        rows.append((label, best_and_median(seconds), f"< {HUB_FAIL_TARGET_S:.0f} s"))
    return rows


def _first(load: tuple[float, float, float] | None) -> str:
    return f"{load[0]:.1f}" if load else "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best and median reported)")
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("TINYSTORIES_DATA") or bundled_corpus_dir()),
        help="folder with train.txt.gz and valid.txt.gz (default: $TINYSTORIES_DATA, else the bundled slice)",
    )
    parser.add_argument("--no-append", action="store_true", help="print the table only; leave RESULTS.md alone")
    args = parser.parse_args()
    train, valid = args.data / "train.txt.gz", args.data / "valid.txt.gz"
    load_before = load_average()
    story_mb = sum(len(story.encode("utf-8")) for story in read_stories(train)) / 1e6
    seconds, _ = timed(lambda: make_tokenizer("bpe:4096", read_stories(train)), args.repeats)
    rows = [(f"train bpe:4096 on train.txt.gz ({story_mb:.1f} MB of stories)", best_and_median(seconds),
             f"< {TRAIN_TARGET_S:.0f} s")]
    rows += prepare_rows(train, valid, args.repeats)
    rows += hub_failure_rows(args.repeats)
    load_after = load_average()
    body = (
        markdown_table(["measurement", "result", "target"], rows) + "\n\n"
        f"Notes: data {args.data}; best of {args.repeats} runs (median in brackets); wall-clock time. "
        f"1-minute load average {_first(load_before)} before, {_first(load_after)} after (other jobs "
        "on the cores change the figures). "
        "`prepare` MB = story-text bytes (UTF-8, no separators) of train + valid; its time includes "
        "reading and gunzipping, hashing the inputs, encoding (tiktoken engine on all cores, chunks of "
        "joined stories) and writing the shards. Training time includes reading the gzip file. The "
        "hub rows time `tinystories.data.download` until its DataError (timeout 3 s, no retries).\n"
    )
    print(body)
    if not args.no_append:
        append_results("Tokenization (benchmarks/tokenize_throughput.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
