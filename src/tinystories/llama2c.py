"""karpathy's llama2.c formats: the legacy (version 0) `.bin` checkpoint and `tokenizer.bin`.

Checkpoint (`run.c`'s `read_checkpoint`): a header of 7 int32s

    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len

(vocab_size < 0 means a separate classifier matrix follows the other weights), then float32 arrays:

    token_embedding (V, dim), rms_att (L, dim), wq (L, H*D, dim), wk (L, K*D, dim), wv (L, K*D, dim),
    wo (L, dim, H*D), rms_ffn (L, dim), w1 (L, F, dim), w2 (L, dim, F), w3 (L, F, dim), rms_final (dim),
    freq_cis_real (seq_len, D/2), freq_cis_imag (seq_len, D/2), [wcls (V, dim)]

Matrices are row-major (out, in), like `nn.Linear.weight`. llama2.c rotates adjacent pairs
(x[2i], x[2i+1]); our model rotates halves (x[i], x[i + D/2]), so wq/wk rows are permuted on the
way out and back on the way in. run.c hard-codes RMSNorm eps 1e-5, RoPE theta 10000 and SwiGLU.

The tokenizer.bin format and llama2.c's own sentencepiece vocabulary (`Llama2cTokenizer`) live in
vocab_bin.py. Our byte-level BPEs go into the same file with another layout
(`byte_level_vocab_order`): <|endoftext|> at id 1 and byte b at id 3 + b; importing such a file
rebuilds the byte-level BPE (`byte_level_tokenizer_from_pieces`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from tinystories.config import ModelConfig
from tinystories.tokenizer import (EOT, BPETokenizer, byte_level_tokenizer, bytes_to_unicode, merge_pair,
                                   symbol_bytes, unicode_to_bytes)
from tinystories.vocab_bin import BYTE_PIECE, Llama2cError

HEADER = struct.Struct("<7i")
LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's newer (version >= 1) export formats start with it
NORM_EPS = 1e-5  # run.c: rmsnorm adds 1e-5
ROPE_THETA = 10000.0  # run.c: powf(10000.0f, ...)
_SYMBOL_OF_BYTE = bytes_to_unicode()

# --- rotary layouts -------------------------------------------------------------------------------


def halves_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from 'rotate halves' (HF) to 'adjacent pairs' (Meta, llama2.c, GGUF).

    Within each head, row i of the first half and row i of the second half rotate together;
    they become rows 2i and 2i+1. weight: (n_heads * D, ...) -> same shape.
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(rows, *rest)


def pairs_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `halves_to_pairs` (what HF's convert_llama_weights_to_hf calls `permute`)."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


# --- checkpoint -----------------------------------------------------------------------------------


def check_llama2c_compatible(config: ModelConfig) -> None:
    """Raise Llama2cError naming the first field llama2.c's run.c cannot express."""
    problems = [
        (config.position != "rope", f"position={config.position!r} (llama2.c uses RoPE)"),
        (config.norm != "rmsnorm", f"norm={config.norm!r} (llama2.c uses RMSNorm)"),
        (config.mlp != "swiglu", f"mlp={config.mlp!r} (llama2.c uses SwiGLU)"),
        (config.bias, "bias=True (llama2.c has no biases)"),
        (config.sliding_window is not None, f"sliding_window={config.sliding_window} (llama2.c attends to all positions)"),
        (config.rope_theta != ROPE_THETA, f"rope_theta={config.rope_theta:g} (run.c hard-codes 10000)"),
        (config.norm_eps != NORM_EPS, f"norm_eps={config.norm_eps:g} (run.c hard-codes 1e-5)"),
        (config.qk_norm, "qk_norm=True (run.c has no query/key normalisation)"),
        (config.logit_softcap is not None, f"logit_softcap={config.logit_softcap} (run.c has no logit cap)"),
        (config.value_embedding, "value_embedding=True (run.c has no value embeddings; train with --set value_embedding=false)"),
        (config.input_mix, "input_mix=True (run.c blocks read the stream alone)"),
    ]
    for bad, field in problems:
        if bad:
            raise Llama2cError(f"cannot export to llama2c: model config has {field}")


def llama2c_arrays(config: ModelConfig, weights: dict[str, torch.Tensor],
                   vocab_order: Sequence[int] | None = None) -> tuple[bytes, list[np.ndarray]]:
    """(header bytes, float32 arrays in file order) for a Llama-style model's state dict.

    `vocab_order[new_id] = our_id` relabels the vocabulary (rows of the embedding and classifier).
    """
    check_llama2c_compatible(config)
    if vocab_order is not None:
        rows = torch.as_tensor(list(vocab_order))
        weights = dict(weights, **{"tok_emb.weight": weights["tok_emb.weight"][rows],
                                   "lm_head.weight": weights["lm_head.weight"][rows]})
    H, K, D, F, L = config.n_head, config.kv_heads, config.head_dim, config.ffn_dim, config.n_layer
    q_size, kv_size = H * D, K * D

    def layers(fn) -> np.ndarray:
        return np.stack([fn(i).detach().float().cpu().numpy() for i in range(L)])

    def qkv(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return weights[f"blocks.{i}.attn.qkv.weight"].split([q_size, kv_size, kv_size], dim=0)

    def fc(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return weights[f"blocks.{i}.mlp.fc.weight"].split([F, F], dim=0)  # gate (w1), up (w3)

    # The RoPE tables exactly as llama2.c's model.py precomputes them (float32); run.c skips them.
    inverse_frequency = 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2)[: D // 2].float() / D))
    angles = torch.outer(torch.arange(config.context_length), inverse_frequency).float()  # (seq_len, D/2)
    untied = not config.tie_embeddings
    arrays = [
        weights["tok_emb.weight"].float().numpy(),
        layers(lambda i: weights[f"blocks.{i}.norm1.weight"]),
        layers(lambda i: halves_to_pairs(qkv(i)[0], H)),
        layers(lambda i: halves_to_pairs(qkv(i)[1], K)),
        layers(lambda i: qkv(i)[2]),
        layers(lambda i: weights[f"blocks.{i}.attn.proj.weight"]),
        layers(lambda i: weights[f"blocks.{i}.norm2.weight"]),
        layers(lambda i: fc(i)[0]),
        layers(lambda i: weights[f"blocks.{i}.mlp.proj.weight"]),
        layers(lambda i: fc(i)[1]),
        weights["norm_f.weight"].float().numpy(),
        torch.cos(angles).numpy(),
        torch.sin(angles).numpy(),
    ]
    if untied:
        arrays.append(weights["lm_head.weight"].float().numpy())
    vocab = -config.vocab_size if untied else config.vocab_size
    header = HEADER.pack(config.d_model, F, L, H, K, vocab, config.context_length)
    return header, [np.ascontiguousarray(a, dtype="<f4") for a in arrays]


def write_llama2c_bin(path: str | os.PathLike, config: ModelConfig, weights: dict[str, torch.Tensor],
                      vocab_order: Sequence[int] | None = None) -> None:
    """Write the legacy llama2.c checkpoint to `path` (the caller makes it atomic)."""
    header, arrays = llama2c_arrays(config, weights, vocab_order)
    with open(path, "wb") as file:
        file.write(header)
        for array in arrays:
            file.write(array.tobytes())


@dataclass
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # absolute value
    seq_len: int
    shared_classifier: bool

    def expected_floats(self) -> int:
        dim, F, L, V = self.dim, self.hidden_dim, self.n_layers, self.vocab_size
        head_size = dim // self.n_heads
        kv_dim = self.n_kv_heads * head_size
        count = V * dim + L * dim * 2 + L * dim * (dim + 2 * kv_dim + dim) + L * 3 * dim * F + dim
        count += self.seq_len * head_size  # freq_cis_real + freq_cis_imag, seq_len * D/2 each
        return count + (0 if self.shared_classifier else V * dim)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size, context_length=self.seq_len, n_layer=self.n_layers,
            n_head=self.n_heads, n_kv_head=None if self.n_kv_heads == self.n_heads else self.n_kv_heads,
            d_model=self.dim, d_ff=self.hidden_dim, norm="rmsnorm", norm_eps=NORM_EPS, position="rope",
            rope_theta=ROPE_THETA, mlp="swiglu", bias=False, dropout=0.0,
            tie_embeddings=self.shared_classifier, sliding_window=None,
        )


def read_llama2c_header(path: Path) -> Llama2cHeader:
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            raw = file.read(HEADER.size)
    except OSError as error:
        raise Llama2cError(f"{path}: cannot read ({error.strerror or error})") from None
    if len(raw) < HEADER.size:
        raise Llama2cError(f"{path}: {size} bytes is too short for a llama2.c checkpoint header (28 bytes)")
    values = HEADER.unpack(raw)
    if values[0] == LLAMA2C_MAGIC:
        raise Llama2cError(f"{path}: a llama2.c version>=1 export (magic 'ak42'); "
                           "only the legacy version-0 format (export.py --version 0) is supported")
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len = values
    if min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0 or vocab == 0:
        raise Llama2cError(f"{path}: not a llama2.c checkpoint (header {list(values)} has non-positive sizes)")
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise Llama2cError(f"{path}: not a llama2.c checkpoint (dim {dim}, n_heads {n_heads}, "
                           f"n_kv_heads {n_kv_heads} do not divide evenly)")
    header = Llama2cHeader(dim, hidden_dim, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len, vocab > 0)
    expected = HEADER.size + 4 * header.expected_floats()
    if size != expected:
        raise Llama2cError(f"{path}: size {size} bytes does not match its header "
                           f"(dim={dim} hidden_dim={hidden_dim} n_layers={n_layers} vocab_size={vocab} "
                           f"seq_len={seq_len} needs {expected} bytes): truncated or not a llama2.c file")
    return header


class _FloatReader:
    """Consecutive arrays out of one flat float32 array, in file order."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.position = 0

    def take(self, *shape: int) -> torch.Tensor:
        count = int(np.prod(shape))
        array = self.data[self.position:self.position + count].reshape(shape)
        self.position += count
        return torch.from_numpy(array.astype(np.float32))


def read_llama2c_bin(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state dict) from a legacy llama2.c checkpoint; Llama2cError if malformed."""
    path = Path(path)
    header = read_llama2c_header(path)
    config = header.model_config()
    data = _FloatReader(np.fromfile(path, dtype="<f4", offset=HEADER.size))
    H, K, D, F, L, C, V = (header.n_heads, header.n_kv_heads, config.head_dim, header.hidden_dim,
                           header.n_layers, header.dim, header.vocab_size)
    take = data.take
    token_embedding = take(V, C)
    rms_att, wq, wk, wv = take(L, C), take(L, H * D, C), take(L, K * D, C), take(L, K * D, C)
    wo, rms_ffn = take(L, C, H * D), take(L, C)
    w1, w2, w3 = take(L, F, C), take(L, C, F), take(L, F, C)
    rms_final = take(C)
    take(header.seq_len, D // 2), take(header.seq_len, D // 2)  # RoPE tables: recomputed by the model
    weights = {"tok_emb.weight": token_embedding, "norm_f.weight": rms_final}
    for i in range(L):
        q, k = pairs_to_halves(wq[i], H), pairs_to_halves(wk[i], K)
        weights[f"blocks.{i}.norm1.weight"] = rms_att[i].clone()
        weights[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, wv[i]], dim=0)
        weights[f"blocks.{i}.attn.proj.weight"] = wo[i].clone()
        weights[f"blocks.{i}.norm2.weight"] = rms_ffn[i].clone()
        weights[f"blocks.{i}.mlp.fc.weight"] = torch.cat([w1[i], w3[i]], dim=0)  # rows [gate; up]
        weights[f"blocks.{i}.mlp.proj.weight"] = w2[i].clone()
    if not header.shared_classifier:
        weights["lm_head.weight"] = take(V, C)
    return config, weights


# --- our byte-level vocabulary in tokenizer.bin ---------------------------------------------------


def byte_level_vocab_order(tokenizer_json: dict[str, Any], vocab_size: int, eot_id: int) -> list[int]:
    """order[llama2c_id] = our id, laying a byte-level vocabulary out the way run.c assumes.

    run.c prepends id 1 (BOS) to every prompt and stops generating when id 1 comes out: our EOT,
    the story separator, goes there. run.c encodes a character missing from the vocabulary as
    ids 3 + byte (sentencepiece byte fallback): byte b's token goes to id 3 + b. Every other token
    keeps its relative order in the remaining ids.
    """
    byte_of = unicode_to_bytes()
    order: list[int | None] = [None] * vocab_size
    order[1] = eot_id
    for token, token_id in tokenizer_json["model"]["vocab"].items():
        if len(token) == 1 and token in byte_of and 3 + byte_of[token] < vocab_size and token_id != eot_id:
            order[3 + byte_of[token]] = token_id
    placed = {token_id for token_id in order if token_id is not None}
    remaining = iter(token_id for token_id in range(vocab_size) if token_id not in placed)
    return [token_id if token_id is not None else next(remaining) for token_id in order]


def byte_level_pieces(tokenizer_json: dict[str, Any], vocab_size: int) -> tuple[list[bytes], list[float]]:
    """llama2.c pieces and scores for a byte-level BPE (our 'bpe'/'gpt2' kinds).

    Each piece is the token's decoded bytes; special tokens are their text. run.c merges the
    adjacent pair with the highest score, so a merged token scores -(its merge rank); others 0.
    Ids past the tokenizer's vocabulary (a padded embedding) get empty pieces.
    """
    model = tokenizer_json["model"]
    pieces: list[bytes] = [b""] * vocab_size
    scores: list[float] = [0.0] * vocab_size
    for token, token_id in model["vocab"].items():
        # A token outside the byte-level alphabet is an unused id's placeholder (see
        # `byte_level_tokenizer_from_pieces`): it stands for no bytes, like a padded id.
        piece = symbol_bytes(token)
        if token_id < vocab_size and piece is not None:
            pieces[token_id] = piece
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < vocab_size:
            pieces[added["id"]] = added["content"].encode("utf-8")
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge_pair(merge)
        merged_id = model["vocab"].get(left + right)
        if merged_id is not None and merged_id < vocab_size and scores[merged_id] == 0.0:
            scores[merged_id] = -float(rank + 1)
    return pieces, scores


def is_byte_level_vocab(pieces: Sequence[bytes]) -> bool:
    """True for a vocabulary laid out by `byte_level_vocab_order` (our byte-level export).

    Token 3 + b is exactly the single byte b for every b, and there is no sentencepiece byte-fallback
    piece "<0xXX>" (a sentencepiece vocabulary holds those at ids 3..258 instead).
    """
    return (len(pieces) >= 3 + 256 and all(pieces[3 + byte] == bytes([byte]) for byte in range(256))
            and not any(BYTE_PIECE.fullmatch(piece) for piece in pieces))


def _bpe_parts(piece: bytes, merge_ranks: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """`piece` split into tokens by the merges in `merge_ranks`, the way a BPE encoder does it:
    repeatedly merge the adjacent pair whose merge comes first."""
    parts = [bytes([byte]) for byte in piece]
    while len(parts) > 1:
        ranked = [(merge_ranks.get(pair), index) for index, pair in enumerate(zip(parts, parts[1:]))]
        ranked = [(rank, index) for rank, index in ranked if rank is not None]
        if not ranked:
            break
        _, index = min(ranked)
        parts[index:index + 2] = [parts[index] + parts[index + 1]]
    return parts


def _merge_split(piece: bytes, merge_ranks: dict[tuple[bytes, bytes], int],
                 known: set[bytes]) -> tuple[bytes, bytes] | None:
    """The pair of earlier tokens whose merge made `piece`, or None if no split has both halves.

    With one candidate split it is that one. With several (e.g. 'abc' = 'ab'+'c' = 'a'+'bc') the
    training merge is the split a BPE encoder gives `piece` with the merges before it: the trainer
    tokenized its text with exactly those merges when it found the pair. Recovering the merges this
    way is what makes the rebuilt tokenizer encode like the original, not just decode like it.
    """
    candidates = [(piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                  if piece[:cut] in known and piece[cut:] in known]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    parts = _bpe_parts(piece, merge_ranks)
    if len(parts) == 2 and (parts[0], parts[1]) in candidates:
        return parts[0], parts[1]
    return candidates[0]  # not a vocabulary a BPE trainer made: any split still decodes exactly


def byte_level_tokenizer_from_pieces(pieces: Sequence[bytes], scores: Sequence[float],
                                     source: str = "tokenizer.bin") -> BPETokenizer:
    """Rebuild our byte-level BPE (kind 'bpe') from a tokenizer.bin our exporter wrote.

    The ids stay those of the file (EOT at 1, byte b at 3 + b), so the imported model and tokenizer
    agree. Merged tokens score -(merge rank + 1) (`byte_level_pieces`); each becomes a merge of the
    two earlier tokens that make it up (`_merge_split`), in rank order. Ids with an empty piece
    (a padded embedding) below the last real token get a placeholder the encoder can never produce
    (its first character is outside the byte-level alphabet); empty ones after it are left out, as
    a padded model's tokenizer does. Works for the 'bytes' kind too (no merges).

    Assumption: tokenizer.bin stores no pre-tokenizer. The rebuilt one is the standard ByteLevel
    (GPT-2 regex, no prefix space) that our 'bpe' and 'gpt2' kinds use; a byte-level BPE trained
    with another pre-tokenization would decode exactly but might split text differently.
    """
    from tokenizers import AddedToken, models

    if pieces[1] != EOT.encode("utf-8"):
        raise Llama2cError(f"{source}: a byte-level vocabulary (byte b at id 3 + b) but token 1 is "
                           f"{pieces[1][:40]!r}, not {EOT}: not written by tinystories' llama2c export")
    used = max(token_id for token_id, piece in enumerate(pieces) if piece) + 1
    vocab = _byte_level_vocab(pieces[:used], source)
    merges = [(_symbols(left), _symbols(right)) for left, right in _recovered_merges(pieces[:used], scores, source)]
    hf_tokenizer = byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf_tokenizer.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return BPETokenizer(hf_tokenizer, "bpe", f"bpe:{used}")


def _symbols(piece: bytes) -> str:
    """`piece` in the byte-level alphabet (`bytes_to_unicode`), as tokenizer.json spells tokens."""
    return "".join(_SYMBOL_OF_BYTE[byte] for byte in piece)


def _byte_level_vocab(pieces: Sequence[bytes], source: str) -> dict[str, int]:
    """tokenizer.json's vocab for `pieces`: EOT at id 1, a placeholder for each empty (unused) id."""
    vocab: dict[str, int] = {}
    for token_id, piece in enumerate(pieces):
        if token_id == 1:
            string = EOT
        elif not piece:
            string = f"\ufffd<unused{token_id}>"
        else:
            string = _symbols(piece)
        if string in vocab:
            raise Llama2cError(f"{source}: token {token_id} repeats piece {string!r} of token {vocab[string]}")
        vocab[string] = token_id
    return vocab


def _recovered_merges(pieces: Sequence[bytes], scores: Sequence[float], source: str) -> list[tuple[bytes, bytes]]:
    """The BPE merges (left, right) that made the multi-byte pieces, first merge first."""
    merged = [token_id for token_id, piece in enumerate(pieces) if token_id != 1 and len(piece) > 1]
    for token_id in merged:
        if scores[token_id] >= 0:
            raise Llama2cError(f"{source}: token {token_id} ({pieces[token_id][:40]!r}) is several bytes but "
                               f"has score {scores[token_id]:g}; a merged token scores -(merge rank + 1)")
    merged.sort(key=lambda token_id: (-scores[token_id], token_id))  # first merge first
    known = {bytes([byte]) for byte in range(256)}
    merge_ranks: dict[tuple[bytes, bytes], int] = {}
    for rank, token_id in enumerate(merged):
        piece = pieces[token_id]
        split = _merge_split(piece, merge_ranks, known)
        if split is None:
            raise Llama2cError(f"{source}: token {token_id} ({piece[:40]!r}) is no merge of two earlier tokens")
        merge_ranks.setdefault(split, rank)
        known.add(piece)
    return sorted(merge_ranks, key=merge_ranks.__getitem__)
