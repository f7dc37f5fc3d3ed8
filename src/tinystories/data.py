"""Reading stories, fetching them from the Hugging Face hub, and writing/reading token shards.

Stories
    `read_stories` streams stories, one at a time, from
    * ``.txt`` in the TinyStories layout (stories separated by a line ``<|endoftext|>``) and ``.gz``
      of it,
    * ``.jsonl`` (``.jsonl.gz``) with a ``text`` (or ``story``) field per line,
    * ``.parquet`` with a ``text`` (or ``story``) column, read one record batch at a time,
    and folders of such files (searched recursively, in sorted order). A story is the text between
    two separators with surrounding whitespace removed; empty stories are skipped. Any
    ``<|endoftext|>`` inside a jsonl/parquet text also separates stories, so no story ever contains
    the separator text.

Shard directory layout (what `prepare` writes)
    ``train.bin``, ``val.bin``
        Flat token ids with no header, ``uint16`` when the vocabulary fits (vocab_size <= 65536),
        else ``uint32``. **The EOT token precedes every story**: ``EOT s1 EOT s2 ... EOT sN``. A model
        therefore learns EOT as "a story starts here", and generation can be prompted with EOT alone.
    ``tokenizer.json`` (bpe, gpt2) and ``tokenizer_meta.json``
        The tokenizer, as `tinystories.tokenizer.Tokenizer.save` writes it.
    ``meta.json``
        Written last; a directory without it is incomplete. Keys:
        ``format``, ``layout``, ``tokenizer`` (spec), ``tokenizer_kind``, ``vocab_size``, ``eot_id``,
        ``dtype``, ``splits`` -> {``train``, ``val``} -> {``file``, ``tokens``, ``stories``,
        ``bytes``}, ``validation`` ({``source``: ``files`` | ``held_out``, ``fraction``}),
        ``sources`` -> {``train``, ``val``} -> [{``path``, ``sha256``, ``size``}], ``errors``,
        ``fingerprint``.

    Counting, per split:
        ``tokens``  the number of ids in the .bin file, EOT tokens included (one per story);
        ``stories`` the number of stories;
        ``bytes``   the UTF-8 bytes of the story texts as `read_stories` yields them (stripped),
                    without separators, newlines between stories or EOT. Bits per byte of a split
                    is the summed loss in bits over its story tokens divided by this number.

Default inputs
    Without input files, `default_inputs` uses ``$TINYSTORIES_DATA`` (a folder) if set, else the
    TinyStories slice bundled as package data (``tinystories/assets/demo-corpus/``: every story of
    the project's 16,648-story train and 1,332-story validation files, gzip, with the
    CDLA-Sharing-1.0 text and attribution), so nothing needs the network. The hub is one option
    away (``data_source="hub"``, or `download`), and says how big its files are before fetching.

Interrupted and concurrent runs
    `prepare` writes under temporary names that carry its pid (``.train.bin.tmp-PID``) and holds
    ``.prepare.lock`` in the output folder (an flock, which the kernel releases when the holder dies,
    kill -9 included). A second prepare of the same folder while the first lives gets a one-line
    DataError; the next run after a killed one removes the temporary files it left. No file takes
    its final name before it is complete, and meta.json comes last.

Validation split
    ``val_inputs`` gives validation files. Without them, a story goes to validation when the first
    8 bytes of BLAKE2b(story UTF-8) read as a fraction of 2**64 are below ``val_fraction`` (default
    0.01, the ratio of TinyStories' own validation set). That depends only on the story's text, so it
    is the same on every run and identical stories always land in the same split. The BPE is
    trained on the training split only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import zlib
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from tinystories.errors import UserError
from tinystories.files import write_json_atomic
from tinystories.tokenizer import META_FILE as TOKENIZER_META_FILE
from tinystories.tokenizer import TOKENIZER_FILE, EOT, Tokenizer, available_cpus, make_tokenizer, parse_spec

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

FORMAT = "tinystories-shards-v1"
LAYOUT = "EOT precedes every story: EOT s1 EOT s2 ... (flat token ids, no header)"
META_FILE = "meta.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
DEFAULT_VAL_FRACTION = 0.01
ERROR_MODES = ("strict", "replace")
LOCK_FILE = ".prepare.lock"  # in the output folder while a prepare writes it (see _locked_output_dir)
# The temporary files prepare writes: `.train.bin.tmp-PID` here, `.meta.json.tmp-PID-HEX` in tinystories.files.
_TEMPORARY_NAME = re.compile(
    r"\.(%s)\.tmp-(\d+)(-[0-9a-f]+)?" % "|".join(
        re.escape(name) for name in (*SPLIT_FILES.values(), META_FILE, TOKENIZER_FILE, TOKENIZER_META_FILE))
)

HUB_DATASET = "roneneldan/TinyStories"
HUB_FILES = {
    "v1": ("TinyStories-train.txt", "TinyStories-valid.txt"),
    "v2-gpt4": ("TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"),
}
DEFAULT_HUB_VERSION = "v2-gpt4"
DATA_SOURCES = ("bundled", "hub")  # where stories come from when no --input / $TINYSTORIES_DATA is given
BUNDLED_CORPUS_FOLDER = "demo-corpus"  # under tinystories/assets/: the slice shipped as package data
BUNDLED_FILES = ("train.txt.gz", "valid.txt.gz")
# Short, so an offline machine fails in seconds instead of retrying for minutes.
HUB_TIMEOUT_S = 10.0

TEXT_SUFFIXES = (".txt", ".txt.gz", ".gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_FIELDS = ("text", "story")

_EOT_BYTES = EOT.encode("ascii")
_PROGRESS_STEP = 1 << 20  # report reading progress about every MiB
_CHUNK_CHARS = 256 * 1024  # text per encode call: big enough to amortise, small enough to spread
_IN_FLIGHT_PER_THREAD = 4  # chunks queued per encoding thread: keeps cores busy, memory bounded


class DataError(UserError):
    """Bad input data or a bad output location; the message is one line naming the file and problem."""


ProgressCallback = Callable[[int], None]


# --- finding and reading story files ----------------------------------------------------------


def _file_format(path: Path) -> str:
    """'jsonl', 'parquet' or 'text' (the TinyStories layout, also for unknown suffixes)."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _is_story_file(path: Path) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and name.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)


def find_story_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand `paths` (files or folders) into story files, folders searched recursively and sorted.

    Raises DataError for a missing path or a folder without story files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_story_file(p))
            if not found:
                raise DataError(
                    f"{path}: folder has no readable story files "
                    f"({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)})"
                )
            files.extend(found)
        elif path.is_file():
            if not os.access(path, os.R_OK):
                raise DataError(f"{path}: file is not readable (permission denied)")
            files.append(path)
        elif path.exists():
            raise DataError(f"{path}: not a regular file")
        else:
            raise DataError(f"{path}: no such file or directory")
    if not files:
        raise DataError("no input files given")
    return files


def read_stories(paths: Iterable[str | os.PathLike] | str | os.PathLike, errors: str = "strict") -> Iterator[str]:
    """Stream the stories of `paths` (files or folders), in order, one story at a time.

    `errors` is 'strict' (invalid UTF-8 raises DataError naming file and byte offset) or
    'replace' (bad bytes become U+FFFD). A file with no story raises DataError.
    """
    _check_errors_mode(errors)
    for path in find_story_files(paths):
        yield from _file_stories(path, errors)


def _file_stories(path: Path, errors: str, progress: ProgressCallback | None = None) -> Iterator[str]:
    """Stories of one file; DataError if it holds none. `progress(n)` gets the bytes read so far."""
    readers = {"text": _text_stories, "jsonl": _jsonl_stories, "parquet": _parquet_stories}
    count = 0
    for story in readers[_file_format(path)](path, errors, progress):
        count += 1
        yield story
    if count == 0:
        raise DataError(f"{path}: no stories in file (it is empty)")


def _clean(text: str) -> Iterator[str]:
    """The stories in one record: split on any EOT marker, strip, drop empty ones."""
    for piece in text.split(EOT) if EOT in text else (text,):
        story = piece.strip()
        if story:
            yield story


def _decode(data: bytes, errors: str, path: Path, offset: int, where: str = "") -> str:
    """UTF-8 decode; on bad bytes in strict mode, a DataError with the file byte offset."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: invalid UTF-8 at byte offset {offset + error.start}{where} ({error.reason}); "
            "pass --errors replace to replace invalid bytes with U+FFFD"
        ) from None


@contextmanager
def _open_binary(path: Path) -> Iterator[tuple[IO[bytes], IO[bytes]]]:
    """(stream of the file's content, the raw file whose position measures progress).

    A `.gz` file is decompressed on the fly; gzip errors become DataError.
    """
    try:
        raw = open(path, "rb")
    except OSError as error:
        raise DataError(f"{path}: cannot open ({error.strerror or error})") from None
    with raw:
        if path.name.lower().endswith(".gz"):
            # GzipFile.readline is Python code; a BufferedReader on top splits lines in C.
            stream: IO[bytes] = io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), 1 << 20)
        else:
            stream = raw
        try:
            yield stream, raw
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise DataError(f"{path}: not a valid gzip file ({error or 'truncated'})") from None
        except OSError as error:
            raise DataError(f"{path}: read failed ({error.strerror or error})") from None


def _text_stories(path: Path, errors: str, progress: ProgressCallback | None) -> Iterator[str]:
    """Stories of a TinyStories text file: separated by `<|endoftext|>` (normally on its own line)."""
    compressed = path.name.lower().endswith(".gz")
    where = " of the decompressed text" if compressed else ""
    with _open_binary(path) as (stream, raw):
        pending: list[bytes] = []  # lines of the story being read
        story_offset = 0  # offset (in the decoded stream) of the first byte of `pending`
        line_offset = 0
        next_report = _PROGRESS_STEP
        for line in stream:
            if _EOT_BYTES in line:
                segment_offset = line_offset
                for index, segment in enumerate(line.split(_EOT_BYTES)):
                    if index:  # an EOT came before this segment: the pending story is complete
                        yield from _clean(_decode(b"".join(pending), errors, path, story_offset, where))
                        pending = []
                        story_offset = segment_offset
                    pending.append(segment)
                    segment_offset += len(segment) + len(_EOT_BYTES)
            else:
                pending.append(line)
            line_offset += len(line)
            if progress is not None and line_offset >= next_report:
                progress(raw.tell())
                next_report = line_offset + _PROGRESS_STEP
        yield from _clean(_decode(b"".join(pending), errors, path, story_offset, where))
        if progress is not None:
            progress(raw.tell())


def _jsonl_stories(path: Path, errors: str, progress: ProgressCallback | None) -> Iterator[str]:
    """Stories of a JSON-lines file: the `text` (or `story`) field of each object."""
    field_name: str | None = None
    with _open_binary(path) as (stream, raw):
        offset = 0
        next_report = _PROGRESS_STEP
        for line_number, line in enumerate(stream, start=1):
            text_line = _decode(line, errors, path, offset).strip()
            offset += len(line)
            if not text_line:
                continue
            try:
                record = json.loads(text_line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {line_number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {line_number} is not a JSON object")
            if field_name is None:
                field_name = _text_field(path, list(record))
            text = record.get(field_name)
            if not isinstance(text, str):
                raise DataError(
                    f"{path}: line {line_number} has no string {field_name!r} field "
                    f"(fields found: {', '.join(record) or 'none'})"
                )
            yield from _clean(text)
            if progress is not None and offset >= next_report:
                progress(raw.tell())
                next_report = offset + _PROGRESS_STEP
        if progress is not None:
            progress(raw.tell())


def _text_field(path: Path, fields: Sequence[str]) -> str:
    """The first of TEXT_FIELDS present in `fields`, else DataError listing what was found."""
    for name in TEXT_FIELDS:
        if name in fields:
            return name
    raise DataError(
        f"{path}: no 'text' or 'story' field (fields found: {', '.join(map(str, fields)) or 'none'})"
    )


def _parquet_stories(path: Path, errors: str, progress: ProgressCallback | None) -> Iterator[str]:
    """Stories of a parquet file's `text` (or `story`) column, read one record batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable parquet file ({str(error).splitlines()[0]})") from None
    with parquet:
        column = _text_field(path, parquet.schema_arrow.names)
        total_rows = max(1, parquet.metadata.num_rows)
        rows_done = 0
        size = path.stat().st_size
        try:
            for batch in parquet.iter_batches(batch_size=4096, columns=[column]):
                values = batch.column(0)
                if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                    raise DataError(f"{path}: column {column!r} holds {values.type}, not text")
                for text in values.to_pylist():
                    if text:
                        yield from _clean(text)
                rows_done += batch.num_rows
                if progress is not None:
                    progress(size * rows_done // total_rows)
        except pa.ArrowException as error:
            raise DataError(f"{path}: cannot read parquet data ({str(error).splitlines()[0]})") from None


def _check_errors_mode(errors: str) -> None:
    if errors not in ERROR_MODES:
        raise DataError(f"unknown --errors mode {errors!r}: use strict or replace")


# --- default inputs: $TINYSTORIES_DATA, the bundled slice, or the Hugging Face hub ----------------


def bundled_corpus_dir() -> Path:
    """The TinyStories slice shipped as package data (train.txt.gz, valid.txt.gz, LICENSE, SOURCES.md)."""
    return Path(__file__).resolve().parent / "assets" / BUNDLED_CORPUS_FOLDER


def bundled_corpus() -> tuple[list[Path], list[Path]]:
    """([train.txt.gz], [valid.txt.gz]) of the bundled slice; DataError if the install lacks them."""
    train, val = (bundled_corpus_dir() / name for name in BUNDLED_FILES)
    for path in (train, val):
        if not path.is_file():
            raise DataError(f"{path}: the bundled TinyStories slice is missing (broken install?); "
                            "pass --input PATH or set TINYSTORIES_DATA")
    return [train], [val]


def default_inputs(source: str | None = None) -> tuple[list[Path], list[Path]]:
    """(train files, validation files) to use when the user names none.

    `source` None: the story files of `$TINYSTORIES_DATA` if set (names containing 'train', and
    'valid' or 'val'), else the bundled slice. 'bundled': the bundled slice. 'hub': download the
    default hub version (`download`).
    """
    if source not in (None, *DATA_SOURCES):
        raise DataError(f"unknown --data-source {source!r}: use {' or '.join(DATA_SOURCES)}")
    folder = os.environ.get("TINYSTORIES_DATA")
    if source == "hub":
        train_file, val_file = download()
        return [train_file], [val_file]
    if source == "bundled" or not folder:
        return bundled_corpus()
    files = find_story_files([folder])
    train = [path for path in files if "train" in path.name.lower()]
    val = [path for path in files if "val" in path.name.lower() and path not in train]
    if not train:
        names = ", ".join(path.name for path in files)
        raise DataError(f"TINYSTORIES_DATA={folder}: no file with 'train' in its name (found: {names})")
    return train, val


def describe_inputs(train: Sequence[Path], val: Sequence[Path]) -> str:
    """A short phrase saying where stories come from, e.g. 'the bundled TinyStories slice'."""
    if [*train, *val] == [bundled_corpus_dir() / name for name in BUNDLED_FILES]:
        return f"the bundled TinyStories slice ({bundled_corpus_dir()})"
    return ", ".join(str(path) for path in [*train, *val])


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub itself reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(
    dataset: str = HUB_DATASET,
    version: str = DEFAULT_HUB_VERSION,
    out_dir: str | os.PathLike | None = None,
    *,
    endpoint: str | None = None,
    timeout: float = HUB_TIMEOUT_S,
    progress: bool = True,
) -> list[Path]:
    """Fetch [train file, validation file] of TinyStories `version` ('v1' or 'v2-gpt4') from the hub.

    Files go to `out_dir` when given, else to the Hugging Face cache; a file already there is reused.
    Online, the files' sizes are asked of the hub first and printed (stderr) before anything is
    fetched. Offline (HF_HUB_OFFLINE=1), only cached files are used, and a one-line DataError says
    so otherwise; an unreachable hub fails within `timeout` seconds, also with one line.
    """
    if version not in HUB_FILES:
        raise DataError(f"unknown TinyStories version {version!r}: use {' or '.join(HUB_FILES)}")
    try:
        import huggingface_hub
    except ImportError:
        raise DataError("huggingface_hub is not installed; pass local files with --input") from None
    offline = _hub_offline()
    filenames = HUB_FILES[version]
    if offline:
        paths = [_hub_download(huggingface_hub, dataset, name, out_dir, endpoint, timeout, True) for name in filenames]
        _say(progress, f"tinystories: HF_HUB_OFFLINE is set: using the cached {' and '.join(filenames)} "
                       "(the hub was not asked)")
        return paths
    sizes = [_hub_file_size(huggingface_hub, dataset, name, endpoint, timeout) for name in filenames]
    _say(progress, _download_announcement(dataset, filenames, sizes))
    return [_hub_download(huggingface_hub, dataset, name, out_dir, endpoint, timeout, False) for name in filenames]


def _hub_download(hub: Any, dataset: str, filename: str, out_dir: str | os.PathLike | None,
                  endpoint: str | None, timeout: float, offline: bool) -> Path:
    """One file through `hf_hub_download` (which reuses a cached or already downloaded copy)."""
    try:
        return Path(hub.hf_hub_download(dataset, filename, repo_type="dataset", local_dir=out_dir,
                                        endpoint=endpoint, etag_timeout=timeout, local_files_only=offline))
    except Exception as error:  # network, HTTP, offline-mode and cache errors all end here
        reason = (
            "offline mode (HF_HUB_OFFLINE is set): no cached copy, and the hub cannot be asked for it or its size"
            if offline else _first_line(error)
        )
        raise _download_error(dataset, filename, reason) from None


def _hub_file_size(hub: Any, dataset: str, filename: str, endpoint: str | None, timeout: float) -> int | None:
    """The file's size in bytes from one HEAD request without retries (None if the hub does not say).

    Also the reachability check: `hf_hub_download` alone retries for about a minute when nothing is
    cached yet, this fails in `timeout` seconds.
    """
    url = hub.hf_hub_url(dataset, filename, repo_type="dataset", endpoint=endpoint)
    try:
        try:
            metadata = hub.get_hf_file_metadata(url, timeout=timeout, retry_on_errors=False)
        except TypeError:  # huggingface_hub before `retry_on_errors` existed did not retry HEAD requests
            metadata = hub.get_hf_file_metadata(url, timeout=timeout)
    except Exception as error:  # unreachable, HTTP 404, proxy errors ...
        raise _download_error(dataset, filename, _first_line(error)) from None
    return metadata.size


def _download_announcement(dataset: str, filenames: Sequence[str], sizes: Sequence[int | None]) -> str:
    """One line: what is about to be fetched and how big it is."""
    parts = [f"{name} ({_human_bytes(size)})" for name, size in zip(filenames, sizes)]
    known = [size for size in sizes if size is not None]
    total = f", {_human_bytes(sum(known))} in all" if len(known) == len(sizes) else ""
    return f"tinystories: downloading from the Hugging Face hub ({dataset}): {', '.join(parts)}{total}"


def _human_bytes(size: int | None) -> str:
    """'2.23 GB' style (powers of 1000), or 'size unknown'."""
    if size is None:
        return "size unknown"
    exponent = min(4, (len(str(size)) - 1) // 3)  # 1000**exponent <= size, capped at TB
    if exponent == 0:
        return f"{size} bytes"
    return f"{size / 1000**exponent:.2f} {('kB', 'MB', 'GB', 'TB')[exponent - 1]}"


def _download_error(dataset: str, filename: str, reason: str) -> DataError:
    return DataError(
        f"cannot download {filename} from the Hugging Face hub ({dataset}): {reason}; pass local story "
        "files with --input PATH (or set TINYSTORIES_DATA to a folder of them), or leave both out to "
        "use the bundled TinyStories slice"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= 200 else line[:197] + "..."


# --- preparing shards ------------------------------------------------------------------------


def held_out_for_validation(story: str, fraction: float) -> bool:
    """Whether a story belongs to the deterministic validation hold-out (see module docstring)."""
    digest = hashlib.blake2b(story.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def _utf8_size(story: str) -> int:
    """UTF-8 bytes of `story`, without encoding it when it is ASCII (most TinyStories are)."""
    return len(story) if story.isascii() else len(story.encode("utf-8"))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _SplitWriter:
    """Accumulates one split's stories and writes `EOT s1 EOT s2 ...` ids to a file.

    Stories are joined into ~256 KiB texts with the EOT marker before each story; the tokenizer
    turns the marker into the EOT id, so one encode call per chunk yields the shard layout directly
    (EOT is a special token: it splits the text exactly where separate encodes would). Chunks are
    encoded on `pool` while the caller keeps reading; results are written in submission order, and
    at most `max_in_flight` chunks wait, which bounds memory.
    """

    def __init__(
        self, path: Path, name: str, tokenizer: Tokenizer, dtype: np.dtype, pool: Executor, max_in_flight: int
    ) -> None:
        self.path = path  # where ids are written (a temporary name)
        self.name = name  # the file name the shard gets once complete
        self.stories = 0
        self.story_bytes = 0
        self.tokens = 0
        self._tokenizer = tokenizer
        self._dtype = dtype
        self._pool = pool
        self._max_in_flight = max_in_flight
        self._chunk: list[str] = []
        self._chunk_chars = 0
        self._in_flight: deque[Future[np.ndarray]] = deque()
        self._handle: IO[bytes] | None = open(path, "wb")

    def add(self, story: str, size: int) -> None:
        """Queue one story (`size` = its UTF-8 bytes)."""
        self.stories += 1
        self.story_bytes += size
        self._chunk += (EOT, story)
        self._chunk_chars += len(story)
        if self._chunk_chars >= _CHUNK_CHARS:
            self._submit()

    def _submit(self) -> None:
        text = "".join(self._chunk)
        self._chunk, self._chunk_chars = [], 0
        self._in_flight.append(self._pool.submit(self._encode, text))
        while len(self._in_flight) > self._max_in_flight:
            self._write(self._in_flight.popleft().result())

    def _encode(self, text: str) -> np.ndarray:
        return self._tokenizer.encode_to_numpy(text).astype(self._dtype, copy=False)

    def _write(self, ids: np.ndarray) -> None:
        assert self._handle is not None
        ids.tofile(self._handle)
        self.tokens += len(ids)

    def finish(self) -> None:
        """Encode what is left and write everything."""
        if self._chunk:
            self._submit()
        while self._in_flight:
            self._write(self._in_flight.popleft().result())

    def close(self) -> None:
        """Close the file, dropping work not yet written (after `finish`, there is none)."""
        for future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def stats(self) -> dict[str, Any]:
        return {"file": self.name, "tokens": self.tokens, "stories": self.stories, "bytes": self.story_bytes}


class _Progress:
    """A tqdm bar (stderr) over the bytes of a list of files, advanced from per-file positions."""

    def __init__(self, files: Sequence[Path], description: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self._sizes = [path.stat().st_size for path in files]
        self._bar = tqdm(
            total=sum(self._sizes), desc=description, unit="B", unit_scale=True, file=sys.stderr,
            disable=not enabled, leave=False,
        )

    def file_callback(self, index: int) -> ProgressCallback:
        done_before = sum(self._sizes[:index])

        def report(position: int) -> None:
            self._bar.update(done_before + position - self._bar.n)

        return report

    def close(self) -> None:
        self._bar.close()


def _stories_with_progress(
    files: Sequence[Path], errors: str, description: str, enabled: bool
) -> Iterator[str]:
    progress = _Progress(files, description, enabled)
    try:
        for index, path in enumerate(files):
            yield from _file_stories(path, errors, progress.file_callback(index))
    finally:
        progress.close()


def prepare(
    inputs: Sequence[str | os.PathLike] | None,
    out_dir: str | os.PathLike,
    tokenizer_spec: str = "bpe:4096",
    val_inputs: Sequence[str | os.PathLike] | None = None,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    errors: str = "strict",
    progress: bool = True,
    gpt2_dir: str | os.PathLike | None = None,
    data_source: str | None = None,
) -> dict[str, Any]:
    """Tokenize stories into `out_dir` (train.bin, val.bin, tokenizer, meta.json); return the meta.

    `inputs` are training files/folders (None: `default_inputs(data_source)`, i.e. $TINYSTORIES_DATA,
    else the bundled slice, or the hub with data_source='hub'; it also supplies validation files).
    `tokenizer_spec` is 'bpe:N', 'gpt2', 'bytes' or the path of an existing tokenizer. Without
    `val_inputs`, `val_fraction` of the stories are held out (see module docstring). A rerun with the
    same input contents and options finds the fingerprint in meta.json and returns at once.
    Bad input raises DataError/TokenizerError before anything is written; files appear under their
    final names only once complete, meta.json last. One prepare at a time writes `out_dir` (another
    gets a DataError), and each run first removes what a killed predecessor left behind.
    """
    _check_errors_mode(errors)
    if inputs is None:
        inputs, default_val = default_inputs(data_source)
        if val_inputs is None and default_val:
            val_inputs = default_val
    job = _plan(inputs, val_inputs, tokenizer_spec, val_fraction, errors, gpt2_dir)
    out_dir = Path(out_dir)
    created = _prepare_output_dir(out_dir)
    try:
        with _locked_output_dir(out_dir):
            _remove_stale_temporaries(out_dir, progress)
            meta = _is_up_to_date(out_dir, job.fingerprint)
            if meta is not None:
                _say(progress, f"tinystories: {out_dir} is up to date (same inputs and options); skipping")
                return meta
            meta = _build_shards(job, out_dir, progress)
    except BaseException:
        _remove_created_dirs(out_dir, created)
        raise
    _say(progress, _summary(out_dir, meta))
    return meta


@dataclass
class _PrepareJob:
    """What `prepare` settled before writing anything: checked inputs, tokenizer and options."""

    train_files: list[Path]
    val_files: list[Path]
    tokenizer_spec: str
    tokenizer: Tokenizer | None  # None: a BPE still to be trained on the training split
    holdout: float | None  # fraction of train held out for validation; None with validation files
    errors: str
    sources: dict[str, list[dict[str, Any]]]  # per split: [{path, sha256, size}]
    fingerprint: str  # of everything that decides the output (see `_is_up_to_date`)


def _plan(
    inputs: Sequence[str | os.PathLike],
    val_inputs: Sequence[str | os.PathLike] | None,
    tokenizer_spec: str,
    val_fraction: float,
    errors: str,
    gpt2_dir: str | os.PathLike | None,
) -> _PrepareJob:
    """Check the options, the tokenizer and every input file, so bad input fails before any write."""
    if not val_inputs and not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    kind, bpe_vocab_size = parse_spec(tokenizer_spec)
    # Load or build a non-trained tokenizer now: a bad path or missing GPT-2 files fail early.
    tokenizer = None if kind == "bpe" else make_tokenizer(tokenizer_spec, gpt2_dir=gpt2_dir)
    train_files = find_story_files(inputs)
    val_files = find_story_files(val_inputs) if val_inputs else []
    _check_files_readable(train_files + val_files, errors)
    sources = {"train": _source_entries(train_files), "val": _source_entries(val_files)}
    holdout = None if val_files else val_fraction
    options = {
        "format": FORMAT,
        "tokenizer": f"bpe:{bpe_vocab_size}" if tokenizer is None else _tokenizer_identity(tokenizer),
        "train": [entry["sha256"] for entry in sources["train"]],
        "val": [entry["sha256"] for entry in sources["val"]],
        "val_fraction": holdout,
        "errors": errors,
    }
    return _PrepareJob(train_files, val_files, tokenizer_spec, tokenizer, holdout, errors, sources,
                       _fingerprint(options))


def _check_files_readable(files: Sequence[Path], errors: str) -> None:
    """Read the first story of each file, so bad input fails before anything is written."""
    for path in files:
        stories = _file_stories(path, errors)
        try:
            next(stories)
        finally:
            stories.close()


def _source_entries(files: Sequence[Path]) -> list[dict[str, Any]]:
    return [{"path": str(path), "sha256": file_sha256(path), "size": path.stat().st_size} for path in files]


def _tokenizer_identity(tokenizer: Tokenizer) -> dict[str, Any]:
    """What identifies a ready tokenizer in the fingerprint: its meta and its tokenizer.json hash."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        tokenizer_json = Path(folder) / "tokenizer.json"
        digest = file_sha256(tokenizer_json) if tokenizer_json.exists() else None
    return {**tokenizer.meta(), "tokenizer_json_sha256": digest}


def _fingerprint(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode("utf-8")).hexdigest()


# --- the output folder: created, locked, cleaned ---------------------------------------------------


def _prepare_output_dir(out_dir: Path) -> Path | None:
    """Create `out_dir` if needed and check it is writable; return the topmost folder created."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output directory {out_dir}: exists and is not a directory")
    created: Path | None = None
    for folder in [out_dir, *out_dir.parents]:
        if folder.exists():
            break
        created = folder
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        raise DataError(f"output directory {out_dir}: not writable ({error.strerror or error})") from None
    return created


def _remove_created_dirs(out_dir: Path, created: Path | None) -> None:
    """Remove the (empty) folders `_prepare_output_dir` created, innermost first."""
    if created is None:
        return
    for folder in [out_dir, *out_dir.parents]:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return


@contextmanager
def _locked_output_dir(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir/.prepare.lock` for the block; a DataError at once if a live prepare holds it.

    An flock belongs to the open file, and the kernel drops it when its holder exits, kill -9
    included: a held lock always means a live writer, and a lock file a dead run left behind is
    simply locked again. The file is removed on the way out, so the folder ends as clean as it began.
    """
    path = out_dir / LOCK_FILE
    handle = _acquire_lock(path, out_dir)
    try:
        yield
    finally:
        # Unlink while still locked: a waiter that opened this file sees it is gone and retries.
        path.unlink(missing_ok=True)
        handle.close()


def _acquire_lock(path: Path, out_dir: Path) -> IO[str]:
    """The open, flock-ed lock file with our pid in it (retried if a finishing holder unlinked it)."""
    while True:
        try:
            handle = open(path, "a+", encoding="ascii")  # "a+": never truncate a holder's pid
        except OSError as error:
            raise DataError(f"output directory {out_dir}: cannot create {LOCK_FILE} "
                            f"({error.strerror or error})") from None
        if fcntl is None:  # no flock (Windows): run unlocked
            return handle
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(handle)
            handle.close()
            raise DataError(
                f"output directory {out_dir}: another `tinystories data prepare` ({holder}) is writing it "
                "right now; wait for it to finish or choose another --out"
            ) from None
        if _still_linked(handle, path):
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return handle
        handle.close()


def _lock_holder(handle: IO[str]) -> str:
    """'pid N' as the lock's holder wrote it ('pid unknown' in the instant before it writes)."""
    handle.seek(0)
    text = handle.read().strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _still_linked(handle: IO[str], path: Path) -> bool:
    """Whether `path` still names the file `handle` has open (not unlinked or replaced since)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _remove_stale_temporaries(out_dir: Path, progress: bool) -> None:
    """Delete the temporary files that a killed prepare left in `out_dir` (`.train.bin.tmp-PID`, ...).

    Called with the lock held, so no live prepare writes here and every such file is stale. (Checking
    the pid in the name alone could not tell: a dead run's pid may belong to another process by now.)
    """
    stale = [path for path in out_dir.iterdir() if _TEMPORARY_NAME.fullmatch(path.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        pids = sorted({_TEMPORARY_NAME.fullmatch(path.name).group(2) for path in stale}, key=int)
        _say(progress, f"tinystories: removed {len(stale)} temporary file(s) that an interrupted prepare "
                       f"(pid {', '.join(pids)}) left in {out_dir}")


def _is_up_to_date(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The existing meta when `out_dir` holds complete shards made with the same fingerprint."""
    try:
        meta = load_meta(out_dir)
    except DataError:
        return None
    if meta.get("fingerprint") != fingerprint or not (out_dir / TOKENIZER_META_FILE).is_file():
        return None
    if meta.get("tokenizer_kind") != "bytes" and not (out_dir / TOKENIZER_FILE).is_file():
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in meta["splits"].values():
        path = out_dir / split["file"]
        if not path.is_file() or path.stat().st_size != split["tokens"] * itemsize:
            return None
    return meta


# --- writing the shards --------------------------------------------------------------------------


def _build_shards(job: _PrepareJob, out_dir: Path, progress: bool) -> dict[str, Any]:
    """Train the tokenizer if needed, encode both splits into temporary files, publish; the meta."""
    temporaries: list[Path] = []
    try:
        tokenizer = _train_bpe(job, progress) if job.tokenizer is None else job.tokenizer
        splits = _write_shards(tokenizer, job, out_dir, progress, temporaries)
        meta = _shard_meta(job, tokenizer, splits)
        _publish(out_dir, tokenizer, temporaries, meta)
    except BaseException:
        for path in temporaries:
            path.unlink(missing_ok=True)
        raise
    return meta


def _train_bpe(job: _PrepareJob, progress: bool) -> Tokenizer:
    """The job's BPE, trained on the training split only (held-out stories left out)."""
    training = _stories_with_progress(job.train_files, job.errors, f"training {job.tokenizer_spec}", progress)
    if job.holdout is not None:
        holdout = job.holdout
        training = (story for story in training if not held_out_for_validation(story, holdout))
    return make_tokenizer(job.tokenizer_spec, training)


def _write_shards(
    tokenizer: Tokenizer, job: _PrepareJob, out_dir: Path, progress: bool, temporaries: list[Path]
) -> dict[str, dict[str, Any]]:
    """Encode both splits into temporary files (listed in `temporaries`); return per-split stats.

    Encoding runs on one thread per core (tiktoken and tokenizers release the GIL) while this
    thread reads and splits stories. Temporary names carry our pid: `.train.bin.tmp-PID`.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    threads = available_cpus()
    writers: dict[str, _SplitWriter] = {}
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode") as pool:
        try:
            for split, name in SPLIT_FILES.items():
                temporary = out_dir / f".{name}.tmp-{os.getpid()}"
                temporaries.append(temporary)
                writers[split] = _SplitWriter(temporary, name, tokenizer, dtype, pool, threads * _IN_FLIGHT_PER_THREAD)
            _route_stories(job, writers, progress)
            for writer in writers.values():
                writer.finish()
        finally:
            for writer in writers.values():
                writer.close()
    if writers["train"].stories == 0:
        raise DataError("no training stories left: every story fell into the validation hold-out")
    if writers["val"].stories == 0:
        raise DataError(
            f"no story fell into the validation hold-out ({job.holdout} of {writers['train'].stories} stories); "
            "pass --val-input or a larger --val-fraction"
        )
    return {split: writer.stats() for split, writer in writers.items()}


def _route_stories(job: _PrepareJob, writers: dict[str, _SplitWriter], progress: bool) -> None:
    """Every story to its split's writer: train files (less the hold-out), then validation files."""
    for story in _stories_with_progress(job.train_files, job.errors, "encoding train", progress):
        held_out = job.holdout is not None and held_out_for_validation(story, job.holdout)
        writers["val" if held_out else "train"].add(story, _utf8_size(story))
    if job.val_files:
        for story in _stories_with_progress(job.val_files, job.errors, "encoding val", progress):
            writers["val"].add(story, _utf8_size(story))


def _shard_meta(job: _PrepareJob, tokenizer: Tokenizer, splits: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """meta.json's content (keys in the module docstring)."""
    return {
        "format": FORMAT,
        "layout": LAYOUT,
        "tokenizer": tokenizer.spec,
        "tokenizer_kind": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": splits,
        "validation": {"source": "held_out" if job.holdout is not None else "files", "fraction": job.holdout},
        "sources": job.sources,
        "errors": job.errors,
        "fingerprint": job.fingerprint,
    }


def _publish(out_dir: Path, tokenizer: Tokenizer, temporaries: Sequence[Path], meta: dict[str, Any]) -> None:
    """Move finished files to their names: old meta.json out first, new meta.json in last."""
    (out_dir / META_FILE).unlink(missing_ok=True)
    tokenizer.save(out_dir)
    for temporary, name in zip(temporaries, SPLIT_FILES.values()):
        os.replace(temporary, out_dir / name)
    write_json_atomic(out_dir / META_FILE, meta)


def _summary(out_dir: Path, meta: dict[str, Any]) -> str:
    parts = [
        f"{split} {stats['tokens']:,} tokens ({stats['stories']:,} stories, {stats['bytes']:,} bytes)"
        for split, stats in meta["splits"].items()
    ]
    return f"tinystories: wrote {out_dir} with {meta['tokenizer']} ({meta['dtype']}): " + "; ".join(parts)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)


# --- reading shards ----------------------------------------------------------------------------


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of a prepared shard directory (DataError if it is missing or unreadable)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"{directory}: not a prepared shard directory ({META_FILE} missing; run `tinystories data prepare`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable ({_first_line(error)})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: unknown shard format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def load_tokens(directory: str | os.PathLike, split: str) -> np.memmap:
    """The token ids of `split` ('train' or 'val') as a read-only memory map."""
    if split not in SPLIT_FILES:
        raise DataError(f"unknown split {split!r}: use train or val")
    meta = load_meta(directory)
    stats = meta["splits"][split]
    path = Path(directory) / stats["file"]
    dtype = np.dtype(meta["dtype"])
    if not path.is_file() or path.stat().st_size != stats["tokens"] * dtype.itemsize:
        raise DataError(f"{path}: missing or truncated (expected {stats['tokens']} {dtype.name} tokens)")
    return np.memmap(path, dtype=dtype, mode="r", shape=(stats["tokens"],))


