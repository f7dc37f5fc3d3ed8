"""`tinystories serve`: the completions API and the web page for a trained model."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinystories.cli.common import add_model_arguments, chosen_model
from tinystories.errors import UserError

DEFAULT_MAX_TOKENS_LIMIT = 1024  # the same as tinystories.serve's; repeated so `--help` imports no server code
DEFAULT_MAX_BATCH = 16  # tinystories.serve.DEFAULT_SLOTS, likewise


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with a web page",
        description="Serve a model: POST /v1/completions (OpenAI-compatible, streaming with SSE, logprobs), "
                    "GET /v1/models, GET /health, and a web page at /. Concurrent requests are decoded "
                    "together (continuous batching). Listens on 127.0.0.1 only unless --host says otherwise.",
    )
    add_model_arguments(parser, default="tiny")  # the API reports --model's value, else the run's name
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT, metavar="N",
                        help=f"largest max_tokens a request may ask for (default: {DEFAULT_MAX_TOKENS_LIMIT})")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                        help=f"request choices decoded together (default: {DEFAULT_MAX_BATCH}); 1 serves one at a time")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the decode step before serving (default: yes; seconds, cached on disk)")
    parser.add_argument("--device", default="cpu", help="torch device for the model: cpu, cuda, mps (default: cpu)")
    parser.set_defaults(func=run)


def served_name(run_path: str | None, model: str | None) -> str:
    """The model id the API reports: --model, else the run directory's name."""
    if model:
        return model
    if run_path is None:
        return "tiny"
    path = Path(run_path).resolve()
    if path.name in ("best", "last") and path.parent.name == "checkpoints":
        path = path.parent.parent  # RUN/checkpoints/best -> RUN
    return path.name or "model"


def run(args: argparse.Namespace) -> int:
    if args.max_tokens_limit < 1:
        raise UserError(f"--max-tokens-limit must be a positive integer, got {args.max_tokens_limit}")
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be a positive integer, got {args.max_batch}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    try:
        from tinystories.serve import serve
    except ModuleNotFoundError as error:
        raise UserError(f"serving needs the 'serve' extra ({error.name} is missing): "
                        "pip install 'tinystories[serve]'") from None
    from tinystories.generate import load_model

    language_model = load_model(chosen_model(args, default="tiny"), checkpoint=args.checkpoint, device=args.device,
                                compile=None if args.compile else False)
    serve(language_model, served_name(args.run, args.model), host=args.host, port=args.port,
          max_tokens_limit=args.max_tokens_limit, slots=args.max_batch)
    return 0
