"""`tinystories train`: build a RunConfig from a preset (or the run being resumed) and call train().

Exit codes: 0 when training ends (max steps, time limit, early stopping), 130 after SIGINT and 143
after SIGTERM (the run was checkpointed; the same command resumes it), 2 for bad input or divergence.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

EXIT_CODES = {"sigint": 130, "sigterm": 143}

# CLI flag (argparse dest) -> TrainConfig field
TRAIN_FLAGS = {
    "max_steps": "max_steps", "max_minutes": "max_minutes", "eval_every": "eval_every",
    "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "seed": "seed", "device": "device",
    "compile": "compile", "batching": "batching", "optimizer": "optimizer", "wandb": "wandb",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model (or resume the run in --out)",
        description="Train a model on prepared shards. An existing --out run is resumed: its config.json is "
                    "loaded and flags such as --max-steps extend it. Ctrl-C (SIGINT) or SIGTERM checkpoints "
                    "and exits with 130 / 143; the same command resumes.")
    parser.add_argument("--preset", default=None, help="model + recipe preset (default: tiny; see `tinystories presets`)")
    parser.add_argument("--data", default=None, help="prepared shards directory (from `tinystories data prepare`)")
    parser.add_argument("--out", required=True, help="run directory (created, or resumed if it holds a run)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps to train for")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget; the lr schedule finishes within it")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations and checkpoints")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    parser.add_argument("--seed", type=int, help="seed for initialisation, dropout and batch sampling")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default: auto = cuda > mps > cpu)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: the preset's choice)")
    parser.add_argument("--init-from", metavar="RUN", help="start from another run's weights (fine-tuning)")
    parser.add_argument("--batching", choices=["windows", "epochs", "stories"],
                        help="random windows, every window once per pass (reshuffled), or padded whole stories")
    parser.add_argument("--optimizer", choices=["adamw", "muon", "adamw8bit"])
    parser.add_argument("--wandb", metavar="PROJECT", help="log to this Weights & Biases project (needs wandb)")
    parser.add_argument("--tensorboard", action="store_true", default=None, help="log to RUN/tensorboard (needs tensorboard)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="set any config field, e.g. --set n_layer=6 --set train.weight_decay=0 (repeatable)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(func=run)


def build_run_config(args: argparse.Namespace):
    """The RunConfig for this invocation and notes to print: a resumed run's config.json or a preset,
    then --set overrides, then explicit flags; a new run adapts to its data's tokenizer."""
    from tinystories.batching import adapt_to_data
    from tinystories.checkpoint import load_run_config, resolve_checkpoint
    from tinystories.config import ConfigError, RunConfig, apply_overrides
    from tinystories.files import check_output_path
    from tinystories.train import TrainingError

    out = Path(args.out)
    check_output_path(out, "--out", folder=True)  # bad paths fail before anything is said or read
    if args.init_from is not None:
        resolve_checkpoint(args.init_from, "best")
    notes: list[str] = []
    resuming = (out / "config.json").is_file()
    if resuming:
        run_config = load_run_config(out)
        if args.preset is not None and run_config.preset not in (None, args.preset):
            raise ConfigError(f"--preset {args.preset}: {out} is a {run_config.preset} run; "
                              "drop --preset to resume it or choose another --out")
        if args.data is not None:
            run_config = dataclasses.replace(run_config, data=str(Path(args.data).resolve()))
        notes.append(f"resuming {out}")
    else:
        run_config = RunConfig.from_preset(args.preset or "tiny")
        if args.data is not None:
            run_config = dataclasses.replace(run_config, data=args.data)
    run_config = apply_overrides(run_config, args.overrides)
    changes = {field: getattr(args, flag) for flag, field in TRAIN_FLAGS.items() if getattr(args, flag) is not None}
    if args.tensorboard:
        changes["tensorboard"] = True
    if changes:
        run_config = dataclasses.replace(run_config, train=dataclasses.replace(run_config.train, **changes))
    if run_config.data is None:
        raise TrainingError("--data is required for a new run (a directory made by `tinystories data prepare`)")
    if not resuming:
        run_config, adapted = adapt_to_data(run_config, run_config.data)
        notes.extend(adapted)
    elif not Path(run_config.data).is_dir():
        raise TrainingError(f"{out}: its data directory {run_config.data} is gone; pass --data DIR")
    return run_config, notes


def run(args: argparse.Namespace) -> int:
    from tinystories.runlog import summary_line
    from tinystories.train import train

    run_config, notes = build_run_config(args)
    is_rank_zero = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 talks
    for note in notes if is_rank_zero else []:
        print(f"tinystories: {note}", file=sys.stderr)
    summary = train(run_config, args.out, resume=True, init_from=args.init_from, progress=args.progress)
    if summary.get("rank", 0) != 0:
        return EXIT_CODES.get(summary["stop_reason"], 0)
    print(summary_line(summary), file=sys.stderr)
    return EXIT_CODES.get(summary["stop_reason"], 0)
