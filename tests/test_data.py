"""Reading stories, preparing shards, the hub download, and every bad-input case (via the CLI)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_TRAIN_STORIES, SMALL_VAL_STORIES, write_story_file
from tinystories import data
from tinystories.cli import main
from tinystories.data import (
    DataError,
    default_inputs,
    download,
    held_out_for_validation,
    load_meta,
    load_tokens,
    prepare,
    read_stories,
    token_dtype,
)
from tinystories.tokenizer import EOT, load_tokenizer

# A TinyStories-layout file written by hand: a blank line first, CRLF line ends in one story, an
# empty story between two separators, spaces around a separator, and no separator at the end.
RAW_TEXT = (
    "\nOnce upon a time, Tom had a red ball.\nHe liked it.\n<|endoftext|>\n"
    "Sue saw a cat.\r\nThe cat was big.\r\n<|endoftext|>\r\n"
    "<|endoftext|>\n"
    "  The sun was hot.  \n  <|endoftext|>  \n"
    "The end has no separator."
)
RAW_STORIES = [
    "Once upon a time, Tom had a red ball.\nHe liked it.",
    "Sue saw a cat.\r\nThe cat was big.",
    "The sun was hot.",
    "The end has no separator.",
]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Return code and stderr of `tinystories ARGV`."""
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tinystories: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# --- reading ------------------------------------------------------------------------------------


def test_text_layout_is_split_on_separator_lines(tmp_path: Path) -> None:
    path = tmp_path / "stories.txt"
    path.write_bytes(RAW_TEXT.encode("utf-8"))
    assert list(read_stories(path)) == RAW_STORIES


def test_gzip_gives_the_same_stories(tmp_path: Path) -> None:
    path = tmp_path / "stories.txt.gz"
    path.write_bytes(gzip.compress(RAW_TEXT.encode("utf-8")))
    assert list(read_stories(path)) == RAW_STORIES


def test_jsonl_text_and_story_fields(tmp_path: Path) -> None:
    with_text = tmp_path / "a.jsonl"
    with_text.write_text("\n".join(json.dumps({"id": i, "text": s}) for i, s in enumerate(RAW_STORIES)) + "\n\n")
    with_story = tmp_path / "b.jsonl.gz"
    with_story.write_bytes(gzip.compress("".join(json.dumps({"story": s}) + "\n" for s in RAW_STORIES).encode()))
    assert list(read_stories(with_text)) == RAW_STORIES
    assert list(read_stories(with_story)) == RAW_STORIES


def test_parquet_is_read_across_row_groups(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stories = [f"Story number {i}. The end." for i in range(2500)]
    path = tmp_path / "train-00000.parquet"
    pq.write_table(pa.table({"text": stories, "n": list(range(2500))}), path, row_group_size=700)
    assert pq.ParquetFile(path).num_row_groups == 4
    assert list(read_stories(path)) == stories


def test_a_folder_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    write_story_file(tmp_path / "b.txt", ["Story B."])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "part.jsonl").write_text(json.dumps({"text": "Story A."}) + "\n")
    (tmp_path / "notes.md").write_text("not stories")
    assert list(read_stories(tmp_path)) == ["Story A.", "Story B."]


def test_eot_inside_a_record_separates_stories(tmp_path: Path) -> None:
    path = tmp_path / "joined.jsonl"
    path.write_text(json.dumps({"text": f"First.{EOT}Second."}) + "\n")
    assert list(read_stories(path)) == ["First.", "Second."]


def test_shared_files_hold_the_documented_story_and_byte_counts(data_dir: Path) -> None:
    # SOURCES.md: valid = 1,000 V1 + 332 V2 stories of 787,259 + 260,318 story-text bytes.
    valid = list(read_stories(data_dir / "valid.txt.gz"))
    assert len(valid) == 1332
    assert sum(len(story.encode("utf-8")) for story in valid) == 787_259 + 260_318


# Streams every story of each file it is given and prints, per file, the story count and how far the
# process's peak resident memory rose while reading it (ru_maxrss: KiB on Linux, bytes on macOS).
PEAK_MEMORY_SCRIPT = """
import resource, sys
from tinystories.data import read_stories
unit = 1 if sys.platform == "darwin" else 1024
for path in sys.argv[1:]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    count = sum(1 for _ in read_stories(path))
    print(count, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * unit)
"""


def test_stories_are_streamed_not_loaded_whole(tmp_path: Path) -> None:
    """64 MiB of stories, plain and gzip, read with a peak-memory rise far below the input size."""
    story = "Once upon a time, a little dog named Max ran in the park with his red ball. " * 10
    block = "".join(f"{i}. {story}\n{EOT}\n" for i in range(1000)).encode()
    repeats = 64 * 2**20 // len(block)
    plain, packed = tmp_path / "big.txt", tmp_path / "big.txt.gz"
    with open(plain, "wb") as handle, gzip.open(packed, "wb", compresslevel=1) as gz:
        for _ in range(repeats):
            handle.write(block)
            gz.write(block)
    size = plain.stat().st_size
    assert size >= 60 * 2**20
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY_SCRIPT, str(packed), str(plain)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        count, growth = map(int, line.split())
        assert count == 1000 * repeats
        assert growth < size // 8  # reading it whole would need at least `size` (64 MiB)


# --- the bundled slice (package data) ------------------------------------------------------------

# SOURCES.md's "Stats" table: stories, and bytes uncompressed including separators.
BUNDLED_STATS = {"train.txt.gz": (16_648, 13_868_096), "valid.txt.gz": (1_332, 1_067_557)}
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_bundled_slice_holds_every_story_within_6_mb() -> None:
    folder = data.bundled_corpus_dir()
    assert (folder.parent.name, folder.name) == ("assets", "demo-corpus")  # package data beside the code
    assert sum((folder / name).stat().st_size for name in BUNDLED_STATS) <= 6_000_000
    for name, (stories, size) in BUNDLED_STATS.items():
        assert len(gzip.decompress((folder / name).read_bytes())) == size
        assert sum(1 for _ in read_stories(folder / name)) == stories
    # Only the two story files are stories: a folder read finds nothing else.
    assert [path.name for path in data.find_story_files([folder])] == ["train.txt.gz", "valid.txt.gz"]


def test_the_bundled_slice_carries_its_license_attribution_and_provenance() -> None:
    folder = data.bundled_corpus_dir()
    license_text = (folder / "LICENSE").read_text(encoding="utf-8")
    assert license_text.splitlines()[0] == "Community Data License Agreement - Sharing - Version 1.0"
    sections = ["Definitions", "Right and License to Use and to Publish", "Conditions on Rights Granted",
                "Data Provider(s)' Representations", "Termination",
                "Disclaimer of Warranties and Limitation of Liability", "Miscellaneous"]
    for number, title in enumerate(sections, start=1):
        assert f"   Section {number}. {title}\n" in license_text
    assert all(f"\n1.{n} \"" in license_text for n in range(1, 15))  # the 14 definitions
    assert license_text.rstrip().endswith("subsequent version\npublished by the Steward.")
    readme = " ".join((folder / "README.md").read_text(encoding="utf-8").split())
    for fragment in ("Ronen Eldan and Yuanzhi Li", "arXiv:2305.07759", "CDLA-Sharing-1.0",
                     "TinyStories: How Small Can Language Models Be and Still Speak Coherent English?"):
        assert fragment in readme
    sources = (folder / "SOURCES.md").read_text(encoding="utf-8")
    assert sources.startswith("# TinyStories data — sources and provenance")
    assert "| train.txt.gz | 16,648 | 13,868,096 | 4,161,334 |" in sources
    assert (folder / "train.txt.gz").stat().st_size == 4_161_334


def test_the_wheel_carries_the_bundled_slice(tmp_path: Path) -> None:
    """`pip install` must bring the demo corpus: build the wheel and compare its files with the source."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("tinystories-*.whl")
    folder = data.bundled_corpus_dir()
    with zipfile.ZipFile(wheel) as archive:
        for name in ("train.txt.gz", "valid.txt.gz", "LICENSE", "README.md", "SOURCES.md"):
            assert archive.read(f"tinystories/assets/demo-corpus/{name}") == (folder / name).read_bytes()


# --- prepare ------------------------------------------------------------------------------------


def test_prepared_small_has_the_documented_layout(prepared_small: Path, small_story_files) -> None:
    meta = load_meta(prepared_small)
    tokenizer = load_tokenizer(prepared_small)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["dtype"]) == ("bpe:512", 512, 0, "uint16")
    for split, path in zip(("train", "val"), small_story_files):
        stories = list(read_stories(path))
        tokens = load_tokens(prepared_small, split)
        stats = meta["splits"][split]
        assert stats["stories"] == len(stories) == {"train": SMALL_TRAIN_STORIES, "val": SMALL_VAL_STORIES}[split]
        assert stats["bytes"] == sum(len(story.encode("utf-8")) for story in stories)
        assert stats["tokens"] == len(tokens) == (prepared_small / stats["file"]).stat().st_size // 2
        # EOT precedes every story: EOT s1 EOT s2 ...
        assert tokens[0] == meta["eot_id"]
        assert int(np.sum(tokens == meta["eot_id"])) == len(stories)
        assert tokenizer.decode(tokens.tolist()) == "".join(EOT + story for story in stories)
        entry = meta["sources"][split][0]
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == data.file_sha256(path)
    assert meta["validation"] == {"source": "files", "fraction": None}
    assert not list(prepared_small.glob(".*tmp*"))


def test_tokens_are_a_read_only_memmap(prepared_small: Path) -> None:
    tokens = load_tokens(prepared_small, "train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    with pytest.raises(ValueError):
        tokens[0] = 1


def test_rerun_with_same_inputs_is_up_to_date(small_story_files, tmp_path: Path, capsys) -> None:
    train, val = small_story_files
    args = ["data", "prepare", "--input", str(train), "--val-input", str(val), "--tokenizer", "bytes",
            "--out", str(tmp_path / "out")]
    assert main(args) == 0
    before = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").iterdir()} == before
    # A different option is not up to date.
    assert main(args + ["--errors", "replace", "--quiet"]) == 0
    assert load_meta(tmp_path / "out")["errors"] == "replace"


def test_reusing_a_tokenizer_gives_byte_identical_shards(prepared_small: Path, small_story_files, tmp_path) -> None:
    train, val = small_story_files
    meta = prepare([train], tmp_path, str(prepared_small / "tokenizer.json"), [val], progress=False)
    assert meta["tokenizer"] == "bpe:512"
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (prepared_small / name).read_bytes()


def test_bytes_shards_hold_one_token_per_byte_plus_one_eot_per_story(small_story_files, tmp_path: Path) -> None:
    train, val = small_story_files
    meta = prepare([train], tmp_path, "bytes", [val], progress=False)
    for split in ("train", "val"):
        stats = meta["splits"][split]
        assert stats["tokens"] == stats["bytes"] + stats["stories"]
    assert load_tokens(tmp_path, "train")[0] == 256


def test_held_out_validation_is_deterministic_by_story_text(small_story_files, tmp_path: Path) -> None:
    train, _ = small_story_files
    stories = list(read_stories(train))
    expected_val = [story for story in stories if held_out_for_validation(story, 0.2)]
    assert 20 < len(expected_val) < 100  # about 60 of 300
    meta = prepare([train], tmp_path / "a", "bytes", val_fraction=0.2, progress=False)
    assert meta["validation"] == {"source": "held_out", "fraction": 0.2}
    assert meta["splits"]["val"]["stories"] == len(expected_val)
    assert meta["splits"]["train"]["stories"] == len(stories) - len(expected_val)
    val_text = load_tokenizer(tmp_path / "a").decode(load_tokens(tmp_path / "a", "val").tolist())
    assert val_text == "".join(EOT + story for story in expected_val)
    # A story's split depends on its text only, not on its position.
    again = prepare([train], tmp_path / "b", "bytes", val_fraction=0.2, progress=False)
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert again["fingerprint"] == meta["fingerprint"]


def test_bpe_is_trained_on_the_training_split_only(small_story_files, tmp_path: Path) -> None:
    from tinystories.tokenizer import make_tokenizer

    train, _ = small_story_files
    stories = list(read_stories(train))
    kept = [story for story in stories if not held_out_for_validation(story, 0.5)]
    prepare([train], tmp_path, "bpe:400", val_fraction=0.5, progress=False)
    trained = load_tokenizer(tmp_path)._hf.to_str()
    assert trained == make_tokenizer("bpe:400", kept)._hf.to_str()
    assert trained != make_tokenizer("bpe:400", stories)._hf.to_str()


def test_gpt2_shards_are_uint16_and_wide_vocabularies_use_uint32(small_story_files, gpt2_dir, tmp_path) -> None:
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    train, val = small_story_files
    meta = prepare([train], tmp_path, "gpt2", [val], progress=False, gpt2_dir=gpt2_dir)
    assert (meta["vocab_size"], meta["eot_id"], meta["dtype"]) == (50257, 50256, "uint16")
    assert load_tokens(tmp_path, "val")[0] == 50256


def test_default_inputs_come_from_tinystories_data(data_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("TINYSTORIES_DATA", str(data_dir))
    train, val = default_inputs()
    assert [p.name for p in train] == ["train.txt.gz"] and [p.name for p in val] == ["valid.txt.gz"]


def test_prepare_without_input_uses_tinystories_data(small_story_files, tmp_path, monkeypatch, capsys) -> None:
    train, val = small_story_files
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "my_train.txt").write_bytes(train.read_bytes())
    (folder / "my_val.txt").write_bytes(val.read_bytes())
    monkeypatch.setenv("TINYSTORIES_DATA", str(folder))
    assert main(["data", "prepare", "--tokenizer", "bytes", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    meta = load_meta(tmp_path / "out")
    assert [Path(e["path"]).name for e in meta["sources"]["train"]] == ["my_train.txt"]
    assert [Path(e["path"]).name for e in meta["sources"]["val"]] == ["my_val.txt"]
    assert meta["splits"]["val"]["stories"] == SMALL_VAL_STORIES


def test_without_tinystories_data_the_bundled_slice_is_used_offline(monkeypatch) -> None:
    monkeypatch.delenv("TINYSTORIES_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = data.bundled_corpus_dir()
    assert default_inputs() == ([folder / "train.txt.gz"], [folder / "valid.txt.gz"])
    assert "bundled TinyStories slice" in data.describe_inputs(*default_inputs())
    monkeypatch.setenv("TINYSTORIES_DATA", "/nonexistent")
    assert default_inputs("bundled") == ([folder / "train.txt.gz"], [folder / "valid.txt.gz"])
    with pytest.raises(DataError, match="offline mode"):
        default_inputs("hub")
    with pytest.raises(DataError, match="unknown --data-source 'web'"):
        default_inputs("web")


def test_prepare_without_input_or_tinystories_data_reads_the_bundled_slice(small_bundled_slice, tmp_path) -> None:
    assert main(["data", "prepare", "--tokenizer", "bytes", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    meta = load_meta(tmp_path / "out")
    assert [e["path"] for e in meta["sources"]["train"]] == [str(small_bundled_slice / "train.txt.gz")]
    assert [e["path"] for e in meta["sources"]["val"]] == [str(small_bundled_slice / "valid.txt.gz")]
    assert (meta["splits"]["train"]["stories"], meta["splits"]["val"]["stories"]) == (SMALL_TRAIN_STORIES,
                                                                                     SMALL_VAL_STORIES)


# --- interrupted and concurrent prepares: real processes ------------------------------------------

# `tinystories ARGS` in a child process that stops for good after writing its first chunk of token
# ids (touching SIGNAL_FILE then), so the test can kill it, or race it, mid-prepare.
PAUSED_PREPARE_SCRIPT = """
import sys, time
from pathlib import Path
from tinystories import data
from tinystories.cli import main

signal_file = Path(sys.argv[1])
write_ids = data._SplitWriter._write

def write_then_wait(self, ids):
    write_ids(self, ids)
    self._handle.flush()
    signal_file.touch()
    time.sleep(600)

data._SplitWriter._write = write_then_wait
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture
def larger_train(tmp_path: Path) -> Path:
    """About 1 MB of stories: four encoding chunks, so a paused prepare has written only part."""
    stories = [f"Story {i}. " + "Tom and Sue play with a red ball in the sun. " * 22 for i in range(1000)]
    return write_story_file(tmp_path / "larger_train.txt", stories)


def start_paused_prepare(args: list[str], tmp_path: Path) -> subprocess.Popen:
    """A child `tinystories ARGS` caught mid-write (returns once it has written its first chunk)."""
    signal_file = tmp_path / "paused"
    child = subprocess.Popen([sys.executable, "-c", PAUSED_PREPARE_SCRIPT, str(signal_file), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # a bound on waiting, not a measurement
    while not signal_file.exists():
        if child.poll() is not None:
            pytest.fail(f"the child prepare ended early (exit {child.returncode}): {child.stderr.read()}")
        assert time.monotonic() < deadline, "the child prepare never reached its first write"
        time.sleep(0.05)
    return child


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()
    child.stderr.close()


def hidden_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_rerun_after_kill_9_cleans_up_and_gives_the_uninterrupted_result(larger_train, tmp_path, capsys) -> None:
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(prepare_args(reference, larger_train, tokenizer="bpe:300") + ["--val-fraction", "0.1"]) == 0
    args = prepare_args(out, larger_train, tokenizer="bpe:300") + ["--val-fraction", "0.1"]
    child = start_paused_prepare(args, tmp_path)
    kill(child)
    left = hidden_files(out)
    assert left == [".prepare.lock", f".train.bin.tmp-{child.pid}", f".val.bin.tmp-{child.pid}"]
    assert not (out / "meta.json").exists()  # nothing looks complete
    with pytest.raises(DataError, match="meta.json missing"):
        load_meta(out)
    capsys.readouterr()

    assert main([arg for arg in args if arg != "--quiet"]) == 0
    stderr = capsys.readouterr().err
    assert f"removed 2 temporary file(s) that an interrupted prepare (pid {child.pid}) left in {out}" in stderr
    assert hidden_files(out) == []
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_second_prepare_of_a_folder_being_written_refuses_and_touches_nothing(larger_train, tmp_path,
                                                                               capsys) -> None:
    out = tmp_path / "out"
    args = prepare_args(out, larger_train) + ["--val-fraction", "0.1"]
    child = start_paused_prepare(args, tmp_path)
    try:
        before = {name: (out / name).stat().st_size for name in hidden_files(out)}
        code, stderr = run_cli(args, capsys)
        assert_one_line_error(code, stderr, f"output directory {out}", f"pid {child.pid}", "another", "--out")
        assert {name: (out / name).stat().st_size for name in hidden_files(out)} == before
        assert child.poll() is None  # the first is still alive, its files untouched
    finally:
        kill(child)
    assert main(args) == 0  # once it is dead, the same command runs
    assert hidden_files(out) == []
    assert load_meta(out)["splits"]["train"]["stories"] + load_meta(out)["splits"]["val"]["stories"] == 1000


def test_stale_temporaries_of_ours_are_removed_and_other_files_kept(good_train: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ours = [".meta.json.tmp-999999-0123abcd", ".tokenizer_meta.json.tmp-42-ff00ff00", ".val.bin.tmp-7"]
    others = [".notes.tmp-1", "keep.txt", ".train.bin.tmp-abc"]
    for name in ours + others:
        (out / name).write_text("x")
    (out / ".prepare.lock").write_text("999999\n")  # a dead run's lock file: locked again and removed
    prepare([good_train], out, "bytes", val_fraction=0.5, progress=False)
    assert sorted(path.name for path in out.iterdir()) == sorted(
        others + ["meta.json", "tokenizer_meta.json", "train.bin", "val.bin"])


# --- the hub ------------------------------------------------------------------------------------


def test_download_offline_mode_fails_with_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stderr = run_cli(["data", "download", "--version", "v1", "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, stderr, "TinyStories-train.txt", "offline", "size", "--input", "bundled")


def test_download_with_unreachable_hub_fails_with_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(DataError, match=r"cannot download TinyStoriesV2-GPT4-train.txt .*--input") as caught:
        download(version="v2-gpt4", out_dir=tmp_path, endpoint="http://127.0.0.1:9", timeout=3)
    assert "\n" not in str(caught.value)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def fake_hub(monkeypatch, capsys):
    """huggingface_hub's metadata and download calls replaced: sizes of 2,227,753,162 and 22,502,601
    bytes, files written locally. Returns the events in order, each download with the stderr seen so far."""
    import huggingface_hub

    sizes = {"TinyStoriesV2-GPT4-train.txt": 2_227_753_162, "TinyStoriesV2-GPT4-valid.txt": 22_502_601}
    events: list[tuple[str, str, str]] = []

    def metadata(url, **kwargs):
        name = url.rsplit("/", 1)[-1]
        events.append(("size", name, ""))
        return type("Metadata", (), {"size": sizes[name]})()

    def fetch(dataset, filename, *, local_dir, **kwargs):
        events.append(("download", filename, capsys.readouterr().err))
        path = Path(local_dir or ".") / filename
        write_story_file(path, [f"A story from {filename}."])
        return str(path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fetch)
    return events


def test_download_says_how_big_the_files_are_before_it_starts(fake_hub, tmp_path, capsys) -> None:
    code = main(["data", "download", "--out", str(tmp_path)])
    assert code == 0
    assert [(kind, name) for kind, name, _ in fake_hub] == [
        ("size", "TinyStoriesV2-GPT4-train.txt"), ("size", "TinyStoriesV2-GPT4-valid.txt"),
        ("download", "TinyStoriesV2-GPT4-train.txt"), ("download", "TinyStoriesV2-GPT4-valid.txt"),
    ]
    announced = fake_hub[2][2]  # what stderr held when the first download began
    assert announced.strip() == (
        "tinystories: downloading from the Hugging Face hub (roneneldan/TinyStories): "
        "TinyStoriesV2-GPT4-train.txt (2.23 GB), TinyStoriesV2-GPT4-valid.txt (22.50 MB), 2.25 GB in all"
    )
    assert capsys.readouterr().out.split() == [str(tmp_path / name) for name in data.HUB_FILES["v2-gpt4"]]


def test_hub_data_source_downloads_both_files(fake_hub, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # without --out the fake writes to the working folder
    train, val = default_inputs("hub")
    assert [p.name for p in train + val] == list(data.HUB_FILES["v2-gpt4"])
    assert list(read_stories(val)) == ["A story from TinyStoriesV2-GPT4-valid.txt."]
    assert [kind for kind, _, _ in fake_hub] == ["size", "size", "download", "download"]


def test_download_rejects_an_unknown_version(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["data", "download", "--version", "v3"])
    with pytest.raises(DataError, match="unknown TinyStories version"):
        download(version="v3")


# --- bad input: one line, exit code 2, nothing written --------------------------------------------


@pytest.fixture
def good_train(tmp_path: Path) -> Path:
    return write_story_file(tmp_path / "good_train.txt", [f"Story {i}. Tom and Sue play." for i in range(20)])


def prepare_args(out: Path, *inputs: Path | str, tokenizer: str = "bytes") -> list[str]:
    return ["data", "prepare", "--input", *map(str, inputs), "--tokenizer", tokenizer, "--out", str(out), "--quiet"]


def test_missing_input_file(tmp_path: Path, capsys) -> None:
    code, stderr = run_cli(prepare_args(tmp_path / "out", tmp_path / "nope.txt"), capsys)
    assert_one_line_error(code, stderr, "nope.txt", "no such file")
    assert not (tmp_path / "out").exists()


def test_folder_without_story_files(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "readme.md").write_text("no stories here")
    code, stderr = run_cli(prepare_args(tmp_path / "out", folder), capsys)
    assert_one_line_error(code, stderr, str(folder), "no readable story files")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"\n  \n", f"{EOT}\n{EOT}\n".encode()])
def test_empty_file(content: bytes, tmp_path: Path, capsys) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    code, stderr = run_cli(prepare_args(tmp_path / "out", path), capsys)
    assert_one_line_error(code, stderr, "empty.txt", "empty")
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path, capsys) -> None:
    head = f"Good story.\n{EOT}\nBad ".encode()
    path = tmp_path / "bad.txt"
    path.write_bytes(head + b"\xff byte here.\n")
    code, stderr = run_cli(prepare_args(tmp_path / "out", path), capsys)
    assert_one_line_error(code, stderr, "bad.txt", f"byte offset {len(head)}", "--errors replace")
    assert not (tmp_path / "out").exists()
    # --errors replace opts in: the bad byte becomes U+FFFD.
    assert list(read_stories(path, errors="replace")) == ["Good story.", "Bad \ufffd byte here."]


def test_invalid_utf8_inside_gzip_reports_the_decompressed_offset(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt.gz"
    # "ok\n" (3 bytes) + "<|endoftext|>\n" (14) + "ab" (2): the bad byte is at offset 19.
    path.write_bytes(gzip.compress(b"ok\n" + EOT.encode() + b"\nab\xc3(\n"))
    with pytest.raises(DataError, match=r"bad.txt.gz: invalid UTF-8 at byte offset 19 of the decompressed text"):
        list(read_stories(path))


def test_invalid_utf8_deep_in_a_file_leaves_nothing_behind(good_train: Path, tmp_path: Path, capsys) -> None:
    # The first story is fine (so the up-front check passes); the failure comes while encoding.
    path = tmp_path / "late.txt"
    path.write_bytes(good_train.read_bytes() + b"Broken \xfe story.\n")
    out = tmp_path / "new" / "out"
    half = ["--val-fraction", "0.5"]
    code, stderr = run_cli(prepare_args(out, good_train, path) + half, capsys)
    assert_one_line_error(code, stderr, "late.txt", "invalid UTF-8")
    assert not (tmp_path / "new").exists()
    # An existing complete result survives a failed rerun.
    assert main(prepare_args(out, good_train) + half) == 0
    before = (out / "train.bin").read_bytes()
    code, stderr = run_cli(prepare_args(out, good_train, path) + half, capsys)
    assert code == 2
    assert (out / "train.bin").read_bytes() == before and load_meta(out)["splits"]["train"]["tokens"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "tokenizer_meta.json", "train.bin", "val.bin"]


def test_jsonl_without_text_field_lists_the_fields(tmp_path: Path, capsys) -> None:
    path = tmp_path / "stories.jsonl"
    path.write_text(json.dumps({"id": 1, "content": "A story."}) + "\n")
    code, stderr = run_cli(prepare_args(tmp_path / "out", path), capsys)
    assert_one_line_error(code, stderr, "stories.jsonl", "no 'text' or 'story' field", "fields found: id, content")


def test_parquet_without_text_column_lists_the_columns(tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "stories.parquet"
    pq.write_table(pa.table({"body": ["A story."], "label": [1]}), path)
    code, stderr = run_cli(prepare_args(tmp_path / "out", path), capsys)
    assert_one_line_error(code, stderr, "stories.parquet", "fields found: body, label")


def test_bpe_vocab_below_257(good_train: Path, tmp_path: Path, capsys) -> None:
    code, stderr = run_cli(prepare_args(tmp_path / "out", good_train, tokenizer="bpe:200"), capsys)
    assert_one_line_error(code, stderr, "bpe:200", "at least 257")
    assert not (tmp_path / "out").exists()


def test_bpe_vocab_larger_than_the_corpus_supports(good_train: Path, tmp_path: Path, capsys) -> None:
    code, stderr = run_cli(prepare_args(tmp_path / "out", good_train, tokenizer="bpe:5000"), capsys)
    assert_one_line_error(code, stderr, "bpe:5000", "larger than the training stories support")
    assert not (tmp_path / "out").exists()


def test_output_dir_not_writable(good_train: Path, tmp_path: Path, capsys) -> None:
    # A path below a regular file can never be created, even by root (chmod does not stop root).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, stderr = run_cli(prepare_args(blocker / "out", good_train), capsys)
    assert_one_line_error(code, stderr, "output directory", "not writable")
    code, stderr = run_cli(prepare_args(blocker, good_train), capsys)
    assert_one_line_error(code, stderr, "output directory", "not a directory")


def test_unknown_tokenizer_spec(good_train: Path, tmp_path: Path, capsys) -> None:
    code, stderr = run_cli(prepare_args(tmp_path / "out", good_train, tokenizer="sentencepiece"), capsys)
    assert_one_line_error(code, stderr, "unknown tokenizer spec 'sentencepiece'", "bpe:N")
    assert not (tmp_path / "out").exists()


def test_bad_val_fraction(good_train: Path, tmp_path: Path, capsys) -> None:
    code, stderr = run_cli(prepare_args(tmp_path / "out", good_train) + ["--val-fraction", "1.5"], capsys)
    assert_one_line_error(code, stderr, "--val-fraction")


def test_hold_out_that_catches_no_story(tmp_path: Path, capsys) -> None:
    path = write_story_file(tmp_path / "one.txt", ["Only one story."])
    assert not held_out_for_validation("Only one story.", 0.001)
    code, stderr = run_cli(prepare_args(tmp_path / "out", path) + ["--val-fraction", "0.001"], capsys)
    assert_one_line_error(code, stderr, "--val-input")
    assert not (tmp_path / "out").exists()


def test_load_meta_of_an_unprepared_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="meta.json missing"):
        load_meta(tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_tokens(tmp_path, "test")


def test_cli_help_documents_every_prepare_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["data", "prepare", "--help"])
    text = capsys.readouterr().out
    for option in ("--input", "--val-input", "--tokenizer", "--out", "--errors", "--val-fraction", "--quiet"):
        assert option in text
    assert "EOT s1 EOT s2" in text


def test_shards_are_identical_without_the_tiktoken_fast_path(prepared_small: Path, small_story_files, tmp_path,
                                                             monkeypatch) -> None:
    import tinystories.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "_tiktoken_engine", lambda *args: None)
    assert load_tokenizer(prepared_small).engine == "tokenizers"
    train, val = small_story_files
    prepare([train], tmp_path, str(prepared_small), [val], progress=False)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / name).read_bytes() == (prepared_small / name).read_bytes()
