"""The command line as a whole: every command takes a model the same way, and every path argument
that is missing, empty, unreadable or of the wrong kind gives one line on stderr and exit code 2.

Commands run in-process through `tinystories.cli.main(argv)`; a few run as real processes to check
the exit code and that no traceback reaches stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from export_helpers import llama_config, make_run
from tinystories.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `tinystories ARGV`; argparse's own exits count as exit codes."""
    capsys.readouterr()
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def paths(tmp_path_factory, small_story_files, prepared_small) -> dict[str, Path]:
    """Good and bad paths to hand the commands (made once; the tests never write inside them)."""
    root = tmp_path_factory.mktemp("cli-paths")
    run, _ = make_run(root / "run", llama_config(vocab_size=320, context_length=32))
    named = {"run": run, "checkpoint": run / "checkpoints" / "best", "stories": small_story_files[1],
             "missing": root / "missing", "missing_file": root / "missing.txt", "empty_dir": root / "empty",
             "file": root / "notes.txt", "empty_file": root / "empty.txt", "under_file": root / "notes.txt" / "x",
             "full_dir": root / "full", "bad_config": root / "bad-config", "config_dir": root / "config-dir",
             "truncated": root / "truncated", "out": root / "new-out", "png": root / "new.png",
             "shards": prepared_small}
    named["empty_dir"].mkdir()
    named["file"].write_text("not a model, not a folder\n")
    named["empty_file"].write_bytes(b"")
    named["full_dir"].mkdir()
    (named["full_dir"] / "keep.txt").write_text("keep")
    # A run whose config.json is not JSON; one whose config.json is a folder (opening it fails);
    # one whose weights are cut short.
    for name in ("bad_config", "config_dir", "truncated"):
        make_run(named[name], llama_config(vocab_size=320, context_length=32))
    (named["bad_config"] / "config.json").write_text("{not json")
    (named["config_dir"] / "config.json").unlink()
    (named["config_dir"] / "config.json").mkdir()
    weights = named["truncated"] / "checkpoints" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return named


# --- the model argument: the same forms everywhere ------------------------------------------------

MODEL_COMMANDS = {  # command -> the rest of a command line that succeeds with a good model
    "generate": ["--prompt", "Once", "--max-new-tokens", "3", "--temperature", "0"],
    "eval": ["--input", "{stories}", "--samples", "0"],
    "serve": [],
    "export": ["--format", "safetensors", "--out", "{out}"],
    "diagram": ["--out", "{png}"],
    "inspect attention": ["--prompt", "Once upon a time", "--out", "{png}"],
    "inspect params": [],
}


def command_line(command: str, model_args: list[str], paths: dict[str, Path], tmp_path: Path) -> list[str]:
    fresh = {"out": tmp_path / "out", "png": tmp_path / "figure.png", "stories": paths["stories"]}
    rest = [part.format(**fresh) for part in MODEL_COMMANDS[command]]
    return command.split() + model_args + rest


@pytest.fixture
def no_server(monkeypatch):
    """`serve` loads its model, then would listen: record what it got instead of listening."""
    import tinystories.serve

    served = []
    monkeypatch.setattr(tinystories.serve, "serve", lambda model, name, **options: served.append((model, name)))
    return served


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
@pytest.mark.parametrize("form", ["run positional", "checkpoint --model", "shipped positional", "shipped --model"])
def test_every_model_command_takes_every_form(command, form, paths, tmp_path, capsys, no_server):
    where, how = form.split()
    model = {"run": str(paths["run"]), "checkpoint": str(paths["checkpoint"]), "shipped": "tiny"}[where]
    model_args = [model] if how == "positional" else ["--model", model]
    code, out, err = run_cli(command_line(command, model_args, paths, tmp_path), capsys)
    assert code == 0, err
    expected_layers = "4" if where == "shipped" else "2"  # tiny has 4 layers, the test run 2
    if command == "inspect params":
        assert out.splitlines()[-1].split()[0] == "total"
    elif command == "eval":
        assert "| val_loss |" in out
    elif command == "serve":
        (model_served, _), = no_server
        assert model_served.config.model.n_layer == int(expected_layers)
    elif command == "export":
        exported = json.loads((tmp_path / "out" / "config.json").read_text())
        assert exported["model"]["n_layer"] == int(expected_layers)
    elif command in ("diagram", "inspect attention"):
        assert (tmp_path / "figure.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", list(MODEL_COMMANDS))
def test_a_model_given_twice_or_not_at_all_is_one_line(command, paths, tmp_path, capsys, no_server):
    code, _, err = run_cli(command_line(command, ["tiny", "--model", "tiny"], paths, tmp_path), capsys)
    assert code == 2 and "not both" in err and err.count("\n") == 1
    if command not in ("generate", "serve"):  # those two default to the shipped tiny
        code, _, err = run_cli(command_line(command, [], paths, tmp_path), capsys)
        assert code == 2 and err.count("\n") == 1 and ("no model given" in err or "--preset" in err)
    assert no_server == []


# --- bad paths: one line naming it, exit 2 --------------------------------------------------------

BAD_MODELS = ["missing", "empty_dir", "file", "bad_config", "config_dir", "truncated", "empty string"]
# What each bad model must name: the path, or for the broken runs the file inside them that is bad.
BAD_MODEL_NAMES = {"bad_config": "config.json", "config_dir": "config.json", "truncated": "model.safetensors"}
CONFIG_ONLY = ("diagram", "inspect params")  # these read config.json only: truncated weights do not matter


def bad_model_cases():
    for command in MODEL_COMMANDS:
        for bad in BAD_MODELS:
            if not (bad == "truncated" and command in CONFIG_ONLY):
                yield pytest.param(command, bad, id=f"{command}-{bad}")


@pytest.mark.parametrize("command, bad", list(bad_model_cases()))
@pytest.mark.parametrize("how", ["positional", "--model"])
def test_a_bad_model_path_is_one_line_exit_2(command, bad, how, paths, tmp_path, capsys, no_server):
    model = "" if bad == "empty string" else str(paths[bad])
    argv = command_line(command, [model] if how == "positional" else ["--model", model], paths, tmp_path)
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("tinystories: error: ") and err.count("\n") == 1, err
    assert (BAD_MODEL_NAMES.get(bad) or model or "RUN ''") in err
    assert no_server == [] and not (tmp_path / "out").exists() and not (tmp_path / "figure.png").exists()


# Every other path argument: (case id, command line, what the message must contain). The placeholders
# are `paths` entries; {tmp} is a fresh folder for outputs.
BAD_PATHS = [
    ("eval --data missing", ["eval", "{run}", "--data", "{missing}", "--samples", "0"], "{missing}"),
    ("eval --data file", ["eval", "{run}", "--data", "{file}", "--samples", "0"], "{file}"),
    ("eval --data empty", ["eval", "{run}", "--data", "{empty_dir}", "--samples", "0"], "{empty_dir}"),
    ("eval --input missing", ["eval", "{run}", "--input", "{missing_file}", "--samples", "0"], "{missing_file}"),
    ("eval --input empty file", ["eval", "{run}", "--input", "{empty_file}", "--samples", "0"], "{empty_file}"),
    ("eval --input empty dir", ["eval", "{run}", "--input", "{empty_dir}", "--samples", "0"], "{empty_dir}"),
    ("eval --json dir", ["eval", "{run}", "--input", "{stories}", "--samples", "0", "--json", "{empty_dir}"],
     "{empty_dir}"),
    ("eval --json under file", ["eval", "{run}", "--input", "{stories}", "--samples", "0", "--json",
                                "{under_file}"], "{under_file}"),
    ("export --out file", ["export", "{run}", "--format", "hf", "--out", "{file}"], "{file}"),
    ("export --out full", ["export", "{run}", "--format", "hf", "--out", "{full_dir}"], "{full_dir}"),
    ("export --out under file", ["export", "{run}", "--format", "safetensors", "--out", "{under_file}"],
     "{under_file}"),
    ("export gguf --out under file", ["export", "{run}", "--format", "gguf", "--out", "{file}/m.gguf"],
     "{file}"),
    ("import MODEL missing", ["import", "llama2c", "{missing_file}", "--tokenizer", "{file}", "--out", "{tmp}/r"],
     "{missing_file}"),
    ("import MODEL dir", ["import", "llama2c", "{empty_dir}", "--tokenizer", "{file}", "--out", "{tmp}/r"],
     "{empty_dir}"),
    ("import MODEL empty", ["import", "llama2c", "{empty_file}", "--tokenizer", "{file}", "--out", "{tmp}/r"],
     "{empty_file}"),
    ("import --tokenizer missing", ["import", "llama2c", "{file}", "--tokenizer", "{missing_file}", "--out",
                                    "{tmp}/r"], "{missing_file}"),
    ("import --tokenizer dir", ["import", "llama2c", "{file}", "--tokenizer", "{empty_dir}", "--out", "{tmp}/r"],
     "{empty_dir}"),
    ("import --out file", ["import", "llama2c", "{file}", "--tokenizer", "{file}", "--out", "{file}"], "{file}"),
    ("diagram --out dir", ["diagram", "--preset", "tiny", "--out", "{empty_dir}"], "{empty_dir}"),
    ("diagram --out under file", ["diagram", "--preset", "tiny", "--out", "{under_file}.png"], "{under_file}"),
    ("inspect attention --out dir", ["inspect", "attention", "{run}", "--prompt", "Hi", "--out", "{empty_dir}"],
     "{empty_dir}"),
    ("data prepare --input missing", ["data", "prepare", "--input", "{missing_file}", "--out", "{tmp}/d"],
     "{missing_file}"),
    ("data prepare --input empty file", ["data", "prepare", "--input", "{empty_file}", "--out", "{tmp}/d"],
     "{empty_file}"),
    ("data prepare --input empty dir", ["data", "prepare", "--input", "{empty_dir}", "--out", "{tmp}/d"],
     "{empty_dir}"),
    ("data prepare --val-input missing", ["data", "prepare", "--input", "{stories}", "--val-input",
                                          "{missing_file}", "--out", "{tmp}/d"], "{missing_file}"),
    ("data prepare --tokenizer missing", ["data", "prepare", "--input", "{stories}", "--tokenizer",
                                          "{missing}/tokenizer.json", "--out", "{tmp}/d"], "{missing}"),
    ("data prepare --tokenizer empty dir", ["data", "prepare", "--input", "{stories}", "--tokenizer",
                                            "{empty_dir}", "--out", "{tmp}/d"], "{empty_dir}"),
    ("data prepare --out file", ["data", "prepare", "--input", "{stories}", "--out", "{file}"], "{file}"),
    ("train --data missing", ["train", "--data", "{missing}", "--out", "{tmp}/r"], "{missing}"),
    ("train --data file", ["train", "--data", "{file}", "--out", "{tmp}/r"], "{file}"),
    ("train --data empty", ["train", "--data", "{empty_dir}", "--out", "{tmp}/r"], "{empty_dir}"),
    # with shards whose tokenizer differs from the preset's, so the notes about it would come first
    ("train --out file", ["train", "--data", "{shards}", "--out", "{file}"], "{file}"),
    ("train --out under file", ["train", "--data", "{shards}", "--out", "{under_file}"], "{under_file}"),
    ("train --init-from missing", ["train", "--data", "{shards}", "--out", "{tmp}/r", "--init-from", "{missing}"],
     "{missing}"),
    ("train --init-from empty", ["train", "--data", "{shards}", "--out", "{tmp}/r", "--init-from", "{empty_dir}"],
     "{empty_dir}"),
    ("demo --input missing", ["demo", "--input", "{missing_file}", "--out", "{tmp}/demo"], "{missing_file}"),
    ("demo --out file", ["demo", "--input", "{stories}", "--out", "{file}"], "{file}"),
]


def fill(template: str, paths: dict[str, Path], tmp_path: Path) -> str:
    return template.format(tmp=tmp_path, **paths)


@pytest.mark.parametrize("argv, names", [pytest.param(argv, names, id=case) for case, argv, names in BAD_PATHS])
def test_a_bad_path_argument_is_one_line_exit_2(argv, names, paths, tmp_path, capsys):
    before = sorted(p.name for p in paths["run"].parent.iterdir())
    code, _, err = run_cli([fill(part, paths, tmp_path) for part in argv], capsys)
    assert code == 2 and err.startswith("tinystories: error: ") and err.count("\n") == 1, err
    assert fill(names, paths, tmp_path) in err
    assert sorted(p.name for p in paths["run"].parent.iterdir()) == before  # nothing written beside them
    assert list(tmp_path.iterdir()) == []
    assert (paths["full_dir"] / "keep.txt").read_text() == "keep"


def test_an_unreadable_file_is_one_line_exit_2(paths, tmp_path, capsys, monkeypatch):
    """Tests run as root, who may read anything: a config.json whose open fails stands in for one
    without read permission."""
    import pathlib

    real_read_text = pathlib.Path.read_text

    def refuse_config(self, *args, **kwargs):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", refuse_config)
    for argv in (["eval", paths["run"], "--input", paths["stories"], "--samples", "0"],
                 ["export", paths["run"], "--format", "hf", "--out", tmp_path / "hf"],
                 ["inspect", "params", paths["run"]]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "config.json" in err and "Permission denied" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["eval", "{missing}", "--input", "{stories}"],
    ["export", "--model", "{file}", "--format", "gguf", "--out", "{tmp}/x.gguf"],
    ["inspect", "attention", "{config_dir}", "--prompt", "Hi", "--out", "{tmp}/a.png"],
    ["generate", "--model", "{truncated}"],
    ["data", "prepare", "--input", "{empty_dir}", "--out", "{tmp}/d"],
], ids=["eval", "export", "inspect", "generate", "data"])
def test_bad_paths_in_a_real_process_exit_2_without_a_traceback(argv, paths, tmp_path):
    command = [sys.executable, "-m", "tinystories", *(fill(part, paths, tmp_path) for part in argv)]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert list(tmp_path.iterdir()) == []
