"""Recipe search: which recipe gives the lowest validation bits per byte for a fixed number of training
tokens? Budgets are tokens, not minutes, because the machines this runs on differ ~3x in speed.

    python benchmarks/recipe_search.py --search short                 # 5.6M tokens each (~1.6 passes)
    python benchmarks/recipe_search.py --search long                  # 20.6M tokens each (6 passes)
    python benchmarks/recipe_search.py --search short --candidates base,ema0.99 --lanes 1

A candidate is a preset plus `--set`-style overrides (CANDIDATES). Each trains as its own
`tinystories train` process with OMP_NUM_THREADS=1, `--lanes` of them side by side (default 2, one
per core: small models use one core better than two), so every run is reproducible bit for bit on
the same kind of machine. Runs resume where they stopped (their run directories stay under
benchmarks/out/recipe/), finished candidates are remembered in benchmarks/out/recipe_search.jsonl, so a
search spans sessions. Each finished run is scored on the WHOLE validation split (its best
checkpoint, the one generate/eval load); the table has one line per run with its tokens/s, so
contention is visible, and goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE] + [str(HERE)]
sys.path.insert(0, str(REPO_ROOT / "src"))

from common import append_results, cpu_model, markdown_table  # noqa: E402

TOKENS_PER_STEP = 16 * 256  # tiny's batch: the steps quoted for a budget are of this many tokens
SEARCHES = {  # name -> (preset, training tokens, steps between evaluations)
    "short": ("tiny", 5_600_000, 200),  # 1,380 steps x 16 x 256: 10 minutes on the first search's machine
    "long": ("tiny", 20_600_000, 500),  # 6 passes over the 3.43M-token training split
}
# Every candidate starts from tiny's recipe as the short search found it (the first search, in minutes,
# had made muon + lr 6e-3 its default), so each name keeps meaning what it meant; the short search's
# winner, epochs+ema0.99+wd1, has been tiny's default since.
BEFORE_SHORT_SEARCH = ["batching=windows", "weight_decay=0.1", "ema_decay=None"]
# name -> overrides on the preset after BEFORE_SHORT_SEARCH; 'base' is that recipe itself.
CANDIDATES: dict[str, list[str]] = {
    "base": [],
    "ema0.99": ["ema_decay=0.99"],
    "ema0.998": ["ema_decay=0.998"],
    "qknorm": ["qk_norm=true"],
    "zeroinit": ["zero_init_proj=true"],
    "relu2": ["mlp=relu2"],
    "softcap15": ["logit_softcap=15"],
    "epochs": ["batching=epochs"],
    "wd0.3": ["weight_decay=0.3"],
    "wd1": ["weight_decay=1.0"],
    "embwd0.1": ["embedding_weight_decay=0.1"],
    "dropout0.1": ["dropout=0.1"],
    "batch8": ["batch_size=8"],  # the same tokens in twice the updates
    "minlr0": ["min_lr_ratio=0.0"],
    "muonlr0.03": ["muon_lr=0.03"],
    "epochs+ema0.99": ["batching=epochs", "ema_decay=0.99"],  # the two that won alone, together
    # the short search's winners together, then with twice the updates for the same tokens
    "epochs+ema0.99+wd0.3": ["batching=epochs", "ema_decay=0.99", "weight_decay=0.3"],
    "epochs+ema0.99+batch8": ["batching=epochs", "ema_decay=0.99", "batch_size=8"],
    "epochs+ema0.99+wd0.3+batch8": ["batching=epochs", "ema_decay=0.99", "weight_decay=0.3", "batch_size=8"],
    # stronger decay (small data repeats: Kim et al. 2025), and an untied head (0.5M parameters, no FLOPs)
    "epochs+ema0.99+wd1": ["batching=epochs", "ema_decay=0.99", "weight_decay=1.0"],
    "epochs+ema0.99+wd0.3+untied": ["batching=epochs", "ema_decay=0.99", "weight_decay=0.3",
                                    "tie_embeddings=false"],
    # towards 0.85: still stronger decay, and decay on the (tied) embedding too
    "epochs+ema0.99+wd3": ["batching=epochs", "ema_decay=0.99", "weight_decay=3.0"],
    "epochs+ema0.99+wd1+embwd0.3": ["batching=epochs", "ema_decay=0.99", "weight_decay=1.0",
                                    "embedding_weight_decay=0.3"],
}
# the levers not yet measured, each on top of the short search's winner (tiny's defaults since)
WINNER = CANDIDATES["epochs+ema0.99+wd1"]
CANDIDATES |= {
    "winner+wd1.5": WINNER + ["weight_decay=1.5"],
    "winner+wd2": WINNER + ["weight_decay=2.0"],
    "winner+minlr0": WINNER + ["min_lr_ratio=0.0"],
    "winner+muonlr0.03": WINNER + ["muon_lr=0.03"],
    "winner+zeroinit": WINNER + ["zero_init_proj=true"],
    "winner+softcap15": WINNER + ["logit_softcap=15"],
    "winner+dropout0.1": WINNER + ["dropout=0.1"],
    "winner+ema0.995": WINNER + ["ema_decay=0.995"],
    # the spread between seeds (initial weights and batch order), against which the edges above are read
    "winner+seed2": WINNER + ["seed=2"],
    "winner+softcap15+seed2": WINNER + ["logit_softcap=15", "seed=2"],
    "winner+seed3": WINNER + ["seed=3"],
    "winner+softcap15+seed3": WINNER + ["logit_softcap=15", "seed=3"],
    # the schedule's end: decaying to 0 lost (winner+minlr0), so try ending higher, or a stable phase
    "winner+softcap15+minlr0.3": WINNER + ["logit_softcap=15", "min_lr_ratio=0.3"],
    "winner+softcap15+wsd": WINNER + ["logit_softcap=15", "schedule=wsd"],
    "winner+softcap15+lr1.2e-2": WINNER + ["logit_softcap=15", "lr=0.012"],  # AdamW's embeddings, 2x
    # the same FLOPs per token in another shape: two heads of 64, and Muon's step two thirds as long
    "winner+heads2": WINNER + ["n_head=2"],
    "winner+muonlr0.015": WINNER + ["muon_lr=0.015"],
    # a second token table in every layer's values: 0.5M parameters at no matmul cost
    "winner+valueemb": WINNER + ["value_embedding=true"],
    "winner+inputmix": WINNER + ["input_mix=true"],  # every block also reads the embedded tokens
    "winner+muonsplit": WINNER + ["muon_split=true"],  # q, k, v, gate and up orthogonalized apart
    # on top of the value embeddings (0.8567), the other two new levers
    "winner+valueemb+inputmix": WINNER + ["value_embedding=true", "input_mix=true"],
    "winner+valueemb+muonsplit": WINNER + ["value_embedding=true", "muon_split=true"],
    "winner+valueemb+inputmix+muonsplit": WINNER + ["value_embedding=true", "input_mix=true", "muon_split=true"],
    "winner+muonsplit+muonlr0.03": WINNER + ["muon_split=true", "muon_lr=0.03"],
    "winner+muonsplit+wd1.5": WINNER + ["muon_split=true", "weight_decay=1.5"],
    # the spread between seeds again, for the new recipes
    "winner+muonsplit+seed2": WINNER + ["muon_split=true", "seed=2"],
    "winner+valueemb+muonsplit+seed2": WINNER + ["value_embedding=true", "muon_split=true", "seed=2"],
    "winner+valueemb+muonsplit+seed3": WINNER + ["value_embedding=true", "muon_split=true", "seed=3"],
    "winner+valueemb+muonsplit+muonlr0.03": WINNER + ["value_embedding=true", "muon_split=true", "muon_lr=0.03"],
}


def run_dir(search: str, name: str) -> Path:
    return HERE / "out" / "recipe" / search / name


def shards() -> Path:
    """bpe:4096 shards of the demo corpus (or $TINYSTORIES_DATA), prepared once under benchmarks/out."""
    from tinystories.data import prepare

    out = HERE / "out" / "shards-bpe4096"
    prepare(None, out, "bpe:4096", progress=False)
    return out


def overrides(name: str) -> list[str]:
    """The `--set` assignments of a candidate: the recipe before the short search, then its own."""
    return BEFORE_SHORT_SEARCH + CANDIDATES[name]


def tokens_per_step(preset: str, name: str) -> int:
    from tinystories.config import RunConfig, apply_overrides

    run = apply_overrides(RunConfig.from_preset(preset), overrides(name))
    return run.train.batch_size * run.model.context_length


def command(search: str, name: str, data: Path) -> list[str]:
    preset, tokens, eval_every = SEARCHES[search]
    steps = round(tokens / tokens_per_step(preset, name))  # the same tokens whatever the candidate's batch
    sets = [item for assignment in overrides(name) for item in ("--set", assignment)]
    return [sys.executable, "-m", "tinystories", "train", "--preset", preset, "--data", str(data),
            "--out", str(run_dir(search, name)), "--max-steps", str(steps), "--eval-every", str(eval_every),
            "--device", "cpu", "--no-progress", *sets]


def start(search: str, name: str, data: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT / "src"))
    log = open(run_dir(search, name).parent / f"{name}.log", "ab")
    print(f"--- {search}/{name}: {' '.join(CANDIDATES[name]) or '(the recipe before)'}", file=sys.stderr, flush=True)
    return subprocess.Popen(command(search, name, data), env=env, stdout=log, stderr=log)


def score(search: str, name: str, data: Path) -> dict:
    """The finished run on the whole validation split, and what its training cost."""
    from tinystories.evaluate import evaluate_shards
    from tinystories.generate import load_model
    from tinystories.runlog import iter_metrics

    directory = run_dir(search, name)
    scores = evaluate_shards(load_model(directory, checkpoint="best"), data)
    records = list(iter_metrics(directory))
    train_records = [r for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    last = train_records[-1]
    return {"search": search, "name": name, "overrides": CANDIDATES[name], "steps": last["step"],
            "tokens": last["tokens"], "tokens_per_second": round(last["tokens"] / last["elapsed_seconds"]),
            "final_train_loss": round(train_records[-1]["train_loss"], 4),
            "best_eval_step": min(evals, key=lambda r: r["val_loss"])["step"],
            "val_loss": round(scores["val_loss"], 4), "val_bpb": round(scores["bits_per_byte"], 4),
            "cpu": cpu_model()}


def finished(results: Path, search: str) -> dict[str, dict]:
    done = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            record = json.loads(line)
            if record.get("search") == search:
                done[record["name"]] = record
    return done


def run_search(search: str, names: list[str], lanes: int, results: Path) -> dict[str, dict]:
    """Train every pending candidate, `lanes` at a time; score and record each as it ends."""
    data = shards()
    done = finished(results, search)
    pending = [name for name in names if name not in done]
    running: dict[str, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < lanes:
            name = pending.pop(0)
            run_dir(search, name).parent.mkdir(parents=True, exist_ok=True)
            running[name] = start(search, name, data)
        time.sleep(5)
        for name, process in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode != 0:
                print(f"{search}/{name} failed (exit {process.returncode}); see its .log", file=sys.stderr)
                continue
            done[name] = score(search, name, data)
            with open(results, "a", encoding="utf-8") as file:
                file.write(json.dumps(done[name]) + "\n")
            print(json.dumps(done[name]), file=sys.stderr, flush=True)
    return done


def table(search: str, done: dict[str, dict]) -> str:
    preset, tokens, _ = SEARCHES[search]
    rows = [[r["name"], " ".join(r["overrides"]) or "(the recipe before)", r["steps"], f"{r['tokens'] / 1e6:.2f}M",
             f"{r['tokens_per_second']:,}", r["final_train_loss"], r["best_eval_step"], f"{r['val_loss']:.4f}",
             f"**{r['val_bpb']:.4f}**"] for r in sorted(done.values(), key=lambda r: r["val_bpb"])]
    return markdown_table(["candidate", "overrides", "steps", "tokens", "tokens/s (1 thread)", "final train loss",
                           "best eval at step", "val loss", "val bpb"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--search", choices=list(SEARCHES), default="short")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names")
    parser.add_argument("--lanes", type=int, default=2, help="runs side by side, one thread each (default 2)")
    parser.add_argument("--no-append", action="store_true", help="print only; don't append to benchmarks/RESULTS.md")
    args = parser.parse_args()
    names = [name.strip() for name in args.candidates.split(",") if name.strip()]
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown:
        sys.exit(f"recipe_search.py: unknown candidate(s) {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    results = HERE / "out" / "recipe_search.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    done = run_search(args.search, names, args.lanes, results)
    body = table(args.search, {name: done[name] for name in names if name in done})
    preset, tokens, eval_every = SEARCHES[args.search]
    notes = (f"\n\n{preset} preset with {' '.join(BEFORE_SHORT_SEARCH)} (its recipe before this search), then "
             f"each candidate's overrides; {tokens / 1e6:.1f}M training tokens each ({round(tokens / TOKENS_PER_STEP)} "
             f"steps of 16 x 256; a candidate with another batch size takes the steps that make the same tokens), evaluated every {eval_every} steps; val bpb of the best checkpoint on the whole "
             f"validation split (1,332 stories), best first. One thread per run, {args.lanes} side by side.")
    print(body + notes)
    if not args.no_append:
        append_results(f"Recipe search '{args.search}': {tokens / 1e6:.1f}M tokens each (benchmarks/recipe_search.py)",
                       body + notes)


if __name__ == "__main__":
    main()
