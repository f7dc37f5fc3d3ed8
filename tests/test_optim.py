"""tinystories.optim: the schedule, parameter groups, Muon, AdamW and the weight average."""

import math

import pytest
import torch

from tinystories.config import ModelConfig, TrainConfig
from tinystories.model import GPT
from tinystories.optim import (Muon, OptimizerStateError, WeightEMA, build_optimizer, learning_rate, lr_multiplier,
                               orthogonalize, parameter_groups)


# --- schedule ------------------------------------------------------------------------------------


def test_cosine_schedule_at_hand_computed_steps():
    config = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="cosine")
    assert lr_multiplier(0, config) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_multiplier(4, config) == pytest.approx(0.5)
    assert lr_multiplier(9, config) == pytest.approx(1.0)
    assert lr_multiplier(10, config) == pytest.approx(1.0)  # decay starts at the end of warmup
    assert lr_multiplier(60, config) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert lr_multiplier(35, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_multiplier(110, config) == pytest.approx(0.1)
    assert learning_rate(60, TrainConfig(lr=3e-3, warmup_steps=10, max_steps=110)) == pytest.approx(3e-3 * 0.55)


def test_wsd_and_constant_schedules():
    wsd = TrainConfig(lr=1.0, warmup_steps=0, max_steps=100, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert [lr_multiplier(s, wsd) for s in (0, 50, 80)] == pytest.approx([1.0, 1.0, 1.0])
    assert lr_multiplier(90, wsd) == pytest.approx(0.55)  # halfway through the decay: 1 - 0.9 * 0.5
    assert lr_multiplier(100, wsd) == pytest.approx(0.1)
    constant = TrainConfig(lr=1.0, warmup_steps=4, max_steps=100, schedule="constant")
    assert [lr_multiplier(s, constant) for s in (0, 3, 50, 99)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_time_limit_drives_the_schedule_when_it_is_ahead():
    config = TrainConfig(lr=1.0, warmup_steps=0, max_steps=1000, min_lr_ratio=0.0, max_minutes=1.0)
    assert lr_multiplier(10, config, elapsed_seconds=30.0) == pytest.approx(0.5)  # 30 s of 60: halfway
    assert lr_multiplier(500, config, elapsed_seconds=1.0) == pytest.approx(0.5)  # steps are ahead: they count
    assert lr_multiplier(10, config, elapsed_seconds=60.0) == pytest.approx(0.0)


# --- parameter groups and weight decay -----------------------------------------------------------


def gpt_with_everything() -> GPT:
    return GPT(ModelConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=16, norm="layernorm",
                           position="learned", mlp="gelu", bias=True, tie_embeddings=False))


BLOCK_MATRICES = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}


def test_groups_partition_the_parameters_by_role():
    model = gpt_with_everything()
    groups = {role: {name for name, _ in params} for role, params in parameter_groups(model).items()}
    assert groups["matrices"] == BLOCK_MATRICES | {"lm_head.weight"}
    assert groups["embeddings"] == {"tok_emb.weight", "pos_emb.weight"}
    assert {"norm_f.weight", "norm_f.bias", "blocks.0.attn.qkv.bias", "blocks.1.norm2.weight"} <= groups["gains"]
    assert groups["matrices"] | groups["embeddings"] | groups["gains"] == {n for n, _ in model.named_parameters()}
    assert not groups["matrices"] & groups["embeddings"] and not groups["gains"] & groups["matrices"]
    assert groups["hidden"] == BLOCK_MATRICES  # Muon: the block matrices, not the head


def test_value_embeddings_are_an_embedding_and_their_weights_gains():
    model = GPT(ModelConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=16, value_embedding=True))
    groups = {role: {name for name, _ in params} for role, params in parameter_groups(model).items()}
    assert groups["embeddings"] == {"tok_emb.weight", "value_emb.weight"}  # AdamW, embedding_weight_decay
    assert {"blocks.0.attn.value_weight", "blocks.1.attn.value_weight"} <= groups["gains"]  # no decay
    assert groups["hidden"] == BLOCK_MATRICES  # Muon's set is unchanged


def test_input_mix_weights_are_gains_that_start_as_the_plain_stream():
    model = GPT(ModelConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=16, input_mix=True))
    groups = {role: {name for name, _ in params} for role, params in parameter_groups(model).items()}
    assert {"stream_weight", "input_weight"} <= groups["gains"]  # AdamW, no decay
    assert model.stream_weight.tolist() == [1.0, 1.0] and model.input_weight.tolist() == [0.0, 0.0]


def test_each_group_gets_its_own_weight_decay():
    model = gpt_with_everything()
    groups = parameter_groups(model)
    config = TrainConfig(weight_decay=0.1, embedding_weight_decay=0.03)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    by_decay = {group["weight_decay"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert by_decay[0.1] == {id(p) for _, p in groups["matrices"]}
    assert by_decay[0.03] == {id(p) for _, p in groups["embeddings"]}
    assert by_decay[0.0] == {id(p) for _, p in groups["gains"]}


def test_a_tied_head_is_an_embedding():
    model = GPT(ModelConfig(vocab_size=50, context_length=16, n_layer=1, n_head=2, d_model=16, tie_embeddings=True))
    groups = parameter_groups(model)
    assert [name for name, _ in groups["embeddings"]] == ["tok_emb.weight"]
    assert not any(name.startswith(("tok_emb", "lm_head")) for name, _ in groups["matrices"])


def test_decoupled_weight_decay_shrinks_by_lr_times_decay():
    # With a zero gradient AdamW's step is the decay alone: w <- w * (1 - lr * wd)
    layer = torch.nn.Linear(3, 3, bias=False)
    before = layer.weight.detach().clone()
    optimizer = build_optimizer(torch.nn.Sequential(layer), TrainConfig(lr=0.1, weight_decay=0.5), torch.device("cpu"))
    layer.weight.grad = torch.zeros_like(layer.weight)
    optimizer.step()
    torch.testing.assert_close(layer.weight.detach(), before * (1 - 0.1 * 0.5))


# --- Muon ----------------------------------------------------------------------------------------


def reference_muon_update(gradient: torch.Tensor, buffer: torch.Tensor, momentum: float) -> torch.Tensor:
    """Keller Jordan's Muon step for one matrix, in float64: Nesterov momentum, then 5 quintic
    Newton-Schulz steps on the wide orientation, then the sqrt(max(1, rows/cols)) scale."""
    buffer.mul_(momentum).add_(gradient, alpha=1 - momentum)
    update = gradient + momentum * (buffer - gradient)  # lerp(gradient, buffer, momentum)
    x = update.T if update.shape[0] > update.shape[1] else update
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    x = x.T if update.shape[0] > update.shape[1] else x
    return x * math.sqrt(max(1.0, update.shape[0] / update.shape[1]))


def test_muon_matches_the_reference_algorithm_over_steps():
    generator = torch.Generator().manual_seed(0)
    shapes = [(6, 10), (10, 6), (6, 10), (4, 4)]  # two of one shape: orthogonalized as one batch
    weights = [torch.randn(*s, generator=generator, dtype=torch.float64) for s in shapes]
    params = [torch.nn.Parameter(w.float()) for w in weights]
    expected = [w.clone() for w in weights]
    buffers = [torch.zeros_like(w) for w in weights]
    optimizer = Muon(params, lr=0.02, momentum=0.95, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn(*s, generator=generator, dtype=torch.float64) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.float()
        optimizer.step()
        for i, g in enumerate(grads):
            expected[i] = expected[i] * (1 - 0.02 * 0.1) - 0.02 * reference_muon_update(g, buffers[i], 0.95)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, atol=1e-5, rtol=1e-5)


def test_a_split_fused_matrix_steps_as_its_parts_would_apart():
    generator = torch.Generator().manual_seed(3)
    parts = [4, 2, 2]  # q, k, v rows of a fused (8, 6) matrix: a (4, 6) and two (2, 6) matrices
    weight = torch.randn(8, 6, generator=generator, dtype=torch.float64)
    fused = torch.nn.Parameter(weight.clone())
    apart = [torch.nn.Parameter(w.clone()) for w in weight.split(parts)]
    optimizer = Muon([fused], lr=0.02, weight_decay=0.1, row_parts={fused: parts})
    reference = Muon(apart, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(8, 6, generator=generator, dtype=torch.float64)
        fused.grad = grad.clone()
        for p, g in zip(apart, grad.split(parts)):
            p.grad = g.clone()
        optimizer.step()
        reference.step()
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in apart]))
    split, whole = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    split.grad, whole.grad = grad.clone(), grad.clone()
    Muon([split], lr=0.02, row_parts={split: parts}).step()
    Muon([whole], lr=0.02).step()  # orthogonalized whole, the same gradient moves the matrix elsewhere
    assert (split.detach() - whole.detach()).abs().max() > 1e-3


def test_muon_split_names_qkv_and_swiglu_parts():
    model = GPT(ModelConfig(vocab_size=50, context_length=16, n_layer=2, n_head=4, n_kv_head=2, d_model=16))
    muon = build_optimizer(model, TrainConfig(optimizer="muon", muon_split=True), torch.device("cpu")).optimizers[0]
    block = model.blocks[1]
    assert muon.row_parts[id(block.attn.qkv.weight)] == [16, 8, 8]  # 4 query heads of 4, 2 key/value heads
    assert muon.row_parts[id(block.mlp.fc.weight)] == [model.config.ffn_dim] * 2
    assert build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu")).optimizers[0].row_parts == {}


def test_muon_agrees_with_torchs_bf16_muon_to_its_precision():
    generator = torch.Generator().manual_seed(1)
    weight, grad = torch.randn(32, 48, generator=generator), torch.randn(32, 48, generator=generator)
    ours, theirs = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    Muon([ours], lr=0.02).step()
    torch.optim.Muon([theirs], lr=0.02, weight_decay=0.0).step()
    step_ours, step_theirs = ours.detach() - weight, theirs.detach() - weight
    assert torch.nn.functional.cosine_similarity(step_ours.flatten(), step_theirs.flatten(), dim=0) > 0.99


def test_orthogonalize_pushes_singular_values_towards_one():
    matrix = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    singular_values = torch.linalg.svdvals(orthogonalize(matrix)[0])
    assert 0.6 < float(singular_values.min()) and float(singular_values.max()) < 1.25


def test_muon_for_hidden_matrices_adamw_for_the_rest():
    model = gpt_with_everything()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02), torch.device("cpu"))
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for group in muon.param_groups for p in group["params"]}
    assert muon_ids == {id(p) for _, p in parameter_groups(model)["hidden"]}
    assert id(model.lm_head.weight) not in muon_ids and id(model.tok_emb.weight) not in muon_ids
    assert muon.param_groups[0]["weight_decay"] == pytest.approx(0.1 * 1e-3 / 0.02)  # AdamW's shrink per step
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    model(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))[1].backward()
    optimizer.set_lr_multiplier(0.5)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01) and adamw.param_groups[0]["lr"] == pytest.approx(5e-4)
    optimizer.step()
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)


def test_optimizer_state_round_trips_and_refuses_another_kind():
    model = gpt_with_everything()
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    model(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))[1].backward()
    optimizer.step()
    copy = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    copy.load_state_dict(optimizer.state_dict())
    first = model.blocks[0].attn.qkv.weight
    torch.testing.assert_close(copy.optimizers[0].state[first]["momentum_buffer"],
                               optimizer.optimizers[0].state[first]["momentum_buffer"])
    with pytest.raises(OptimizerStateError, match="was --optimizer changed"):
        build_optimizer(model, TrainConfig(optimizer="adamw"), torch.device("cpu")).load_state_dict(
            optimizer.state_dict())


def test_adamw8bit_falls_back_to_adamw_with_a_warning():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed: no fallback to test")
    except ImportError:
        pass
    with pytest.warns(UserWarning, match="bitsandbytes"):
        optimizer = build_optimizer(gpt_with_everything(), TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))
    assert isinstance(optimizer.optimizers[0], torch.optim.AdamW)


# --- the weight average --------------------------------------------------------------------------


def test_ema_step_by_hand_and_applied_then_restored():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = WeightEMA(layer, decay=0.9)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(8) == pytest.approx(0.5)  # (1 + t) / (10 + t)
    assert ema.decay_at(80) == pytest.approx(0.9) and ema.decay_at(10_000) == pytest.approx(0.9)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0]]))
    ema.update(step=100)  # d = 0.9: 0.9 * (1, 2) + 0.1 * (3, 0) = (1.2, 1.8)
    torch.testing.assert_close(ema.weights()["weight"], torch.tensor([[1.2, 1.8]]))
    with ema.applied():
        torch.testing.assert_close(layer.weight.detach(), torch.tensor([[1.2, 1.8]]))
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[3.0, 0.0]]))


def test_ema_covers_tied_weights_once_and_reloads():
    model = GPT(ModelConfig(vocab_size=50, context_length=16, n_layer=1, n_head=2, d_model=16, tie_embeddings=True))
    ema = WeightEMA(model, decay=0.5)
    assert "lm_head.weight" not in ema.weights() and "tok_emb.weight" in ema.weights()
    other = WeightEMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    other.update(step=0)
    ema.load_weights(other.weights())
    for name, tensor in ema.weights().items():
        torch.testing.assert_close(tensor, other.weights()[name])
    with pytest.raises(OptimizerStateError, match="lacks"):
        ema.load_weights({})
