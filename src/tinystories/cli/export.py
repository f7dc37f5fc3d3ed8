"""`tinystories export` and `tinystories import` (one module: `import` is a Python keyword)."""

from __future__ import annotations

import argparse

from tinystories.cli.common import add_model_arguments, chosen_model


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="write a run as a transformers, GGUF, llama2.c or safetensors model",
        description="Export a run so other tools can use it: hf (transformers: Llama, Mistral or GPT-2 class), "
                    "gguf (llama.cpp, Llama-style models), llama2c (karpathy's run.c: model.bin + tokenizer.bin), "
                    "safetensors (a self-contained directory tinystories loads).")
    add_model_arguments(export)
    export.add_argument("--format", required=True, help="hf | gguf | llama2c | safetensors")
    export.add_argument("--out", required=True,
                        help="output directory (created; must be new or empty); for gguf also a file name ending "
                             "in .gguf")
    export.add_argument("--dtype", default="float32", help="float32 | float16 (hf, safetensors also bfloat16)")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
    export.set_defaults(func=run_export)

    importer = subparsers.add_parser(
        "import", help="turn a llama2.c checkpoint into a run directory",
        description="Import a model from another tool as a run that generate, eval and train --init-from accept. "
                    "Example: tinystories import llama2c stories15M.bin --tokenizer tokenizer.bin --out runs/stories15M")
    importer.add_argument("source_format", metavar="FORMAT", help="llama2c")
    importer.add_argument("model", metavar="MODEL", help="the checkpoint file (llama2.c: legacy version-0 .bin)")
    importer.add_argument("--tokenizer", required=True, help="llama2.c tokenizer.bin matching the model")
    importer.add_argument("--out", required=True, help="run directory to create")
    importer.add_argument("--force", action="store_true", help="replace --out if it exists")
    importer.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> int:
    from tinystories.export import export

    model = chosen_model(args)
    out = export(model, args.format, args.out, checkpoint=args.checkpoint, dtype=args.dtype, force=args.force)
    print(f"exported {model} as {args.format} ({args.dtype}) to {out}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from tinystories.export import import_model

    out = import_model(args.source_format, args.model, args.out, tokenizer=args.tokenizer, force=args.force)
    print(f"imported {args.model} into run {out}")
    return 0


run = run_export  # the `run(args)` every command module has
