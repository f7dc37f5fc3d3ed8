"""Shared fixtures: where the TinyStories text and GPT-2 files are, and a small prepared shard dir.

Tests read TinyStories from `$TINYSTORIES_DATA` when it is set, else from the slice the package
ships (`tinystories/assets/demo-corpus`, the one copy of TinyStories text in the repository), and
write any slices they need into pytest's temporary directories.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinystories.tokenizer import EOT

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_TRAIN_STORIES = 300
SMALL_VAL_STORIES = 50
SMALL_BPE_SPEC = "bpe:512"
# Compiling the decode step costs seconds per model shape (a minute cold on 2 cores): the suite decodes
# eagerly, and the tests of the compiled default path opt back in (tests/test_generate.py, test_serve.py).
os.environ.setdefault("TINYSTORIES_COMPILE", "0")


def _env_path(variable: str, default: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else (REPO_ROOT / default).resolve()


def write_story_file(path: Path, stories: list[str]) -> Path:
    """Write `stories` in the TinyStories text layout: each story followed by a line `<|endoftext|>`."""
    path.write_text("".join(f"{story}\n{EOT}\n" for story in stories), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder holding train.txt.gz and valid.txt.gz: $TINYSTORIES_DATA, else the bundled slice."""
    from tinystories.data import bundled_corpus_dir

    value = os.environ.get("TINYSTORIES_DATA")
    folder = Path(value) if value else bundled_corpus_dir()
    if not (folder / "train.txt.gz").is_file() or not (folder / "valid.txt.gz").is_file():
        pytest.fail(f"TinyStories text not found in {folder} (train.txt.gz, valid.txt.gz); fix TINYSTORIES_DATA")
    return folder


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    """Folder holding GPT-2's encoder.json and vocab.bpe (skips the test when it is absent)."""
    folder = _env_path("TINYSTORIES_GPT2_DIR", "../shared/data/gpt2")
    if not (folder / "encoder.json").is_file() or not (folder / "vocab.bpe").is_file():
        pytest.skip(f"GPT-2 BPE files not found in {folder}; set TINYSTORIES_GPT2_DIR")
    return folder


@pytest.fixture(scope="session")
def valid_stories(data_dir: Path) -> list[str]:
    """Every story of the shared validation file (about 1,300)."""
    from tinystories.data import read_stories

    return list(read_stories(data_dir / "valid.txt.gz"))


@pytest.fixture(scope="session")
def small_story_files(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.txt, valid.txt) in a temporary folder: the first 300 train and 50 valid stories."""
    from itertools import islice

    from tinystories.data import read_stories

    folder = tmp_path_factory.mktemp("small_stories")
    train = list(islice(read_stories(data_dir / "train.txt.gz"), SMALL_TRAIN_STORIES))
    val = list(islice(read_stories(data_dir / "valid.txt.gz"), SMALL_VAL_STORIES))
    return write_story_file(folder / "train.txt", train), write_story_file(folder / "valid.txt", val)


@pytest.fixture
def small_bundled_slice(small_story_files: tuple[Path, Path], tmp_path: Path, monkeypatch) -> Path:
    """The package's bundled folder replaced by 300 + 50 of its stories (same names, gzip), with
    $TINYSTORIES_DATA unset and the hub offline: what `data prepare` and `demo` read without --input,
    small enough for a test. Returns the stand-in folder."""
    import gzip

    from tinystories import data

    train, val = small_story_files
    folder = tmp_path / "demo-corpus"
    folder.mkdir()
    (folder / "train.txt.gz").write_bytes(gzip.compress(train.read_bytes()))
    (folder / "valid.txt.gz").write_bytes(gzip.compress(val.read_bytes()))
    monkeypatch.setattr(data, "bundled_corpus_dir", lambda: folder)
    monkeypatch.delenv("TINYSTORIES_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # proves nothing is fetched
    return folder


@pytest.fixture(scope="session")
def prepared_small(small_story_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard dir prepared from `small_story_files` with a bpe:512 tokenizer. Treat as read-only.

    Holds train.bin, val.bin, meta.json, tokenizer.json and tokenizer_meta.json (see tinystories.data).
    """
    from tinystories.data import prepare

    train, val = small_story_files
    out_dir = tmp_path_factory.mktemp("prepared_small")
    prepare([train], out_dir, SMALL_BPE_SPEC, [val], progress=False)
    return out_dir


@pytest.fixture
def one_thread(monkeypatch):
    """One CPU thread for training tests: the machine may be shared, and tiny models run fastest
    without thread hand-offs. Restores torch's thread count afterwards."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
