"""Tokenizers: exact round trips, GPT-2 ids equal tiktoken's, save/load, bad specs."""

from __future__ import annotations

import ast
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from tinystories.data import read_stories
from tinystories.tokenizer import (
    EOT,
    BPETokenizer,
    BytesTokenizer,
    TokenizerError,
    bytes_to_unicode,
    load_tokenizer,
    make_tokenizer,
    merge_pair,
    symbol_bytes,
    unicode_to_bytes,
)

# Text that byte-level tokenizers must not alter: leading/trailing/repeated spaces, tabs, CRLF,
# blank lines, curly quotes, accents, CJK, emoji, a NUL and a lone combining mark.
TRICKY_TEXTS = [
    " leading space",
    "trailing spaces   ",
    "two  spaces\tand a tab",
    "\n\nblank lines first\n\n\nand inside\n",
    "windows\r\nline\r\nends\r\n",
    "“Curly” quotes and it’s — dashes…",
    "naïve café Ångström; e\u0301 (decomposed, must stay decomposed)",
    "日本語のテキスト and 😀🐶 emoji",
    "nul\x00byte",
    "",
]


@pytest.fixture(scope="module")
def train_sample(data_dir: Path) -> list[str]:
    """The first 3,000 training stories (enough to train bpe:4096 in about a second)."""
    return list(islice(read_stories(data_dir / "train.txt.gz"), 3000))


@pytest.fixture(scope="module")
def bpe4096(train_sample: list[str]) -> BPETokenizer:
    tokenizer = make_tokenizer("bpe:4096", train_sample)
    assert isinstance(tokenizer, BPETokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def gpt2(gpt2_dir: Path) -> BPETokenizer:
    tokenizer = make_tokenizer("gpt2", gpt2_dir=gpt2_dir)
    assert isinstance(tokenizer, BPETokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def reference_gpt2(gpt2_dir: Path):
    """tiktoken's GPT-2 encoding built here, independently, from the local files (no network)."""
    import tiktoken  # a core dependency

    encoder = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    ranks = {symbol_bytes(token): rank for token, rank in encoder.items() if token != EOT}
    return tiktoken.Encoding(
        "gpt2-local",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )


def test_byte_symbol_maps_invert_each_other():
    """GPT-2's byte-level alphabet: 256 distinct printable symbols, "!" stands for itself and the
    space byte for "Ġ" (as in every GPT-2 vocabulary); the inverse map and symbol_bytes undo it."""
    symbols = bytes_to_unicode()
    assert len(set(symbols.values())) == 256 and all(symbol.isprintable() for symbol in symbols.values())
    assert symbols[ord("!")] == "!" and symbols[ord(" ")] == "Ġ" and symbols[ord("\n")] == "Ċ"
    assert unicode_to_bytes() == {symbol: byte for byte, symbol in symbols.items()}
    assert symbol_bytes("ĠOnce") == b" Once" and symbol_bytes("Ċ") == b"\n"
    assert symbol_bytes("x\u4e00") is None  # a character outside the alphabet
    assert merge_pair("Ġ t") == merge_pair(["Ġ", "t"]) == ("Ġ", "t")


def tokenizer_of_kind(kind: str, request: pytest.FixtureRequest):
    """bytes, or the module's trained bpe:4096 / gpt2 fixture (built only when a test needs it)."""
    if kind == "bytes":
        return BytesTokenizer()
    return request.getfixturevalue({"bpe": "bpe4096", "gpt2": "gpt2"}[kind])


def _hf_engine(tokenizer: BPETokenizer) -> BPETokenizer:
    """The same tokenizer encoding through Hugging Face `tokenizers` instead of tiktoken."""
    return BPETokenizer(tokenizer._hf, tokenizer.kind, tokenizer.spec, use_tiktoken=False)


# --- bytes ----------------------------------------------------------------------------------------


def test_bytes_ids_are_utf8_bytes_and_eot_is_256() -> None:
    tokenizer = make_tokenizer("bytes")
    assert (tokenizer.kind, tokenizer.spec, tokenizer.vocab_size, tokenizer.eot_id) == ("bytes", "bytes", 257, 256)
    # "é" is C3 A9 in UTF-8.
    assert tokenizer.encode("Hi é") == [72, 105, 32, 0xC3, 0xA9]
    assert tokenizer.encode(f"a{EOT}b") == [97, 256, 98]
    assert tokenizer.decode([72, 105, 256]) == f"Hi{EOT}"


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "bpe", "gpt2"])
def test_every_validation_story_round_trips(kind: str, valid_stories: list[str], request) -> None:
    tokenizer = tokenizer_of_kind(kind, request)
    assert len(valid_stories) > 1000
    encoded = tokenizer.encode_batch(valid_stories)
    mismatches = [index for index, (ids, story) in enumerate(zip(encoded, valid_stories))
                  if tokenizer.decode(ids) != story]
    assert mismatches == []
    assert all(tokenizer.eot_id not in ids for ids in encoded)  # encode adds no EOT


@pytest.mark.parametrize("kind", ["bytes", "bpe", "gpt2"])
def test_whitespace_and_unicode_round_trip_exactly(kind: str, request) -> None:
    tokenizer = tokenizer_of_kind(kind, request)
    engines = [tokenizer] if kind == "bytes" else [tokenizer, _hf_engine(tokenizer)]
    for engine in engines:
        for text in TRICKY_TEXTS + [f"one{EOT}two", f"{EOT} starts with EOT"]:
            assert engine.decode(engine.encode(text)) == text, (engine, text)


@pytest.mark.parametrize("kind", ["bytes", "bpe", "gpt2"])
def test_decoding_a_split_utf8_character_does_not_raise(kind: str, request) -> None:
    tokenizer = tokenizer_of_kind(kind, request)
    engines = [tokenizer] if kind == "bytes" else [tokenizer, _hf_engine(tokenizer)]
    for engine in engines:
        ids = engine.encode("🐶")  # 4 UTF-8 bytes: more than one token in all three vocabularies
        assert len(ids) > 1
        for cut in range(1, len(ids)):
            assert "\ufffd" in engine.decode(ids[:cut])
        assert engine.decode(ids) == "🐶"


@pytest.mark.parametrize("kind", ["bytes", "bpe", "gpt2"])
def test_ids_outside_the_vocabulary_decode_to_replacement_characters(kind: str, request) -> None:
    tokenizer = tokenizer_of_kind(kind, request)
    hi, there = tokenizer.encode("Hi"), tokenizer.encode(" there")
    outside = tokenizer.vocab_size  # e.g. sampled from a padded embedding table
    assert tokenizer.decode(hi + [outside] + there) == "Hi\ufffd there"
    assert tokenizer.decode([-1, outside + 5]) == "\ufffd\ufffd"


# --- bpe ------------------------------------------------------------------------------------------


def test_bpe_has_requested_size_and_eot_first(bpe4096: BPETokenizer) -> None:
    assert (bpe4096.kind, bpe4096.spec, bpe4096.vocab_size, bpe4096.eot_id) == ("bpe", "bpe:4096", 4096, 0)
    assert bpe4096.encode(f"The end.{EOT}Once") == bpe4096.encode("The end.") + [0] + bpe4096.encode("Once")
    # Frequent words are single tokens after training on stories.
    assert len(bpe4096.encode("Once upon a time")) == 4  # Once, " upon", " a", " time"


def test_bpe_fast_engine_matches_hugging_face_tokenizers(bpe4096: BPETokenizer, valid_stories: list[str]) -> None:
    assert bpe4096.engine == "tiktoken"
    reference = _hf_engine(bpe4096)
    assert reference.engine == "tokenizers"
    assert bpe4096.encode_batch(valid_stories) == reference.encode_batch(valid_stories)


def test_bpe_training_is_deterministic(train_sample: list[str]) -> None:
    first = make_tokenizer("bpe:600", train_sample[:300])
    second = make_tokenizer("bpe:600", train_sample[:300])
    assert first._hf.to_str() == second._hf.to_str()


def test_bpe_vocab_below_257_is_rejected() -> None:
    with pytest.raises(TokenizerError, match="at least 257"):
        make_tokenizer("bpe:256", ["some story"])


def test_bpe_vocab_larger_than_the_corpus_supports_is_rejected() -> None:
    with pytest.raises(TokenizerError, match="larger than the training stories support"):
        make_tokenizer("bpe:2000", ["a tiny corpus", "with few words"])


def test_bpe_without_stories_is_rejected() -> None:
    with pytest.raises(TokenizerError, match="must be trained"):
        make_tokenizer("bpe:512")
    with pytest.raises(TokenizerError, match="no training stories"):
        make_tokenizer("bpe:512", [])


# --- gpt2 -----------------------------------------------------------------------------------------


def test_gpt2_ids_equal_tiktoken(gpt2: BPETokenizer, reference_gpt2, valid_stories: list[str], train_sample) -> None:
    assert (gpt2.kind, gpt2.spec, gpt2.vocab_size, gpt2.eot_id) == ("gpt2", "gpt2", 50257, 50256)
    stories = valid_stories + train_sample[:500] + TRICKY_TEXTS
    expected = reference_gpt2.encode_ordinary_batch(stories)
    assert gpt2.encode_batch(stories) == expected
    # The tokenizer.json path (what a run dir stores and transformers loads) agrees too.
    assert _hf_engine(gpt2).encode_batch(stories) == expected
    assert gpt2.encode(f"Hello{EOT}") == reference_gpt2.encode(f"Hello{EOT}", allowed_special="all")
    # Hand-checked GPT-2 ids: "Hello" = 15496, " world" = 995.
    assert gpt2.encode("Hello world") == [15496, 995]


def test_gpt2_saved_in_a_run_dir_loads_without_the_shared_files(
    gpt2: BPETokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpt2.save(tmp_path / "run")
    monkeypatch.setenv("TINYSTORIES_GPT2_DIR", str(tmp_path / "nowhere"))
    loaded = load_tokenizer(tmp_path / "run")
    assert (loaded.kind, loaded.spec, loaded.vocab_size, loaded.eot_id) == ("gpt2", "gpt2", 50257, 50256)
    text = "Once upon a time, Lily’s dog ran.\nThe end."
    assert loaded.encode(text) == gpt2.encode(text)


def test_gpt2_without_its_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="encoder.json"):
        make_tokenizer("gpt2", gpt2_dir=tmp_path)


# --- saving, loading, specs -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_save_then_load_gives_the_same_tokenizer(kind: str, bpe4096: BPETokenizer, tmp_path: Path) -> None:
    tokenizer = BytesTokenizer() if kind == "bytes" else bpe4096
    tokenizer.save(tmp_path)
    meta = json.loads((tmp_path / "tokenizer_meta.json").read_text())
    assert meta == {"kind": tokenizer.kind, "spec": tokenizer.spec,
                    "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}
    assert (tmp_path / "tokenizer.json").exists() == (kind == "bpe")
    for loaded in (load_tokenizer(tmp_path), make_tokenizer(str(tmp_path))):
        assert loaded.meta() == tokenizer.meta()
        text = "Tom and Sue went to the park. “Hi!” said Sue."
        assert loaded.encode(text) == tokenizer.encode(text)
    if kind == "bpe":
        from_file = make_tokenizer(str(tmp_path / "tokenizer.json"))
        assert from_file.meta() == tokenizer.meta()


def test_transformers_loads_the_saved_tokenizer(bpe4096: BPETokenizer, tmp_path: Path) -> None:
    import transformers  # in the dev extras
    bpe4096.save(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in ["Once upon a time, there was a dog.", "  two spaces\nnew line", "“quotes” é 😀"]:
        ids = fast.encode(text, add_special_tokens=False)
        assert ids == bpe4096.encode(text)
        assert fast.decode(ids) == text


def test_encode_batch_equals_encode_one_by_one(bpe4096: BPETokenizer) -> None:
    texts = ["first story", "", "third\nstory " * 50, EOT]
    assert bpe4096.encode_batch(texts) == [bpe4096.encode(text) for text in texts]
    assert BytesTokenizer().encode_batch(texts) == [BytesTokenizer().encode(text) for text in texts]


@pytest.mark.parametrize("kind", ["bytes", "bpe", "gpt2"])
def test_encode_to_numpy_equals_encode(kind: str, valid_stories: list[str], request) -> None:
    tokenizer = tokenizer_of_kind(kind, request)
    engines = [tokenizer] if kind == "bytes" else [tokenizer, _hf_engine(tokenizer)]
    text = "".join(EOT + story for story in valid_stories[:100]) + "\n tail 😀"
    for engine in engines:
        array = engine.encode_to_numpy(text)
        assert array.dtype == np.uint32
        assert array.tolist() == engine.encode(text)


@pytest.mark.parametrize("spec", ["wordpiece", "bpe:lots", "bpe4096", "gpt3"])
def test_unknown_spec_is_a_user_error(spec: str) -> None:
    with pytest.raises(TokenizerError, match="unknown tokenizer spec"):
        make_tokenizer(spec, ["a story"])


def test_missing_tokenizer_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        make_tokenizer(str(tmp_path / "missing" / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path)


def test_default_bpe_spec_is_4096(train_sample: list[str]) -> None:
    from tinystories.tokenizer import parse_spec

    assert parse_spec("bpe") == ("bpe", 4096)
    assert parse_spec("bpe:300") == ("bpe", 300)


# --- the package's import graph -----------------------------------------------------------------

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "tinystories"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every tinystories module an `import` anywhere in `tree` names (function bodies included),
    plus the command modules `tinystories.cli` loads by name with importlib."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    if module == "tinystories.cli":
        from tinystories.cli import COMMAND_MODULES

        names.update(f"tinystories.cli.{name}" for name in COMMAND_MODULES)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the tinystories modules it imports (a module's own parent packages left out: Python
    imports those first, whatever the module says)."""
    sources = {_module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}
    graph = {}
    for module, path in sources.items():
        names = _imported_names(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py")
        graph[module] = {name for name in names if name in sources and name != module
                         and not module.startswith(name + ".")}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per module that can reach itself (depth-first search)."""
    cycles = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for target in sorted(graph[module]):
                if target == start:
                    cycles.append(path + [start])
                    stack = []
                    break
                if target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
    return cycles


def test_import_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [cycle[0] for cycle in import_cycles(graph)] == ["a", "b", "c"]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "tinystories.vocab_bin" in graph["tinystories.tokenizer"]  # the graph sees module-level imports
    assert "tinystories.tokenizer" in graph["tinystories.checkpoint"]  # ... and function-level ones
    assert "tinystories.cli.export" in graph["tinystories.cli"]  # ... and cli's importlib command list
    assert graph["tinystories.vocab_bin"] <= {"tinystories.errors", "tinystories.files"}  # a leaf
    assert import_cycles(graph) == []
