"""GGUF export (llama.cpp's file format) for Llama-style models, tokenizer embedded.

Written with the `gguf` package (llama.cpp's own Python writer). llama.cpp's `llama` architecture
rotates adjacent pairs (Meta's original layout), so q/k rows are permuted from our 'rotate halves'
layout exactly as llama.cpp's convert_hf_to_gguf.py does. Byte-level BPE tokenizers ('bpe',
'gpt2', 'bytes') are embedded as tokenizer.ggml.model 'gpt2' (tokens in GPT-2's byte-to-unicode
alphabet, merges "a b"); an imported llama2.c vocabulary as 'llama' (sentencepiece pieces, scores).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from tinystories.config import ModelConfig
from tinystories.errors import UserError
from tinystories.llama2c import halves_to_pairs
from tinystories.tokenizer import merge_pair
from tinystories.vocab_bin import BYTE_PIECE

ARCH = "llama"


class GGUFExportError(UserError):
    """The model or tokenizer cannot be written as a llama.cpp 'llama' GGUF."""


def check_gguf_compatible(config: ModelConfig) -> None:
    problems = [
        (config.position != "rope", f"position={config.position!r} (llama uses RoPE)"),
        (config.norm != "rmsnorm", f"norm={config.norm!r} (llama uses RMSNorm)"),
        (config.mlp != "swiglu", f"mlp={config.mlp!r} (llama's feed-forward is gated SiLU)"),
        (config.bias, "bias=True (this exporter writes no bias tensors)"),
        (config.sliding_window is not None, f"sliding_window={config.sliding_window} (llama attends to all positions)"),
        (config.qk_norm, "qk_norm=True (llama has no query/key normalisation)"),
        (config.logit_softcap is not None, f"logit_softcap={config.logit_softcap} (llama has no logit cap)"),
        (config.value_embedding, "value_embedding=True (llama has no value embeddings; train with --set value_embedding=false)"),
        (config.input_mix, "input_mix=True (llama blocks read the stream alone)"),
    ]
    for bad, field in problems:
        if bad:
            raise GGUFExportError(f"cannot export to gguf (llama architecture): model config has {field}")


def gguf_tensors(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> tensor (numpy order: (out, in) like nn.Linear), q/k in the pairs layout."""
    H, K, D, F = config.n_head, config.kv_heads, config.head_dim, config.ffn_dim
    tensors = {"token_embd.weight": weights["tok_emb.weight"], "output_norm.weight": weights["norm_f.weight"]}
    if not config.tie_embeddings:
        tensors["output.weight"] = weights["lm_head.weight"]  # tied: llama.cpp reuses token_embd
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        q, k, v = weights[ours + "attn.qkv.weight"].split([H * D, K * D, K * D], dim=0)
        gate, up = weights[ours + "mlp.fc.weight"].split([F, F], dim=0)
        tensors.update({
            theirs + "attn_norm.weight": weights[ours + "norm1.weight"],
            theirs + "attn_q.weight": halves_to_pairs(q, H),
            theirs + "attn_k.weight": halves_to_pairs(k, K),
            theirs + "attn_v.weight": v,
            theirs + "attn_output.weight": weights[ours + "attn.proj.weight"],
            theirs + "ffn_norm.weight": weights[ours + "norm2.weight"],
            theirs + "ffn_gate.weight": gate,
            theirs + "ffn_up.weight": up,
            theirs + "ffn_down.weight": weights[ours + "mlp.proj.weight"],
        })
    return tensors


def gguf_vocab(tokenizer_json: dict[str, Any], meta: dict[str, Any], vocab_size: int,
               scores: list[float] | None = None) -> dict[str, Any]:
    """Tokenizer metadata for llama.cpp: model, tokens, token types, merges or scores, special ids.

    `scores` (sentencepiece piece scores) are needed for the 'llama2c' kind.
    """
    import gguf

    model = tokenizer_json["model"]
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for token, token_id in model["vocab"].items():
        if token_id < vocab_size:
            tokens[token_id] = token
    special_ids = set()
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            if added.get("special", True):
                special_ids.add(added["id"])
    for token_id in special_ids:
        types[token_id] = int(gguf.TokenType.CONTROL)
    for token_id, token in enumerate(tokens):
        if token is None:  # the model's embedding is larger than the tokenizer: padding ids
            tokens[token_id] = f"[PAD{token_id}]"
            types[token_id] = int(gguf.TokenType.UNUSED)
    if meta.get("kind") == "llama2c":
        if scores is None:
            raise GGUFExportError("a llama2c tokenizer needs its scores (tokenizer.bin) for gguf export")
        types[0] = int(gguf.TokenType.UNKNOWN)
        for token_id, token in enumerate(tokens):
            if BYTE_PIECE.fullmatch(token.encode("utf-8")):
                types[token_id] = int(gguf.TokenType.BYTE)
        return {"model": "llama", "pre": "default", "tokens": tokens, "types": types,
                "scores": list(scores[:vocab_size]) + [0.0] * (vocab_size - len(scores)), "merges": None,
                "bos": 1, "eos": 2, "unk": 0, "add_bos": True}
    merges = [" ".join(merge_pair(merge)) for merge in model.get("merges", [])]  # GGUF spells them "a b"
    pre_tokenizer = tokenizer_json.get("pre_tokenizer") or {}
    regex = pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True)
    eot = int(meta["eot_id"])
    return {"model": "gpt2", "pre": "gpt-2" if regex else "default", "tokens": tokens, "types": types,
            "scores": None, "merges": merges, "bos": eot, "eos": eot, "unk": None, "add_bos": False}


def write_gguf(path: str | os.PathLike, config: ModelConfig, weights: dict[str, torch.Tensor],
               tokenizer_json: dict[str, Any], meta: dict[str, Any], *, scores: list[float] | None = None,
               dtype: str = "float32", name: str = "tinystories") -> None:
    """Write a llama.cpp GGUF file to `path` (the caller makes it atomic)."""
    import gguf

    check_gguf_compatible(config)
    if dtype not in ("float32", "float16"):
        raise GGUFExportError(f"--dtype {dtype}: gguf export writes float32 or float16")
    vocab = gguf_vocab(tokenizer_json, meta, config.vocab_size, scores)
    writer = gguf.GGUFWriter(str(path), arch=ARCH)
    writer.add_name(name)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        writer.add_token_scores(vocab["scores"])
    if vocab["merges"] is not None:
        writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    if vocab["unk"] is not None:
        writer.add_unk_token_id(vocab["unk"])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(False)
    for tensor_name, tensor in gguf_tensors(config, weights).items():
        array = tensor.detach().float().cpu().numpy()
        # llama.cpp keeps 1-D tensors (norm weights) in float32 whatever the file type.
        if dtype == "float16" and array.ndim > 1:
            array = array.astype(np.float16)
        writer.add_tensor(tensor_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
