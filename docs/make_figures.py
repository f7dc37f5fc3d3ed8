"""Draw every figure of docs/ from a trained run, and print the measured tables the pages quote.

    .venv/bin/python docs/make_figures.py --run tiny --out docs/figures     # `make docs-figures`
    .venv/bin/python docs/make_figures.py --run tiny --tables \\
        --data ../shared/data/tinystories                                   # markdown tables to stdout

`--run` is a run directory or a shipped model name; the default, `tiny`, is the model shipped with the
package (its metrics.jsonl is shipped too), so the figures can be redrawn without training anything.

Figures (PNG, dpi 100 or less, each well under 100 KB):
  architecture-tiny.png    the run's model as a block diagram            (tinystories.visualize.draw_architecture)
  attention-layer0.png     layer 0's heads on a story's first sentence   (tinystories.visualize.attention_weights)
  attention-grid.png       every layer x head on the same sentence
  lr-schedule.png          cosine vs wsd for the run's TrainConfig        (tinystories.optim.learning_rate)
  sampling.png             the next-token distribution under temperature, top-k, top-p (generate.filter_*)
  training-loss.png        train/val loss and gradient norm from the run's metrics.jsonl (runlog.plot_metrics)
  many-passes.png          val loss and train/val gap per pass of the shipped models (their metrics.jsonl)

The tables (--tables) are text: how the run's tokenizer splits sentences, the parameter breakdown of
every preset, sample stories per sampling setting and each shipped model's losses per pass. (The training step's profile is
benchmarks/step_profile.py's.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from tinystories.checkpoint import shipped_model_path
from tinystories.config import TrainConfig, get_preset, preset_names
from tinystories.generate import LanguageModel, filter_top_k, filter_top_p, load_model
from tinystories.visualize import (attention_weights, new_figure, draw_architecture, parameter_breakdown,
                                 plot_attention, save_figure, token_labels)
from tinystories.optim import learning_rate
from tinystories.runlog import plot_metrics

ATTENTION_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
SAMPLING_PROMPT = "Once upon a time, there was a little"
TRAIN_TOKENS = 3_433_479  # the training split (../shared/data/tinystories, bpe:4096): what one pass is
PASS_MODELS = ("tiny", "mini")  # the shipped models whose curves docs/training.md compares
SAMPLING_SETTINGS = [  # (label, sampling options)
    ("greedy (temperature 0)", {"temperature": 0.0}),
    ("temperature 0.5", {"temperature": 0.5}),
    ("temperature 1.0", {"temperature": 1.0}),
    ("temperature 1.5", {"temperature": 1.5}),
    ("temperature 1.0, top-k 10", {"temperature": 1.0, "top_k": 10}),
    ("temperature 1.0, top-p 0.9", {"temperature": 1.0, "top_p": 0.9}),
]


# --------------------------------------------------------------------------------------------------
# Figures


def figure_architecture(lm: LanguageModel, out: Path) -> Path:
    return draw_architecture(lm.model.config, out / "architecture-tiny.png")


def figure_attention(lm: LanguageModel, out: Path) -> list[Path]:
    ids = lm.encode_prompt(ATTENTION_PROMPT)[:20]
    weights = attention_weights(lm.model, torch.tensor(ids))  # (L, H, T, T)
    labels = token_labels(lm.tokenizer, ids)
    labels[0] = "EOT"
    return [plot_attention(weights, labels, out / "attention-layer0.png", layer=0, dpi=90),
            plot_attention(weights, labels, out / "attention-grid.png", dpi=70, tick_labels=False)]


def figure_lr_schedule(train: TrainConfig, out: Path) -> Path:
    """The learning rate of every step for the run's recipe, with the schedule set to cosine and wsd."""
    figure = new_figure((6.4, 3.2))
    ax = figure.subplots()
    steps = range(train.max_steps)
    for schedule in ("cosine", "wsd"):
        config = dataclasses.replace(train, schedule=schedule, max_minutes=None)
        ax.plot(steps, [learning_rate(step, config) for step in steps], label=schedule, linewidth=1.5)
    ax.set(xlabel="optimizer step", ylabel="learning rate",
           title=f"peak {train.lr:g}, warmup {train.warmup_steps} steps, floor {train.min_lr_ratio:g} x peak, "
                 f"wsd decays over the last {train.decay_fraction:.0%}")
    ax.title.set_fontsize(8)
    ax.legend()
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, out / "lr-schedule.png")


def next_token_distributions(lm: LanguageModel, prompt: str, top: int = 12) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Probabilities of the `top` most likely next tokens after `prompt` under each filter setting,
    computed with the sampler's own filters (generate.filter_top_k / filter_top_p)."""
    ids = torch.tensor([lm.encode_prompt(prompt)], device=lm.device)
    with torch.no_grad():
        logits = lm.model(ids)[0][0, -1].float()[None]  # (1, V)
    order = logits[0].argsort(descending=True)[:top]
    settings = {
        "temperature 0.5": logits / 0.5,
        "temperature 1.0": logits,
        "temperature 1.5": logits / 1.5,
        "top-k 5": filter_top_k(logits, 5),
        "top-p 0.9": filter_top_p(logits, 0.9),
    }
    probabilities = {name: values.softmax(-1)[0][order].cpu() for name, values in settings.items()}
    return token_labels(lm.tokenizer, order.tolist()), probabilities


def figure_sampling(lm: LanguageModel, out: Path) -> Path:
    labels, probabilities = next_token_distributions(lm, SAMPLING_PROMPT)
    figure = new_figure((13, 3.0))
    axes = figure.subplots(1, len(probabilities), sharey=True)
    for ax, (name, probs) in zip(axes, probabilities.items()):
        ax.bar(range(len(labels)), probs.numpy(), color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("probability of next token")
    figure.suptitle(f"next token after {SAMPLING_PROMPT!r} (the 12 most likely tokens)", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, out / "sampling.png", dpi=80)


def figure_loss(run: Path, out: Path) -> Path | None:
    if not (run / "metrics.jsonl").is_file():
        return None
    path = out / "training-loss.png"
    plot_metrics(read_metrics(run), path)
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses_per_pass(records: list[dict], window: int = 100) -> list[dict]:
    """At each evaluation: step, passes over the training split, val loss (of the weight average when
    there is one), the raw weights' val loss, and the mean train loss of the `window` steps before."""
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    rows = []
    for record in (r for r in records if "val_loss" in r):
        recent = [loss for step, loss in train if record["step"] - window < step <= record["step"]]
        raw = record.get("val_loss_raw", record["val_loss"])
        rows.append({"step": record["step"], "passes": record["tokens"] / TRAIN_TOKENS, "val": record["val_loss"],
                     "val_raw": raw, "train": sum(recent) / len(recent), "gap": raw - sum(recent) / len(recent)})
    return rows


def figure_passes(out: Path) -> Path | None:
    """Val loss and the raw weights' train/val gap against passes, for each shipped model."""
    models = {name: shipped_model_path(name) for name in PASS_MODELS}
    if not all(models.values()):
        return None
    figure = new_figure((9, 3.6))
    loss_axes, gap_axes = figure.subplots(1, 2)
    for (name, path), color in zip(models.items(), ("tab:blue", "tab:orange")):
        rows = losses_per_pass(read_metrics(path))
        passes = [row["passes"] for row in rows]
        loss_axes.plot(passes, [row["val"] for row in rows], color=color, marker="o", markersize=3, label=f"{name} val")
        loss_axes.plot(passes, [row["train"] for row in rows], color=color, linestyle="--", label=f"{name} train")
        gap_axes.plot(passes, [row["gap"] for row in rows], color=color, marker="o", markersize=3, label=name)
    loss_axes.set(xlabel="passes over the training split", ylabel="loss (nats/token)", title="loss")
    gap_axes.set(xlabel="passes over the training split", ylabel="val - train (nats/token)",
                 title="gap (raw weights)")
    for ax in (loss_axes, gap_axes):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, out / "many-passes.png", dpi=80)


def main(run: str | Path, out: str | Path) -> list[Path]:
    """Draw every figure for `run` into `out`; returns the paths written."""
    run, out = shipped_model_path(run) or Path(run), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(run)
    lm.model.eval()
    paths = [figure_architecture(lm, out), *figure_attention(lm, out), figure_lr_schedule(lm.config.train, out),
             figure_sampling(lm, out)]
    paths += [path for path in (figure_loss(run, out), figure_passes(out)) if path is not None]
    return paths


# --------------------------------------------------------------------------------------------------
# Tables (text for the pages)


def table_tokenization(lm: LanguageModel, sentences: list[str]) -> str:
    lines = []
    for sentence in sentences:
        ids = lm.tokenizer.encode(sentence)
        pieces = " | ".join(token_labels(lm.tokenizer, ids))
        lines.append(f"{len(sentence.encode())} bytes -> {len(ids)} tokens: {pieces}")
    return "\n".join(lines)


def table_presets() -> str:
    parts = ("embeddings", "positions", "attention", "mlp", "norms", "head")
    lines = ["| preset | " + " | ".join(parts) + " | total |", "|---" + "|---:" * (len(parts) + 1) + "|"]
    for name in preset_names():
        config = get_preset(name).model
        counts = parameter_breakdown(config)
        total = config.num_parameters()
        cells = [f"{counts[p]:,} ({100 * counts[p] / total:.0f}%)" if counts[p] else "0" for p in parts]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {total:,} |")
    return "\n".join(lines)


def table_samples(lm: LanguageModel, max_new_tokens: int = 60) -> str:
    blocks = []
    for label, options in SAMPLING_SETTINGS:
        text = lm.generate(SAMPLING_PROMPT, max_new_tokens=max_new_tokens, seed=0, **options)[0].text
        blocks.append(f"--- {label} ---\n{SAMPLING_PROMPT}{text}")
    return "\n\n".join(blocks)


def table_passes(name: str) -> str:
    rows = losses_per_pass(read_metrics(shipped_model_path(name)))
    lines = [f"`{name}`:", "", "| step | passes | val loss | raw weights' val loss | train loss | gap (nats/token) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['step']:,} | {row['passes']:.1f} | {row['val']:.3f} | {row['val_raw']:.3f} | "
                     f"{row['train']:.3f} | {row['gap']:.3f} |")
    return "\n".join(lines)


def table_vocab_sizes(data: str | Path, train_stories: int = 5000, d_model: int = 128) -> str:
    """Validation tokens per vocabulary: BPEs trained on the first `train_stories` training stories,
    plus bytes and GPT-2 (when $TINYSTORIES_GPT2_DIR or ../shared/data/gpt2 has its files)."""
    from itertools import islice

    from tinystories.data import read_stories
    from tinystories.errors import UserError
    from tinystories.tokenizer import BytesTokenizer, gpt2_tokenizer, train_bpe

    data = Path(data)
    train = list(islice(read_stories(data / "train.txt.gz"), train_stories))
    valid = list(read_stories(data / "valid.txt.gz"))
    num_bytes = sum(len(story.encode()) for story in valid)
    tokenizers = [("bytes", BytesTokenizer())] + [(f"bpe:{v}", train_bpe(train, v)) for v in (1024, 2048, 4096, 8192)]
    try:
        tokenizers.append(("gpt2", gpt2_tokenizer()))
    except UserError:
        pass
    lines = [f"validation split: {len(valid):,} stories, {num_bytes:,} bytes; BPEs trained on the first "
             f"{train_stories:,} training stories", "",
             f"| tokenizer | vocabulary | validation tokens | bytes per token | embedding parameters at d_model {d_model} |",
             "|---|---:|---:|---:|---:|"]
    for name, tokenizer in tokenizers:
        count = sum(len(ids) for ids in tokenizer.encode_batch(valid))
        lines.append(f"| `{name}` | {tokenizer.vocab_size:,} | {count:,} | {num_bytes / count:.2f} | "
                     f"{tokenizer.vocab_size * d_model:,} |")
    return "\n".join(lines)


def tables(run: str | Path, data: str | Path | None = None) -> str:
    lm = load_model(run)
    lm.model.eval()
    sentences = ["Once upon a time, there was a little girl named Lily.",
                 "She loved to play with her toys and eat yummy food.",
                 "The dinosaur was enormous, but it was afraid of the tiny ladybug."]
    return "\n\n".join([
        "## Tokenization\n" + table_tokenization(lm, sentences),
        "## Parameters per preset\n" + table_presets(),
        "## Samples\n" + table_samples(lm),
        "## Losses per pass\n" + "\n\n".join(table_passes(name) for name in PASS_MODELS if shipped_model_path(name)),
        *(["## Vocabulary sizes\n" + table_vocab_sizes(data)] if data else []),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="tiny",
                        help="a trained run directory or a shipped model name (default: the shipped tiny)")
    parser.add_argument("--out", default="docs/figures", help="folder for the PNGs (default docs/figures)")
    parser.add_argument("--tables", action="store_true", help="print the markdown tables instead of drawing")
    parser.add_argument("--data", help="with --tables: a folder with train.txt.gz and valid.txt.gz, to measure "
                                       "tokens per byte for several vocabulary sizes")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.tables:
        print(tables(args.run, args.data))
    else:
        for path in main(args.run, args.out):
            print(f"{path}  {path.stat().st_size / 1000:.0f} KB")
    sys.exit(0)
