"""The transformer against independent references.

Every check compares `tinystories.model` with something written here from the formulas (explicit loops,
einsum, hand-written norms and activations) or with torch.nn.functional, never with the model itself.
Models are tiny (2 layers, 32 wide) so the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tinystories.config import ModelConfig, get_preset, preset_names
from tinystories.model import GPT, MLP, KVCache, RotaryEmbedding, apply_rotary, make_norm


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which is slow on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=61, context_length=24, n_layer=2, n_head=4, d_model=32, norm="rmsnorm",
                  position="rope", mlp="swiglu")
    values.update(overrides)
    return ModelConfig(**values)


def randomized(model: GPT, seed: int = 0) -> GPT:
    """Re-draw every weight at unit scale so attention is peaked and logits are O(1).

    With the GPT-2 init (std 0.02) attention is almost uniform, and a wrong mask or rotation would barely
    change the output; these weights make every part of the model matter to the comparison.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm_f.weight":
                parameter.copy_(1.0 + 0.2 * noise)
            elif name in ("stream_weight", "input_weight"):  # input mixing: both parts of every block's input
                parameter.copy_(0.8 + 0.2 * noise)
            elif parameter.dim() == 1:  # biases
                parameter.copy_(0.1 * noise)
            elif parameter.dim() == 0:  # the layers' value-embedding weights
                parameter.copy_(1.0 + 0.2 * noise)
            elif name in ("tok_emb.weight", "pos_emb.weight", "value_emb.weight"):
                parameter.copy_(noise)
            else:  # (out, in) matrices
                parameter.copy_(noise / math.sqrt(parameter.shape[1]))
    return model


def build(config: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return randomized(GPT(config), seed).eval()


# --- independent reference implementation -------------------------------------------------------------

def reference_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) of x (B, T, n, D) by angle pos * theta^(-2i/D), one pair at a time."""
    D = x.shape[-1]
    half = D // 2
    out = torch.empty_like(x)
    for i in range(half):
        angle = positions.double() * theta ** (-2.0 * i / D)  # (B, T)
        cos, sin = angle.cos().float()[..., None], angle.sin().float()[..., None]  # (B, T, 1)
        a, b = x[..., i], x[..., i + half]  # (B, T, n)
        out[..., i] = a * cos - b * sin
        out[..., i + half] = a * sin + b * cos
    return out


def allowed_keys(T: int, window: int | None) -> torch.Tensor:
    """(T, T) bool: query i may attend key j iff j <= i and j is among the last `window` tokens."""
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            allowed[i, j] = j <= i and (window is None or i - j < window)
    return allowed


def reference_attention(q, k, v, allowed):
    """Masked softmax attention. q (B, T, H, D), k/v (B, S, K, D), allowed (B|1, T, S) -> (B, T, H, D)."""
    H, K, D = q.shape[2], k.shape[2], q.shape[3]
    k = k.repeat_interleave(H // K, dim=2)  # query head h uses key/value head h // (H/K)
    v = v.repeat_interleave(H // K, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)


def reference_norm(norm, x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    if config.norm == "rmsnorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * norm.weight
    mean = x.mean(-1, keepdim=True)
    variance = (x - mean).pow(2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(variance + config.norm_eps) * norm.weight
    return y + norm.bias if norm.bias is not None else y


def linear(x, layer):
    y = x @ layer.weight.T
    return y + layer.bias if layer.bias is not None else y


def reference_mlp(mlp, x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    h = linear(x, mlp.fc)
    if config.mlp == "swiglu":
        gate, up = h[..., :config.ffn_dim], h[..., config.ffn_dim:]
        h = gate / (1.0 + torch.exp(-gate)) * up  # silu(gate) * up
    else:
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))
    return linear(h, mlp.proj)


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Logits of the model's weights computed with the naive pieces above."""
    config = model.config
    B, T = idx.shape
    H, K, D = config.n_head, config.kv_heads, config.head_dim
    positions = torch.arange(T).expand(B, T)
    allowed = allowed_keys(T, config.sliding_window)[None]
    x = model.tok_emb.weight[idx]
    if config.position == "learned":
        x = x + model.pos_emb.weight[positions]
    embedded = x
    for i, block in enumerate(model.blocks):
        if config.input_mix:
            x = model.stream_weight[i] * x + model.input_weight[i] * embedded
        qkv = linear(reference_norm(block.norm1, x, config), block.attn.qkv)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
        if config.value_embedding:  # each layer adds its weight times the token's row of the second table
            v = v + block.attn.value_weight * model.value_emb.weight[idx].view(B, T, K, D)
        if config.position == "rope":
            q, k = reference_rope(q, positions, config.rope_theta), reference_rope(k, positions, config.rope_theta)
        x = x + linear(reference_attention(q, k, v, allowed).reshape(B, T, H * D), block.attn.proj)
        x = x + reference_mlp(block.mlp, reference_norm(block.norm2, x, config), config)
    return reference_norm(model.norm_f, x, config) @ model.lm_head.weight.T


# --- the whole model against the reference ----------------------------------------------------------

VARIANTS = {
    "llama": dict(),
    "gpt2": dict(norm="layernorm", position="learned", mlp="gelu", bias=True),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "gqa-window": dict(n_kv_head=2, sliding_window=5),
    "window-1": dict(sliding_window=1),
    "window-T-1": dict(sliding_window=15),
    "window-T": dict(sliding_window=16),
    "window-beyond-T": dict(sliding_window=40),
    "learned-window": dict(position="learned", sliding_window=3),
    "untied-bias-rms": dict(tie_embeddings=False, bias=True),
    "value-embedding": dict(value_embedding=True),
    "value-embedding-gqa": dict(value_embedding=True, n_kv_head=2),
    "input-mix": dict(input_mix=True),
    "input-mix-learned-value-embedding": dict(input_mix=True, position="learned", value_embedding=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_naive_reference(variant):
    model = build(small_config(**VARIANTS[variant]))
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx)
    assert loss is None
    expected = reference_forward(model, idx)
    assert logits.shape == (2, 16, 61)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_rope_beyond_precomputed_table_matches_formula():
    # context_length 8 precomputes 8 positions; a 20-token input takes the computed-on-the-fly path.
    model = build(small_config(context_length=8))
    idx = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(idx)[0], reference_forward(model, idx), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["llama", "gpt2", "gqa-window"])
def test_causal_future_tokens_never_change_past_logits(variant):
    model = build(small_config(**VARIANTS[variant]))
    generator = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 61, (2, 16), generator=generator)
    logits = model(idx)[0]
    for t in (0, 5, 14):
        changed = idx.clone()
        changed[:, t + 1:] = torch.randint(0, 61, (2, 15 - t), generator=generator)
        new_logits = model(changed)[0]
        torch.testing.assert_close(new_logits[:, :t + 1], logits[:, :t + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(new_logits[:, t + 1:], logits[:, t + 1:])  # the change is visible later


def test_sliding_window_limits_what_is_seen():
    model = build(small_config(sliding_window=4))
    generator = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 61, (1, 16), generator=generator)
    changed = idx.clone()
    changed[0, 2] = (idx[0, 2] + 1) % 61
    delta = (model(changed)[0] - model(idx)[0]).abs().amax(dim=-1)[0]  # (T,)
    # With 2 layers a token reaches 2 * (window - 1) = 6 positions ahead, and no further.
    assert (delta[:2] == 0).all()
    assert (delta[2:9] > 0).all()
    assert (delta[9:] == 0).all()


# --- parts against their formulas ------------------------------------------------------------------

@pytest.mark.parametrize("head_dim,theta", [(8, 10000.0), (16, 500000.0)])
def test_rope_matches_pair_rotation_formula(head_dim, theta):
    rotary = RotaryEmbedding(head_dim, theta, max_positions=32)
    x = torch.randn(2, 10, 3, head_dim, generator=torch.Generator().manual_seed(5))
    # Default positions start..start+T-1 (sliced from the table), including a start past the table.
    for start in (0, 7, 30):
        cos, sin = rotary(start, 10)
        positions = torch.arange(start, start + 10).expand(2, 10)
        torch.testing.assert_close(apply_rotary(x, cos, sin), reference_rope(x, positions, theta), atol=1e-5, rtol=1e-5)
    # Explicit per-row positions (gathered), one row reaching past the table.
    positions = torch.stack([torch.arange(3, 13), torch.arange(25, 35)])
    cos, sin = rotary(0, 10, positions)
    torch.testing.assert_close(apply_rotary(x, cos, sin), reference_rope(x, positions, theta), atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rotary = RotaryEmbedding(16, 10000.0, max_positions=64)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(query_position, key_position):
        rotated_q = apply_rotary(q, *rotary(0, 1, torch.tensor([[query_position]])))
        rotated_k = apply_rotary(k, *rotary(0, 1, torch.tensor([[key_position]])))
        return (rotated_q * rotated_k).sum()

    torch.testing.assert_close(score(9, 4), score(40, 35), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(9, 4), score(9, 5))


@pytest.mark.parametrize("norm,bias", [("rmsnorm", False), ("rmsnorm", True), ("layernorm", False), ("layernorm", True)])
def test_norms_match_torch_functional(norm, bias):
    config = small_config(norm=norm, bias=bias, norm_eps=1e-6)
    layer = make_norm(config)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32))
        if getattr(layer, "bias", None) is not None:
            layer.bias.copy_(torch.randn(32))
    x = 3.0 * torch.randn(4, 7, 32) + 1.0
    if norm == "rmsnorm":
        expected = F.rms_norm(x, (32,), layer.weight, eps=1e-6)
        assert sum(p.numel() for p in layer.parameters()) == 32  # RMSNorm has no bias, whatever `bias` says
    else:
        expected = F.layer_norm(x, (32,), layer.weight, layer.bias, eps=1e-6)
        assert (layer.bias is not None) == bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), reference_norm(layer, x, config), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_mlp_matches_hand_formula(kind):
    config = small_config(mlp=kind, bias=True)
    torch.manual_seed(6)
    mlp = MLP(config)
    x = torch.randn(2, 5, 32)
    if kind == "swiglu":
        assert mlp.fc.out_features == 2 * config.ffn_dim
        gate_weight, up_weight = mlp.fc.weight[:config.ffn_dim], mlp.fc.weight[config.ffn_dim:]
        gate_bias, up_bias = mlp.fc.bias[:config.ffn_dim], mlp.fc.bias[config.ffn_dim:]
        gate, up = x @ gate_weight.T + gate_bias, x @ up_weight.T + up_bias
        expected = (gate * torch.sigmoid(gate) * up) @ mlp.proj.weight.T + mlp.proj.bias
    else:
        expected = reference_mlp(mlp, x, config)
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)


def test_loss_is_cross_entropy_ignoring_minus_one():
    model = build(small_config())
    generator = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 61, (3, 12), generator=generator)
    targets = torch.randint(0, 61, (3, 12), generator=generator)
    targets[0, :4] = -1
    targets[2, 9:] = -1
    no_logits, loss = model(idx, targets)
    assert no_logits is None  # the fused loss never builds them
    logits, _ = model(idx)
    expected = F.cross_entropy(logits.reshape(-1, 61), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, expected)
    # and by hand: mean over the kept positions of -log softmax at the target
    keep = targets >= 0
    log_probs = logits.log_softmax(-1)[keep]  # (N, V)
    by_hand = -log_probs.gather(1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, by_hand, atol=1e-5, rtol=1e-5)


# --- parameters, init, tying ------------------------------------------------------------------------

@pytest.mark.parametrize("name", preset_names())
def test_preset_parameter_count_matches_closed_form(name):
    config = get_preset(name).model
    with torch.device("meta"):  # no memory, no init cost, even for the 50K-vocabulary presets
        model = GPT(config)
    assert model.num_parameters() == config.num_parameters()


@pytest.mark.parametrize("overrides", [
    dict(), dict(tie_embeddings=False), dict(bias=True), dict(n_kv_head=1), dict(n_kv_head=2, d_ff=50),
    dict(norm="layernorm", bias=True, position="learned", mlp="gelu"), dict(norm="layernorm", bias=False),
    dict(value_embedding=True), dict(value_embedding=True, n_kv_head=1), dict(input_mix=True),
])
def test_variant_parameter_count_matches_closed_form(overrides):
    config = small_config(**overrides)
    assert GPT(config).num_parameters() == config.num_parameters()


def test_init_scales_residual_projections():
    n_layer = 6
    config = small_config(n_layer=n_layer, d_model=256, n_head=4, vocab_size=128)
    torch.manual_seed(8)
    model = GPT(config)
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for block in model.blocks:
        for weight in (block.attn.proj.weight, block.mlp.proj.weight):
            assert weight.std().item() == pytest.approx(residual_std, rel=0.05)
        for weight in (block.attn.qkv.weight, block.mlp.fc.weight):
            assert weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.equal(block.norm1.weight, torch.ones(256))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_tied_embeddings_share_storage():
    tied = GPT(small_config(tie_embeddings=True))
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    with torch.no_grad():
        tied.tok_emb.weight[3, 0] = 42.0
    assert tied.lm_head.weight[3, 0].item() == 42.0
    untied = GPT(small_config(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 61 * 32


# --- KV cache ---------------------------------------------------------------------------------------

CACHE_VARIANTS = [
    dict(position=position, n_kv_head=kv_heads, sliding_window=window)
    for position in ("rope", "learned") for kv_heads in (4, 2, 1) for window in (None, 4)
] + [dict(value_embedding=True, n_kv_head=2), dict(input_mix=True, sliding_window=4)]


@pytest.mark.parametrize("overrides", CACHE_VARIANTS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_cached_decoding_equals_full_forward(overrides):
    model = build(small_config(**overrides))
    idx = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(9))
    full = model(idx)[0]
    cache = model.new_cache(batch_size=2, max_length=16)
    assert isinstance(cache, KVCache) and cache.length == 0 and cache.max_length == 16
    pieces = [model(idx[:, :5], cache=cache)[0]]  # prefill
    assert cache.length == 5
    pieces.append(model(idx[:, 5:8], cache=cache)[0])  # a chunk after the prefill
    for t in range(8, 14):  # then one token at a time
        pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.length == 0
    torch.testing.assert_close(model(idx[:, :3], cache=cache)[0], full[:, :3], atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_learned_position_overflow_are_errors():
    model = build(small_config(position="learned", context_length=8))
    cache = model.new_cache(1, max_length=4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="beyond the learned positions"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond the learned positions"):
        model(torch.zeros(1, 2, dtype=torch.long), position_ids=torch.tensor([[7, 8]]))


@pytest.mark.parametrize("overrides", [dict(), dict(position="learned"), dict(n_kv_head=2, sliding_window=4),
                                       dict(n_kv_head=1, position="learned", sliding_window=3)],
                         ids=["rope", "learned", "gqa-window", "mqa-learned-window"])
def test_left_padded_row_equals_that_row_alone(overrides):
    model = build(small_config(**overrides))
    generator = torch.Generator().manual_seed(10)
    long_row = torch.randint(0, 61, (9,), generator=generator)
    short_row = torch.randint(0, 61, (5,), generator=generator)
    pad = 4
    idx = torch.stack([long_row, torch.cat([torch.zeros(pad, dtype=torch.long), short_row])])  # (2, 9)
    real = torch.ones(2, 9 + 3, dtype=torch.bool)  # three decoding steps follow the prompt
    real[1, :pad] = False
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (2, 12): the short row counts from 0 at its start
    continuation = torch.randint(0, 61, (2, 3), generator=generator)

    # Without a cache: the padded prompt in one pass.
    logits = model(idx, position_ids=positions[:, :9], key_padding_mask=real[:, :9])[0]
    torch.testing.assert_close(logits[0], model(long_row[None])[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, pad:], model(short_row[None])[0][0], atol=1e-5, rtol=1e-5)

    # With a cache: prefill the padded prompt, then decode three tokens.
    cache = model.new_cache(2, max_length=12)
    pieces = [model(idx, cache=cache, position_ids=positions[:, :9], key_padding_mask=real[:, :9])[0]]
    for step in range(3):
        slot = 9 + step
        pieces.append(model(continuation[:, step:step + 1], cache=cache, position_ids=positions[:, slot:slot + 1],
                            key_padding_mask=real[:, :slot + 1])[0])
    cached = torch.cat(pieces, dim=1)  # (2, 12, V)
    alone_long = model(torch.cat([long_row, continuation[0]])[None])[0][0]
    alone_short = model(torch.cat([short_row, continuation[1]])[None])[0][0]
    torch.testing.assert_close(cached[0], alone_long, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached[1, pad:], alone_short, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(cached).all()  # padding queries see themselves: no NaN from an empty softmax


def test_explicit_default_positions_equal_implicit():
    for position in ("rope", "learned"):
        model = build(small_config(position=position))
        idx = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(11))
        torch.testing.assert_close(model(idx, position_ids=torch.arange(10))[0], model(idx)[0])
        torch.testing.assert_close(model(idx, position_ids=torch.arange(10).expand(2, 10))[0], model(idx)[0])


# --- training behaviour -----------------------------------------------------------------------------

def test_dropout_only_in_train_mode():
    config = small_config(dropout=0.5)
    model = build(config)
    no_dropout = GPT(small_config(dropout=0.0))
    no_dropout.load_state_dict(model.state_dict())
    no_dropout.eval()
    idx = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(12))
    model.train()
    torch.manual_seed(0)
    first, second = model(idx)[0], model(idx)[0]
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], atol=0, rtol=0)
    torch.testing.assert_close(model(idx)[0], no_dropout(idx)[0], atol=0, rtol=0)


def test_tiny_batch_overfits():
    torch.manual_seed(13)
    config = small_config(vocab_size=32, context_length=16, d_model=64)
    model = GPT(config)
    generator = torch.Generator().manual_seed(13)
    data = torch.randint(0, 32, (4, 17), generator=generator)
    data[:, 0] = torch.arange(4)  # distinct first tokens: every next token is determined by the prefix
    inputs, targets = data[:, :-1], data[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(100):
        loss = model(inputs, targets)[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_training_forward_has_no_graph_breaks():
    config = small_config()
    model = GPT(config)
    idx = torch.randint(0, 61, (2, 16))
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_model_matches_eager():
    model = build(small_config(n_layer=1, d_model=32, sliding_window=None))
    idx = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(14))
    expected_logits, _ = model(idx)
    _, expected_loss = model(idx, idx)
    compiled = torch.compile(model)
    logits, _ = compiled(idx)
    _, loss = compiled(idx, idx)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)


ROPE_TABLE_IN_A_FRESH_PROCESS = """
import math, sys, torch
torch.set_num_threads(2)
from tinystories.model import RotaryEmbedding
rotary = RotaryEmbedding(32, 10000.0, max_positions=256)  # tiny's shape: 4,096 entries, split over 2 threads
angles = [[p * (1.0 / 10000.0 ** (i / 32)) for i in range(0, 32, 2)] for p in range(256)]
cos = torch.tensor([[math.cos(a) for a in row] for row in angles], dtype=torch.float64).float()
sin = torch.tensor([[math.sin(a) for a in row] for row in angles], dtype=torch.float64).float()
sys.exit(0 if torch.equal(rotary.cos_table, cos) and torch.equal(rotary.sin_table, sin) else 1)
"""


@pytest.mark.slow
def test_rope_tables_are_the_same_in_every_fresh_two_thread_process():
    """Each fresh process gets libm's cos and sin exactly. Without devices.start_mkl_on_this_thread,
    the tables' 2-thread cos as MKL's first call came out 1 ulp off (rounded to float32) in 4-12% of
    fresh processes on an Intel Xeon: a race, so this catches its return in most runs, not all (the
    determinism test in test_train_determinism.py catches it too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    codes = [subprocess.run([sys.executable, "-c", ROPE_TABLE_IN_A_FRESH_PROCESS], env=env, timeout=120).returncode
             for _ in range(24)]
    assert codes == [0] * 24
