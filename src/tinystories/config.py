"""Configuration: one source of truth for every default.

`ModelConfig` describes a transformer, `TrainConfig` a training recipe, and a `Preset` names a pair of
them with a tokenizer. `RunConfig` is what a run directory saves as `config.json`: everything needed to
rebuild the model and continue the run. This module imports no torch, so `--help` and `presets` are fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinystories.errors import UserError
from tinystories.files import write_json_atomic


class ConfigError(UserError):
    """A configuration value or file is invalid."""


def field_notes(cls: type) -> dict[str, str]:
    """Each field's trailing comment in this file (the documentation `presets --explain` shows)."""
    import inspect
    import re

    notes = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s{4}(\w+): [^#]*#\s*(.+)$", line)
        if match:
            notes[match.group(1)] = match.group(2).strip()
    return notes


def _requirement_checker(section: str):
    """need(condition, message): raise a one-line ConfigError naming the config section."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(f"{section} config: {message}")

    return need


@dataclass
class ModelConfig:
    """The shape of a GPT-style transformer. Every architecture variant is a setting here."""

    vocab_size: int = 4096  # token ids 0 .. vocab_size-1 (a new run takes it from its data's tokenizer)
    context_length: int = 256  # tokens a model sees at once (training windows, generation's window)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads (head_dim = d_model / n_head)
    n_kv_head: int | None = None  # None: same as n_head (MHA); 1: MQA; between: GQA
    d_model: int = 128  # width of the residual stream
    d_ff: int | None = None  # None: 4*d for gelu, ~8/3*d (rounded up to 32) for swiglu
    norm: str = "rmsnorm"  # 'layernorm' | 'rmsnorm'
    norm_eps: float = 1e-5  # added to the variance inside every norm
    position: str = "rope"  # 'learned' (a table) | 'rope' (rotary: relative positions, no parameters)
    rope_theta: float = 10000.0  # RoPE base: pair i turns by position * theta^(-2i/head_dim)
    mlp: str = "swiglu"  # 'gelu' | 'swiglu' | 'relu2' (proj(relu(fc(x))^2), as modded-nanogpt)
    bias: bool = False  # biases in linear layers and LayerNorm
    dropout: float = 0.0  # on embeddings, attention weights and both residual branches while training
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    sliding_window: int | None = None  # None: full causal attention; N: attend to the last N tokens
    qk_norm: bool = False  # RMS-normalise queries and keys per head (no weights) before RoPE
    logit_softcap: float | None = None  # None: plain logits; c: c * tanh(logits / c)
    zero_init_proj: bool = False  # start every block's output projections at zero (blocks begin as identity)
    value_embedding: bool = False  # a second token table added to every layer's values (modded-nanogpt)
    input_mix: bool = False  # each block's input is a * x + b * (the embedded tokens), a and b learned per layer

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need = _requirement_checker("model")
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive integer")
        need(self.d_model % self.n_head == 0, f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        need(self.kv_heads > 0 and self.n_head % self.kv_heads == 0,
             f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        need(self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        need(self.position in ("learned", "rope"), f"position must be 'learned' or 'rope', got {self.position!r}")
        need(self.mlp in ("gelu", "swiglu", "relu2"), f"mlp must be 'gelu', 'swiglu' or 'relu2', got {self.mlp!r}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.position != "rope" or self.head_dim % 2 == 0, "rope needs an even head dimension")
        need(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be None or positive")
        need(self.d_ff is None or self.d_ff > 0, "d_ff must be None or positive")
        need(self.logit_softcap is None or self.logit_softcap > 0, "logit_softcap must be None or positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp in ("gelu", "relu2"):
            return 4 * self.d_model
        # SwiGLU has three matrices instead of two: 2/3 of 4*d keeps the parameter count of a GELU MLP.
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    def parameter_counts(self) -> dict[str, int]:
        """Closed-form parameters per part of the model (the model's own count must agree).

        Keys: embeddings (token table), positions (learned table; 0 with RoPE), attention (qkv + output
        projection of all layers), mlp (all layers), norms (every norm's weights and biases), head
        (the output projection; 0 when tied to the token embeddings), value_embeddings and input_mix (0 without).
        """
        d, hd = self.d_model, self.head_dim
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        qkv_out = (self.n_head + 2 * self.kv_heads) * hd
        attention = d * qkv_out + self.n_head * hd * d + (qkv_out + d if self.bias else 0)
        mlp_in = self.ffn_dim * (2 if self.mlp == "swiglu" else 1)
        mlp = d * mlp_in + self.ffn_dim * d + (mlp_in + d if self.bias else 0)
        return {
            "embeddings": self.vocab_size * d,
            "positions": self.context_length * d if self.position == "learned" else 0,
            "attention": self.n_layer * attention,
            "mlp": self.n_layer * mlp,
            "norms": (2 * self.n_layer + 1) * norm,
            "head": 0 if self.tie_embeddings else self.vocab_size * d,
            # a (V, K*D) table and one mixing weight per layer
            "value_embeddings": (self.vocab_size * self.kv_heads * hd + self.n_layer) if self.value_embedding else 0,
            "input_mix": 2 * self.n_layer if self.input_mix else 0,  # (a, b) per layer
        }

    def num_parameters(self) -> int:
        """Closed-form parameter count: the sum of `parameter_counts`."""
        return sum(self.parameter_counts().values())

    def flops_per_token(self, sequence_length: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, for MFU.

        6 FLOPs per matmul weight (2 forward, 4 backward) plus attention's two T x T products;
        causal attention does half of those, hence 6 rather than 12 per layer per d per position.
        """
        t = sequence_length or self.context_length
        if self.sliding_window:
            t = min(t, 2 * self.sliding_window)
        d, hd = self.d_model, self.head_dim
        qkv_out = (self.n_head + 2 * self.kv_heads) * hd
        mlp_in = self.ffn_dim * (2 if self.mlp == "swiglu" else 1)
        matmul_weights = self.n_layer * (d * qkv_out + self.n_head * hd * d + d * mlp_in + self.ffn_dim * d)
        matmul_weights += self.vocab_size * d  # the output head
        return 6.0 * matmul_weights + 6.0 * self.n_layer * d * t

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, values, "model")


@dataclass
class TrainConfig:
    """A training recipe. Steps count optimizer updates; tokens per step = batch_size * grad_accum * T."""

    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000  # optimizer updates to train for (the lr schedule ends there)
    max_minutes: float | None = None  # stop (and finish the schedule) after this much training time
    optimizer: str = "adamw"  # 'adamw' | 'muon' (Muon for hidden matrices, AdamW for the rest) | 'adamw8bit'
    lr: float = 3e-3  # peak learning rate of AdamW
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    muon_lr: float = 0.02  # peak learning rate of Muon (when optimizer == 'muon')
    muon_split: bool = False  # Muon orthogonalizes q, k, v (and SwiGLU's gate and up) apart, not as one fused matrix
    schedule: str = "cosine"  # 'cosine' | 'wsd' (warmup-stable-decay) | 'constant'
    warmup_steps: int = 50  # updates over which the lr rises linearly from 0 to its peak
    decay_fraction: float = 0.2  # wsd: the last fraction of training that decays
    weight_decay: float = 0.1  # weight matrices (Muon's and AdamW's); norms and biases are never decayed
    embedding_weight_decay: float = 0.0  # the token (and position) embeddings, which a tied head shares
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    grad_clip: float = 1.0  # 0 disables clipping
    batching: str = "windows"  # 'windows' (random windows) | 'epochs' (every window once per pass, reshuffled) | 'stories' (padded whole stories)
    eval_every: int = 200  # steps between evaluations (and checkpoints)
    eval_tokens: int = 65536  # size of the fixed validation subset evaluated each time
    log_every: int = 10  # steps between train_loss lines in metrics.jsonl (each one reads the device once)
    patience: int | None = None  # stop after this many evaluations without improvement
    seed: int = 1337  # initial weights, dropout masks and the order of batches
    device: str = "auto"  # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'mps'
    dtype: str = "auto"  # 'auto' (bf16 autocast on CUDA, fp32 elsewhere) | 'float32' | 'bfloat16'
    compile: bool = False  # torch.compile the model (faster steps after a first compiling one)
    deterministic: bool = True  # the same seed, data and thread count give bit-identical runs (compiled too)
    ema_decay: float | None = None  # None: off; d: also keep, evaluate and ship an average of the weights
    sample_tokens: int = 120  # length of the sample story printed at each evaluation (0: none)
    wandb: str | None = None  # a Weights & Biases project name
    tensorboard: bool = False  # also log to RUN/tensorboard

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        need = _requirement_checker("train")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive integer")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.optimizer in ("adamw", "muon", "adamw8bit"), f"optimizer must be adamw, muon or adamw8bit, got {self.optimizer!r}")
        need(self.schedule in ("cosine", "wsd", "constant"), f"schedule must be cosine, wsd or constant, got {self.schedule!r}")
        need(self.batching in ("windows", "epochs", "stories"),
             f"batching must be 'windows', 'epochs' or 'stories', got {self.batching!r}")
        need(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
             f"device must be auto, cpu, cuda or mps, got {self.device!r}")
        need(self.dtype in ("auto", "float32", "bfloat16"), f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        need(self.max_minutes is None or self.max_minutes > 0, "max_minutes must be positive")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]")
        need(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        need(self.patience is None or self.patience > 0, "patience must be None or positive")
        need(self.ema_decay is None or 0.0 < self.ema_decay < 1.0, f"ema_decay must be None or in (0, 1), got {self.ema_decay}")
        need(self.weight_decay >= 0 and self.embedding_weight_decay >= 0, "weight decays must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, values, "train")


@dataclass
class Preset:
    """A named model + recipe + tokenizer, with the reasons behind its notable choices."""

    name: str
    model: ModelConfig
    train: TrainConfig
    tokenizer: str  # a tokenizer spec: 'bpe:4096', 'gpt2', 'bytes'
    mirrors: str  # what this preset reproduces or is for
    reasons: dict[str, str] = field(default_factory=dict)  # hyperparameter -> one-line reason


def _presets() -> dict[str, Preset]:
    gpt2_vocab = 50257
    tiny_model = ModelConfig(vocab_size=4096, context_length=256, n_layer=4, n_head=4, d_model=128,
                             norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=True,
                             value_embedding=True)
    tiny_train = TrainConfig(batch_size=16, max_steps=2000, optimizer="muon", lr=6e-3, warmup_steps=50,
                             weight_decay=1.0, batching="epochs", ema_decay=0.99, eval_every=200, compile=True,
                             muon_split=True)
    presets = [
        Preset(
            name="tiny",
            tokenizer="bpe:4096",
            mirrors="ours: ~2M-parameter Llama-style model, the CPU default (coherent stories in ~15 min on 2 cores)",
            model=tiny_model,
            train=tiny_train,
            reasons={
                "optimizer": "Muon: 0.930 vs AdamW's 0.973 bits per byte in 10 minutes (benchmarks/RESULTS.md, recipe search)",
                "vocab_size": "a 4096 BPE spends few parameters on embeddings yet keeps stories short in tokens",
                "position": "RoPE generalises better than learned positions at this size",
                "mlp": "SwiGLU gives lower loss than GELU for the same parameters",
                "tie_embeddings": "half the embedding parameters of an untied head, which matters at 1M",
                "lr": "6e-3 for the AdamW-trained parts (embeddings, norms) beside Muon: 0.890 bpb in 10 minutes, the search's best",
                "compile": "torch.compile speeds small models 1.4-1.7x on CPU",
                "context_length": "256 tokens hold a whole average story (196 bpe:4096 tokens on validation)",
                "d_model": "4 x 128 keeps it at 1.3M parameters (1.9M with the value embeddings' table, which costs "
                           "no matmul): ~7M training tokens fit in 15 minutes on 2 CPU cores",
                "max_steps": "2,000 x 16 x 256 = 8.2M tokens, ~16 min at ~8.4k tokens/s (make demo's 15-min budget "
                             "ends at 1,000-1,770 steps, by machine)",
                "warmup_steps": "50 steps ramp the lr up while Adam's moment estimates settle",
                "weight_decay": "1.0 with epochs + EMA: 0.8663 bits per byte at 5.6M tokens, against 0.8758 with 0.1 "
                                "and 0.9104 with 3.0 (benchmarks/RESULTS.md, short recipe search)",
                "batching": "every window once per pass, reshuffled: 0.8786 vs random windows' 0.8926 at 5.6M tokens",
                "ema_decay": "the 0.99 average of the weights is evaluated and shipped: 0.8758 with epochs vs 0.8786",
                "muon_split": "q, k, v, gate and up orthogonalized apart: 0.8527 vs 0.8663 at 5.6M tokens",
                "value_embedding": "with the Muon split, 0.8422 / 0.8440 / 0.8425 (seeds 1337 / 2 / 3) at 5.6M tokens; not "
                                   "exportable to HF, GGUF or llama2.c (set it false for a model to export)",
            },
        ),
        Preset(
            name="mini",
            tokenizer="bpe:4096",
            mirrors="ours: ~7.4M-parameter Llama-style model, the second shipped model (a CPU hour or two)",
            # tiny's architecture and recipe as they were when mini was shipped, wider, deeper and longer
            model=dataclasses.replace(tiny_model, n_layer=8, n_head=8, d_model=256, d_ff=688, value_embedding=False),
            train=dataclasses.replace(tiny_train, max_steps=7500, eval_every=250, muon_split=False),
            reasons={
                "d_model": "8 x 256 (6.3M parameters in the blocks) reached 0.7233 bits per byte where 6 x 192 "
                           "(2.7M) reached 0.7475, both at 20.5M tokens with this recipe (2026-12-02)",
                "n_head": "head size 32, as tiny's",
                "d_ff": "688 ~ 8/3 x 256 (a multiple of 16): SwiGLU's size for the parameters of a 4x GELU MLP",
                "max_steps": "7,500 x 16 x 256 = 30.7M tokens, ~9 passes over the 3.4M training tokens: "
                             "0.7177 bits per byte against 0.7233 at 5,000 steps "
                             "(~1.8 h on 2 Xeon cores with AMX and train.dtype=bfloat16)",
                "weight_decay": "tiny's recipe-search winner (epochs + EMA + 1.0), which matters more as passes grow",
                "batching": "every window once per pass, reshuffled (tiny's recipe search)",
                "ema_decay": "the 0.99 average of the weights is evaluated and shipped (tiny's recipe search)",
                "value_embedding": "off, like muon_split: the shipped mini predates both, and this command repeats it",
            },
        ),
        Preset(
            name="small",
            tokenizer="bpe:4096",
            mirrors="ours: ~15M-parameter Llama-style model in the spirit of llama2.c's stories15M",
            model=ModelConfig(vocab_size=4096, context_length=256, n_layer=8, n_head=6, d_model=384, d_ff=1024,
                              norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=True),
            train=TrainConfig(batch_size=32, max_steps=5000, lr=1e-3, warmup_steps=100, eval_every=250, compile=True),
            reasons={
                "d_model": "llama2.c's 15M model is 288 wide with a 32K vocabulary; with a 4K vocabulary the "
                           "parameters go into depth and width instead",
                "lr": "1e-3 is stable for 15M-parameter models with AdamW",
                "d_ff": "1024 ~ 8/3 x 384: SwiGLU's size for the parameters of a 4x GELU MLP",
                "tie_embeddings": "saves 1.6M parameters",
            },
        ),
        Preset(
            name="medium",
            tokenizer="bpe:4096",
            mirrors="ours: ~40M-parameter Llama-style model for a GPU",
            model=ModelConfig(vocab_size=4096, context_length=512, n_layer=12, n_head=8, d_model=512, d_ff=1408,
                              norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=True),
            train=TrainConfig(batch_size=64, max_steps=10000, lr=6e-4, warmup_steps=200, eval_every=500, compile=True),
            reasons={
                "context_length": "512 covers almost every TinyStories story in one window",
                "lr": "lower peak lr as width grows (roughly 1/width scaling)",
            },
        ),
        Preset(
            name="seed000",
            tokenizer="bpe:4096",
            mirrors="seed 000: a ~4.8M-parameter GPT (LayerNorm, learned positions, multi-head attention)",
            model=ModelConfig(vocab_size=4096, context_length=256, n_layer=6, n_head=8, d_model=256, d_ff=704,
                              norm="layernorm", position="learned", mlp="gelu", bias=True, tie_embeddings=True),
            train=TrainConfig(batch_size=32, max_steps=5000, lr=1e-3, warmup_steps=100, eval_every=250),
            reasons={"d_ff": "2.75x width instead of 4x brings the GPT to the seed's 4.8M parameters",
                     "norm": "LayerNorm as in the original GPT the seed reproduces",
                     "position": "learned positions as in the original GPT the seed reproduces"},
        ),
        Preset(
            name="seed001",
            tokenizer="gpt2",
            mirrors="seed 001: GPT-2-style 6x384 model with the GPT-2 tokenizer (~30M parameters)",
            model=ModelConfig(vocab_size=gpt2_vocab, context_length=128, n_layer=6, n_head=6, d_model=384,
                              norm="layernorm", position="learned", mlp="gelu", bias=True, dropout=0.1,
                              tie_embeddings=True),
            train=TrainConfig(batch_size=32, grad_accum=32, max_steps=5000, lr=1e-4, warmup_steps=1000,
                              schedule="cosine", eval_every=250),
            reasons={"grad_accum": "the seed's effective batch of 1024 sequences",
                     "context_length": "the seed trains on 128-token windows",
                     "dropout": "the seed regularises with dropout 0.1"},
        ),
        Preset(
            name="seed002",
            tokenizer="bpe:32000",
            mirrors="seed 002: Mistral-like 12x384 model, sliding-window attention, 32K BPE (~40M parameters)",
            model=ModelConfig(vocab_size=32000, context_length=1024, n_layer=12, n_head=6, d_model=384, d_ff=1152,
                              norm="rmsnorm", position="rope", mlp="gelu", bias=False, sliding_window=384,
                              tie_embeddings=False),
            train=TrainConfig(batch_size=8, grad_accum=4, max_steps=5000, lr=3e-4, warmup_steps=200,
                              optimizer="adamw8bit", patience=2, eval_every=250),
            reasons={"sliding_window": "Mistral's local attention: cost grows linearly past 384 tokens",
                     "context_length": "long context is configurable up to 4096 (--set context_length=4096)",
                     "optimizer": "8-bit AdamW (bitsandbytes) as in the seed; falls back to AdamW with a warning",
                     "patience": "the seed stops after 2 evaluations without improvement"},
        ),
        Preset(
            name="seed003",
            tokenizer="gpt2",
            mirrors="seed 003: pre-norm GPT with the GPT-2 tokenizer and flash attention (~51M parameters)",
            model=ModelConfig(vocab_size=gpt2_vocab, context_length=512, n_layer=8, n_head=8, d_model=512,
                              norm="layernorm", position="learned", mlp="gelu", bias=True, tie_embeddings=True),
            train=TrainConfig(batch_size=16, grad_accum=4, max_steps=5000, lr=6e-4, warmup_steps=200, eval_every=250),
            reasons={"n_layer": "8 layers of 512 put the model in the seed's 50-60M range"},
        ),
        Preset(
            name="seed004",
            tokenizer="gpt2",
            mirrors="seed 004: a 2-layer, 128-wide GPT with the GPT-2 tokenizer",
            model=ModelConfig(vocab_size=gpt2_vocab, context_length=256, n_layer=2, n_head=4, d_model=128,
                              norm="layernorm", position="learned", mlp="gelu", bias=True, tie_embeddings=True),
            train=TrainConfig(batch_size=32, max_steps=5000, lr=1e-4, warmup_steps=100, eval_every=250,
                              batching="stories"),
            reasons={"batching": "the seed trains on whole stories padded per batch"},
        ),
    ]
    return {preset.name: preset for preset in presets}


def preset_names() -> list[str]:
    return list(_presets())


def get_preset(name: str) -> Preset:
    """A fresh copy of the named preset (callers may modify it)."""
    presets = _presets()  # built anew each call: no shared mutable state
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    return presets[name]


@dataclass
class RunConfig:
    """What a run directory's `config.json` holds: enough to rebuild the model and resume the run."""

    model: ModelConfig
    train: TrainConfig
    tokenizer: str = "bpe:4096"
    data: str | None = None  # the prepared shards directory
    preset: str | None = None
    init_from: str | None = None  # a run whose weights started this one

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "tokenizer": self.tokenizer,
            "data": self.data,
            "init_from": self.init_from,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        if not isinstance(values, dict) or "model" not in values:
            raise ConfigError("run config must be a JSON object with a 'model' section")
        return cls(
            model=ModelConfig.from_dict(values["model"]),
            train=TrainConfig.from_dict(values.get("train", {})),
            tokenizer=values.get("tokenizer", "bpe:4096"),
            data=values.get("data"),
            preset=values.get("preset"),
            init_from=values.get("init_from"),
        )

    @classmethod
    def from_preset(cls, name: str) -> "RunConfig":
        preset = get_preset(name)
        return cls(model=preset.model, train=preset.train, tokenizer=preset.tokenizer, preset=name)

    def preset_differences(self) -> list[str]:
        """`section.field=value` for every model and train field that differs from this run's preset:
        the `--set` assignments that rebuild this config from `--preset` (needs a preset)."""
        preset = RunConfig.from_preset(self.preset)
        differences = []
        for section in ("model", "train"):
            ours, theirs = getattr(self, section).to_dict(), getattr(preset, section).to_dict()
            differences += [f"{section}.{name}={value}" for name, value in ours.items() if value != theirs[name]]
        return differences

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RunConfig":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        return cls.from_dict(values)


def apply_overrides(run: RunConfig, assignments: list[str]) -> RunConfig:
    """Apply `--set` assignments: 'model.n_layer=6', 'train.lr=1e-3', or a bare 'lr=1e-3'."""
    model, train = run.model.to_dict(), run.train.to_dict()
    sections = {"model": model, "train": train}
    top_level = {"tokenizer": run.tokenizer, "data": run.data}
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--set {assignment!r}: expected field=value")
        key, raw = assignment.split("=", 1)
        key = key.strip()
        if key in top_level:
            top_level[key] = raw
            continue
        if "." in key:
            section_name, name = key.split(".", 1)
            if section_name not in sections or name not in sections[section_name]:
                raise ConfigError(f"--set {key}: unknown field")
            owners = [section_name]
        else:
            name = key
            owners = [section for section, values in sections.items() if name in values]
            if not owners:
                known = sorted(set(model) | set(train) | set(top_level))
                raise ConfigError(f"--set {key}: unknown field; known fields: {', '.join(known)}")
            if len(owners) > 1:
                raise ConfigError(f"--set {key}: ambiguous, write {' or '.join(f'{o}.{key}' for o in owners)}")
        cls = ModelConfig if owners[0] == "model" else TrainConfig
        sections[owners[0]][name] = parse_field_value(cls, name, raw)
    return RunConfig(model=ModelConfig.from_dict(model), train=TrainConfig.from_dict(train),
                     tokenizer=top_level["tokenizer"], data=top_level["data"], preset=run.preset,
                     init_from=run.init_from)


def parse_field_value(cls: type, name: str, raw: str) -> Any:
    """Turn the text of a `--set` value into the field's type (int, float, bool, str, or None)."""
    hints = typing.get_type_hints(cls)
    kinds = _field_kinds(hints[name])
    text = raw.strip()
    if type(None) in kinds and text.lower() in ("none", "null", ""):
        return None
    for kind in kinds:
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
        elif kind is int:
            try:
                return int(text)
            except ValueError:
                continue
        elif kind is float:
            try:
                return float(text)
            except ValueError:
                continue
        elif kind is str:
            return text
    expected = " or ".join(k.__name__ for k in kinds)
    raise ConfigError(f"--set {name}={raw}: expected {expected}")


def _field_kinds(hint: Any) -> list[type]:
    args = typing.get_args(hint)
    return [arg for arg in args] if args else [hint]


def _from_dict(cls: type, values: dict[str, Any], section: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{section} config: unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"{section} config: {error}") from None


class SamplingError(UserError):
    """A sampling option is out of range (message is one line naming the option)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON/Python True is not 1 here


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


FLOAT32_MAX = 3.4028234663852886e38  # the decode engine holds per-row sampling options as float32


@dataclass
class SamplingConfig:
    """How to pick each next token and when to stop: the one place sampling defaults and limits live
    (the library, `generate`'s flags and the server all read them). `temperature=0` is greedy decoding.

    Filters apply in this order: repetition penalty, temperature, top-k, top-p.
    """

    max_new_tokens: int = 200
    temperature: float = 1.0  # 0: greedy (argmax); top_k / top_p are then irrelevant
    top_k: int = 0  # 0: off; else sample among the k most likely tokens
    top_p: float = 1.0  # 1: off; else the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # 1: off; CTRL-style on tokens already in the prompt or output
    seed: int | None = None  # None: fresh randomness each call
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before the first one that appears

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.validate()

    def validate(self) -> None:
        for valid, message in (
            (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}"),
            (_is_finite_number(self.temperature) and 0 <= self.temperature <= FLOAT32_MAX,
             f"temperature must be >= 0 (0 = greedy) and fit a float32, got {self.temperature!r}"),
            (_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
            (_is_finite_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_is_finite_number(self.repetition_penalty) and 0 < self.repetition_penalty <= FLOAT32_MAX,
             f"repetition_penalty must be > 0 (1 = off) and fit a float32, got {self.repetition_penalty!r}"),
            (self.seed is None or _is_int(self.seed), f"seed must be an integer or None, got {self.seed!r}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty strings, got {self.stop!r}"),
        ):
            if not valid:
                raise SamplingError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_options(cls, **options: Any) -> "SamplingConfig":
        """Build from keyword options, with a one-line error for an unknown one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SamplingError(f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)
