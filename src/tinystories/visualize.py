"""Look inside a model: parameter breakdown, attention weights, and figures of both.

`parameter_breakdown(config)`   where a `ModelConfig`'s parameters go (embeddings, attention, MLP, norms, head)
`attention_weights(model, ids)` the softmax attention of every layer and head, (L, H, T, T)
`plot_attention(...)`           heat maps of those weights (one layer's heads, or a layers x heads grid)
`draw_architecture(config)`     a block diagram of the model, drawn from its config

The model computes attention with `F.scaled_dot_product_attention`, which never materialises the
weights; `attention_weights` recomputes them from each block's queries and keys (captured with a
forward hook on the block's attention module) so that model.py stays a training-speed kernel.
Figures are written with matplotlib's Agg backend, to a temp file renamed into place.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from tinystories.config import ModelConfig
from tinystories.errors import UserError
from tinystories.files import atomic_path
from tinystories.model import GPT, apply_rotary, eval_mode


class InspectError(UserError):
    """Bad input to an inspection command (layer out of range, empty prompt, unknown figure type)."""


# --------------------------------------------------------------------------------------------------
# Parameter breakdown


def parameter_breakdown(config: ModelConfig) -> dict[str, int]:
    """Parameters per part of the model (`ModelConfig.parameter_counts`, the closed form)."""
    return config.parameter_counts()


def module_breakdown(model: GPT) -> dict[str, int]:
    """The same parts as `parameter_breakdown`, counted from a built model's tensors (tied ones once)."""
    counts = dict.fromkeys(("embeddings", "positions", "attention", "mlp", "norms", "head", "value_embeddings",
                            "input_mix"), 0)
    for name, parameter in model.named_parameters():  # a tied head shares tok_emb's tensor: listed once
        if name.startswith("tok_emb."):
            part = "embeddings"
        elif name.startswith("value_emb.") or name.endswith(".value_weight"):
            part = "value_embeddings"
        elif name in ("stream_weight", "input_weight"):
            part = "input_mix"
        elif name.startswith("pos_emb."):
            part = "positions"
        elif name.startswith("lm_head."):
            part = "head"
        elif ".attn." in name:
            part = "attention"
        elif ".mlp." in name:
            part = "mlp"
        else:
            part = "norms"
        counts[part] += parameter.numel()
    return counts


# --------------------------------------------------------------------------------------------------
# Attention weights


@torch.no_grad()
def attention_weights(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of every layer and head for one sequence: ids (T,) -> (L, H, T, T).

    Row t of [layer, head] is the distribution over key positions 0..t that query t attends to.
    Recomputed from each block's own input (normed x, RoPE tables, mask) exactly as
    `Attention.forward` feeds `F.scaled_dot_product_attention`, without a KV cache.
    """
    if ids.dim() != 1 or ids.numel() == 0:
        raise InspectError("attention_weights needs a non-empty 1-D tensor of token ids")
    config = model.config
    H, K, D = config.n_head, config.kv_heads, config.head_dim
    captured: list[torch.Tensor] = []

    def hook(module, inputs, output):
        x, rotary, mask = inputs[0], inputs[1], inputs[2]  # x (1, T, C) is the block's normed input
        B, T, _ = x.shape
        qk, _ = module.qkv(x).view(B, T, H + 2 * K, D).split([H + K, K], dim=2)
        if rotary is not None:
            qk = apply_rotary(qk, *rotary)
        q, k = qk.transpose(1, 2).split([H, K], dim=1)  # (B, H, T, D), (B, K, T, D)
        k = k.repeat_interleave(H // K, dim=1)  # grouped key heads -> one per query head, (B, H, T, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if mask is not None:  # sliding window: the model passes an explicit (1, 1, T, T) mask
            allowed = allowed & mask[0, 0, :T, :T]
        captured.append(scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)[0])  # (H, T, T)

    handles = [block.attn.register_forward_hook(hook) for block in model.blocks]
    try:
        with eval_mode(model):
            model(ids[None, :].to(model.tok_emb.weight.device))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(captured).float().cpu()  # (L, H, T, T)


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """A short printable label per token: its text, spaces shown as '·', newlines as '⏎', other
    control characters as \\xNN."""
    labels = []
    for token in ids:
        text = tokenizer.decode([int(token)]).replace(" ", "·").replace("\n", "⏎")
        text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)  # fonts lack control glyphs
        labels.append(text or "∅")
    return labels


# --------------------------------------------------------------------------------------------------
# Figures


def new_figure(figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure drawn with the Agg canvas: files only, leaving pyplot's global state (and
    a notebook's backend) alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write a matplotlib figure to `path` (format from its suffix) via a temp file and rename."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ("png", "svg", "pdf"):
        raise InspectError(f"--out {path}: expected a .png, .svg or .pdf file name")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format=suffix)
    return path


def plot_attention(weights: torch.Tensor, labels: Sequence[str], path: str | os.PathLike,
                   layer: int | None = None, title: str | None = None, dpi: int = 100,
                   tick_labels: bool | None = None) -> Path:
    """Heat maps of attention weights (L, H, T, T): one panel per head of `layer`, or with layer=None
    a grid of layers (rows) x heads (columns). Rows are queries, columns the keys they attend to.
    tick_labels: label rows and columns with the tokens (default: when T <= 24)."""
    L, H, T, _ = weights.shape
    if layer is not None and not 0 <= layer < L:
        raise InspectError(f"--layer {layer}: the model has layers 0..{L - 1}")
    layers = list(range(L)) if layer is None else [layer]
    panel = 2.6 if T <= 24 else 3.2
    figure = new_figure((panel * H, panel * len(layers) + 0.6))
    axes = figure.subplots(len(layers), H, squeeze=False)
    show_labels = T <= 24 if tick_labels is None else tick_labels  # unreadable on long prompts
    for row, layer_index in enumerate(layers):
        for head in range(H):
            ax = axes[row][head]
            ax.imshow(weights[layer_index, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer_index} head {head}", fontsize=8)
            if show_labels:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(T), labels, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    figure.suptitle(title or "attention weights (row: query token, column: key token)", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path, dpi=dpi)


def draw_architecture(config: ModelConfig, path: str | os.PathLike, title: str | None = None) -> Path:
    """A block diagram of the model described by `config`, bottom (tokens) to top (logits),
    with each box's shape and parameter count."""
    from matplotlib.patches import FancyBboxPatch

    parts = parameter_breakdown(config)
    d, hd = config.d_model, config.head_dim
    norm_name = "RMSNorm" if config.norm == "rmsnorm" else "LayerNorm"
    kv = "" if config.kv_heads == config.n_head else f", {config.kv_heads} kv heads"
    window = f", window {config.sliding_window}" if config.sliding_window else ""
    mlp_name = "SwiGLU" if config.mlp == "swiglu" else "GELU"
    per_layer_attn, per_layer_mlp = parts["attention"] // config.n_layer, parts["mlp"] // config.n_layer
    embed = f"token embedding {config.vocab_size} x {d}  ({parts['embeddings']:,})"
    if config.position == "learned":
        embed += f"\n+ learned positions {config.context_length} x {d}  ({parts['positions']:,})"
    if config.value_embedding:
        embed += (f"\nvalue embedding {config.vocab_size} x {config.kv_heads * hd}, into every layer's values"
                  f"  ({parts['value_embeddings']:,})")
    head = ("output head (tied to the token embedding)" if config.tie_embeddings
            else f"output head {d} x {config.vocab_size}  ({parts['head']:,})")
    # (text, colour, inside the repeated block?)
    boxes = [
        (f"token ids (B, T), T <= {config.context_length}", "#eeeeee", False),
        (embed, "#cfe2f3", False),
        (norm_name, "#fff2cc", True),
        (f"causal self-attention: {config.n_head} heads x {hd}{kv}{window}"
         + ("\nRoPE on queries and keys" if config.position == "rope" else "")
         + f"  ({per_layer_attn:,})", "#f4cccc", True),
        ("+ residual", "#ffffff", True),
        (norm_name, "#fff2cc", True),
        (f"{mlp_name} MLP {d} -> {config.ffn_dim} -> {d}  ({per_layer_mlp:,})", "#d9ead3", True),
        ("+ residual", "#ffffff", True),
        (f"final {norm_name}", "#fff2cc", False),
        (head, "#cfe2f3", False),
        (f"logits (B, T, {config.vocab_size})", "#eeeeee", False),
    ]
    height = 0.62
    figure = new_figure((6.4, 0.58 * len(boxes) + 1.0))
    ax = figure.subplots()
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.6, len(boxes) * 0.9 + 0.2)
    ax.axis("off")
    ys = [i * 0.9 for i in range(len(boxes))]
    for (text, colour, _), y in zip(boxes, ys):
        ax.add_patch(FancyBboxPatch((1.6, y), 6.8, height, boxstyle="round,pad=0.02", fc=colour, ec="#444444"))
        ax.text(5.0, y + height / 2, text, ha="center", va="center", fontsize=7.5)
    for y0, y1 in zip(ys[:-1], ys[1:]):
        ax.annotate("", xy=(5.0, y1), xytext=(5.0, y0 + height), arrowprops={"arrowstyle": "->", "lw": 0.8})
    inside = [y for (_, _, repeated), y in zip(boxes, ys) if repeated]
    bottom, top = min(inside) - 0.12, max(inside) + height + 0.12
    ax.add_patch(FancyBboxPatch((1.2, bottom), 7.6, top - bottom, boxstyle="round,pad=0.02", fc="none",
                                ec="#3d85c6", ls="--", lw=1.2))
    ax.text(9.0, (bottom + top) / 2, f"x {config.n_layer}\nblocks", ha="left", va="center", fontsize=9,
            color="#3d85c6")
    total = config.num_parameters()
    ax.set_title(title or f"{total:,} parameters: d_model {d}, {config.n_layer} layers, "
                          f"{config.n_head} heads, context {config.context_length}", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path)


def model_config_of(model: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a run directory, a checkpoint directory or a shipped model's name, read
    from its config.json (no weights are loaded; a run needs no checkpoint yet)."""
    from tinystories.checkpoint import CONFIG_FILE, load_run_config, resolve_checkpoint, shipped_model_path

    path = shipped_model_path(model) or Path(model)
    if (path / CONFIG_FILE).is_file():
        return load_run_config(path).model
    _, home = resolve_checkpoint(path)
    return load_run_config(home).model


def attention_figure(run: str | os.PathLike, prompt: str, path: str | os.PathLike, layer: int | None = None,
                     checkpoint: str = "best", max_tokens: int = 24) -> Path:
    """Load a run, encode `prompt` (after the EOT every story starts with, cut to `max_tokens`),
    and draw its attention maps to `path`."""
    from tinystories.generate import load_model

    if not prompt:
        raise InspectError("--prompt: expected some text to look at")
    if max_tokens < 2:
        raise InspectError(f"--max-tokens {max_tokens}: expected at least 2")
    lm = load_model(run, checkpoint=checkpoint)
    ids = lm.encode_prompt(prompt)[:max_tokens]
    weights = attention_weights(lm.model, torch.tensor(ids))
    labels = token_labels(lm.tokenizer, ids)
    labels[0] = "EOT" if ids[0] == lm.tokenizer.eot_id else labels[0]
    return plot_attention(weights, labels, path, layer=layer)
