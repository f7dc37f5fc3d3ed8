"""Tokenizers: one small interface over three kinds.

* ``bpe:N`` (default ``bpe:4096``): byte-level BPE trained with Hugging Face ``tokenizers`` on the
  training stories. ``<|endoftext|>`` is id 0, the 256 byte symbols follow, then the merges.
* ``gpt2``: the 50,257-token GPT-2 BPE (the same ids as tiktoken's ``gpt2``), built offline from
  ``encoder.json`` + ``vocab.bpe`` (``<|endoftext|>`` = 50256).
* ``bytes``: id = byte value (0-255) and ``<|endoftext|>`` = 256. Needs no training and no files.

Every tokenizer round-trips exactly: ``decode(encode(s)) == s`` for any string ``s`` (there is no
normalizer; the byte-level mapping is lossless). The text ``<|endoftext|>`` inside a string is
encoded as the EOT token, and ``decode`` writes the EOT token back as that text, so the round trip
also holds for strings that contain it. ``decode`` never raises on a partial sequence that splits a
UTF-8 character: the broken bytes become U+FFFD.

``bpe`` and ``gpt2`` are defined by their ``tokenizer.json`` (the Hugging Face format, loadable by
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``), so a run directory holds everything
needed to rebuild them. Encoding goes through tiktoken's byte-pair engine when it is installed
and the BPE has the shape tiktoken implements (GPT-2 pre-tokenizer regex, byte-level symbols,
merge order equal to id order): it is several times faster than ``tokenizers`` on the GPT-2 regex,
which is what makes shard preparation reach its throughput target. ``make_tokenizer`` checks the
two engines agree on a probe text before trusting tiktoken, and the tests compare them on the
shared stories; otherwise ``tokenizers`` is used.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from tinystories.errors import UserError
from tinystories.files import write_json_atomic, write_text_atomic
from tinystories.vocab_bin import Llama2cTokenizer

EOT = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 4096
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
# 256 byte symbols + <|endoftext|>: the smallest vocabulary a byte-level BPE can have.
MIN_BPE_VOCAB = 257
_REPLACEMENT_BYTES = "\ufffd".encode("utf-8")
# The pre-tokenizer regex of GPT-2; Hugging Face's ByteLevel(use_regex=True) uses the same one.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Text the two encoding engines must agree on before tiktoken is trusted: letters, digits,
# contractions, punctuation runs, whitespace runs, newlines, non-ASCII and the EOT marker.
_ENGINE_PROBE = (
    "Once upon a time, there was a little girl named Lily. She's 3 years old!\n"
    "\"Can we go?\" he asked.  Mom said: “Yes, we’ll go at 10:30.”\n\n  indented\tline \n"
    "naïve café – 日本語 😀 ÿ\r\nThe end." + EOT + "Next story, 1999 and 2024... ok?!"
)


class TokenizerError(UserError):
    """A tokenizer spec or file the user gave cannot be used (message is one line)."""


def available_cpus() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (byte-level BPE symbols)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


_BYTE_OF_SYMBOL = {char: byte for byte, char in bytes_to_unicode().items()}


def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`: each byte-level symbol back to its byte."""
    return dict(_BYTE_OF_SYMBOL)


def symbol_bytes(token: str) -> bytes | None:
    """The bytes a byte-level BPE token (a string of `bytes_to_unicode` symbols) stands for, or None
    when a character of it is outside that alphabet."""
    try:
        return bytes(_BYTE_OF_SYMBOL[char] for char in token)
    except KeyError:
        return None


class Tokenizer:
    """Common interface. Subclasses implement `_encode_one`, `decode` and `_save_files`."""

    kind: str
    spec: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no EOT is added; the text `<|endoftext|>` becomes the EOT id)."""
        return self._encode_one(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, using all cores. Fastest with a few large texts."""
        return [self._encode_one(text) for text in texts]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array (cheaper than a list for long texts with the fast engine)."""
        return np.asarray(self._encode_one(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. The EOT id becomes the text `<|endoftext|>`; bytes that do not form UTF-8
        (a sequence cut inside a character) become U+FFFD, and so does each id outside the vocabulary
        (a model with a padded embedding table may sample one), so decoding never raises."""
        raise NotImplementedError

    def _encode_one(self, text: str) -> list[int]:
        raise NotImplementedError

    def _save_files(self, directory: Path) -> None:
        """Write the kind-specific files (tokenizer.json) into `directory`."""

    def meta(self) -> dict[str, Any]:
        """What `tokenizer_meta.json` holds."""
        return {"kind": self.kind, "spec": self.spec, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` (bpe, gpt2) and `tokenizer_meta.json` into `directory`.

        Each file is written under a temporary name and renamed, so a reader never sees half a file.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        write_json_atomic(directory / META_FILE, self.meta())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: id = byte value, `<|endoftext|>` = 256."""

    kind = "bytes"
    spec = "bytes"
    vocab_size = 257
    eot_id = 256

    def _encode_one(self, text: str) -> list[int]:
        ids: list[int] = []
        for index, piece in enumerate(text.split(EOT)):
            if index:
                ids.append(self.eot_id)
            ids.extend(piece.encode("utf-8"))
        return ids

    def encode_to_numpy(self, text: str) -> np.ndarray:
        eot = np.array([self.eot_id], dtype=np.uint32)
        parts: list[np.ndarray] = []
        for index, piece in enumerate(text.split(EOT)):
            if index:
                parts.append(eot)
            parts.append(np.frombuffer(piece.encode("utf-8"), dtype=np.uint8).astype(np.uint32))
        return np.concatenate(parts)

    def decode(self, ids: Iterable[int]) -> str:
        buffer = bytearray()
        eot_bytes = EOT.encode("ascii")
        for token in ids:
            if 0 <= token < 256:
                buffer.append(token)
            elif token == self.eot_id:
                buffer += eot_bytes
            else:
                buffer += _REPLACEMENT_BYTES
        return buffer.decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """A byte-level BPE held as a Hugging Face `tokenizers.Tokenizer` (kinds 'bpe' and 'gpt2')."""

    def __init__(self, hf_tokenizer: Any, kind: str, spec: str, *, use_tiktoken: bool = True) -> None:
        self.kind = kind
        self.spec = spec
        self._hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        eot_id = hf_tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise TokenizerError(f"tokenizer has no {EOT} token; it is needed to separate stories")
        self.eot_id = int(eot_id)
        self._tiktoken = _tiktoken_engine(hf_tokenizer, self.eot_id) if use_tiktoken else None

    @property
    def engine(self) -> str:
        """Which library encodes: 'tiktoken' (fast path) or 'tokenizers'."""
        return "tiktoken" if self._tiktoken is not None else "tokenizers"

    def _encode_one(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode(text, allowed_special={EOT}, disallowed_special=())
        return self._hf_encode([text])[0]

    def _hf_encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode with `tokenizers`: its batch call releases the GIL and spreads over all cores
        (unless TOKENIZERS_PARALLELISM=false); the `_fast` variant skips offsets we never use."""
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]

    def encode_to_numpy(self, text: str) -> np.ndarray:
        if self._tiktoken is None:
            return super().encode_to_numpy(text)
        return self._tiktoken.encode_to_numpy(text, allowed_special={EOT}, disallowed_special=())

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._tiktoken is None:
            return self._hf_encode(texts)
        if len(texts) <= 1:
            return [self._encode_one(text) for text in texts]
        # tiktoken releases the GIL while encoding, so threads use every core.
        with ThreadPoolExecutor(max_workers=min(available_cpus(), len(texts))) as pool:
            return list(pool.map(self._encode_one, texts))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(token) for token in ids]
        if all(0 <= token < self.vocab_size for token in ids):
            return self._decode_known(ids)
        # Decode the runs of known ids; each unknown id stands for one U+FFFD.
        pieces: list[str] = []
        run: list[int] = []
        for token in ids:
            if 0 <= token < self.vocab_size:
                run.append(token)
            else:
                pieces += (self._decode_known(run), "\ufffd")
                run = []
        pieces.append(self._decode_known(run))
        return "".join(pieces)

    def _decode_known(self, ids: list[int]) -> str:
        if self._tiktoken is not None:
            return self._tiktoken.decode(ids, errors="replace")
        # The ByteLevel decoder turns bytes that are not valid UTF-8 into U+FFFD.
        return self._hf.decode(ids, skip_special_tokens=False)

    def _save_files(self, directory: Path) -> None:
        write_text_atomic(directory / TOKENIZER_FILE, self._hf.to_str(pretty=False))


# --- building and checking the Hugging Face tokenizer ------------------------------------------


def byte_level_tokenizer(model: Any) -> Any:
    """A `tokenizers.Tokenizer` around a BPE model with GPT-2's byte-level pre/post-processing.

    No normalizer: the text is tokenized as-is, which is what makes the round trip exact.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers, processors

    tokenizer = HFTokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def merge_pair(merge: str | Sequence[str]) -> tuple[str, str]:
    """(left, right) of a tokenizer.json merge: "a b" in older files, ["a", "b"] in newer ones."""
    left, right = merge.split(" ") if isinstance(merge, str) else merge
    return left, right


def train_bpe(stories: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (including `<|endoftext|>` = id 0) on `stories`.

    Raises TokenizerError when `vocab_size` is below 257 or above what the stories support.
    """
    from tokenizers import models, pre_tokenizers, trainers

    _check_bpe_vocab_size(vocab_size)
    tokenizer = byte_level_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 bytes, even those the stories never use, so any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = _CountingIterable(stories)
    tokenizer.train_from_iterator(_batched(counter, 1000), trainer=trainer)
    if counter.count == 0:
        raise TokenizerError(f"cannot train bpe:{vocab_size}: no training stories")
    trained = tokenizer.get_vocab_size(with_added_tokens=True)
    if trained < vocab_size:
        raise TokenizerError(
            f"bpe:{vocab_size} is larger than the training stories support: "
            f"they only yield {trained} tokens; use bpe:{trained} or fewer, or more text"
        )
    return BPETokenizer(tokenizer, "bpe", f"bpe:{vocab_size}")


def _check_bpe_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_BPE_VOCAB:
        raise TokenizerError(
            f"bpe:{vocab_size} is too small: a byte-level BPE needs at least {MIN_BPE_VOCAB} tokens "
            f"(256 bytes + {EOT})"
        )


class _CountingIterable:
    """Wraps an iterable of stories and counts them, to detect training on nothing."""

    def __init__(self, items: Iterable[str]) -> None:
        self._items = items
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for item in self._items:
            self.count += 1
            yield item


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lists of `size` items: tokenizers trains faster from batches than from single strings."""
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def gpt2_files_dir(gpt2_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding GPT-2's `encoder.json` and `vocab.bpe`.

    Looks in `gpt2_dir`, then `$TINYSTORIES_GPT2_DIR`, then `../shared/data/gpt2` (from the current
    directory and from the source checkout).
    """
    candidates: list[Path] = []
    if gpt2_dir is not None:
        candidates.append(Path(gpt2_dir))
    elif os.environ.get("TINYSTORIES_GPT2_DIR"):
        candidates.append(Path(os.environ["TINYSTORIES_GPT2_DIR"]))
    else:
        candidates.append(Path("../shared/data/gpt2"))
        candidates.append(Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gpt2")
    for candidate in candidates:
        if (candidate / "encoder.json").is_file() and (candidate / "vocab.bpe").is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise TokenizerError(
        f"GPT-2 BPE files (encoder.json, vocab.bpe) not found in {tried}; "
        "set TINYSTORIES_GPT2_DIR to the folder that holds them"
    )


def gpt2_tokenizer(gpt2_dir: str | os.PathLike | None = None) -> BPETokenizer:
    """GPT-2's tokenizer built from local `encoder.json` + `vocab.bpe` (no network)."""
    from tokenizers import AddedToken, models

    folder = gpt2_files_dir(gpt2_dir)
    try:
        encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        merge_lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as error:
        raise TokenizerError(f"cannot read GPT-2 BPE files in {folder}: {error}") from error
    merges = [tuple(line.split(" ")) for line in merge_lines if line and not line.startswith("#version")]
    tokenizer = byte_level_tokenizer(models.BPE(vocab=encoder, merges=merges))
    tokenizer.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return BPETokenizer(tokenizer, "gpt2", "gpt2")


# --- tiktoken fast path -------------------------------------------------------------------------


def _tiktoken_engine(hf_tokenizer: Any, eot_id: int) -> Any | None:
    """A tiktoken `Encoding` that gives the same ids as `hf_tokenizer`, or None if none can.

    tiktoken merges the adjacent pair whose concatenation has the lowest id, `tokenizers` the pair
    that comes first in the merge list. The two rules coincide when ids grow with merge order and
    each merge makes a new token, which `_tiktoken_ranks` checks; this is how tiktoken itself
    defines GPT-2. It is not a proof for every trained vocabulary, so the probe text is checked
    here, and the tests compare both engines on all shared validation stories (identical there,
    and on the whole train file when this was written). Either engine's ids decode to the input.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    ranks = _tiktoken_ranks(json.loads(hf_tokenizer.to_str()), eot_id)
    if ranks is None:
        return None
    try:
        encoding = tiktoken.Encoding(
            "tinystories", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: eot_id}
        )
    except (ValueError, KeyError):
        return None
    expected = hf_tokenizer.encode(_ENGINE_PROBE, add_special_tokens=False).ids
    if encoding.encode(_ENGINE_PROBE, allowed_special={EOT}, disallowed_special=()) != expected:
        return None
    return encoding


def _tiktoken_ranks(config: dict[str, Any], eot_id: int) -> dict[bytes, int] | None:
    """Byte string -> id for every non-special token, if `config` (tokenizer.json) suits tiktoken."""
    model = config.get("model") or {}
    pre_tokenizer = config.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or model.get("dropout")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
        or model.get("byte_fallback")
        or config.get("normalizer")
        or pre_tokenizer.get("type") != "ByteLevel"
        or not pre_tokenizer.get("use_regex", True)
        or pre_tokenizer.get("add_prefix_space")
    ):
        return None
    specials = {token["id"] for token in config.get("added_tokens", [])}
    if specials != {eot_id}:
        return None
    vocab: dict[str, int] = model["vocab"]
    ranks = {symbol_bytes(token): token_id for token, token_id in vocab.items() if token_id != eot_id}
    if None in ranks:  # a symbol outside the byte-level alphabet
        return None
    if len(ranks) != len(vocab) - (1 if EOT in vocab else 0) or len(set(ranks.values())) != len(ranks):
        return None
    if any(bytes([byte]) not in ranks for byte in range(256)):
        return None
    previous_id = -1
    made: set[str] = set()
    for merge in model.get("merges", []):
        left, right = merge_pair(merge)
        merged = left + right
        merged_id = vocab.get(merged)
        if merged_id is None or merged_id <= previous_id or merged in made:
            return None
        if vocab[left] >= merged_id or vocab[right] >= merged_id:
            return None
        previous_id = merged_id
        made.add(merged)
    return ranks


# --- specs, saving and loading -----------------------------------------------------------------

_BPE_SPEC = re.compile(r"bpe(?::(\d+))?")


def parse_spec(spec: str) -> tuple[str, int | None]:
    """('bpe', N) | ('gpt2', None) | ('bytes', None) | ('path', None) for a spec; TokenizerError if unknown."""
    spec = spec.strip()
    match = _BPE_SPEC.fullmatch(spec)
    if match:
        vocab_size = int(match.group(1)) if match.group(1) else DEFAULT_BPE_VOCAB
        _check_bpe_vocab_size(vocab_size)
        return "bpe", vocab_size
    if spec in ("gpt2", "bytes"):
        return spec, None
    path = Path(spec)
    if path.exists():
        return "path", None
    if spec.endswith(".json") or os.sep in spec or "/" in spec:
        raise TokenizerError(f"tokenizer file not found: {spec}")
    raise TokenizerError(
        f"unknown tokenizer spec {spec!r}: use bpe:N (e.g. bpe:4096), gpt2, bytes, "
        "or the path of a tokenizer.json or of a folder holding one"
    )


def make_tokenizer(
    spec: str,
    stories: Iterable[str] | None = None,
    *,
    gpt2_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """Build the tokenizer `spec` names.

    'bpe:N' ('bpe' = 'bpe:4096') trains on `stories`; 'gpt2' reads the GPT-2 files (see
    `gpt2_files_dir`); 'bytes' needs nothing; a path to a `tokenizer.json` or a folder loads it.
    """
    kind, vocab_size = parse_spec(spec)
    if kind == "bpe":
        if stories is None:
            raise TokenizerError(f"{spec} must be trained: give training stories")
        return train_bpe(stories, vocab_size or DEFAULT_BPE_VOCAB)
    if kind == "gpt2":
        return gpt2_tokenizer(gpt2_dir)
    if kind == "bytes":
        return BytesTokenizer()
    path = Path(spec)
    return load_tokenizer(path if path.is_dir() else path.parent, tokenizer_file=path if path.is_file() else None)


def load_tokenizer(directory: str | os.PathLike, *, tokenizer_file: str | os.PathLike | None = None) -> Tokenizer:
    """Load what `Tokenizer.save` wrote into `directory`.

    `tokenizer_file` names a tokenizer.json to load instead of `directory/tokenizer.json`; without a
    `tokenizer_meta.json` beside it, it is taken as a byte-level BPE whose spec is its path.
    """
    directory = Path(directory)
    json_path = Path(tokenizer_file) if tokenizer_file is not None else directory / TOKENIZER_FILE
    meta_path = json_path.parent / META_FILE
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise TokenizerError(f"cannot read {meta_path}: {error}") from error
    if meta.get("kind") == "bytes":
        return BytesTokenizer()
    if meta.get("kind") == "llama2c":  # imported from llama2.c's tokenizer.bin (sentencepiece-style pieces)
        return Llama2cTokenizer.load(directory)
    if not json_path.is_file():
        raise TokenizerError(f"no tokenizer in {directory} ({TOKENIZER_FILE} and {META_FILE} missing)")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf_tokenizer = HFTokenizer.from_file(str(json_path))
    except Exception as error:  # tokenizers raises a bare Exception on malformed files
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TokenizerError(f"cannot load {json_path}: {first_line}") from error
    kind = meta.get("kind", "bpe")
    spec = meta.get("spec", str(json_path))
    tokenizer = BPETokenizer(hf_tokenizer, kind, spec)
    if meta and (tokenizer.vocab_size, tokenizer.eot_id) != (meta.get("vocab_size"), meta.get("eot_id")):
        raise TokenizerError(f"{json_path} does not match {meta_path} (vocab_size or eot_id differ)")
    return tokenizer
