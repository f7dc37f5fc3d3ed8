"""Export to Hugging Face transformers, GGUF and safetensors directories; CLI and bad input."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from export_helpers import (EOT, SENTENCES, gpt2_config, greedy, llama_config, make_run, require_llama_cpp,
                            train_byte_level_bpe)
from tinystories.checkpoint import build_model, load_weights, resolve_checkpoint, load_run_config
from tinystories.cli import main
from tinystories.errors import UserError
from tinystories.export import ExportError, export
from tinystories.llama2c import halves_to_pairs, pairs_to_halves


FAMILIES = {
    # name: (config, expected transformers class)
    "llama-gqa-untied": (llama_config(rope_theta=500.0), "LlamaForCausalLM"),
    "llama-bias-tied": (llama_config(bias=True, tie_embeddings=True, n_kv_head=1, norm_eps=1e-6), "LlamaForCausalLM"),
    "mistral-window": (llama_config(sliding_window=5), "MistralForCausalLM"),
    "gpt2-bias-tied": (gpt2_config(), "GPT2LMHeadModel"),
    "gpt2-nobias-untied": (gpt2_config(bias=False, tie_embeddings=False, norm_eps=1e-6), "GPT2LMHeadModel"),
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_byte_level_bpe()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_export_matches_logits_and_greedy(tmp_path, tokenizer, family):
    config, class_name = FAMILIES[family]
    run, model = make_run(tmp_path / "run", config, tokenizer)
    out = export(run, "hf", tmp_path / "hf")

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == class_name
    tokens = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = hf_model(tokens).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    prompt = tokens[0, :6].tolist()
    eot = tokenizer.token_to_id(EOT)
    expected = greedy(model, prompt, 12, stop=eot)
    with torch.no_grad():
        generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert generated[0, len(prompt):].tolist() == expected


def test_hf_tokenizer_loads_with_autotokenizer(tmp_path, tokenizer):
    run, _ = make_run(tmp_path / "run", llama_config(), tokenizer)
    out = export(run, "hf", tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = SENTENCES[3] + EOT + "Tom smiled."
    expected = tokenizer.encode(text, add_special_tokens=False).ids
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert hf_tokenizer.decode(expected) == text
    assert hf_tokenizer.eos_token == EOT and hf_tokenizer.eos_token_id == tokenizer.token_to_id(EOT)


def test_hf_export_of_bytes_tokenizer(tmp_path):
    """The 'bytes' kind has no tokenizer.json; the export synthesises one with id = byte value."""
    config = llama_config(vocab_size=257)
    run, _ = make_run(tmp_path / "run", config, train_byte_level_bpe())
    (run / "tokenizer.json").unlink()
    (run / "tokenizer_meta.json").write_text(json.dumps({"kind": "bytes", "spec": "bytes", "vocab_size": 257,
                                                         "eot_id": 256}))
    out = export(run, "hf", tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Lily's café 😀" + EOT + "x"
    expected = list("Lily's café 😀".encode("utf-8")) + [256] + [ord("x")]
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert hf_tokenizer.decode(expected) == text


def test_hf_export_float16(tmp_path, tokenizer):
    run, model = make_run(tmp_path / "run", llama_config(), tokenizer)
    out = export(run, "hf", tmp_path / "hf", dtype="float16")
    with safe_open(out / "model.safetensors", "pt") as file:
        assert {file.get_tensor(name).dtype for name in file.keys()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens)[0], atol=0.05, rtol=0.01)


SHIPPED = Path(__file__).resolve().parents[1] / "src" / "tinystories" / "assets" / "models" / "tiny"


def card_section(card: str, heading: str, fence: str) -> str:
    """The first fenced block (```fence) after `## heading` in a model card."""
    after = card.split(f"## {heading}\n", 1)[1]
    return after.split(f"```{fence}\n", 1)[1].split("\n```", 1)[0]


def test_hf_export_of_the_shipped_model_has_a_complete_model_card(tmp_path, capsys):
    from huggingface_hub import ModelCard

    from tinystories.config import RunConfig, apply_overrides

    out = export("tiny", "hf", tmp_path / "hf")
    card = ModelCard.load(out / "README.md")  # the hub's own parser of the YAML front matter
    assert card.data.license == "mit" and card.data.datasets == ["roneneldan/TinyStories"]
    assert {"tinystories", "llama", "text-generation"} <= set(card.data.tags)
    evaluations = [json.loads(line) for line in (SHIPPED / "metrics.jsonl").read_text().splitlines()
                   if "val_loss" in line]
    best = min(evaluations, key=lambda record: record["val_loss"])  # export's default checkpoint is best
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_split) == (
        "bits_per_byte", round(best["val_bpb"], 4), "validation")
    text = card.text
    assert f"| validation bits per byte | {best['val_bpb']:.4f} (" in text
    assert f"| training tokens | {best['tokens']:,} (by step {best['step']:,}) |" in text
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert f"| parameters | {hf_model.num_parameters():,} |" in text

    # The training command rebuilds the shipped config.json exactly.
    command = card_section(text, "How it was trained", "bash").replace("\\\n", " ").split()
    assert command[:4] == ["tinystories", "train", "--preset", "tiny"]
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    rebuilt = apply_overrides(RunConfig.from_preset("tiny"), sets)
    shipped = RunConfig.load(SHIPPED / "config.json")
    assert (rebuilt.model, rebuilt.train) == (shipped.model, shipped.train) and "train.max_steps=6000" in sets

    # The sample is what `tinystories generate` prints for the command the card names.
    capsys.readouterr()
    assert main(["generate", "tiny", "--prompt", "Once upon a time", "--temperature", "0",
                 "--max-new-tokens", "120"]) == 0
    assert 'generate tiny --prompt "Once upon a time" --temperature 0 --max-new-tokens 120' in text
    assert card_section(text, "A sample", "text") == capsys.readouterr().out.strip()


def test_model_card_says_unknown_for_what_the_run_does_not_record(tmp_path, tokenizer, monkeypatch):
    from huggingface_hub import ModelCard

    import tinystories.export as export_module

    monkeypatch.setattr(export_module, "sample_story", lambda source: "A story.")  # tested on the shipped model
    run, _ = make_run(tmp_path / "run", llama_config(), tokenizer)  # no metrics.jsonl, no preset
    card = ModelCard.load(export(run, "hf", tmp_path / "hf") / "README.md")
    assert card.data.eval_results is None and card.data.license == "mit"
    assert "| validation bits per byte | unknown" in card.text and "| training tokens | unknown |" in card.text
    assert "The training command is unknown" in card.text
    (run / "metrics.jsonl").write_text('{"step": 10, "tokens": 640, "train_loss": 5.0}\n'
                                       '{"step": 10, "tokens": 640, "val_loss": 4.5, "val_bpb": 1.5}\n'
                                       '{"step": 20, "tokens": 1280, "val_loss": 4.0, "val_bpb": 1.2}\n{"step": 3')
    for checkpoint, bpb in (("best", 1.2), ("last", 1.2)):
        card = ModelCard.load(export(run, "hf", tmp_path / checkpoint, checkpoint=checkpoint) / "README.md")
        assert card.data.eval_results[0].metric_value == bpb  # the cut-off last line is left out


@pytest.mark.parametrize("config, field", [
    (gpt2_config(mlp="swiglu"), "mlp='swiglu'"),  # learned positions + swiglu
    (gpt2_config(norm="rmsnorm"), "norm='rmsnorm'"),
    (gpt2_config(n_kv_head=2), "n_kv_head=2"),  # GQA in GPT-2
    (gpt2_config(sliding_window=8), "sliding_window=8"),
    (llama_config(mlp="gelu"), "mlp='gelu'"),  # gelu MLP in Llama
    (llama_config(norm="layernorm"), "norm='layernorm'"),
    (llama_config(sliding_window=8, bias=True), "bias=True"),  # bias in Mistral
    (llama_config(sliding_window=8, mlp="gelu"), "mlp='gelu'"),  # the seed002 preset's shape
    (llama_config(mlp="relu2"), "mlp='relu2'"),
    (llama_config(qk_norm=True), "qk_norm=True"),
    (gpt2_config(logit_softcap=15.0), "logit_softcap=15.0"),
    (llama_config(value_embedding=True), "value_embedding=True"),
    (llama_config(input_mix=True), "input_mix=True"),
])
def test_hf_export_refuses_what_the_class_cannot_express(tmp_path, tokenizer, config, field):
    run, _ = make_run(tmp_path / "run", config, tokenizer)
    with pytest.raises(UserError, match=field.replace("(", r"\(")) as error:
        export(run, "hf", tmp_path / "hf")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary directory left behind


# --- GGUF -----------------------------------------------------------------------------------------

REQUIRED_GGUF_KEYS = [
    "general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
]


def _field_value(reader, key):
    field = reader.fields[key]
    return field.contents()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gguf_tensors_and_metadata(tmp_path, tokenizer, dtype):
    config = llama_config(rope_theta=20000.0, norm_eps=1e-6)
    run, model = make_run(tmp_path / "run", config, tokenizer)
    out = export(run, "gguf", tmp_path / "gguf", dtype=dtype)
    reader = gguf.GGUFReader(out / "model.gguf")

    for key in REQUIRED_GGUF_KEYS:
        assert key in reader.fields, key
    assert _field_value(reader, "general.architecture") == "llama"
    assert _field_value(reader, "llama.context_length") == 32
    assert _field_value(reader, "llama.embedding_length") == 64
    assert _field_value(reader, "llama.block_count") == 2
    assert _field_value(reader, "llama.feed_forward_length") == 96
    assert _field_value(reader, "llama.attention.head_count") == 4
    assert _field_value(reader, "llama.attention.head_count_kv") == 2
    assert _field_value(reader, "llama.rope.dimension_count") == 16
    assert _field_value(reader, "llama.rope.freq_base") == pytest.approx(20000.0)
    assert _field_value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert _field_value(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field_value(reader, "tokenizer.ggml.bos_token_id") == tokenizer.token_to_id(EOT)
    assert _field_value(reader, "tokenizer.ggml.eos_token_id") == tokenizer.token_to_id(EOT)
    vocab = tokenizer.get_vocab()
    tokens = _field_value(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    types = _field_value(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.token_to_id(EOT)] == int(gguf.TokenType.CONTROL) and types[100] == int(gguf.TokenType.NORMAL)
    saved = json.loads(tokenizer.to_str())["model"]["merges"]
    assert _field_value(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in saved]

    # Every tensor, read back and un-permuted, equals ours.
    state = {name: tensor.float() for name, tensor in model.state_dict().items()}
    H, K, D, F = 4, 2, 16, 96
    expected = {"token_embd.weight": state["tok_emb.weight"], "output.weight": state["lm_head.weight"],
                "output_norm.weight": state["norm_f.weight"]}
    for i in range(config.n_layer):
        q, k, v = state[f"blocks.{i}.attn.qkv.weight"].split([H * D, K * D, K * D])
        gate, up = state[f"blocks.{i}.mlp.fc.weight"].split([F, F])
        expected.update({f"blk.{i}.attn_q.weight": q, f"blk.{i}.attn_k.weight": k, f"blk.{i}.attn_v.weight": v,
                         f"blk.{i}.attn_output.weight": state[f"blocks.{i}.attn.proj.weight"],
                         f"blk.{i}.ffn_gate.weight": gate, f"blk.{i}.ffn_up.weight": up,
                         f"blk.{i}.ffn_down.weight": state[f"blocks.{i}.mlp.proj.weight"],
                         f"blk.{i}.attn_norm.weight": state[f"blocks.{i}.norm1.weight"],
                         f"blk.{i}.ffn_norm.weight": state[f"blocks.{i}.norm2.weight"]})
    found = {tensor.name: tensor for tensor in reader.tensors}
    assert set(found) == set(expected)
    tolerance = 0 if dtype == "float32" else 1e-3
    for name, tensor in found.items():
        array = torch.from_numpy(np.array(tensor.data, dtype=np.float32)).reshape(expected[name].shape)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            array = pairs_to_halves(array, H if "attn_q" in name else K)
        torch.testing.assert_close(array, expected[name], atol=tolerance, rtol=tolerance, msg=name)
        if array.dim() == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay float32
        else:
            assert tensor.tensor_type == (gguf.GGMLQuantizationType.F32 if dtype == "float32"
                                          else gguf.GGMLQuantizationType.F16)


def test_gguf_tied_model_has_no_output_tensor(tmp_path, tokenizer):
    run, _ = make_run(tmp_path / "run", llama_config(tie_embeddings=True), tokenizer)
    reader = gguf.GGUFReader(export(run, "gguf", tmp_path / "gguf") / "model.gguf")
    assert "output.weight" not in {tensor.name for tensor in reader.tensors}


def test_gguf_out_with_a_gguf_name_is_that_file(tmp_path, tokenizer, capsys):
    run, _ = make_run(tmp_path / "run", llama_config(), tokenizer)
    as_dir = export(run, "gguf", tmp_path / "dir") / "model.gguf"
    assert main(["export", "--model", str(run), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 0
    assert (tmp_path / "x.gguf").is_file() and (tmp_path / "x.gguf").read_bytes() == as_dir.read_bytes()
    assert f"to {tmp_path / 'x.gguf'}" in capsys.readouterr().out
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "file exists (use --force" in capsys.readouterr().err
    (tmp_path / "x.gguf").write_bytes(b"old")
    export(run, "gguf", tmp_path / "x.gguf", force=True)
    assert (tmp_path / "x.gguf").read_bytes() == as_dir.read_bytes()
    (tmp_path / "d.gguf").mkdir()  # an existing directory named *.gguf stays a directory target
    assert export(run, "gguf", tmp_path / "d.gguf") == tmp_path / "d.gguf"
    assert (tmp_path / "d.gguf" / "model.gguf").read_bytes() == as_dir.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.gguf", "dir", "run", "x.gguf"]  # no temp file left


def test_pairs_permutation_is_the_rotary_layout_change():
    """Rotating halves with W equals rotating adjacent pairs with halves_to_pairs(W), then un-permuting."""
    torch.manual_seed(0)
    H, D, C = 2, 8, 5
    weight, x = torch.randn(H * D, C), torch.randn(C)
    angles = torch.tensor([0.3, 1.1, -0.7, 2.0])  # one angle per pair index
    y = (weight @ x).view(H, D)
    first, second = y[:, : D // 2], y[:, D // 2:]
    halves = torch.cat([first * angles.cos() - second * angles.sin(), second * angles.cos() + first * angles.sin()], 1)
    z = (halves_to_pairs(weight, H) @ x).view(H, D // 2, 2)
    even, odd = z[..., 0], z[..., 1]
    pairs = torch.stack([even * angles.cos() - odd * angles.sin(), odd * angles.cos() + even * angles.sin()], -1)
    torch.testing.assert_close(pairs_to_halves(pairs.reshape(H * D, 1), H).view(H, D), halves)
    torch.testing.assert_close(pairs_to_halves(halves_to_pairs(weight, H), H), weight)


@pytest.mark.parametrize("config, field", [
    (gpt2_config(), "position='learned'"),
    (llama_config(mlp="gelu"), "mlp='gelu'"),
    (llama_config(bias=True), "bias=True"),
    (llama_config(sliding_window=4), "sliding_window=4"),
    (llama_config(qk_norm=True), "qk_norm=True"),
    (llama_config(logit_softcap=30.0), "logit_softcap=30.0"),
    (llama_config(value_embedding=True), "value_embedding=True"),
    (llama_config(input_mix=True), "input_mix=True"),
])
def test_gguf_refuses_non_llama_models(tmp_path, tokenizer, config, field):
    run, _ = make_run(tmp_path / "run", config, tokenizer)
    with pytest.raises(UserError, match=field):
        export(run, "gguf", tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_missing_llama_cpp_fails_in_ci_and_skips_elsewhere(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    monkeypatch.setenv("TINYSTORIES_REQUIRE_LLAMA_CPP", "1")
    with pytest.raises(pytest.fail.Exception, match="requires it"):
        require_llama_cpp()
    monkeypatch.delenv("TINYSTORIES_REQUIRE_LLAMA_CPP")
    with pytest.raises(pytest.skip.Exception, match="CI sets TINYSTORIES_REQUIRE_LLAMA_CPP=1"):
        require_llama_cpp()


def test_gguf_greedy_matches_llama_cpp(tmp_path, tokenizer):
    llama_cpp = require_llama_cpp()
    config = llama_config(vocab_size=320, context_length=64, tie_embeddings=False)
    run, model = make_run(tmp_path / "run", config, tokenizer)
    out = export(run, "gguf", tmp_path / "gguf")
    # f32 KV cache: llama.cpp defaults to f16, which moves logits by ~1e-3
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, seed=0,
                          type_k=0, type_v=0)
    prompt = tokenizer.encode("Once upon a time, Lily", add_special_tokens=False).ids
    assert llm.tokenize(b"Once upon a time, Lily", add_bos=False, special=True) == prompt
    llm.eval(prompt)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0].numpy()
    theirs = np.array(llm.scores[: len(prompt)])
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    expected = greedy(model, prompt, 10, stop=tokenizer.token_to_id(EOT))
    llm.reset()
    produced = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        if len(produced) == len(expected):
            break
        produced.append(token)
    assert produced == expected


# --- safetensors directory ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_safetensors_dir_is_loadable(tmp_path, tokenizer, dtype):
    config = gpt2_config(tie_embeddings=False)
    run, model = make_run(tmp_path / "run", config, tokenizer)
    out = export(run, "safetensors", tmp_path / "st", dtype=dtype)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                    "tokenizer_meta.json"]
    with safe_open(out / "model.safetensors", "pt") as file:
        assert {file.get_tensor(name).dtype for name in file.keys()} == {getattr(torch, dtype)}
    directory, home = resolve_checkpoint(out)
    assert directory == home == out
    loaded = build_model(load_run_config(home).model, load_weights(directory)).eval()
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        atol = 0 if dtype == "float32" else 0.05
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], atol=atol, rtol=0 if atol == 0 else 0.01)


def test_safetensors_dir_loads_with_load_run(tmp_path, tokenizer):
    from tinystories.checkpoint import load_run

    run, model = make_run(tmp_path / "run", llama_config(), tokenizer)
    out = export(run, "safetensors", tmp_path / "st", checkpoint="best")
    loaded, loaded_tokenizer, run_config = load_run(out)
    assert run_config.model == model.config
    assert loaded_tokenizer.encode(SENTENCES[0]) == tokenizer.encode(SENTENCES[0], add_special_tokens=False).ids
    tokens = torch.randint(0, 320, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], atol=0, rtol=0)


def test_export_uses_the_weight_average_like_generate(tmp_path, tokenizer):
    """A checkpoint with a weight average (model_ema.safetensors): export writes what generate runs."""
    import shutil

    from tinystories.checkpoint import EMA_FILE
    from tinystories.generate import load_model

    run, _ = make_run(tmp_path / "run", llama_config(), tokenizer, seed=0)
    _, average = make_run(tmp_path / "other", llama_config(), tokenizer, seed=1)
    shutil.copyfile(tmp_path / "other" / "checkpoints" / "best" / "model.safetensors",
                    run / "checkpoints" / "best" / EMA_FILE)
    out = export(run, "safetensors", tmp_path / "st")
    exported = build_model(load_run_config(out).model, load_weights(out)).eval()
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens)[0], average(tokens)[0], atol=0, rtol=0)
        torch.testing.assert_close(load_model(run).model(tokens)[0], average(tokens)[0], atol=0, rtol=0)


# --- atomic output, bad input, CLI ----------------------------------------------------------------


def test_failed_export_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    import tinystories.export as export_module

    run, _ = make_run(tmp_path / "run", llama_config(), tokenizer)

    def broken_writer(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setitem(export_module.WRITERS, "gguf", broken_writer)
    monkeypatch.setattr(export_module, "write_gguf_file", broken_writer)
    for out in (tmp_path / "out", tmp_path / "out.gguf", tmp_path / "sub" / "model.gguf"):
        with pytest.raises(RuntimeError):
            export(run, "gguf", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "sub"]  # the parent made for the file
    assert list((tmp_path / "sub").iterdir()) == []


def test_existing_output_needs_force(tmp_path, tokenizer):
    run, _ = make_run(tmp_path / "run", llama_config(), tokenizer)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export(run, "safetensors", out)
    assert (out / "old.txt").read_text() == "keep me"
    export(run, "safetensors", out, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
    with pytest.raises(ExportError, match="overwrite the model"):
        export(run, "safetensors", run, force=True)


@pytest.mark.parametrize("argv, message", [
    (["export", "{run}", "--format", "onnx", "--out", "{out}"], "--format 'onnx': expected one of hf, gguf"),
    (["export", "{run}", "--format", "hf", "--out", "{out}", "--dtype", "int8"], "--dtype 'int8'"),
    (["export", "{tmp}/missing", "--format", "hf", "--out", "{out}"], "no such run"),
    (["export", "{run}", "--format", "llama2c", "--out", "{out}", "--dtype", "float16"], "float32 only"),
    (["export", "{run}", "--format", "hf", "--out", "{out}", "--checkpoint", "latest"], "--checkpoint"),
    (["export", "{gpt2run}", "--format", "gguf", "--out", "{out}"], "position='learned'"),
    (["import", "onnx", "{tmp}/m.bin", "--tokenizer", "{tmp}/t.bin", "--out", "{out}"], "import format 'onnx'"),
    (["import", "llama2c", "{tmp}/m.bin", "--tokenizer", "{tmp}/t.bin", "--out", "{out}"], "no such file"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, tokenizer, capsys, argv, message):
    run, _ = make_run(tmp_path / "run", llama_config(), tokenizer)
    make_run(tmp_path / "gpt2run", gpt2_config(), tokenizer)
    names = {"run": run, "out": tmp_path / "out", "tmp": tmp_path, "gpt2run": tmp_path / "gpt2run"}
    assert main([part.format(**names) for part in argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tinystories: error: ") and error.count("\n") == 1
    assert message in error
    assert not (tmp_path / "out").exists()


def test_cli_export_success(tmp_path, tokenizer, capsys):
    run, _ = make_run(tmp_path / "run", llama_config(), tokenizer)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--dtype", "float16"]) == 0
    assert "exported" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(tmp_path / "hf"))
    assert json.loads(Path(tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_hf_export_with_the_gpt2_tokenizer(tmp_path, gpt2_dir):
    """The seed004 preset's shape with tokenizer.py's GPT-2 tokenizer: transformers encodes identically."""
    from tinystories.checkpoint import save_checkpoint
    from tinystories.config import RunConfig
    from tinystories.model import GPT
    from tinystories.tokenizer import gpt2_tokenizer

    from export_helpers import randomize

    ours = gpt2_tokenizer(gpt2_dir)
    run_config = RunConfig.from_preset("seed004")
    run = tmp_path / "run"
    run_config.save(run / "config.json")
    ours.save(run)
    model = randomize(GPT(run_config.model), scale=0.05)
    save_checkpoint(run / "checkpoints" / "best", model)
    out = export(run, "hf", tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Once upon a time, Lily's cat said \"hi!\"  ünïcode 😀" + EOT + "The end."
    ids = ours.encode(text)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == ours.decode(ids) == text
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(torch.tensor([ids])).logits, model(torch.tensor([ids]))[0],
                                   atol=1e-4, rtol=0)


# --- llama.cpp runs our GGUF of the shipped model like tinystories does --------------------------

LLAMA_CPP_PROMPTS = ["Once upon a time", "Tom had a red ball", "The little bird"]
LLAMA_CPP_NEW_TOKENS = 120


@pytest.fixture(scope="module")
def shipped_llama(tmp_path_factory):
    """llama.cpp holding `export tiny --format gguf --out tiny.gguf` (float32, f32 KV cache: llama.cpp's
    default f16 cache moves logits by ~1e-3)."""
    llama_cpp = require_llama_cpp()
    out = tmp_path_factory.mktemp("shipped-gguf") / "tiny.gguf"
    assert main(["export", "tiny", "--format", "gguf", "--out", str(out)]) == 0
    return llama_cpp.Llama(model_path=str(out), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                           type_k=0, type_v=0)


def llama_cpp_greedy(llm, tokens: list[int], steps: int, stop: int) -> list[int]:
    """llama.cpp's argmax continuation of `tokens`, one token at a time, until `stop` or `steps`."""
    llm.reset()
    llm.eval(tokens)
    produced = []
    while len(produced) < steps:
        next_token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if next_token == stop:
            break
        produced.append(next_token)
        llm.eval([next_token])
    return produced


@pytest.mark.parametrize("prompt", LLAMA_CPP_PROMPTS)
def test_llama_cpp_greedy_on_the_shipped_gguf_equals_tinystories_generate(shipped_llama, prompt, capsys):
    from tinystories.generate import load_model

    lm = load_model("tiny")
    prompt_ids = shipped_llama.tokenize(prompt.encode(), add_bos=False, special=True)
    assert prompt_ids == lm.tokenizer.encode(prompt)  # the tokenizer embedded in the GGUF
    theirs = llama_cpp_greedy(shipped_llama, [lm.tokenizer.eot_id] + prompt_ids, LLAMA_CPP_NEW_TOKENS,
                              stop=shipped_llama.token_eos())
    assert len(theirs) >= 100
    ours = lm.generate(prompt, max_new_tokens=LLAMA_CPP_NEW_TOKENS, temperature=0)[0]
    assert ours.token_ids == theirs
    capsys.readouterr()
    assert main(["generate", "tiny", "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", str(LLAMA_CPP_NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == prompt + shipped_llama.detokenize(theirs).decode("utf-8") + "\n"


def llama_cpp_nats(llm, stream: list[int], context: int) -> float:
    """Summed next-token nats over non-overlapping windows of `context` tokens (evaluate.py's layout:
    window i reads [iC, iC+C) and predicts [iC+1, iC+C+1))."""
    total = 0.0
    for start in range(0, len(stream) - 1, context):
        window, targets = stream[start:start + context], stream[start + 1:start + context + 1]
        window = window[:len(targets)]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:len(window)], dtype=np.float64)  # (T, V)
        top = logits.max(axis=1, keepdims=True)
        log_normaliser = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
        total += float(np.sum(log_normaliser - logits[np.arange(len(targets)), targets]))
    return total


def test_llama_cpp_perplexity_of_the_shipped_gguf_equals_tinystories_eval(shipped_llama, small_story_files,
                                                                         tmp_path, capsys):
    from tinystories.data import read_stories

    _, valid = small_story_files
    stories = list(read_stories(valid))
    assert len(stories) == 50
    eot = shipped_llama.token_eos()
    stream = []
    for story in stories:  # tokenized by llama.cpp, laid out as shards are: EOT s1 EOT s2 ...
        stream += [eot] + shipped_llama.tokenize(story.encode(), add_bos=False, special=False)
    theirs = math.exp(llama_cpp_nats(shipped_llama, stream, context=256) / (len(stream) - 1))
    assert main(["eval", "--model", "tiny", "--input", str(valid), "--samples", "0",
                 "--json", str(tmp_path / "eval.json")]) == 0
    ours = json.loads((tmp_path / "eval.json").read_text())
    assert ours["tokens"] == len(stream) - 1  # the same tokens: llama.cpp's tokenizer agrees with ours
    assert abs(theirs / ours["perplexity"] - 1) < 0.01, (theirs, ours["perplexity"])
