"""`tinystories presets` output and `tinystories train` argument errors."""

from __future__ import annotations

import dataclasses

import pytest

from tinystories.cli import main
from tinystories.config import get_preset, preset_names


def test_presets_table_lists_every_preset_with_its_parameter_count(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "params", "tokenizer", "mirrors"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == preset_names()
    tiny = get_preset("tiny")
    assert rows["tiny"].split()[1:3] == [f"{tiny.model.num_parameters() / 1e6:.1f}M", "bpe:4096"]
    assert rows["seed001"].split()[2] == "gpt2"
    for name, line in rows.items():
        assert get_preset(name).mirrors in line


def test_presets_explain_shows_fields_values_reasons_and_parameters(capsys):
    assert main(["presets", "--explain", "seed002"]) == 0
    out = capsys.readouterr().out
    preset = get_preset("seed002")
    assert f"parameters: {preset.model.num_parameters():,}" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["model.sliding_window"].split()[1] == "384"
    assert preset.reasons["sliding_window"] in lines["model.sliding_window"]
    assert lines["train.optimizer"].split()[1] == "'adamw8bit'"
    assert preset.reasons["optimizer"] in lines["train.optimizer"]
    # no reason given: the field's own note from config.py, in parentheses
    assert lines["model.n_layer"].split()[:3] == ["model.n_layer", "12", "(transformer"]
    assert "(RMS-normalise queries and keys" in lines["model.qk_norm"]
    assert "(None: off; d: also keep, evaluate and ship an average of the weights)" in lines["train.ema_decay"]
    assert len(lines) == len(preset.model.to_dict()) + len(preset.train.to_dict())


def test_every_config_field_has_a_note():
    from tinystories.config import ModelConfig, TrainConfig, field_notes

    for cls in (ModelConfig, TrainConfig):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in field_notes(cls)]
        assert not missing, f"{cls.__name__} fields without a note: {missing}"


def test_explain_unknown_preset_is_a_user_error(capsys):
    assert main(["presets", "--explain", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--data", "{tmp}/missing"], "--data {tmp}/missing: no such directory"),
    (["--data", "{data}", "--preset", "gigantic"], "unknown preset 'gigantic'"),
    (["--data", "{data}", "--set", "n_layers=3"], "--set n_layers: unknown field"),
    (["--data", "{data}", "--set", "n_layer"], "expected field=value"),
    (["--data", "{data}", "--set", "n_layer=three"], "--set n_layer=three: expected int"),
    (["--data", "{data}", "--set", "lr=-1"], "lr must be positive"),
    ([], "--data is required"),
    (["--data", "{tmp}"], "meta.json missing"),
])
def test_train_cli_errors_are_one_line_and_write_nothing(arguments, message, prepared_small, tmp_path, capsys):
    out = tmp_path / "run"
    fill = {"tmp": str(tmp_path), "data": str(prepared_small)}
    code = main(["train", "--out", str(out), "--no-progress", *[a.format(**fill) for a in arguments]])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tinystories: error: ") and message.format(**fill) in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_train_cli_says_when_the_data_decides_the_vocabulary(prepared_small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    code = main(["train", "--data", str(prepared_small), "--out", str(out), "--no-progress", "--max-steps", "1",
                 "--set", "n_layer=1", "--set", "d_model=32", "--set", "context_length=16", "--batch-size", "2",
                 "--set", "eval_tokens=16", "--set", "sample_tokens=0", "--no-compile", "--optimizer", "muon",
                 "--batching", "stories", "--lr", "2e-3", "--seed", "7", "--grad-accum", "2", "--eval-every", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "vocab_size set to 512 from the data's tokenizer (the preset says 4096)" in err
    from tinystories.config import RunConfig

    saved = RunConfig.load(out / "config.json")
    assert saved.model.vocab_size == 512 and saved.tokenizer == "bpe:512"
    assert (saved.train.optimizer, saved.train.batching, saved.train.lr, saved.train.seed, saved.train.grad_accum,
            saved.train.compile, saved.train.batch_size) == ("muon", "stories", 2e-3, 7, 2, False, 2)


def test_resuming_with_another_preset_is_refused(prepared_small, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(
        '{"preset": "tiny", "model": {"vocab_size": 512}, "train": {}, "data": "%s"}' % prepared_small)
    assert main(["train", "--out", str(out), "--preset", "seed000"]) == 2
    assert "is a tiny run" in capsys.readouterr().err
