"""The main job, end to end: stories -> shards -> a trained `tiny` model -> three stories and an eval table.

`tinystories demo` (and `make demo`) call `run_demo`. Each stage is an ordinary library call, so this file
doubles as a map of the pipeline. Every stage reuses its output when re-run: prepared shards are
fingerprinted and a finished training run is resumed (and so returns at once). Without input files the
stories come from $TINYSTORIES_DATA, else from the TinyStories slice bundled with the package, so the
demo runs offline; `data_source="hub"` downloads TinyStories from the Hugging Face hub instead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from tinystories.config import RunConfig, apply_overrides


@dataclass
class DemoOptions:
    out: Path = Path("out/demo")
    inputs: list[str] | None = None  # raw training text; None: $TINYSTORIES_DATA, else the bundled slice
    val_inputs: list[str] | None = None
    data_source: str | None = None  # without inputs: 'bundled' or 'hub' (see tinystories.data.default_inputs)
    preset: str = "tiny"
    tokenizer: str | None = None  # None: the preset's tokenizer
    max_minutes: float = 15.0
    max_steps: int | None = None  # None: the preset's steps (the time limit usually ends training first)
    overrides: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ("Once upon a time", "Tom and his dog", "The little bird")
    seed: int = 0
    eval_samples: int = 20
    progress: bool = True


# The three demo stories: one greedy, two sampled, so a user sees both behaviours.
DEMO_SAMPLING = (
    {"temperature": 0.0},
    {"temperature": 0.8, "top_p": 0.95},
    {"temperature": 1.0, "top_k": 40},
)


def run_demo(options: DemoOptions, stdout: TextIO | None = None, stderr: TextIO | None = None) -> dict[str, Any]:
    """Prepare data, train, generate three stories and evaluate. Returns a summary dict.

    `stdout`/`stderr` default to the streams current at the call (not at import: tests swap them)."""
    from tinystories.evaluate import evaluate_generation, evaluate_shards
    from tinystories.generate import load_model

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    out = Path(options.out)
    run_config = RunConfig.from_preset(options.preset)
    data_dir = prepare_demo_data(options, out, options.tokenizer or run_config.tokenizer, stderr)
    run_dir, summary = train_demo_model(options, run_config, data_dir, out / "run", stderr)

    print("[3/4] three stories (1 greedy, 2 sampled)", file=stderr)
    lm = load_model(run_dir, checkpoint="best")
    write_demo_stories(lm, options, stdout)

    print("[4/4] evaluating", file=stderr)
    results = evaluate_shards(lm, data_dir)
    if options.eval_samples > 0:
        results.update(evaluate_generation(lm, samples=options.eval_samples, seed=options.seed,
                                           max_new_tokens=300, temperature=0.8, top_p=0.95))
    print(format_table(results), file=stdout)
    print(f"\nloss curve: {run_dir / 'loss.png'}\nrun directory: {run_dir}", file=stdout)
    return {"train": summary, "eval": results, "run_dir": str(run_dir), "data_dir": str(data_dir)}


def prepare_demo_data(options: DemoOptions, out: Path, tokenizer_spec: str, stderr: TextIO) -> Path:
    """Stage 1, stories -> shards in OUT/data-<tokenizer>; returns that folder."""
    from tinystories.data import default_inputs, describe_inputs, find_story_files, prepare
    from tinystories.files import check_output_path

    check_output_path(out, "--out", folder=True)  # bad paths fail in one line, before any stage starts
    inputs, val_inputs = options.inputs, options.val_inputs
    if not inputs:
        inputs, val_inputs = default_inputs(options.data_source)
    find_story_files(list(inputs) + list(val_inputs or []))
    data_dir = out / f"data-{tokenizer_spec.replace(':', '')}"
    source = describe_inputs([Path(p) for p in inputs], [Path(p) for p in val_inputs or []])
    print(f"[1/4] preparing {tokenizer_spec} shards in {data_dir} from {source}", file=stderr)
    prepare([str(p) for p in inputs], data_dir, tokenizer_spec,
            val_inputs=[str(p) for p in val_inputs] if val_inputs else None, progress=options.progress)
    return data_dir


def train_demo_model(options: DemoOptions, run_config: RunConfig, data_dir: Path, run_dir: Path,
                     stderr: TextIO) -> tuple[Path, dict[str, Any]]:
    """Stage 2, shards -> a trained run in `run_dir` (resumed, or returned at once, when it exists)."""
    from tinystories.train import train

    train_config = replace(run_config.train, max_minutes=options.max_minutes)
    if options.max_steps is not None:
        train_config = replace(train_config, max_steps=options.max_steps)
    run_config = replace(run_config, train=train_config, data=str(data_dir))
    if options.overrides:
        run_config = apply_overrides(run_config, list(options.overrides))
    print(f"[2/4] training {options.preset} for at most {options.max_minutes:g} minutes in {run_dir}", file=stderr)
    return run_dir, train(run_config, run_dir, resume=True, progress=options.progress)


def write_demo_stories(lm: Any, options: DemoOptions, stdout: TextIO) -> None:
    """Stage 3, three stories from the prompts, one per DEMO_SAMPLING setting."""
    for index, (prompt, sampling) in enumerate(zip(options.prompts, DEMO_SAMPLING)):
        settings = ", ".join(f"{k}={v}" for k, v in sampling.items())
        print(f"--- story {index + 1} ({settings}, seed {options.seed}) ---", file=stdout)
        completion = lm.generate(prompt, max_new_tokens=300, seed=options.seed, **sampling)[0]
        print(prompt + completion.text, file=stdout)
        print(file=stdout)
    stdout.flush()


def format_table(results: dict[str, Any]) -> str:
    """A two-column markdown table of the numeric results."""
    lines = ["| metric | value |", "|---|---|"]
    for key, value in results.items():
        if isinstance(value, float):
            lines.append(f"| {key} | {value:.4f} |")
        elif isinstance(value, int) and not isinstance(value, bool):
            lines.append(f"| {key} | {value:,} |")
    return "\n".join(lines)
