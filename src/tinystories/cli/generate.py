"""`tinystories generate`: sample stories from a run, a checkpoint or a shipped model.

Stories go to stdout (the prompt followed by its continuation, one blank line between samples); a
single sample is printed token by token as it is produced. Everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from tinystories.cli.common import add_model_arguments, chosen_model
from tinystories.config import SamplingConfig

DEFAULTS = SamplingConfig()  # the library's sampling defaults, the only place they are written

# Compiling the decode step takes seconds (a minute the first time on a small CPU; inductor caches it
# on disk) and then saves about half of each step: below this many tokens it costs more than it saves.
AUTO_COMPILE_TOKENS = 4096


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="sample stories from a trained model",
        description="Continue a prompt with a trained model. RUN (or --model RUN) is a run directory, a "
                    "checkpoint directory or a model shipped with the package. --temperature 0 is greedy decoding. "
                    "An empty prompt starts a story from scratch (from <|endoftext|>).")
    add_model_arguments(parser, default="tiny")
    parser.add_argument("--prompt", default="", help="text to continue (default: empty, a new story)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens,
                        help=f"tokens to generate at most (default {DEFAULTS.max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                        help=f"0 = greedy (default {DEFAULTS.temperature})")
    parser.add_argument("--top-k", type=int, default=DEFAULTS.top_k,
                        help=f"sample among the K most likely tokens (0 = off; default {DEFAULTS.top_k})")
    parser.add_argument("--top-p", type=float, default=DEFAULTS.top_p,
                        help=f"nucleus sampling mass in (0, 1] (1 = off; default {DEFAULTS.top_p})")
    parser.add_argument("--repetition-penalty", type=float, default=DEFAULTS.repetition_penalty,
                        help=f"CTRL-style penalty (1 = off; default {DEFAULTS.repetition_penalty})")
    parser.add_argument("--num-samples", type=int, default=1, help="stories to generate (in one batch)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop when this text appears; it is cut off (repeatable)")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false",
                        help="recompute the whole context each step (slow; for checking the KV cache)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step (default: only for at least "
                             f"{AUTO_COMPILE_TOKENS} tokens in all, num-samples x max-new-tokens)")
    parser.add_argument("--quantize", choices=["int8"], help="dynamic int8 linear layers (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tinystories.errors import UserError
    from tinystories.generate import load_model

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                              stop=tuple(args.stop))
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    compile_step = args.compile
    if compile_step is None:
        compile_step = args.num_samples * args.max_new_tokens >= AUTO_COMPILE_TOKENS
    lm = load_model(chosen_model(args, default="tiny"), checkpoint=args.checkpoint, device=args.device,
                    quantize=args.quantize, compile=None if compile_step else False)
    options = vars(sampling)
    out = sys.stdout
    started = time.perf_counter()
    if args.num_samples == 1:
        out.write(args.prompt)
        out.flush()
        tokens = 0
        for chunk in lm.stream(args.prompt, use_cache=args.use_cache, **options):
            tokens += 1
            if chunk.text:
                out.write(chunk.text)
                out.flush()
        out.write("\n")
        out.flush()
    else:
        completions = lm.generate(args.prompt, num_samples=args.num_samples, use_cache=args.use_cache, **options)
        tokens = lm.last_stats.get("tokens", 0)
        out.write("\n\n".join(args.prompt + c.text for c in completions) + "\n")
        out.flush()
    elapsed = time.perf_counter() - started
    print(f"tinystories: {tokens} tokens in {elapsed:.2f} s ({tokens / max(elapsed, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0
