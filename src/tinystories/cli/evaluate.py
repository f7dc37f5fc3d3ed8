"""`tinystories eval`: validation loss, perplexity, bits per byte and generation diversity of a model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinystories.cli.common import add_model_arguments, chosen_model


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="loss, perplexity, bits per byte and sample diversity of a model",
        description="Evaluate a model on prepared shards (--data DIR: val.bin in non-overlapping context windows) "
                    "or on raw text (--input FILE: .txt/.gz/.jsonl/.parquet, tokenized with the model's own "
                    "tokenizer, so any two models compare on the same text), then sample --samples stories "
                    "and measure their diversity. Bits per byte = summed nats / ln 2 / UTF-8 bytes of the stories.")
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="prepared shards (default: the run's own data directory)")
    source.add_argument("--input", metavar="FILE", nargs="+", help="raw story files or folders")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of val.bin")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    parser.add_argument("--samples", type=int, default=20, help="stories to sample for diversity (0 = skip)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="token limit of each sampled story")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k for sampled stories (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="top-p (nucleus) for sampled stories (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the sampled stories (default 0)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--quantize", choices=["int8"], help="evaluate the dynamic-int8 model (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinystories import evaluate
    from tinystories.files import check_output_path, write_json_atomic
    from tinystories.generate import SamplingConfig, load_model

    _check_counts(args)
    if args.json:
        check_output_path(args.json, "--json")  # before the work, not after it
    sampling = vars(SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p))  # checks the options before the model loads
    sampling.pop("seed")
    lm = load_model(chosen_model(args), checkpoint=args.checkpoint, device=args.device, quantize=args.quantize)
    results = _text_results(args, lm) if args.input else _shard_results(args, lm)
    if args.samples:
        print(f"tinystories: sampling {args.samples} stories", file=sys.stderr)
        results.update(evaluate.evaluate_generation(lm, args.samples, seed=args.seed, **sampling))
    print_results_table(results)
    if args.json:
        write_json_atomic(args.json, results)
        print(f"tinystories: wrote {args.json}", file=sys.stderr)
    return 0


def _check_counts(args: argparse.Namespace) -> None:
    from tinystories.errors import UserError

    if args.samples < 0:
        raise UserError(f"--samples must be >= 0, got {args.samples}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.max_tokens is not None and args.input:
        raise UserError("--max-tokens applies to --data shards; with --input, pass a smaller file")


def _text_results(args: argparse.Namespace, lm) -> dict:
    from tinystories import evaluate
    from tinystories.data import read_stories

    stories = list(read_stories(args.input))
    print(f"tinystories: evaluating {len(stories):,} stories from {' '.join(args.input)}", file=sys.stderr)
    results = evaluate.evaluate_text(lm, stories, batch_size=args.batch_size)
    results["source"] = "input: " + " ".join(args.input)
    return results


def _shard_results(args: argparse.Namespace, lm) -> dict:
    from tinystories import evaluate
    from tinystories.data import load_meta
    from tinystories.errors import UserError

    data_dir = args.data or (lm.config.data if lm.config is not None else None)
    if args.data and not Path(args.data).is_dir():
        kind = "is a file" if Path(args.data).exists() else "no such directory"
        raise UserError(f"--data {args.data}: {kind}; expected prepared shards (`tinystories data prepare`)")
    if not data_dir or not Path(data_dir).is_dir():
        raise UserError("no evaluation text: pass --data DIR (prepared shards) or --input FILE "
                        f"(the run's data directory {data_dir!r} is not there)")
    load_meta(data_dir)  # a folder without shards fails here, before anything is printed
    print(f"tinystories: evaluating val.bin of {data_dir}", file=sys.stderr)
    results = evaluate.evaluate_shards(lm, data_dir, args.max_tokens, args.batch_size)
    results["source"] = f"data: {data_dir}"
    print(f"tinystories: bytes from {results['bytes_source']}", file=sys.stderr)
    return results


def print_results_table(results: dict) -> None:
    """The results as a markdown table on stdout."""
    rows = [("val_loss", "{:.4f}"), ("perplexity", "{:.3f}"), ("bits_per_byte", "{:.4f}"), ("tokens", "{:,}"),
            ("bytes", "{:,}"), ("samples", "{}"), ("distinct_1", "{:.3f}"), ("distinct_2", "{:.3f}"),
            ("distinct_3", "{:.3f}"), ("repeated_4gram_fraction", "{:.3f}"), ("mean_words", "{:.1f}"),
            ("mean_tokens", "{:.1f}"), ("ended_fraction", "{:.2f}")]
    print("| metric | value |\n|---|---|")
    for name, form in rows:
        if name in results:
            print(f"| {name} | {form.format(results[name])} |")
