"""Hugging Face `transformers` export: config.json + model.safetensors + tokenizer files.

The directory loads with `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, no custom code:

* rotary positions + RMSNorm + SwiGLU -> `LlamaForCausalLM` (biases become attention_bias/mlp_bias)
* the same with a sliding window -> `MistralForCausalLM` (no biases there)
* learned positions + LayerNorm + GELU (tanh) -> `GPT2LMHeadModel`. GPT-2's `Conv1D` stores weights
  as (in, out), the transpose of `nn.Linear`; its `c_attn` fuses [q; k; v] like our `qkv`; it always
  has LayerNorm and linear biases, so a model without biases gets zeros.

Anything else is refused with the name of the field the target class cannot express.
"""

from __future__ import annotations

from typing import Any

import torch

from tinystories.config import ModelConfig
from tinystories.errors import UserError


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
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_positions": config.context_length, "n_ctx": config.context_length, "n_embd": config.d_model,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": config.ffn_dim,
            "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "initializer_range": 0.02,
        }
    values = {
        "architectures": ["LlamaForCausalLM" if family == "llama" else "MistralForCausalLM"],
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
