"""`tinystories data prepare|download`: parse options, call `tinystories.data`."""

from __future__ import annotations

import argparse
import sys

from tinystories import data

PREPARE_EPILOG = """\
Layout: train.bin / val.bin hold flat token ids (uint16, or uint32 for vocabularies over 65,536)
with the <|endoftext|> token before every story: EOT s1 EOT s2 ... . meta.json records the
tokenizer, dtype, per-split tokens / stories / bytes (UTF-8 bytes of story text, separators
excluded) and the sha256 of every input file. Rerunning with the same inputs and options prints
"up to date" and does nothing. A run that is killed (even with kill -9) leaves no complete-looking
file, and the next run removes the temporary files it left; a second prepare of an --out that
another one is writing stops at once with an error.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare token shards from stories, or download TinyStories",
        description="Prepare token shards from story files, or download TinyStories from the Hugging Face hub.",
    )
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=run)
    _register_prepare(commands)
    _register_download(commands)


def _register_prepare(commands: argparse._SubParsersAction) -> None:
    prepare = commands.add_parser(
        "prepare",
        help="tokenize stories into train.bin / val.bin",
        description="Tokenize stories into train.bin, val.bin, the tokenizer files and meta.json.",
        epilog=PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = prepare.add_mutually_exclusive_group()
    source.add_argument(
        "--input", nargs="+", action="extend", metavar="PATH",
        help="training stories: .txt / .txt.gz (TinyStories layout, stories separated by a line "
        "<|endoftext|>), .jsonl (text or story field), .parquet (text column), or folders of them. "
        "Default: the files in $TINYSTORIES_DATA whose names contain 'train' (and 'valid'/'val' for "
        "validation); without that variable, the TinyStories slice bundled with the package "
        "(16,648 train + 1,332 validation stories, no network needed).",
    )
    source.add_argument(
        "--data-source", choices=data.DATA_SOURCES, default=None,
        help="instead of --input: bundled (the slice shipped with the package, even if "
        "$TINYSTORIES_DATA is set) or hub (download TinyStories from the Hugging Face hub first; "
        "its size is printed before it starts).",
    )
    prepare.add_argument(
        "--val-input", nargs="+", action="extend", metavar="PATH",
        help="validation stories (same formats). Default: hold out --val-fraction of the training stories.",
    )
    prepare.add_argument(
        "--tokenizer", default="bpe:4096", metavar="SPEC",
        help="bpe:N (train a byte-level BPE with N tokens, N >= 257), gpt2 (GPT-2's 50,257 tokens, "
        "from encoder.json + vocab.bpe in $TINYSTORIES_GPT2_DIR or ../shared/data/gpt2), bytes "
        "(256 bytes + EOT), or PATH of an existing tokenizer.json or shard/run folder to reuse. "
        "Default: %(default)s.",
    )
    prepare.add_argument(
        "--out", default="data/shards", metavar="DIR",
        help="output folder (created if missing). Default: %(default)s.",
    )
    prepare.add_argument(
        "--errors", choices=data.ERROR_MODES, default="strict",
        help="invalid UTF-8 in input: strict stops with the file and byte offset; replace substitutes "
        "U+FFFD. Default: %(default)s.",
    )
    prepare.add_argument(
        "--val-fraction", type=float, default=data.DEFAULT_VAL_FRACTION, metavar="F",
        help="without --val-input, the fraction of stories held out for validation, chosen by a hash "
        "of each story's text (deterministic). Default: %(default)s.",
    )
    prepare.add_argument("--quiet", action="store_true", help="no progress bars or summary on stderr")


def _register_download(commands: argparse._SubParsersAction) -> None:
    download = commands.add_parser(
        "download",
        help="fetch TinyStories train/valid text files from the Hugging Face hub",
        description="Fetch the TinyStories train and validation text files from the Hugging Face hub, "
        "printing their sizes (asked of the hub) before the download starts; v2-gpt4's train file is "
        "over 2 GB. Offline (HF_HUB_OFFLINE=1 or no network) this fails at once; `data prepare` "
        "without --input uses the slice bundled with the package instead.",
    )
    download.add_argument(
        "--dataset", default=data.HUB_DATASET, metavar="REPO",
        help="hub dataset repository. Default: %(default)s.",
    )
    download.add_argument(
        "--version", choices=sorted(data.HUB_FILES), default=data.DEFAULT_HUB_VERSION,
        help="v1: TinyStories-train.txt / -valid.txt; v2-gpt4: TinyStoriesV2-GPT4-train.txt / "
        "-valid.txt (GPT-4 stories only). Default: %(default)s.",
    )
    download.add_argument(
        "--out", metavar="DIR", default=None,
        help="folder to place the files in. Default: the Hugging Face cache.",
    )


def run(args: argparse.Namespace) -> int:
    """Dispatch `data prepare` / `data download` to the library."""
    if args.data_command == "prepare":
        return run_prepare(args)
    if args.data_command == "download":
        return run_download(args)
    print("tinystories data: choose a sub-command: prepare or download (see --help)", file=sys.stderr)
    return 2


def run_prepare(args: argparse.Namespace) -> int:
    data.prepare(
        args.input,
        args.out,
        args.tokenizer,
        args.val_input,
        val_fraction=args.val_fraction,
        errors=args.errors,
        progress=not args.quiet,
        data_source=args.data_source,
    )
    return 0


def run_download(args: argparse.Namespace) -> int:
    for path in data.download(args.dataset, args.version, args.out):
        print(path)
    return 0
