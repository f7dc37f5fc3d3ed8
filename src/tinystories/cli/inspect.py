"""`tinystories diagram` and `tinystories inspect`: look at a model's architecture and attention.

  tinystories diagram --preset tiny --out arch.png            block diagram from a preset's ModelConfig
  tinystories diagram runs/tiny --out arch.png                 ... or from a run's config.json
  tinystories inspect attention RUN --prompt TEXT --out a.png  attention heat maps of a trained model
  tinystories inspect params --preset tiny                     parameters per part (embeddings, attention, ...)
"""

from __future__ import annotations

import argparse

from tinystories.cli.common import add_model_arguments, chosen_model

PARTS = (  # always listed; the optional ones (value_embeddings, input_mix) when present
    "embeddings", "positions", "attention", "mlp", "norms", "head")


def register(subparsers) -> None:
    diagram = subparsers.add_parser(
        "diagram", help="draw a model's architecture (matplotlib figure)",
        description="Draw the transformer a preset or a run describes: embeddings, the repeated block "
                    "(norm, attention, norm, MLP, residuals), head; with shapes and parameter counts.")
    add_model_arguments(diagram, checkpoint=False)
    diagram.add_argument("--preset", metavar="NAME", help="a preset name instead of RUN")
    diagram.add_argument("--out", required=True, metavar="FILE", help="output figure (.png, .svg or .pdf)")
    diagram.set_defaults(func=run_diagram)

    inspect = subparsers.add_parser("inspect", help="look inside a model (attention maps, parameter counts)",
                                    description="Figures and tables that show what a model is made of.")
    what = inspect.add_subparsers(dest="what", metavar="WHAT", required=True)
    attention = what.add_parser("attention", help="heat maps of a trained model's attention on a prompt",
                                description="Run RUN on PROMPT and draw every head's attention weights: one "
                                            "panel per head of --layer, or a layers x heads grid.")
    add_model_arguments(attention)
    attention.add_argument("--prompt", required=True, help="text to look at (a story's first sentence)")
    attention.add_argument("--out", required=True, metavar="FILE", help="output figure (.png, .svg or .pdf)")
    attention.add_argument("--layer", type=int, default=None, help="one layer (0-based; default: all layers)")
    attention.add_argument("--max-tokens", type=int, default=24, help="cut the prompt to this many tokens")
    attention.set_defaults(func=run_attention)

    params = what.add_parser("params", help="parameter count per part of the model",
                             description="Parameters in embeddings, positions, attention, MLP, norms and "
                                         "the output head, for a preset or a run.")
    add_model_arguments(params, checkpoint=False)
    params.add_argument("--preset", metavar="NAME", help="a preset name instead of RUN")
    params.set_defaults(func=run_params)


def _model_config(args: argparse.Namespace):
    """The ModelConfig of --preset NAME, or of the model RUN / --model names."""
    from tinystories.config import get_preset
    from tinystories.errors import UserError
    from tinystories.visualize import model_config_of

    given_model = args.run is not None or args.model is not None
    if given_model == (args.preset is not None):
        raise UserError("give either a model (RUN or --model RUN: a run directory, a checkpoint directory or a "
                        "shipped model's name) or --preset NAME: one of them")
    if args.preset is not None:
        return get_preset(args.preset).model
    return model_config_of(chosen_model(args))


def run_diagram(args: argparse.Namespace) -> int:
    from tinystories.files import check_output_path
    from tinystories.visualize import draw_architecture

    check_output_path(args.out, "--out")
    print(draw_architecture(_model_config(args), args.out))
    return 0


def run_attention(args: argparse.Namespace) -> int:
    from tinystories.files import check_output_path
    from tinystories.visualize import attention_figure

    check_output_path(args.out, "--out")
    print(attention_figure(chosen_model(args), args.prompt, args.out, layer=args.layer, checkpoint=args.checkpoint,
                           max_tokens=args.max_tokens))
    return 0


def run_params(args: argparse.Namespace) -> int:
    from tinystories.visualize import parameter_breakdown

    config = _model_config(args)
    parts = parameter_breakdown(config)
    total = config.num_parameters()
    for part in parts:
        if parts[part] or part in PARTS:  # the optional parts only when the model has them
            print(f"{part:<16} {parts[part]:>12,}  {100 * parts[part] / total:5.1f}%")
    print(f"{'total':<16} {total:>12,}")
    return 0
