"""tinystories.visualize: parameter breakdown, attention weights, figures, and the diagram / inspect commands."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tinystories import cli
from tinystories.checkpoint import save_checkpoint
from tinystories.config import ModelConfig, RunConfig, TrainConfig, get_preset, preset_names
from tinystories.visualize import (
    InspectError,
    attention_weights,
    module_breakdown,
    parameter_breakdown,
    plot_attention,
)
from tinystories.model import GPT
from tinystories.tokenizer import BytesTokenizer

VARIANTS = {
    "llama": dict(norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=True),
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", bias=True, tie_embeddings=True),
    "gqa_untied": dict(n_kv_head=2, position="rope", mlp="gelu", tie_embeddings=False),
    "mqa_window": dict(n_kv_head=1, position="rope", sliding_window=5, norm="layernorm", bias=True),
    "gqa_value_embedding_input_mix": dict(n_kv_head=2, value_embedding=True, input_mix=True),
}


def small_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=257, context_length=32, n_layer=2, n_head=4, d_model=32)
    return ModelConfig(**{**values, **overrides})


@pytest.mark.parametrize("variant", VARIANTS)
def test_breakdown_matches_the_built_model(variant):
    config = small_config(**VARIANTS[variant])
    model = GPT(config)
    parts = parameter_breakdown(config)
    assert parts == module_breakdown(model)
    assert sum(parts.values()) == model.num_parameters() == config.num_parameters()


@pytest.mark.parametrize("name", preset_names())
def test_breakdown_of_every_preset_sums_to_its_count(name):
    config = get_preset(name).model
    parts = parameter_breakdown(config)
    assert sum(parts.values()) == config.num_parameters()
    assert parts["embeddings"] == config.vocab_size * config.d_model
    assert (parts["head"] == 0) == config.tie_embeddings


def test_tiny_breakdown_by_hand():
    # tiny: V=4096, d=128, 4 layers, SwiGLU hidden 352, RMSNorm (weight only), tied, RoPE, a value
    # embedding table (4096 x 4 heads x 32) and one weight for it per layer.
    parts = parameter_breakdown(get_preset("tiny").model)
    assert parts == {"embeddings": 4096 * 128, "positions": 0, "attention": 4 * (128 * 384 + 128 * 128),
                     "mlp": 4 * (128 * 704 + 352 * 128), "norms": 9 * 128, "head": 0,
                     "value_embeddings": 4096 * 128 + 4, "input_mix": 0}


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_weights_reproduce_each_layers_attention_output(variant):
    """proj(weights @ v) must equal what the model's attention module (SDPA) returned."""
    torch.manual_seed(0)
    config = small_config(**VARIANTS[variant])
    model = GPT(config).eval()
    for parameter in model.parameters():  # larger weights: sharp, non-uniform attention patterns
        torch.nn.init.normal_(parameter, std=0.3)
    ids = torch.randint(0, config.vocab_size, (12,))
    seen = []
    hooks = [block.attn.register_forward_hook(lambda m, inputs, output: seen.append((m, inputs, output)))
             for block in model.blocks]
    with torch.no_grad():
        model(ids[None])
    for hook in hooks:
        hook.remove()
    weights = attention_weights(model, ids)  # (L, H, T, T)
    T, H, K, D = 12, config.n_head, config.kv_heads, config.head_dim
    assert weights.shape == (config.n_layer, H, T, T)
    torch.testing.assert_close(weights.sum(-1), torch.ones(config.n_layer, H, T))
    upper = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert (weights[..., upper] == 0).all()  # causal: no query sees a later key
    if config.sliding_window:
        far = torch.ones(T, T, dtype=torch.bool).tril(-config.sliding_window)
        assert (weights[..., far] == 0).all()
    for layer, (module, (x, *_, value_embedding), output) in enumerate(seen):
        v = module.qkv(x).view(1, T, H + 2 * K, D)[:, :, H + K:]  # (1, T, K, D)
        if value_embedding is not None:
            v = v + module.value_weight * value_embedding
        v = v.transpose(1, 2)  # (1, K, T, D)
        v = v.repeat_interleave(H // K, dim=1)  # (1, H, T, D)
        y = (weights[layer][None] @ v).transpose(1, 2).reshape(1, T, H * D)
        torch.testing.assert_close(module.proj(y), output, atol=1e-5, rtol=1e-4)


def test_attention_weights_match_a_plain_softmax_without_rope():
    torch.manual_seed(1)
    config = small_config(position="learned", n_layer=1)
    model = GPT(config).eval()
    ids = torch.randint(0, config.vocab_size, (6,))
    weights = attention_weights(model, ids)
    with torch.no_grad():
        block = model.blocks[0]
        x = block.norm1(model.tok_emb(ids[None]) + model.pos_emb.weight[:6])
        q, k, _ = block.attn.qkv(x).split(config.d_model, dim=-1)
        q = q.view(1, 6, 4, 8).transpose(1, 2)
        k = k.view(1, 6, 4, 8).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)
        expected = F.softmax(scores.masked_fill(torch.ones(6, 6).triu(1).bool(), -math.inf), dim=-1)[0]
    torch.testing.assert_close(weights[0], expected)


def test_attention_weights_reject_an_empty_sequence():
    with pytest.raises(InspectError):
        attention_weights(GPT(small_config()), torch.tensor([], dtype=torch.long))


def test_plot_attention_rejects_a_bad_layer_and_writes_nothing(tmp_path):
    weights = torch.full((2, 4, 3, 3), 1 / 3)
    with pytest.raises(InspectError, match="--layer 5"):
        plot_attention(weights, ["a", "b", "c"], tmp_path / "a.png", layer=5)
    assert not list(tmp_path.iterdir())


def make_run(directory, config: ModelConfig):
    tokenizer = BytesTokenizer()
    RunConfig(model=config, train=TrainConfig(), tokenizer=tokenizer.spec).save(directory / "config.json")
    tokenizer.save(directory)
    save_checkpoint(directory / "checkpoints" / "best", GPT(config))
    return directory


def run_cli(capsys, *argv):
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_diagram_and_attention_write_pngs(tmp_path, capsys):
    run = make_run(tmp_path / "run", small_config())
    for argv in (("diagram", "--preset", "tiny", "--out", tmp_path / "arch.png"),
                 ("diagram", run, "--out", tmp_path / "run-arch.png"),
                 ("inspect", "attention", run, "--prompt", "Once upon a time", "--out", tmp_path / "all.png"),
                 ("inspect", "attention", run, "--prompt", "Hi there", "--layer", "1", "--out", tmp_path / "l1.png")):
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, err
        path = tmp_path / str(argv[-1])
        assert out.strip() == str(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_params_table_sums_to_the_preset_count(capsys):
    code, out, _ = run_cli(capsys, "inspect", "params", "--preset", "tiny")
    assert code == 0
    rows = dict(line.split()[:2] for line in out.strip().splitlines())
    assert rows["total"] == f"{get_preset('tiny').model.num_parameters():,}" == "1,852,548"  # 1,328,256 + 4096 x 128 + 4
    assert sum(int(rows[part].replace(",", "")) for part in rows if part != "total") == 1_852_548


@pytest.mark.parametrize("argv, message", [
    (("diagram", "--out", "x.png"), "or --preset NAME: one of them"),
    (("inspect", "params", "RUN", "--preset", "tiny"), "or --preset NAME: one of them"),
    (("diagram", "--preset", "nope", "--out", "x.png"), "unknown preset"),
    (("diagram", "--preset", "tiny", "--out", "x.txt"), "expected a .png"),
    (("inspect", "attention", "RUN", "--prompt", "Hi", "--layer", "7", "--out", "x.png"), "--layer 7"),
    (("inspect", "attention", "RUN", "--prompt", "", "--out", "x.png"), "--prompt"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    run = make_run(tmp_path / "run", small_config())
    argv = [str(run) if a == "RUN" else (str(tmp_path / a) if a.startswith("x.") else a) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob(".x.*"))
