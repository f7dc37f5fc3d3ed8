"""llama2.c's tokenizer.bin, and the sentencepiece-style vocabulary it holds (`Llama2cTokenizer`).

A leaf module: tokenizer.py (which loads a saved 'llama2c' tokenizer), llama2c.py and export.py
import it, and it imports none of them.

Format (`run.c`'s `build_tokenizer`): int32 max_token_length, then per token: float32 score, int32
length, the piece's bytes. The file does not store how many tokens it holds: the model's vocab_size
says. Pieces come from sentencepiece with '▁' written as ' '; <s> is written as "\\n<s>\\n", </s>
as "\\n</s>\\n", and 256 byte-fallback pieces "<0x00>".."<0xFF>" follow. (tinystories' own llama2c
export of a byte-level BPE writes another layout into the same format: see llama2c.py.)
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from tinystories.errors import UserError
from tinystories.files import atomic_path, write_json_atomic, write_text_atomic

TOKENIZER_BIN = "tokenizer.bin"
BOS_PIECE, EOS_PIECE = b"\n<s>\n", b"\n</s>\n"
SPIECE_SPACE = "\u2581"  # sentencepiece's '▁'
BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cError(UserError):
    """A llama2.c file is malformed, or a model cannot be written in llama2.c's format."""


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

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array (what shard preparation writes)."""
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """run.c's `decode` of `ids` (see the class docstring); an id outside the vocabulary becomes
        U+FFFD, as in the other tokenizers, so decoding never raises."""
        out = bytearray()
        previous = None
        for token in ids:
            token = int(token)
            out += self._piece_bytes(token, previous)
            previous = token
        return out.decode("utf-8", errors="replace")

    def _piece_bytes(self, token: int, previous: int | None) -> bytes:
        """What run.c prints for `token` after `previous`."""
        if not 0 <= token < self.vocab_size:
            return "\ufffd".encode("utf-8")
        piece = b"" if token in (self.bos_id, self.eos_id) else self.pieces[token]
        if previous == self.bos_id and piece.startswith(b" "):
            piece = piece[1:]
        match = BYTE_PIECE.fullmatch(piece)
        if match:
            piece = bytes([int(match.group(1), 16)])
        if len(piece) == 1 and piece[0] < 0x80 and not (0x20 <= piece[0] < 0x7F or piece in b"\t\n\v\f\r"):
            piece = b""  # run.c's safe_printf skips unprintable single bytes
        return piece

    def meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id}

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.bin (the source of truth), tokenizer.json (for HF) and tokenizer_meta.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / TOKENIZER_BIN) as temporary:
            write_tokenizer_bin(temporary, self.pieces, self.scores)
        # The names tokenizer.py's TOKENIZER_FILE and META_FILE (imported there, not here: this is a leaf)
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
