"""Configuration: presets, validation, (de)serialisation, --set overrides, FLOP counts."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tinystories.config import (
    ConfigError, ModelConfig, RunConfig, TrainConfig, apply_overrides, get_preset, preset_names,
)
from tinystories.errors import UserError


# --- presets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", preset_names())
def test_presets_build_valid_configs(name):
    preset = get_preset(name)
    assert preset.name == name
    assert isinstance(preset.model, ModelConfig) and isinstance(preset.train, TrainConfig)
    preset.model.validate()
    preset.train.validate()
    assert preset.tokenizer and preset.mirrors
    run = RunConfig.from_preset(name)
    assert run.preset == name and run.model == preset.model and run.tokenizer == preset.tokenizer
    # the round trip through a dict rebuilds the same configuration
    assert RunConfig.from_dict(run.to_dict()) == run


def test_expected_presets_and_their_shapes():
    assert {"tiny", "small"} <= set(preset_names())
    tiny = get_preset("tiny").model
    assert (tiny.d_model, tiny.n_layer, tiny.context_length, tiny.vocab_size) == (128, 4, 256, 4096)
    assert (tiny.mlp, tiny.position, tiny.norm) == ("swiglu", "rope", "rmsnorm")


def test_get_preset_returns_fresh_copies_and_rejects_unknown_names():
    first = get_preset("tiny")
    first.model.n_layer = 99
    assert get_preset("tiny").model.n_layer == 4
    with pytest.raises(ConfigError, match="unknown preset 'nope'; choose one of: tiny"):
        get_preset("nope")


# --- validation ---------------------------------------------------------------------------------------

MODEL_ERRORS = [
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
    (dict(context_length=-1), "context_length must be a positive integer"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(n_head=0), "n_head must be a positive integer"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(d_model=130, n_head=4), r"d_model \(130\) must be divisible by n_head \(4\)"),
    (dict(n_head=4, n_kv_head=3), r"n_head \(4\) must be divisible by n_kv_head \(3\)"),
    (dict(n_kv_head=0), r"must be divisible by n_kv_head \(0\)"),
    (dict(norm="batchnorm"), "norm must be 'layernorm' or 'rmsnorm', got 'batchnorm'"),
    (dict(position="alibi"), "position must be 'learned' or 'rope', got 'alibi'"),
    (dict(mlp="relu"), "mlp must be 'gelu', 'swiglu' or 'relu2', got 'relu'"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(d_model=12, n_head=4, position="rope"), "rope needs an even head dimension"),
    (dict(sliding_window=0), "sliding_window must be None or positive"),
    (dict(d_ff=0), "d_ff must be None or positive"),
]


@pytest.mark.parametrize("values,message", MODEL_ERRORS, ids=[str(v) for v, _ in MODEL_ERRORS])
def test_bad_model_fields_raise_one_line_config_errors(values, message):
    with pytest.raises(ConfigError, match=message) as caught:
        ModelConfig(**values)
    assert isinstance(caught.value, UserError)
    text = str(caught.value)
    assert "\n" not in text and text.startswith("model config: ")


def test_odd_head_dim_is_fine_without_rope():
    assert ModelConfig(d_model=12, n_head=4, position="learned").head_dim == 3


TRAIN_ERRORS = [
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(grad_accum=0), "grad_accum must be a positive integer"),
    (dict(max_steps=-5), "max_steps must be a positive integer"),
    (dict(eval_every=0), "eval_every must be a positive integer"),
    (dict(log_every=0), "log_every must be a positive integer"),
    (dict(lr=0.0), "lr must be positive"),
    (dict(optimizer="sgd"), "optimizer must be adamw, muon or adamw8bit, got 'sgd'"),
    (dict(schedule="linear"), "schedule must be cosine, wsd or constant, got 'linear'"),
    (dict(batching="rows"), "batching must be 'windows', 'epochs' or 'stories', got 'rows'"),
    (dict(device="tpu"), "device must be auto, cpu, cuda or mps, got 'tpu'"),
    (dict(dtype="float16"), "dtype must be auto, float32 or bfloat16, got 'float16'"),
    (dict(max_minutes=0), "max_minutes must be positive"),
    (dict(min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0"),
    (dict(patience=0), "patience must be None or positive"),
]


@pytest.mark.parametrize("values,message", TRAIN_ERRORS, ids=[str(v) for v, _ in TRAIN_ERRORS])
def test_bad_train_fields_raise_one_line_config_errors(values, message):
    with pytest.raises(ConfigError, match=message) as caught:
        TrainConfig(**values)
    text = str(caught.value)
    assert "\n" not in text and text.startswith("train config: ")


def test_good_edge_values_are_accepted():
    TrainConfig(device="cuda:1", warmup_steps=0, min_lr_ratio=0.0, max_minutes=0.5)
    ModelConfig(n_head=4, n_kv_head=1, dropout=0.0, sliding_window=1)


# --- RunConfig files ----------------------------------------------------------------------------------

def test_run_config_save_load_round_trip(tmp_path):
    run = RunConfig.from_preset("seed002")
    run.model.sliding_window = 128
    run.train.max_minutes = 2.5
    run.train.wandb = "project"
    run.data = "/data/shards"
    run.init_from = "runs/earlier"
    path = tmp_path / "deep" / "config.json"
    run.save(path)
    assert json.loads(path.read_text())["model"]["sliding_window"] == 128  # plain JSON on disk
    loaded = RunConfig.load(path)
    assert loaded == run
    assert loaded.to_dict() == run.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp file left behind


# Fields added after runs were already on disk (issue 17's levers): each "off" when a config.json lacks it.
LATER_FIELDS = {"train": {"ema_decay": None, "embedding_weight_decay": 0.0},
                "model": {"qk_norm": False, "logit_softcap": None, "zero_init_proj": False}}


def test_a_config_written_before_a_field_existed_loads_with_it_off(tmp_path):
    """A resumed old run must not pick up a lever it never trained with (e.g. tiny's EMA default)."""
    values = RunConfig.from_preset("tiny").to_dict()
    for section, fields in LATER_FIELDS.items():
        for name in fields:
            del values[section][name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    loaded = RunConfig.load(path)
    for section, fields in LATER_FIELDS.items():
        assert {name: getattr(getattr(loaded, section), name) for name in fields} == fields
    assert get_preset("tiny").train.ema_decay == 0.99  # the preset does use one: only missing fields are off


def test_run_config_load_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        RunConfig.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON") as caught:
        RunConfig.load(bad)
    assert "\n" not in str(caught.value)
    no_model = tmp_path / "no_model.json"
    no_model.write_text("{}")
    with pytest.raises(ConfigError, match="'model' section"):
        RunConfig.load(no_model)
    unknown = tmp_path / "unknown.json"
    values = RunConfig.from_preset("tiny").to_dict()
    values["model"]["n_layers"] = 3
    unknown.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match="model config: unknown field.*n_layers"):
        RunConfig.load(unknown)
    invalid = tmp_path / "invalid.json"
    values = RunConfig.from_preset("tiny").to_dict()
    values["train"]["lr"] = -1
    invalid.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match="lr must be positive"):
        RunConfig.load(invalid)


# --- --set overrides ----------------------------------------------------------------------------------

def test_apply_overrides_sections_bare_names_and_types():
    run = RunConfig.from_preset("tiny")
    original_lr = run.train.lr
    new = apply_overrides(run, [
        "model.n_layer=2", "lr=1e-3", "n_head=8", "train.compile=false", "bias=True",
        "sliding_window=64", "max_minutes=2", "wandb=my-project", "tokenizer=gpt2", "data=/tmp/shards",
    ])
    assert new.model.n_layer == 2 and isinstance(new.model.n_layer, int)
    assert new.train.lr == pytest.approx(1e-3) and isinstance(new.train.lr, float)
    assert new.model.n_head == 8
    assert new.train.compile is False and new.model.bias is True
    assert new.model.sliding_window == 64
    assert new.train.max_minutes == 2.0 and isinstance(new.train.max_minutes, float)
    assert new.train.wandb == "my-project"
    assert (new.tokenizer, new.data, new.preset) == ("gpt2", "/tmp/shards", "tiny")
    assert run.model.n_layer == 4 and run.train.lr == original_lr != 1e-3  # the sections of the original are untouched


@pytest.mark.parametrize("text", ["None", "none", "null", ""])
def test_apply_overrides_none_values(text):
    run = apply_overrides(RunConfig.from_preset("seed002"), [f"sliding_window={text}", f"train.patience={text}"])
    assert run.model.sliding_window is None and run.train.patience is None


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("yes", True), ("on", True),
                                        ("False", False), ("0", False), ("no", False), ("off", False)])
def test_apply_overrides_bools(text, value):
    assert apply_overrides(RunConfig.from_preset("tiny"), [f"tie_embeddings={text}"]).model.tie_embeddings is value


@pytest.mark.parametrize("assignment,message", [
    ("model.bogus=1", "--set model.bogus: unknown field"),
    ("train.n_layer=2", "--set train.n_layer: unknown field"),
    ("optim.lr=1", "--set optim.lr: unknown field"),
    ("bogus=1", "--set bogus: unknown field; known fields: .*n_layer"),
    ("n_layer", "expected field=value"),
    ("n_layer=two", "--set n_layer=two: expected int"),
    ("bias=maybe", "--set bias=maybe: expected bool"),
    ("n_layer=None", "--set n_layer=None: expected int"),
    ("n_layer=0", "model config: n_layer must be a positive integer"),
    ("lr=-1", "train config: lr must be positive"),
])
def test_apply_overrides_errors(assignment, message):
    with pytest.raises(ConfigError, match=message) as caught:
        apply_overrides(RunConfig.from_preset("tiny"), [assignment])
    assert "\n" not in str(caught.value)


def test_apply_overrides_rejects_a_bare_name_that_two_sections_share():
    # No field is in both sections today; a train section with a `dropout` of its own makes one.
    @dataclasses.dataclass
    class TrainWithDropout(TrainConfig):
        dropout: float = 0.0

    run = RunConfig(model=ModelConfig(), train=TrainWithDropout())
    with pytest.raises(ConfigError, match="--set dropout: ambiguous, write model.dropout or train.dropout"):
        apply_overrides(run, ["dropout=0.1"])


# --- FLOPs ----------------------------------------------------------------------------------------------

def test_flops_per_token_by_hand():
    config = ModelConfig(vocab_size=100, context_length=16, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                         d_ff=64, mlp="swiglu", norm="rmsnorm", position="rope", tie_embeddings=True)
    # per layer: qkv 32*(4+2+2)*8 = 2048, proj 32*32 = 1024, fc 32*2*64 = 4096, mlp proj 64*32 = 2048
    per_layer = 2048 + 1024 + 4096 + 2048
    head = 100 * 32
    attention = 6 * 2 * 32 * 16  # 6 * n_layer * d_model * T (causal QK^T and AV, forward + backward)
    assert config.flops_per_token() == 6 * (2 * per_layer + head) + attention == 135936
    # the matmul part is 6N with N the parameters that take part in matmuls (all but the norms here)
    norms = 2 * 2 * 32 + 32
    assert config.flops_per_token() == 6 * (config.num_parameters() - norms) + attention
    assert config.flops_per_token(8) == 6 * (2 * per_layer + head) + 6 * 2 * 32 * 8
    # a sliding window caps the keys each query sees: the attention term stops growing past 2 * window
    windowed = dataclasses.replace(config, sliding_window=4)
    assert windowed.flops_per_token() == 6 * (2 * per_layer + head) + 6 * 2 * 32 * 8


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_preset_flops_are_about_six_times_parameters(name):
    config = get_preset(name).model
    looked_up = config.parameter_counts()["value_embeddings"]  # a table read by token id: no matmul FLOPs
    ratio = config.flops_per_token() / (6 * (config.num_parameters() - looked_up))
    assert 1.0 < ratio < 1.2  # attention adds a little; the norms' parameters do no matmul FLOPs
