"""Hugging Face `transformers` export: config.json + model.safetensors + tokenizer files.

The directory loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, no custom code:

* rotary positions + RMSNorm + SwiGLU -> `LlamaForCausalLM` (biases become attention_bias/mlp_bias)
* the same with a sliding window -> `MistralForCausalLM` (no biases there)
* learned positions + LayerNorm + GELU (tanh) -> `GPT2LMHeadModel`. GPT-2's `Conv1D` stores weights
  as (in, out), the transpose of `nn.Linear`; its `c_attn` fuses [q; k; v] like our `qkv`; it always
  has LayerNorm and linear biases, so a model without biases gets zeros.

Anything else is refused with the name of the field the target class cannot express.

The directory also gets a model card (README.md with the hub's YAML front matter: license,
datasets, tags, model-index) stating measured figures only: parameters, the bits per byte and
training tokens of the run's metrics.jsonl, a `tinystories train` command rebuilt from config.json,
and a story the weights wrote; a figure the run does not record is written as unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinystories.config import ModelConfig
from tinystories.errors import UserError


HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}


class HFExportError(UserError):
    """The model cannot be expressed as a stock transformers class."""


def hf_architecture(config: ModelConfig) -> str:
    """'llama' | 'mistral' | 'gpt2' for `config`, or HFExportError naming the field that does not fit."""
    if config.position == "learned":
        family, target = "gpt2", "GPT2LMHeadModel (learned positions)"
        problems = [
            (config.norm != "layernorm", f"norm={config.norm!r} (GPT-2 uses LayerNorm)"),
            (config.mlp != "gelu", f"mlp={config.mlp!r} (GPT-2's MLP is GELU, not gated)"),
            (config.kv_heads != config.n_head, f"n_kv_head={config.kv_heads} (GPT-2 has no grouped-query attention)"),
            (config.sliding_window is not None, f"sliding_window={config.sliding_window} (GPT-2 has none)"),
        ]
    else:
        family = "llama" if config.sliding_window is None else "mistral"
        target = ("LlamaForCausalLM (rotary positions)" if family == "llama"
                  else "MistralForCausalLM (rotary positions + sliding window)")
        problems = [
            (config.norm != "rmsnorm", f"norm={config.norm!r} ({family} uses RMSNorm)"),
            (config.mlp != "swiglu", f"mlp={config.mlp!r} ({family}'s MLP is gated SiLU, i.e. swiglu)"),
            (family == "mistral" and config.bias, "bias=True (Mistral has no biases)"),
        ]
    problems += [
        (config.qk_norm, f"qk_norm=True ({family} has no query/key normalisation)"),
        (config.logit_softcap is not None, f"logit_softcap={config.logit_softcap} ({family} has no logit cap)"),
        (config.value_embedding, f"value_embedding=True ({family} has no value embeddings; train with --set value_embedding=false)"),
        (config.input_mix, f"input_mix=True ({family} blocks read the stream alone)"),
    ]
    for bad, field in problems:
        if bad:
            raise HFExportError(f"cannot export to hf as {target}: model config has {field}")
    return family


def hf_config(config: ModelConfig, family: str, *, bos_id: int, eos_id: int, dtype: str) -> dict[str, Any]:
    """The transformers config.json for `family`."""
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "bos_token_id": bos_id, "eos_token_id": eos_id, "torch_dtype": dtype, "dtype": dtype,
              "use_cache": True}
    if family == "gpt2":
        return {
            "architectures": [HF_CLASSES["gpt2"]], "model_type": "gpt2", **common,
            "n_positions": config.context_length, "n_ctx": config.context_length, "n_embd": config.d_model,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.ffn_dim,
            "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "initializer_range": 0.02,
        }
    values = {
        "architectures": [HF_CLASSES[family]],
        "model_type": family, **common,
        "hidden_size": config.d_model, "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "max_position_embeddings": config.context_length, "rms_norm_eps": config.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 rope_parameters: write both.
        "rope_theta": config.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_dropout": config.dropout, "initializer_range": 0.02,
    }
    if family == "llama":
        values.update(attention_bias=config.bias, mlp_bias=config.bias, pretraining_tp=1)
    else:
        values.update(sliding_window=config.sliding_window)
    return values


def hf_state_dict(config: ModelConfig, weights: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Our state dict renamed (and for GPT-2 transposed) to the transformers class's names."""
    return _gpt2_state_dict(config, weights) if family == "gpt2" else _llama_state_dict(config, weights)


def _llama_state_dict(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q_size, kv_size, F = config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.ffn_dim
    out = {"model.embed_tokens.weight": weights["tok_emb.weight"], "model.norm.weight": weights["norm_f.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = weights["lm_head.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = weights[ours + "norm1.weight"]
        out[theirs + "post_attention_layernorm.weight"] = weights[ours + "norm2.weight"]
        suffixes = ("weight", "bias") if config.bias else ("weight",)
        for suffix in suffixes:
            q, k, v = weights[f"{ours}attn.qkv.{suffix}"].split([q_size, kv_size, kv_size], dim=0)
            out[f"{theirs}self_attn.q_proj.{suffix}"] = q
            out[f"{theirs}self_attn.k_proj.{suffix}"] = k
            out[f"{theirs}self_attn.v_proj.{suffix}"] = v
            out[f"{theirs}self_attn.o_proj.{suffix}"] = weights[f"{ours}attn.proj.{suffix}"]
            gate, up = weights[f"{ours}mlp.fc.{suffix}"].split([F, F], dim=0)
            out[f"{theirs}mlp.gate_proj.{suffix}"] = gate
            out[f"{theirs}mlp.up_proj.{suffix}"] = up
            out[f"{theirs}mlp.down_proj.{suffix}"] = weights[f"{ours}mlp.proj.{suffix}"]
    return out


def _gpt2_state_dict(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def bias_of(name: str, size: int) -> torch.Tensor:
        # GPT-2 always has biases: a model without them gets zeros, which computes the same.
        return weights.get(name, torch.zeros(size))

    d = config.d_model
    out = {"transformer.wte.weight": weights["tok_emb.weight"], "transformer.wpe.weight": weights["pos_emb.weight"],
           "transformer.ln_f.weight": weights["norm_f.weight"],
           "transformer.ln_f.bias": bias_of("norm_f.bias", d)}
    if not config.tie_embeddings:
        out["lm_head.weight"] = weights["lm_head.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for our_norm, their_norm in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{theirs}{their_norm}.weight"] = weights[f"{ours}{our_norm}.weight"]
            out[f"{theirs}{their_norm}.bias"] = bias_of(f"{ours}{our_norm}.bias", d)
        for our_linear, their_conv in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                       ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            weight = weights[f"{ours}{our_linear}.weight"]  # (out, in)
            out[f"{theirs}{their_conv}.weight"] = weight.t().contiguous()  # Conv1D: (in, out)
            out[f"{theirs}{their_conv}.bias"] = bias_of(f"{ours}{our_linear}.bias", weight.shape[0])
    return out


def tokenizer_config(meta: dict[str, Any], context_length: int) -> dict[str, Any]:
    """tokenizer_config.json for `PreTrainedTokenizerFast` over our tokenizer.json."""
    from tinystories.tokenizer import EOT

    if meta.get("kind") == "llama2c":
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    return {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": context_length,
            "clean_up_tokenization_spaces": False, "add_prefix_space": False}


# --- the model card (README.md with the hub's YAML front matter) ----------------------------------

CARD_LICENSE = "mit"  # tinystories' own license; TinyStories itself is CDLA-Sharing-1.0 (see the card)
CARD_DATASET = "roneneldan/TinyStories"
SAMPLE_PROMPT = "Once upon a time"
SAMPLE_TOKENS = 120
UNKNOWN = "unknown"


@dataclass
class CardFacts:
    """What a model card states. Each figure is measured or read from the run; None means unknown."""

    name: str  # the model as the user named it to `export` (a run path or a shipped name)
    family: str  # 'llama' | 'mistral' | 'gpt2' (hf_architecture)
    config: ModelConfig
    tokenizer: str  # the tokenizer spec, e.g. bpe:4096
    parameters: int
    evaluation: dict[str, Any] | None  # the metrics.jsonl evaluation of the exported checkpoint
    command: str | None  # a `tinystories train` command that rebuilds the run's configuration
    eval_tokens: int | None  # validation tokens of each training evaluation (train.eval_tokens)
    origin: str | None  # where an imported model came from (checkpoint metadata 'source')
    sample: str  # a story the exported weights wrote, greedy from SAMPLE_PROMPT
    story_prefix: str  # what a prompt starts with for this tokenizer ('<|endoftext|>'; '' when it adds BOS)


def checkpoint_evaluation(records: list[dict[str, Any]], checkpoint: str) -> dict[str, Any] | None:
    """The metrics.jsonl evaluation the checkpoint holds: for 'best' the one with the lowest
    val_loss (the trainer saves best there), for 'last' the last one; None without evaluations."""
    evaluations = [record for record in records if record.get("val_loss") is not None]
    if not evaluations:
        return None
    return min(evaluations, key=lambda record: record["val_loss"]) if checkpoint == "best" else evaluations[-1]


def training_command(run_config: Any) -> str | None:
    """`tinystories train --preset P --data D --out RUN --set ...`: every model and train field that
    differs from the preset, so the command rebuilds config.json exactly; None without a preset."""
    if run_config.preset is None:
        return None
    parts = ["tinystories train", f"--preset {run_config.preset}", f"--data {run_config.data or 'DATA'}", "--out RUN"]
    parts += [f"--set {assignment}" for assignment in run_config.preset_differences()]
    return " \\\n    ".join(parts)


def model_card(facts: CardFacts) -> str:
    """README.md for the hub: YAML front matter (license, datasets, tags, model-index) + the card."""
    return f"---\n{card_metadata(facts).to_yaml()}\n---\n\n" + "\n".join(card_body(facts))


def card_metadata(facts: CardFacts):
    from huggingface_hub import EvalResult, ModelCardData

    bits_per_byte = facts.evaluation.get("val_bpb") if facts.evaluation else None
    results = None if bits_per_byte is None else [EvalResult(
        task_type="text-generation", dataset_type=CARD_DATASET, dataset_name="TinyStories", dataset_split="validation",
        metric_type="bits_per_byte", metric_value=round(float(bits_per_byte), 4),
        metric_name="validation bits per byte")]
    tags = ["tinystories", "text-generation", facts.family, "from-scratch"]
    return ModelCardData(language="en", license=CARD_LICENSE, library_name="transformers", pipeline_tag="text-generation",
                         datasets=[CARD_DATASET], tags=tags, model_name=Path(facts.name).name or facts.name,
                         eval_results=results)


def card_body(facts: CardFacts) -> list[str]:
    config = facts.config
    shape = (f"{config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads ({config.kv_heads} key/value), "
             f"context {config.context_length}, vocabulary {config.vocab_size}, "
             f"{'tied' if config.tie_embeddings else 'separate'} input/output embeddings")
    lines = [f"# {Path(facts.name).name or facts.name}", "",
             f"A {facts.parameters:,}-parameter `{HF_CLASSES[facts.family]}` for short children's stories, "
             "exported by `tinystories export --format hf`. It loads with transformers alone (no custom code).", "",
             "| | |", "|---|---|", f"| architecture | {shape} |", f"| parameters | {facts.parameters:,} |",
             f"| tokenizer | {facts.tokenizer} |", *evaluation_rows(facts), ""]
    lines += ["## How it was trained", "", *training_lines(facts), ""]
    sample_command = (f'tinystories generate {facts.name} --prompt "{SAMPLE_PROMPT}" --temperature 0 '
                      f"--max-new-tokens {SAMPLE_TOKENS}")
    lines += ["## A sample", "", f"Greedy, unedited, written by these weights (`{sample_command}`):", "",
              "```text", facts.sample.strip(), "```", ""]
    lines += usage_lines(facts.story_prefix) + ["## Data and license", "",
                              "TinyStories is by Ronen Eldan and Yuanzhi Li (arXiv:2305.07759), CDLA-Sharing-1.0. "
                              f"These weights: {CARD_LICENSE.upper()}.", ""]
    return lines


def evaluation_rows(facts: CardFacts) -> list[str]:
    record = facts.evaluation
    if record is None:
        return [f"| validation bits per byte | {UNKNOWN} (the run has no evaluations in metrics.jsonl) |",
                f"| training tokens | {UNKNOWN} |"]
    where = f"`val_bpb` at step {record['step']:,} in the run's metrics.jsonl"
    size = f"{facts.eval_tokens:,}-token" if facts.eval_tokens else "fixed"
    return [f"| validation bits per byte | {record['val_bpb']:.4f} ({where}: training's evaluation on a {size} "
            "slice of the validation split) |",
            f"| validation loss | {record['val_loss']:.4f} nats/token (same evaluation) |",
            f"| training tokens | {record['tokens']:,} (by step {record['step']:,}) |"]


def training_lines(facts: CardFacts) -> list[str]:
    if facts.command is None:
        origin = f" It was imported from {facts.origin}." if facts.origin else ""
        return [f"The training command is {UNKNOWN}: the run's config.json names no preset.{origin}"]
    return ["With tinystories' `train` command; this one rebuilds the "
            "run's config.json exactly (every setting that differs from the preset; `--data` is the folder the "
            "run read, made by `tinystories data prepare`):", "", "```bash", facts.command, "```"]


def usage_lines(story_prefix: str) -> list[str]:
    return ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model_id = "path/to/this/folder"  # or its repository id on the hub',
            "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            "model = AutoModelForCausalLM.from_pretrained(model_id)",
            f'ids = tokenizer("{story_prefix}{SAMPLE_PROMPT}", return_tensors="pt").input_ids'
            + ("  # stories follow <|endoftext|>" if story_prefix else "  # the tokenizer adds <s>"),
            "out = model.generate(ids, max_new_tokens=200, do_sample=True, temperature=0.8, top_k=40)",
            "print(tokenizer.decode(out[0], skip_special_tokens=True))", "```", ""]
