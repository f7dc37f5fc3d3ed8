"""`tinystories presets`: list the presets, or explain one field by field."""

from __future__ import annotations

import argparse
import dataclasses


def register(subparsers) -> None:
    parser = subparsers.add_parser("presets", help="list model presets (or explain one)",
                                   description="List the presets as a table, or --explain NAME: every field, "
                                               "its value and why the preset chose it.")
    parser.add_argument("--explain", metavar="NAME", help="show every field of one preset with its reason")
    parser.set_defaults(func=run)


def format_parameters(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.2f}B"
    if count >= 1e6:
        return f"{count / 1e6:.1f}M"
    return f"{count / 1e3:.0f}K"


def presets_table() -> str:
    """A plain-text table: name, parameters, tokenizer, what it mirrors."""
    from tinystories.config import get_preset, preset_names

    rows = [("name", "params", "tokenizer", "mirrors")]
    for name in preset_names():
        preset = get_preset(name)
        rows.append((name, format_parameters(preset.model.num_parameters()), preset.tokenizer, preset.mirrors))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
        if index == 0:
            lines.append("  ".join("-" * width for width in widths) + "  " + "-" * len(row[3]))
    return "\n".join(lines)


def explain(name: str) -> str:
    """Every model and train field of preset `name` with its value and the preset's reason for it, or,
    for a field the preset leaves alone, what the field means (its note in config.py, in parentheses)."""
    from tinystories.config import ModelConfig, TrainConfig, field_notes, get_preset

    preset = get_preset(name)
    notes = {"model": field_notes(ModelConfig), "train": field_notes(TrainConfig)}
    count = preset.model.num_parameters()
    lines = [f"{preset.name}: {preset.mirrors}",
             f"parameters: {count:,} ({format_parameters(count)})", f"tokenizer: {preset.tokenizer}"]
    rows = []
    for section, values in (("model", preset.model), ("train", preset.train)):
        for field in dataclasses.fields(values):
            reason = preset.reasons.get(field.name, preset.reasons.get(f"{section}.{field.name}"))
            note = notes[section].get(field.name)
            rows.append((f"{section}.{field.name}", repr(getattr(values, field.name)),
                         reason or (f"({note})" if note else "")))
    name_width = max(len(row[0]) for row in rows)
    value_width = max(len(row[1]) for row in rows)
    for field, value, reason in rows:
        lines.append(f"  {field.ljust(name_width)}  {value.ljust(value_width)}  {reason}".rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    print(explain(args.explain) if args.explain else presets_table())
    return 0
