"""The model argument, the same for every command that reads a trained model.

`generate`, `eval`, `serve`, `export`, `inspect attention`, `inspect params` and `diagram` take a
run directory, a checkpoint directory or the name of a model shipped with the package (`tiny`),
given positionally (RUN) or as `--model RUN`:

    tinystories eval tiny --input valid.txt        tinystories eval --model tiny --input valid.txt
    tinystories eval runs/tiny --data shards       tinystories eval --model runs/tiny/checkpoints/last ...

Commands call `add_model_arguments(parser)` when they build their parser and `chosen_model(args)`
when they run; the library (checkpoint.resolve_checkpoint) finds what the string names.
"""

from __future__ import annotations

import argparse

from tinystories.errors import UserError

MODEL_FORMS = "a run directory, a checkpoint directory or a shipped model's name (e.g. tiny)"


def add_model_arguments(parser: argparse.ArgumentParser, *, default: str | None = None,
                        checkpoint: bool = True) -> None:
    """RUN (positional, optional) and --model RUN; with `checkpoint`, also --checkpoint best|last."""
    default_note = f" (default: {default})" if default else ""
    parser.add_argument("run", nargs="?", metavar="RUN", help=f"{MODEL_FORMS}{default_note}")
    parser.add_argument("--model", metavar="RUN", help="the same as the positional RUN")
    if checkpoint:
        # checked by the library (checkpoint.resolve_checkpoint), so a bad value is one line like the rest
        parser.add_argument("--checkpoint", default="best", metavar="best|last",
                            help="which checkpoint of a run directory (default: best; last if there is no best)")


def chosen_model(args: argparse.Namespace, default: str | None = None) -> str:
    """The model the command line names (positional RUN or --model), else `default`."""
    if args.run is not None and args.model is not None:
        raise UserError(f"give either RUN or --model, not both (got {args.run!r} and --model {args.model!r})")
    model = args.run if args.run is not None else args.model if args.model is not None else default
    if model is None:
        raise UserError(f"no model given: pass {MODEL_FORMS}, as RUN or --model RUN")
    if not model.strip():
        raise UserError(f"RUN {model!r}: empty; expected {MODEL_FORMS}")
    return model
