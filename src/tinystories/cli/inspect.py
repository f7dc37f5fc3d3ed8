"""`tinystories diagram` and `tinystories inspect`: look at a model's architecture and attention.

  tinystories diagram --preset tiny --out arch.png            block diagram from a preset's ModelConfig
  tinystories diagram runs/tiny --out arch.png                 ... or from a run's config.json
  tinystories inspect attention RUN --prompt TEXT --out a.png  attention heat maps of a trained model
  tinystories inspect params --preset tiny                     parameters per part (embeddings, attention, ...)
"""

from __future__ import annotations

import argparse

PARTS = ("embeddings", "positions", "attention", "mlp", "norms", "head")


def register(subparsers) -> None:
    diagram = subparsers.add_parser(
        "diagram", help="draw a model's architecture (matplotlib figure)",
        description="Draw the transformer a preset or a run describes: embeddings, the repeated block "
                    "(norm, attention, norm, MLP, residuals), head; with shapes and parameter counts.")
    diagram.add_argument("run", nargs="?", metavar="RUN", help="a run directory (uses its config.json)")
    diagram.add_argument("--preset", metavar="NAME", help="a preset name instead of RUN")
    diagram.add_argument("--out", required=True, metavar="FILE", help="output figure (.png, .svg or .pdf)")
    diagram.set_defaults(func=run_diagram)

    inspect = subparsers.add_parser("inspect", help="look inside a model (attention maps, parameter counts)",
                                    description="Figures and tables that show what a model is made of.")
    what = inspect.add_subparsers(dest="what", metavar="WHAT", required=True)
    attention = what.add_parser("attention", help="heat maps of a trained model's attention on a prompt",
                                description="Run RUN on PROMPT and draw every head's attention weights: one "
                                            "panel per head of --layer, or a layers x heads grid.")
    attention.add_argument("run", metavar="RUN", help="run directory or checkpoint directory")
    attention.add_argument("--prompt", required=True, help="text to look at (a story's first sentence)")
    attention.add_argument("--out", required=True, metavar="FILE", help="output figure (.png, .svg or .pdf)")
    attention.add_argument("--layer", type=int, default=None, help="one layer (0-based; default: all layers)")
    attention.add_argument("--max-tokens", type=int, default=24, help="cut the prompt to this many tokens")
    attention.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint of RUN")
    attention.set_defaults(func=run_attention)

    params = what.add_parser("params", help="parameter count per part of the model",
                             description="Parameters in embeddings, positions, attention, MLP, norms and "
                                         "the output head, for a preset or a run.")
    params.add_argument("run", nargs="?", metavar="RUN", help="a run directory (uses its config.json)")
    params.add_argument("--preset", metavar="NAME", help="a preset name instead of RUN")
    params.set_defaults(func=run_params)


def _model_config(args: argparse.Namespace):
    from tinystories.config import get_preset
    from tinystories.errors import UserError

    if (args.run is None) == (args.preset is None):
        raise UserError("give either a run directory or --preset NAME (one of them)")
    if args.preset is not None:
        return get_preset(args.preset).model
    from tinystories.checkpoint import load_run_config

    return load_run_config(args.run).model


def run_diagram(args: argparse.Namespace) -> int:
    from tinystories.visualize import draw_architecture

    print(draw_architecture(_model_config(args), args.out))
    return 0


def run_attention(args: argparse.Namespace) -> int:
    from tinystories.visualize import attention_figure

    print(attention_figure(args.run, args.prompt, args.out, layer=args.layer, checkpoint=args.checkpoint,
                           max_tokens=args.max_tokens))
    return 0


def run_params(args: argparse.Namespace) -> int:
    from tinystories.visualize import parameter_breakdown

    config = _model_config(args)
    parts = parameter_breakdown(config)
    total = config.num_parameters()
    for part in PARTS:
        print(f"{part:<11} {parts[part]:>12,}  {100 * parts[part] / total:5.1f}%")
    print(f"{'total':<11} {total:>12,}")
    return 0
