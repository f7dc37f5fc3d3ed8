"""docs/: the figure script runs on a tiny run, committed figures stay small, and every relative link resolves."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from tinystories.checkpoint import save_checkpoint
from tinystories.config import ModelConfig, RunConfig, TrainConfig
from tinystories.model import GPT
from tinystories.tokenizer import BytesTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", DOCS / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_run(tmp_path) -> Path:
    """A run dir as training writes it, with random weights, the bytes tokenizer and a short metrics.jsonl."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=257, context_length=128, n_layer=2, n_head=2, d_model=32,
                         norm="rmsnorm", position="rope", mlp="swiglu")
    run = tmp_path / "run"
    tokenizer = BytesTokenizer()
    RunConfig(model=config, train=TrainConfig(max_steps=200, warmup_steps=10), tokenizer=tokenizer.spec
              ).save(run / "config.json")
    tokenizer.save(run)
    save_checkpoint(run / "checkpoints" / "best", GPT(config))
    records = [{"step": s, "train_loss": 5.0 - s / 100, "grad_norm": 1.0 + s / 100} for s in range(10, 201, 10)]
    records += [{"step": s, "val_loss": 5.1 - s / 100, "val_bpb": 7.0} for s in (100, 200)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_make_figures_writes_every_png(tiny_run, tmp_path, one_thread):
    out = tmp_path / "figures"
    paths = load_make_figures().main(tiny_run, out)
    names = {path.name for path in paths}
    assert names == {"architecture-tiny.png", "attention-layer0.png", "attention-grid.png", "lr-schedule.png",
                     "sampling.png", "training-loss.png", "many-passes.png"}  # the last from the shipped models
    for path in paths:
        assert path.parent == out
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5_000, path
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left behind


def test_losses_per_pass_average_the_train_loss_of_the_window_before_each_evaluation():
    make_figures = load_make_figures()
    records = [{"step": s, "train_loss": 5.0 - s / 100} for s in range(10, 201, 10)]
    records += [{"step": 100, "tokens": make_figures.TRAIN_TOKENS // 2, "val_loss": 4.0, "val_loss_raw": 4.2},
                {"step": 200, "tokens": make_figures.TRAIN_TOKENS, "val_loss": 3.0}]
    first, second = make_figures.losses_per_pass(records, window=100)
    # steps 10..100: 5.0 - (0.1 + ... + 1.0) / 10 = 4.45; steps 110..200: 5.0 - 1.55 = 3.45
    assert first["passes"] == pytest.approx(0.5, abs=1e-6) and first["train"] == pytest.approx(4.45)
    assert first["gap"] == pytest.approx(4.2 - 4.45)  # the raw weights' val loss when there is one
    assert second["passes"] == 1.0 and second["train"] == pytest.approx(3.45)
    assert second["val_raw"] == 3.0 and second["gap"] == pytest.approx(3.0 - 3.45)


def test_next_token_distributions_follow_the_sampler_filters(tiny_run):
    make_figures = load_make_figures()
    from tinystories.generate import load_model

    lm = load_model(tiny_run)
    labels, probabilities = make_figures.next_token_distributions(lm, "Once", top=12)
    assert len(labels) == 12
    cold, warm, hot = (probabilities[f"temperature {t}"] for t in ("0.5", "1.0", "1.5"))
    assert cold[0] > warm[0] > hot[0]  # the top token's share shrinks as the temperature rises
    assert (warm[:-1] >= warm[1:]).all()  # bars are in descending order of probability
    top_k = probabilities["top-k 5"]
    assert (top_k[5:] == 0).all() and torch.isclose(top_k[:5].sum() / warm[:5].sum(), 1 / warm[:5].sum())


def test_committed_figures_are_small_pngs():
    figures = sorted((DOCS / "figures").glob("*.png"))
    assert figures, "docs/figures holds no PNG"
    for path in figures:
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, path
        assert len(data) <= 110_000, f"{path.name} is {len(data):,} bytes; keep figures under ~100 KB"


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SOURCE = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def relative_links(markdown: str) -> list[str]:
    """Link and image targets outside code, minus web links, mail links and in-page anchors."""
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    targets = LINK.findall(text) + HTML_SOURCE.findall(text)
    return [t for t in targets if not re.match(r"^(https?:|mailto:|#)", t)]


def test_link_extraction_skips_code_web_links_and_anchors():
    markdown = ("[a](docs/x.md) ![b](figures/y.png \"title\") [c](https://e.org) [d](#top) `[e](no.md)`\n"
                "```\n[f](no2.md)\n```\n<img src=\"z.png\" width=\"300\"> [g](x.md#part)")
    assert relative_links(markdown) == ["docs/x.md", "figures/y.png", "x.md#part", "z.png"]


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in DOCS.glob("*.md"))])
def test_every_relative_link_resolves(page):
    path = REPO_ROOT / page if page == "README.md" else DOCS / page
    missing = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{page}: links to missing files: {missing}"
