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

Tokenizer (`run.c`'s `build_tokenizer`): int32 max_token_length, then per token: float32 score,
int32 length, the piece's bytes. Pieces come from sentencepiece with '▁' written as ' '; <s> is
written as "\\n<s>\\n", </s> as "\\n</s>\\n", and 256 byte-fallback pieces "<0x00>".."<0xFF>" follow.
Our own byte-level export (`byte_level_vocab_order`) writes <|endoftext|> at id 1 and byte b at id
3 + b instead; importing such a file rebuilds the byte-level BPE (`byte_level_tokenizer_from_pieces`).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from tinystories.config import ModelConfig
from tinystories.errors import UserError
from tinystories.files import atomic_path, write_json_atomic, write_text_atomic

HEADER = struct.Struct("<7i")
LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's newer (version >= 1) export formats start with it
NORM_EPS = 1e-5  # run.c: rmsnorm adds 1e-5
ROPE_THETA = 10000.0  # run.c: powf(10000.0f, ...)
BOS_PIECE, EOS_PIECE = b"\n<s>\n", b"\n</s>\n"
SPIECE_SPACE = "\u2581"  # sentencepiece's '▁'
BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
TOKENIZER_BIN = "tokenizer.bin"


class Llama2cError(UserError):
    """A llama2.c file is malformed, or a model cannot be written in llama2.c's format."""


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


def read_llama2c_bin(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, our state dict) from a legacy llama2.c checkpoint; Llama2cError if malformed."""
    path = Path(path)
    header = read_llama2c_header(path)
    config = header.model_config()
    data = np.fromfile(path, dtype="<f4", offset=HEADER.size)
    H, K, D, F, L, C, V = (header.n_heads, header.n_kv_heads, config.head_dim, header.hidden_dim,
                           header.n_layers, header.dim, header.vocab_size)
    position = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal position
        count = int(np.prod(shape))
        array = data[position:position + count].reshape(shape)
        position += count
        return torch.from_numpy(array.astype(np.float32))

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


# --- tokenizer.bin --------------------------------------------------------------------------------


def read_tokenizer_bin(path: str | os.PathLike, vocab_size: int | None = None) -> tuple[list[bytes], list[float], int]:
    """(pieces, scores, max_token_length) of a llama2.c tokenizer.bin.

    The file does not store its size: with `vocab_size` exactly that many tokens are read (as run.c
    does) and trailing bytes are an error; without, tokens are read to the end of the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise Llama2cError(f"{path}: cannot read ({error.strerror or error})") from None
    if len(raw) < 4:
        raise Llama2cError(f"{path}: too short for a llama2.c tokenizer.bin")
    (max_token_length,) = struct.unpack_from("<i", raw, 0)
    offset, pieces, scores = 4, [], []
    while offset < len(raw) and (vocab_size is None or len(pieces) < vocab_size):
        if offset + 8 > len(raw):
            raise Llama2cError(f"{path}: truncated at token {len(pieces)} (offset {offset})")
        score, length = struct.unpack_from("<fi", raw, offset)
        offset += 8
        if length < 0 or offset + length > len(raw) or length > max(max_token_length, 0):
            raise Llama2cError(f"{path}: token {len(pieces)} has a bad length {length} "
                               f"(max_token_length {max_token_length}); not a llama2.c tokenizer.bin")
        pieces.append(raw[offset:offset + length])
        scores.append(score)
        offset += length
    if vocab_size is not None and len(pieces) < vocab_size:
        raise Llama2cError(f"{path}: holds {len(pieces)} tokens but the model has vocab_size {vocab_size}")
    if offset != len(raw):
        raise Llama2cError(f"{path}: {len(raw) - offset} bytes left after {len(pieces)} tokens "
                           f"(the model has vocab_size {vocab_size}): tokenizer and model do not match")
    return pieces, scores, max_token_length


def write_tokenizer_bin(path: str | os.PathLike, pieces: Sequence[bytes], scores: Sequence[float]) -> None:
    max_token_length = max((len(piece) for piece in pieces), default=0)
    with open(path, "wb") as file:
        file.write(struct.pack("<i", max_token_length))
        for piece, score in zip(pieces, scores):
            file.write(struct.pack("<fi", score, len(piece)))
            file.write(piece)


def byte_level_vocab_order(tokenizer_json: dict[str, Any], vocab_size: int, eot_id: int) -> list[int]:
    """order[llama2c_id] = our id, laying a byte-level vocabulary out the way run.c assumes.

    run.c prepends id 1 (BOS) to every prompt and stops generating when id 1 comes out: our EOT,
    the story separator, goes there. run.c encodes a character missing from the vocabulary as
    ids 3 + byte (sentencepiece byte fallback): byte b's token goes to id 3 + b. Every other token
    keeps its relative order in the remaining ids.
    """
    from tinystories.tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
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
    from tinystories.tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    model = tokenizer_json["model"]
    pieces: list[bytes] = [b""] * vocab_size
    scores: list[float] = [0.0] * vocab_size
    for token, token_id in model["vocab"].items():
        # A token outside the byte-level alphabet is an unused id's placeholder (see
        # `byte_level_tokenizer_from_pieces`): it stands for no bytes, like a padded id.
        if token_id < vocab_size and all(char in byte_of for char in token):
            pieces[token_id] = bytes(byte_of[char] for char in token)
    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < vocab_size:
            pieces[added["id"]] = added["content"].encode("utf-8")
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
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
                                     source: str = "tokenizer.bin"):
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

    from tinystories.tokenizer import EOT, BPETokenizer, byte_level_tokenizer, bytes_to_unicode

    if pieces[1] != EOT.encode("utf-8"):
        raise Llama2cError(f"{source}: a byte-level vocabulary (byte b at id 3 + b) but token 1 is "
                           f"{pieces[1][:40]!r}, not {EOT}: not written by tinystories' llama2c export")
    symbol = bytes_to_unicode()
    used = max(token_id for token_id, piece in enumerate(pieces) if piece) + 1
    strings: list[str] = []
    for token_id, piece in enumerate(pieces[:used]):
        if token_id == 1:
            strings.append(EOT)
        elif not piece:
            strings.append(f"\ufffd<unused{token_id}>")
        else:
            strings.append("".join(symbol[byte] for byte in piece))
    vocab: dict[str, int] = {}
    for token_id, string in enumerate(strings):
        if string in vocab:
            raise Llama2cError(f"{source}: token {token_id} repeats piece {string!r} of token {vocab[string]}")
        vocab[string] = token_id
    merged = [token_id for token_id, piece in enumerate(pieces[:used])
              if token_id != 1 and len(piece) > 1]
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
    merges = [("".join(symbol[b] for b in left), "".join(symbol[b] for b in right))
              for (left, right), _ in sorted(merge_ranks.items(), key=lambda item: item[1])]
    hf_tokenizer = byte_level_tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf_tokenizer.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return BPETokenizer(hf_tokenizer, "bpe", f"bpe:{used}")


class Llama2cTokenizer:
    """llama2.c's sentencepiece-style vocabulary with our tokenizer interface.

    Encoding follows run.c's `encode` (a '▁' dummy prefix, per-character lookup with <0xXX> byte
    fallback, then merges by score) through a Hugging Face `tokenizers` BPE built from the pieces.

    `eot_id` is BOS (id 1), not </s> (id 2): llama2.c's models were trained with BOS before every
    story and never saw </s>, and run.c prepends BOS to the prompt and stops when BOS comes out.
    So our convention ([eot_id] + encode(prompt), stop at eot_id) gives exactly run.c's tokens.
    `encode` adds no special token (the HF tokenizer.json's post-processor adds BOS for
    transformers users, as Llama's does). `decode` follows run.c's `decode`: BOS and EOS print
    nothing, a leading space is dropped right after BOS, <0xXX> pieces are raw bytes, and
    unprintable single ASCII bytes are skipped (run.c's `safe_printf`); bytes >= 0x80 are kept so
    UTF-8 text survives (run.c drops them).
    """

    kind = "llama2c"
    spec = "llama2c"

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], source: str = "tokenizer.bin") -> None:
        if len(pieces) < 3 or pieces[1] != BOS_PIECE or pieces[2] != EOS_PIECE:
            raise Llama2cError(f"{source}: not a llama2.c sentencepiece vocabulary "
                               "(expected <unk>, <s>, </s> as tokens 0, 1, 2)")
        self.pieces = list(pieces)
        self.scores = [float(score) for score in scores]
        self.vocab_size = len(self.pieces)
        self.unk_id, self.bos_id, self.eos_id = 0, 1, 2
        self.eot_id = self.bos_id  # the story separator (see the class docstring)
        self._hf = self._build_hf_tokenizer(source)

    # The HF tokenizer: sentencepiece strings ('▁' for space), BPE merges derived from the scores.
    def _build_hf_tokenizer(self, source: str):
        from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

        strings = [self._piece_string(i) for i in range(self.vocab_size)]
        vocab: dict[str, int] = {}
        for token_id, string in enumerate(strings):
            if string in vocab:
                raise Llama2cError(f"{source}: token {token_id} repeats piece {string!r} of token {vocab[string]}")
            vocab[string] = token_id
        merges = []
        for token_id, string in enumerate(strings):
            if token_id < 3 or BYTE_PIECE.fullmatch(self.pieces[token_id]) or len(string) < 2:
                continue
            for split in range(1, len(string)):
                left, right = string[:split], string[split:]
                if left in vocab and right in vocab:
                    merges.append((-self.scores[token_id], token_id, split, left, right))
        merges.sort()  # run.c merges the highest score first; ties: lower id first
        model = models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in merges],
                           unk_token=strings[0], byte_fallback=True, fuse_unk=True)
        tokenizer = Tokenizer(model)
        # run.c prepends a dummy ' ' to non-empty text and never splits on whitespace.
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE),
                                                     normalizers.Replace(" ", SPIECE_SPACE)])
        tokenizer.add_special_tokens([AddedToken(strings[i], special=True, normalized=False) for i in range(3)])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{strings[1]} $A", pair=f"{strings[1]} $A {strings[1]} $B", special_tokens=[(strings[1], 1)])
        tokenizer.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(),
                                               decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        return tokenizer

    def _piece_string(self, token_id: int) -> str:
        piece = self.pieces[token_id]
        if token_id == 1:
            return "<s>"
        if token_id == 2:
            return "</s>"
        return piece.decode("utf-8", errors="replace").replace(" ", SPIECE_SPACE)

    @property
    def hf_tokenizer(self):
        """The Hugging Face `tokenizers.Tokenizer` (what `save` writes as tokenizer.json)."""
        return self._hf

    def encode(self, text: str) -> list[int]:
        """run.c's encoding of `text` without its leading BOS."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        previous = None
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary (0-{self.vocab_size - 1})")
            piece = b"" if token in (self.bos_id, self.eos_id) else self.pieces[token]
            if previous == self.bos_id and piece.startswith(b" "):
                piece = piece[1:]
            match = BYTE_PIECE.fullmatch(piece)
            if match:
                piece = bytes([int(match.group(1), 16)])
            if len(piece) == 1 and piece[0] < 0x80 and not (0x20 <= piece[0] < 0x7F or piece in b"\t\n\v\f\r"):
                piece = b""  # run.c's safe_printf skips unprintable single bytes
            out += piece
            previous = token
        return out.decode("utf-8", errors="replace")

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id}

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.bin (the source of truth), tokenizer.json (for HF) and tokenizer_meta.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / TOKENIZER_BIN) as temporary:
            write_tokenizer_bin(temporary, self.pieces, self.scores)
        write_text_atomic(directory / "tokenizer.json", self._hf.to_str())
        write_json_atomic(directory / "tokenizer_meta.json", self.meta())

    @classmethod
    def from_bin(cls, path: str | os.PathLike, vocab_size: int | None = None) -> "Llama2cTokenizer":
        pieces, scores, _ = read_tokenizer_bin(path, vocab_size)
        return cls(pieces, scores, source=str(path))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Llama2cTokenizer":
        """Load what `save` wrote (reads tokenizer.bin)."""
        return cls.from_bin(Path(directory) / TOKENIZER_BIN)

    def __repr__(self) -> str:
        return f"Llama2cTokenizer(vocab_size={self.vocab_size})"


def load_any_tokenizer(directory: str | os.PathLike):
    """`tokenizer.load_tokenizer`, plus the 'llama2c' kind it may not know about."""
    directory = Path(directory)
    meta_path = directory / "tokenizer_meta.json"
    try:
        kind = json.loads(meta_path.read_text()).get("kind") if meta_path.is_file() else None
    except (OSError, ValueError):
        kind = None
    if kind == "llama2c":
        return Llama2cTokenizer.load(directory)
    from tinystories.tokenizer import load_tokenizer

    return load_tokenizer(directory)
