"""Recipe search for the `tiny` preset: which ~1M-parameter recipe gives the lowest validation bits per
byte for a fixed wall-clock training budget on this machine?

    python benchmarks/recipe_search.py [--minutes 10] [--candidates base,muon,...] [--data DIR]

Each candidate is the `tiny` preset plus `--set`-style overrides (see CANDIDATES). Candidates run one
after another (never side by side: they would share the cores), each with `max_minutes` as its budget,
so the lr schedule anneals within it and torch.compile warm-up and evaluations count against it. Val
bits per byte are then measured on the WHOLE validation split (tokenizer-independent, so vocabulary
sizes compare). Finished candidates are remembered in benchmarks/out/recipe_search.jsonl: a re-run
skips them, so a search can span sessions. The table of all finished runs is printed and appended to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT / "src"))

from common import append_results, load_average, markdown_table  # noqa: E402

# name -> (tokenizer spec, overrides). Every candidate keeps ~1M parameters. The search started from
# the first `tiny` recipe (AdamW, lr 3e-3): candidates name optimizer and lr explicitly, so each still
# means what it meant when it ran, now that its winner (muon-lr6e-3) is the preset's default.
ADAMW = ["optimizer=adamw", "lr=3e-3"]
MUON = ["optimizer=muon", "lr=6e-3"]
CANDIDATES: dict[str, tuple[str, list[str]]] = {
    "base": ("bpe:4096", ADAMW),
    "eager": ("bpe:4096", ADAMW + ["compile=false"]),
    "muon": ("bpe:4096", ["optimizer=muon", "lr=3e-3"]),
    "muon-lr6e-3": ("bpe:4096", MUON),
    "muon-muonlr0.04": ("bpe:4096", ["optimizer=muon", "lr=3e-3", "muon_lr=0.04"]),
    "lr6e-3": ("bpe:4096", ["optimizer=adamw", "lr=6e-3"]),
    "batch32": ("bpe:4096", ADAMW + ["batch_size=32"]),
    "wsd": ("bpe:4096", ADAMW + ["schedule=wsd"]),
    "ctx128": ("bpe:4096", ADAMW + ["context_length=128", "batch_size=32"]),
    "vocab2048": ("bpe:2048", ADAMW + ["d_model=144", "n_head=4"]),
    "vocab8192": ("bpe:8192", ADAMW + ["d_model=112", "n_head=4", "n_layer=3"]),
    "deep": ("bpe:4096", ADAMW + ["d_model=96", "n_layer=8", "n_head=4"]),
    "wide": ("bpe:4096", ADAMW + ["d_model=160", "n_layer=2", "n_head=4"]),
    "muon-batch32": ("bpe:4096", MUON + ["batch_size=32"]),
    "muon-ctx128": ("bpe:4096", MUON + ["context_length=128", "batch_size=32"]),
    "muon-deep": ("bpe:4096", MUON + ["d_model=96", "n_layer=8", "n_head=4"]),
}


def shards_for(tokenizer: str) -> Path:
    """benchmarks/out/shards-<tokenizer>, prepared from $TINYSTORIES_DATA once (later calls reuse it)."""
    from tinystories.data import prepare

    source = Path(os.environ.get("TINYSTORIES_DATA") or REPO_ROOT.parent / "shared" / "data" / "tinystories")
    out = HERE / "out" / f"shards-{tokenizer.replace(':', '')}"
    prepare([source / "train.txt.gz"], out, tokenizer, [source / "valid.txt.gz"], progress=False)
    return out


def run_candidate(name: str, minutes: float, results_path: Path) -> dict:
    from tinystories.config import RunConfig, apply_overrides
    from tinystories.evaluate import evaluate_shards
    from tinystories.generate import load_model
    from tinystories.train import train

    tokenizer, overrides = CANDIDATES[name]
    data = shards_for(tokenizer)
    run_config = RunConfig.from_preset("tiny")
    # A step limit far beyond reach: the time budget alone ends training and drives the schedule.
    run_config = replace(run_config, data=str(data), tokenizer=tokenizer,
                         train=replace(run_config.train, max_minutes=minutes, max_steps=1_000_000))
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    run_config = apply_overrides(run_config, [f"vocab_size={vocab}", *overrides])
    out_dir = HERE / "out" / "recipe" / name
    load_before = load_average()
    started = time.time()
    summary = train(run_config, out_dir, resume=False, progress=False)
    seconds = time.time() - started
    scores = evaluate_shards(load_model(out_dir, checkpoint="best"), data)
    record = {
        "name": name, "tokenizer": tokenizer, "overrides": overrides, "minutes": minutes,
        "parameters": run_config.model.num_parameters(), "steps": summary["steps"], "tokens": summary["tokens"],
        "train_seconds": round(seconds, 1), "tokens_per_second": round(summary["tokens"] / seconds),
        "val_loss": round(scores["val_loss"], 4), "val_bpb": round(scores["bits_per_byte"], 4),
        "load_before": load_before and round(load_before[0], 2),
    }
    with open(results_path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per candidate")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names")
    parser.add_argument("--again", action="store_true", help="re-run candidates that already have a result")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no busy-waiting threads if anything else runs

    results_path = HERE / "out" / "recipe_search.jsonl"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            record = json.loads(line)
            if record["minutes"] == args.minutes:
                done[record["name"]] = record
    for name in args.candidates.split(","):
        if name not in CANDIDATES:
            sys.exit(f"recipe_search.py: unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")
        if name in done and not args.again:
            continue
        print(f"--- {name}: {CANDIDATES[name]}", file=sys.stderr, flush=True)
        done[name] = run_candidate(name, args.minutes, results_path)
        print(json.dumps(done[name]), file=sys.stderr, flush=True)

    rows = [[r["name"], r["tokenizer"], " ".join(r["overrides"]) or "(tiny preset)", f"{r['parameters']/1e6:.2f}M",
             r["steps"], f"{r['tokens']/1e6:.2f}M", f"{r['tokens_per_second']:,}", f"{r['val_loss']:.4f}",
             f"**{r['val_bpb']:.4f}**", r["load_before"]]
            for r in sorted(done.values(), key=lambda r: r["val_bpb"])]
    table = markdown_table(["candidate", "tokenizer", "overrides", "params", "steps", "tokens", "tokens/s",
                            "val loss", "val bpb", "load before"], rows)
    print(table)
    append_results(f"Recipe search for tiny, {args.minutes:g} minutes each (benchmarks/recipe_search.py)",
                   table + "\n\nval bpb on the whole validation split; best first. 'load before' is the 1-minute "
                   "load average when the run started; it includes the previous candidate's own load, so read "
                   "contention from tokens/s.")


if __name__ == "__main__":
    main()
