"""`tinystories demo`: the main job (prepare data, train `tiny`, print three stories and an eval table)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    from tinystories.data import DATA_SOURCES

    parser = subparsers.add_parser(
        "demo", help="the whole pipeline: prepare data, train tiny, write three stories, evaluate",
        description="Prepare TinyStories shards (from --input, else $TINYSTORIES_DATA, else the TinyStories "
                    "slice bundled with the package, which needs no network), train the `tiny` preset for a "
                    "bounded time, print three stories and the evaluation table, and leave the loss curve in "
                    "OUT/run/loss.png. Re-running resumes or reuses each stage.")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output directory (default: out/demo)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", nargs="+", metavar="PATH", help="raw training stories (.txt/.gz/.jsonl/.parquet)")
    source.add_argument("--data-source", choices=DATA_SOURCES,
                        help="instead of --input: bundled (the shipped slice, even if $TINYSTORIES_DATA is set) or "
                             "hub (download TinyStories from the Hugging Face hub; its size is printed first)")
    parser.add_argument("--val-input", nargs="+", metavar="PATH", help="raw validation stories")
    parser.add_argument("--preset", default="tiny", help="preset to train (default: tiny)")
    parser.add_argument("--tokenizer", help="tokenizer spec (default: the preset's, e.g. bpe:4096)")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="training time budget (default: 15)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for the stories (default: 0)")
    parser.add_argument("--eval-samples", type=int, default=20, help="stories sampled for diversity metrics")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    from tinystories.errors import UserError
    from tinystories.pipeline import DemoOptions, run_demo

    if args.max_minutes <= 0:
        raise UserError(f"--max-minutes must be positive, got {args.max_minutes}")
    run_demo(DemoOptions(out=args.out, inputs=args.input, val_inputs=args.val_input, data_source=args.data_source,
                         preset=args.preset, tokenizer=args.tokenizer, max_minutes=args.max_minutes,
                         max_steps=args.max_steps, overrides=tuple(args.overrides), seed=args.seed,
                         eval_samples=args.eval_samples, progress=args.progress))
    return 0
