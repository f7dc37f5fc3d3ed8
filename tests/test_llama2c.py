"""llama2.c export and import, checked against an independent numpy port of run.c.

run.c's source is not available offline, so `RunC` below re-implements its `read_checkpoint`,
`forward` (adjacent-pair RoPE, its exact formulas), `encode` and `decode` from the C code's
definitions. These tests never use our writer to produce what they check our reader against.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import EOT, gpt2_config, greedy, llama_config, make_run, require_llama_cpp, train_byte_level_bpe
from tinystories.checkpoint import build_model, load_run_config, load_weights, resolve_checkpoint
from tinystories.cli import main
from tinystories.errors import UserError
from tinystories.export import export, import_llama2c
from tinystories.tokenizer import load_tokenizer
from tinystories.vocab_bin import Llama2cError, Llama2cTokenizer, read_tokenizer_bin


# --- an independent port of run.c -----------------------------------------------------------------


class RunC:
    """run.c's transformer, read straight from a legacy .bin (float64 arithmetic)."""

    def __init__(self, path: Path):
        raw = Path(path).read_bytes()
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
        self.dim, self.hidden, self.layers, self.heads, self.kv_heads = dim, hidden, layers, heads, kv_heads
        self.vocab, self.seq_len, shared = abs(vocab), seq_len, vocab > 0
        self.head_size = dim // heads
        kv_dim = kv_heads * self.head_size
        data = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
        self._data, self._offset = data, 0
        take = self._take

        self.tok = take(self.vocab, dim)
        self.rms_att = take(layers, dim)
        self.wq, self.wk, self.wv = take(layers, dim, dim), take(layers, kv_dim, dim), take(layers, kv_dim, dim)
        self.wo = take(layers, dim, dim)
        self.rms_ffn = take(layers, dim)
        self.w1, self.w2, self.w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
        self.rms_final = take(dim)
        take(seq_len, self.head_size // 2), take(seq_len, self.head_size // 2)
        self.wcls = self.tok if shared else take(self.vocab, dim)
        assert self._offset == data.size

    def _take(self, *shape):
        """The next array of `shape` in the file's float order."""
        count = int(np.prod(shape))
        array = self._data[self._offset:self._offset + count].reshape(shape)
        self._offset += count
        return array

    @staticmethod
    def rmsnorm(x, weight):
        ss = np.sum(x * x) / x.size + 1e-5
        return weight * (x / math.sqrt(ss))

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits after each token, feeding them one at a time with a KV cache as run.c does."""
        hs, kv_mul, kv_dim = self.head_size, self.heads // self.kv_heads, self.kv_heads * self.head_size
        key_cache = np.zeros((self.layers, self.seq_len, kv_dim))
        value_cache = np.zeros((self.layers, self.seq_len, kv_dim))
        out = []
        for pos, token in enumerate(tokens):
            x = self.tok[token].copy()
            for l in range(self.layers):
                xb = self.rmsnorm(x, self.rms_att[l])
                q, k, v = self.wq[l] @ xb, self.wk[l] @ xb, self.wv[l] @ xb
                for i in range(0, self.dim, 2):
                    head_dim = i % hs
                    freq = 1.0 / 10000.0 ** (head_dim / hs)
                    fcr, fci = math.cos(pos * freq), math.sin(pos * freq)
                    for vec in ((q, k) if i < kv_dim else (q,)):
                        v0, v1 = vec[i], vec[i + 1]
                        vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
                key_cache[l, pos], value_cache[l, pos] = k, v
                attended = np.zeros(self.dim)
                for h in range(self.heads):
                    qh = q[h * hs:(h + 1) * hs]
                    kv = slice((h // kv_mul) * hs, (h // kv_mul + 1) * hs)
                    scores = key_cache[l, :pos + 1, kv] @ qh / math.sqrt(hs)
                    scores = np.exp(scores - scores.max())
                    scores /= scores.sum()
                    attended[h * hs:(h + 1) * hs] = scores @ value_cache[l, :pos + 1, kv]
                x = x + self.wo[l] @ attended
                xb = self.rmsnorm(x, self.rms_ffn[l])
                gate, up = self.w1[l] @ xb, self.w3[l] @ xb
                x = x + self.w2[l] @ (gate / (1.0 + np.exp(-gate)) * up)
            out.append(self.wcls @ self.rmsnorm(x, self.rms_final))
        return np.stack(out)

    def generate_greedy(self, prompt: list[int], steps: int) -> list[int]:
        """run.c's generate loop with temperature 0: stops when BOS (1) is produced."""
        tokens = list(prompt)
        produced = []
        while len(produced) < steps:
            next_token = int(np.argmax(self.logits(tokens)[-1]))
            if next_token == 1:
                break
            produced.append(next_token)
            tokens.append(next_token)
        return produced


def runc_encode(pieces: list[bytes], scores: list[float], text: str) -> list[int]:
    """run.c's encode(text, bos=1, eos=0): dummy prefix, per-codepoint lookup, byte fallback, merges."""
    lookup = {piece: i for i, piece in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])
    for char in text:
        encoded = char.encode("utf-8")
        if encoded in lookup:
            tokens.append(lookup[encoded])
        else:
            tokens.extend(byte + 3 for byte in encoded)
    while True:
        best_score, best_id, best_index = -1e10, -1, -1
        for index in range(1, len(tokens) - 1):  # position 0 is BOS in run.c's buffer too
            merged = pieces[tokens[index]] + pieces[tokens[index + 1]]
            if merged in lookup and scores[lookup[merged]] > best_score:
                best_score, best_id, best_index = scores[lookup[merged]], lookup[merged], index
        if best_index == -1:
            return tokens
        tokens[best_index:best_index + 2] = [best_id]


def runc_decode(pieces: list[bytes], ids: list[int]) -> bytes:
    """What run.c prints for `ids` (each decoded with its predecessor, through safe_printf)."""
    out, previous = b"", 1
    for token in ids:
        piece = pieces[token]
        if previous == 1 and piece.startswith(b" "):
            piece = piece[1:]
        if piece.startswith(b"<0x") and len(piece) == 6:
            piece = bytes([int(piece[3:5], 16)])
        if len(piece) == 1 and not (chr(piece[0]).isprintable() and piece[0] < 0x7F or piece in b" \t\n\v\f\r"):
            piece = b""
        out += piece
        previous = token
    return out


# --- hand-made llama2.c files (written here, not by our writer) -----------------------------------


def sentencepiece_vocab() -> tuple[list[bytes], list[float]]:
    """A small sentencepiece-like vocabulary laid out as llama2.c's tokenizer.py exports it."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    scores = [0.0] * len(pieces)
    merged = [" t", "he", " the", " a", "in", " w", "an", "ou", " s", "ed", " h", "er", "at", " b", "ing", " O",
              " On", "ce", " Once", " up", "on", " upon", " ti", "me", " time", " c", " ca", " cat", "  ", "   ",
              " was", "as", " l", "it", "tle", " lit", " little", ".", ",", "!"]
    chars = sorted(set("".join(merged)) | set("abcdefghijklmnopqrstuvwxyzOTLS\n"))
    for rank, piece in enumerate(merged):
        pieces.append(piece.encode())
        scores.append(-float(rank))
    for index, char in enumerate(chars):
        if char.encode() not in pieces:
            pieces.append(char.encode())
            scores.append(-1000.0 - index)
    return pieces, scores


def write_tokenizer_bin_by_hand(path: Path, pieces: list[bytes], scores: list[float]) -> None:
    blob = struct.pack("<i", max(len(p) for p in pieces))
    for piece, score in zip(pieces, scores):
        blob += struct.pack("<f", score) + struct.pack("<i", len(piece)) + piece
    path.write_bytes(blob)


def write_model_bin_by_hand(path: Path, dim=48, hidden=80, layers=2, heads=4, kv_heads=2, vocab=320, seq_len=24,
                            shared=True, seed=0) -> None:
    """Random weights in run.c's order, RoPE tables as llama2.c's model.py computes them."""
    rng = np.random.default_rng(seed)
    hs = dim // heads
    kv_dim = kv_heads * hs

    def rand(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype("<f4")

    def gains(*shape):
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype("<f4")

    freqs = 1.0 / (10000.0 ** (torch.arange(0, hs, 2)[: hs // 2].float() / hs))
    angles = torch.outer(torch.arange(seq_len), freqs).float()
    arrays = [rand(vocab, dim), gains(layers, dim), rand(layers, dim, dim), rand(layers, kv_dim, dim),
              rand(layers, kv_dim, dim), rand(layers, dim, dim), gains(layers, dim), rand(layers, hidden, dim),
              rand(layers, dim, hidden), rand(layers, hidden, dim), gains(dim),
              torch.cos(angles).numpy(), torch.sin(angles).numpy()]
    if not shared:
        arrays.append(rand(vocab, dim))
    header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len)
    path.write_bytes(header + b"".join(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in arrays))


@pytest.fixture()
def llama2c_files(tmp_path):
    pieces, scores = sentencepiece_vocab()
    tokenizer_bin = tmp_path / "tok.bin"
    write_tokenizer_bin_by_hand(tokenizer_bin, pieces, scores)
    model_bin = tmp_path / "model.bin"
    write_model_bin_by_hand(model_bin, vocab=len(pieces), shared=False)
    return model_bin, tokenizer_bin, pieces, scores


def load_imported(run: Path):
    directory, home = resolve_checkpoint(run)
    return build_model(load_run_config(home).model, load_weights(directory)).eval(), Llama2cTokenizer.load(home)


# --- export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied, kv_heads", [(True, 4), (False, 2), (True, 1)])
def test_exported_bin_runs_like_run_c(tmp_path, tied, kv_heads):
    config = llama_config(n_kv_head=kv_heads, tie_embeddings=tied, d_model=48, d_ff=80, context_length=24)
    tokenizer = train_byte_level_bpe()
    run, model = make_run(tmp_path / "run", config, tokenizer)
    out = export(run, "llama2c", tmp_path / "l2c")
    reference = RunC(out / "model.bin")
    assert (reference.vocab, reference.seq_len, reference.kv_heads) == (320, 24, kv_heads)
    order = vocab_order(tokenizer, 320)  # llama2.c id -> our id
    tokens = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([[order[t] for t in tokens]]))[0][0, :, order].double().numpy()
    np.testing.assert_allclose(reference.logits(tokens), ours, atol=1e-4, rtol=0)


def vocab_order(tokenizer, vocab_size: int) -> list[int]:
    from tinystories.llama2c import byte_level_vocab_order

    return byte_level_vocab_order(json.loads(tokenizer.to_str()), vocab_size, tokenizer.token_to_id(EOT))


def test_exported_model_generates_in_run_c_like_ours(tmp_path):
    """run.c's own prompt encoding works on the relabelled vocabulary: BOS is our EOT, byte fallback is exact."""
    tokenizer = train_byte_level_bpe()
    config = llama_config(d_model=48, d_ff=80, context_length=48, tie_embeddings=True)
    run, model = make_run(tmp_path / "run", config, tokenizer)
    out = export(run, "llama2c", tmp_path / "l2c")
    pieces, scores, _ = read_tokenizer_bin(out / "tokenizer.bin", vocab_size=320)
    assert pieces[1] == EOT.encode() and all(pieces[3 + b] == bytes([b]) for b in range(256))
    text = "Once upon a time, Lily's café ☃"
    prompt = runc_encode(pieces, scores, text)
    assert b"".join(pieces[i] for i in prompt[1:]) == b" " + text.encode()  # run.c's dummy prefix space
    order = vocab_order(tokenizer, 320)
    expected = RunC(out / "model.bin").generate_greedy(prompt, 6)
    produced = greedy(model, [order[i] for i in prompt], 6, stop=tokenizer.token_to_id(EOT))
    assert len(expected) >= 3 and [order.index(i) for i in produced][: len(expected)] == expected


def test_exported_tokenizer_bin_holds_each_tokens_bytes(tmp_path):
    tokenizer = train_byte_level_bpe()
    config = llama_config(vocab_size=330)  # 10 padding ids past the tokenizer
    run, _ = make_run(tmp_path / "run", config, tokenizer)
    out = export(run, "llama2c", tmp_path / "l2c")
    pieces, scores, max_length = read_tokenizer_bin(out / "tokenizer.bin", vocab_size=330)
    assert max_length == max(len(p) for p in pieces)
    order = vocab_order(tokenizer, 330)
    assert sorted(order) == list(range(330))
    text = "Once upon a time, Lily's café had 3 cats!" + EOT
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert b"".join(pieces[order.index(i)] for i in ids) == text.encode("utf-8")
    assert pieces[1] == EOT.encode() and pieces[order.index(325)] == b""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    first = "".join(merges[0] if isinstance(merges[0], list) else merges[0].split(" "))
    assert scores[order.index(tokenizer.token_to_id(first))] == -1.0  # the first merge scores highest


@pytest.mark.parametrize("config, field", [
    (gpt2_config(), "position='learned'"),
    (llama_config(mlp="gelu"), "mlp='gelu'"),
    (llama_config(norm="layernorm"), "norm='layernorm'"),
    (llama_config(bias=True), "bias=True"),
    (llama_config(sliding_window=4), "sliding_window=4"),
    (llama_config(qk_norm=True), "qk_norm=True"),
    (llama_config(logit_softcap=30.0), "logit_softcap=30.0"),
    (llama_config(value_embedding=True), "value_embedding=True"),
    (llama_config(input_mix=True), "input_mix=True"),
    (llama_config(rope_theta=500000.0), "rope_theta=500000"),
    (llama_config(norm_eps=1e-6), "norm_eps=1e-06"),
])
def test_llama2c_export_refuses(tmp_path, config, field):
    run, _ = make_run(tmp_path / "run", config)
    with pytest.raises(Llama2cError, match=field):
        export(run, "llama2c", tmp_path / "l2c")
    assert not (tmp_path / "l2c").exists()


# --- import ---------------------------------------------------------------------------------------


def test_import_matches_run_c_logits_and_greedy(tmp_path, llama2c_files):
    model_bin, tokenizer_bin, pieces, scores = llama2c_files
    run = import_llama2c(model_bin, tokenizer_bin, tmp_path / "run")
    model, tokenizer = load_imported(run)
    reference = RunC(model_bin)

    prompt = [tokenizer.eot_id] + tokenizer.encode("Once upon a time, the little cat")  # as generate.py does
    assert prompt == runc_encode(pieces, scores, "Once upon a time, the little cat")
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0].double().numpy()
    np.testing.assert_allclose(reference.logits(prompt), ours, atol=1e-4, rtol=0)

    expected = reference.generate_greedy(prompt, 10)
    produced = greedy(model, prompt, len(expected) + 1, stop=1)
    assert produced[: len(expected)] == expected


def test_import_writes_a_run_directory(tmp_path, llama2c_files):
    model_bin, tokenizer_bin, pieces, _ = llama2c_files
    run = import_llama2c(model_bin, tokenizer_bin, tmp_path / "run")
    config = load_run_config(run)
    m = config.model
    assert (m.d_model, m.d_ff, m.n_layer, m.n_head, m.kv_heads, m.vocab_size, m.context_length) == (
        48, 80, 2, 4, 2, len(pieces), 24)
    assert (m.norm, m.norm_eps, m.position, m.rope_theta, m.mlp, m.bias, m.tie_embeddings) == (
        "rmsnorm", 1e-5, "rope", 10000.0, "swiglu", False, False)
    for which in ("best", "last"):
        assert (run / "checkpoints" / which / "model.safetensors").is_file()
    meta = json.loads((run / "tokenizer_meta.json").read_text())
    assert meta["kind"] == "llama2c" and meta["eot_id"] == 1 and meta["vocab_size"] == len(pieces)
    assert isinstance(load_tokenizer(run), Llama2cTokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "run", "tok.bin"]


def test_import_then_load_run(tmp_path, llama2c_files):
    """tokenizer.load_tokenizer hands kind 'llama2c' to Llama2cTokenizer."""
    from tinystories.checkpoint import load_run

    model_bin, tokenizer_bin, _, _ = llama2c_files
    run = import_llama2c(model_bin, tokenizer_bin, tmp_path / "run")
    _, tokenizer, _ = load_run(run)
    assert tokenizer.kind == "llama2c" and tokenizer.eot_id == 1
    assert tokenizer.encode("Once upon a time") == Llama2cTokenizer.from_bin(tokenizer_bin).encode("Once upon a time")


def test_round_trips_are_byte_identical(tmp_path, llama2c_files):
    model_bin, tokenizer_bin, _, _ = llama2c_files
    run = import_llama2c(model_bin, tokenizer_bin, tmp_path / "run")
    out = export(run, "llama2c", tmp_path / "again")
    assert (out / "model.bin").read_bytes() == model_bin.read_bytes()
    assert (out / "tokenizer.bin").read_bytes() == tokenizer_bin.read_bytes()


@pytest.mark.parametrize("tied", [True, False])
def test_export_then_import_gives_identical_weights(tmp_path, tied):
    sp_pieces, sp_scores = sentencepiece_vocab()
    vocab_size = len(sp_pieces) + 4
    config = llama_config(vocab_size=vocab_size, tie_embeddings=tied, n_kv_head=1, d_model=48, d_ff=80,
                          context_length=24)
    tokenizer = train_byte_level_bpe()
    run, model = make_run(tmp_path / "run", config, tokenizer)
    out = export(run, "llama2c", tmp_path / "l2c")
    assert len(read_tokenizer_bin(out / "tokenizer.bin", vocab_size=vocab_size)[0]) == vocab_size
    order = vocab_order(tokenizer, vocab_size)
    # Our byte-level vocabulary is no sentencepiece vocabulary: give the import one of the right size.
    sp_pieces += [f"extra{i}".encode() for i in range(4)]
    write_tokenizer_bin_by_hand(tmp_path / "sp.bin", sp_pieces, sp_scores + [-5000.0] * 4)
    imported = import_llama2c(out / "model.bin", tmp_path / "sp.bin", tmp_path / "imported")
    loaded, _ = load_imported(imported)
    assert load_run_config(imported).model == config
    original = model.state_dict()
    for name in ("tok_emb.weight", "lm_head.weight"):  # rows relabelled for run.c
        original[name] = original[name][order]
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, original[name], atol=0, rtol=0, msg=name)


def test_imported_model_exports_to_hf_and_gguf(tmp_path, llama2c_files):
    import gguf
    import transformers

    model_bin, tokenizer_bin, pieces, scores = llama2c_files
    run = import_llama2c(model_bin, tokenizer_bin, tmp_path / "run")
    model, tokenizer = load_imported(run)
    hf = export(run, "hf", tmp_path / "hf")
    card = (hf / "README.md").read_text()
    assert "imported from llama2.c checkpoint model.bin" in card and "| training tokens | unknown |" in card
    assert 'tokenizer("Once upon a time", return_tensors="pt")' in card  # its tokenizer adds <s> itself
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    text = "Once upon a time, the cat was little."
    ids = hf_tokenizer(text)["input_ids"]  # transformers adds BOS, as for Llama
    assert ids == [1] + tokenizer.encode(text) == runc_encode(pieces, scores, text)
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    with torch.no_grad():
        torch.testing.assert_close(hf_model(torch.tensor([ids])).logits, model(torch.tensor([ids]))[0], atol=1e-4,
                                   rtol=0)
    reader = gguf.GGUFReader(export(run, "gguf", tmp_path / "gguf") / "model.gguf")
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<unk>", "<s>", "</s>"]
    assert reader.fields["tokenizer.ggml.tokens"].contents()[3 + 256] == "\u2581t"
    assert reader.fields["tokenizer.ggml.scores"].contents() == pytest.approx(scores)
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:4] == [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL),
                         int(gguf.TokenType.BYTE)]


def test_imported_model_runs_in_llama_cpp(tmp_path, llama2c_files):
    """The sentencepiece ('llama') GGUF vocabulary: llama.cpp tokenizes and predicts like run.c."""
    llama_cpp = require_llama_cpp()
    model_bin, tokenizer_bin, pieces, scores = llama2c_files
    run = import_llama2c(model_bin, tokenizer_bin, tmp_path / "run")
    out = export(run, "gguf", tmp_path / "gguf")
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=24, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # f32 KV cache
    text = "Once upon a time, the cat was in the house."
    prompt = runc_encode(pieces, scores, text)
    assert llm.tokenize(text.encode(), add_bos=True) == prompt
    llm.eval(prompt)
    np.testing.assert_allclose(np.array(llm.scores[: len(prompt)]), RunC(model_bin).logits(prompt), atol=1e-4)


# --- the llama2.c tokenizer -----------------------------------------------------------------------

TEXTS = ["Once upon a time, the little cat was in the house.", "", "a", "  two  spaces", "line\nbreak",
         "café ☃ naïve", "The END!!", " leading space"]


@pytest.mark.parametrize("text", TEXTS)
def test_llama2c_tokenizer_encodes_and_decodes_like_run_c(tmp_path, text):
    pieces, scores = sentencepiece_vocab()
    write_tokenizer_bin_by_hand(tmp_path / "tok.bin", pieces, scores)
    tokenizer = Llama2cTokenizer.from_bin(tmp_path / "tok.bin")
    ids = [tokenizer.eot_id] + tokenizer.encode(text)
    assert ids == runc_encode(pieces, scores, text)
    ascii_only = all(ord(c) < 128 for c in text)
    if ascii_only:
        assert tokenizer.decode(ids).encode() == runc_decode(pieces, ids[1:])  # run.c never prints pos 0
        assert tokenizer.decode(ids) == text  # run.c drops the dummy prefix after BOS
    else:
        assert tokenizer.decode(ids) == text  # run.c itself would drop the byte-fallback bytes >= 0x80
    assert tokenizer.encode_batch([text, "a"]) == [ids[1:], tokenizer.encode("a")]


def test_llama2c_tokenizer_save_load(tmp_path):
    pieces, scores = sentencepiece_vocab()
    write_tokenizer_bin_by_hand(tmp_path / "tok.bin", pieces, scores)
    tokenizer = Llama2cTokenizer.from_bin(tmp_path / "tok.bin")
    tokenizer.save(tmp_path / "saved")
    loaded = Llama2cTokenizer.load(tmp_path / "saved")
    assert (loaded.kind, loaded.spec, loaded.vocab_size, loaded.eot_id) == ("llama2c", "llama2c", len(pieces), 1)
    assert loaded.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])
    assert (tmp_path / "saved" / "tokenizer.bin").read_bytes() == (tmp_path / "tok.bin").read_bytes()
    # decode of new tokens alone keeps their leading space (run.c only strips it right after BOS)
    ids = tokenizer.encode("Once the cat")
    assert tokenizer.decode(ids[1:]) == " the cat"
    assert tokenizer.decode([tokenizer.eot_id] + ids) == "Once the cat"
    assert tokenizer.decode(ids) == " Once the cat"  # no BOS before it: run.c keeps the dummy-prefix space


# --- bad input ------------------------------------------------------------------------------------


def _corrupt(model_bin: Path, kind: str) -> None:
    raw = model_bin.read_bytes()
    if kind == "truncated":
        model_bin.write_bytes(raw[:-4])
    elif kind == "extra":
        model_bin.write_bytes(raw + b"\0\0\0\0")
    elif kind == "header_only":
        model_bin.write_bytes(raw[:20])
    elif kind == "magic":
        model_bin.write_bytes(struct.pack("<ii", 0x616B3432, 1) + raw[8:])
    elif kind == "zero_dim":
        model_bin.write_bytes(struct.pack("<i", 0) + raw[4:])


@pytest.mark.parametrize("kind, message", [
    ("truncated", "does not match its header"), ("extra", "does not match its header"),
    ("header_only", "too short"), ("magic", "version-0"), ("zero_dim", "non-positive"),
])
def test_corrupt_bin_is_a_one_line_error(tmp_path, llama2c_files, capsys, kind, message):
    model_bin, tokenizer_bin, _, _ = llama2c_files
    _corrupt(model_bin, kind)
    with pytest.raises(Llama2cError, match=message):
        import_llama2c(model_bin, tokenizer_bin, tmp_path / "run")
    code = main(["import", "llama2c", str(model_bin), "--tokenizer", str(tokenizer_bin), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("tinystories: error: ") and error.count("\n") == 1 and message in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    (lambda p, s: (p[:-1], s[:-1]), "holds"),  # fewer tokens than the model's vocab_size
    (lambda p, s: (p + [b"x"], s + [0.0]), "bytes left"),  # more
    (lambda p, s: ([p[0], b"<s>", *p[2:]], s), "not a llama2.c sentencepiece vocabulary"),
])
def test_mismatched_tokenizer_bin_is_refused(tmp_path, llama2c_files, change, message):
    model_bin, tokenizer_bin, pieces, scores = llama2c_files
    write_tokenizer_bin_by_hand(tokenizer_bin, *change(pieces, scores))
    with pytest.raises(UserError, match=message):
        import_llama2c(model_bin, tokenizer_bin, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_import(tmp_path, llama2c_files, capsys):
    model_bin, tokenizer_bin, _, _ = llama2c_files
    out = tmp_path / "run"
    assert main(["import", "llama2c", str(model_bin), "--tokenizer", str(tokenizer_bin), "--out", str(out)]) == 0
    assert "imported" in capsys.readouterr().out
    assert main(["import", "llama2c", str(model_bin), "--tokenizer", str(tokenizer_bin), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(out), "--format", "llama2c", "--out", str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "model.bin").read_bytes() == model_bin.read_bytes()


# --- byte-level round trip: our export, then our import -----------------------------------------

ROUND_TRIP_SENTENCES = [
    "Once upon a time, there was a little girl named Lily. She liked to read books.",
    "Tom and his dog Max ran to the park. They played with a big red ball all day!",
    "\"Can I have a cookie?\" asked Sue. Mom smiled and said, \"Yes, you can.\"",
    "The bird sang a happy song in the tall tree, and the sun was warm and bright.",
] * 4
ROUND_TRIP_TEXTS = [
    "Once upon a time, Lily played with her ball.",
    "naïve café – 😀",
    "  Two spaces,\ttabs\nand new lines 12345. It's Tom's!" + EOT + "Next story.",
    "Zebras quack? ÿ 日本語",
]


def make_tokenizer_run(directory: Path, spec: str, vocab_size: int = 320, tied: bool = False):
    """A run directory with a real tinystories tokenizer (`make_tokenizer`) and a random model."""
    from export_helpers import randomize
    from tinystories.checkpoint import save_checkpoint
    from tinystories.config import RunConfig, TrainConfig
    from tinystories.model import GPT
    from tinystories.tokenizer import make_tokenizer

    tokenizer = make_tokenizer(spec, ROUND_TRIP_SENTENCES)
    config = llama_config(vocab_size=vocab_size, tie_embeddings=tied, d_model=48, d_ff=80, context_length=64)
    directory.mkdir(parents=True)
    RunConfig(model=config, train=TrainConfig(), tokenizer=spec).save(directory / "config.json")
    tokenizer.save(directory)
    model = randomize(GPT(config), seed=3)
    save_checkpoint(directory / "checkpoints" / "best", model)
    return directory, model, tokenizer


def export_import_by_cli(tmp_path: Path, run: Path) -> Path:
    assert main(["export", str(run), "--format", "llama2c", "--out", str(tmp_path / "l2c")]) == 0
    imported = tmp_path / "imported"
    assert main(["import", "llama2c", str(tmp_path / "l2c" / "model.bin"), "--tokenizer",
                 str(tmp_path / "l2c" / "tokenizer.bin"), "--out", str(imported)]) == 0
    return imported


def exporter_order(run: Path, tokenizer, vocab_size: int) -> list[int]:
    """order[llama2c id] = original id, as the exporter computes it from the run's files."""
    from tinystories.export import load_source
    from tinystories.llama2c import byte_level_vocab_order

    return byte_level_vocab_order(load_source(run).tokenizer_json(), vocab_size, tokenizer.eot_id)


@pytest.mark.parametrize("spec, vocab_size, tied", [("bpe:300", 320, False), ("bytes", 264, True)])
def test_byte_level_export_import_round_trip(tmp_path, spec, vocab_size, tied):
    from tinystories.checkpoint import load_run
    from tinystories.generate import load_model

    run, model, original = make_tokenizer_run(tmp_path / "run", spec, vocab_size, tied)
    imported = export_import_by_cli(tmp_path, run)
    order = exporter_order(run, original, vocab_size)
    assert sorted(order) == list(range(vocab_size)) and order != list(range(vocab_size))
    meta = json.loads((imported / "tokenizer_meta.json").read_text())
    assert meta["kind"] == "bpe" and meta["eot_id"] == 1 and not (imported / "tokenizer.bin").exists()
    loaded, tokenizer, run_config = load_run(imported)
    assert run_config.model == load_run_config(run).model

    # (1) The same tokens, relabelled by the exporter's permutation; exact round trip.
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text)
        assert [order[i] for i in ids] == original.encode(text), text
        assert tokenizer.decode(ids) == text
    assert tokenizer.eot_id == 1 and order[1] == original.eot_id

    # (2) The same logits, up to the relabelling of the vocabulary.
    old_ids = [original.eot_id] + original.encode(ROUND_TRIP_TEXTS[0] + " " + ROUND_TRIP_TEXTS[1])
    new_ids = [order.index(i) for i in old_ids]
    with torch.no_grad():
        expected = model(torch.tensor([old_ids]))[0][0][:, order]
        got = loaded(torch.tensor([new_ids]))[0][0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # (3) Greedy generation through generate.load_model gives the same text and tokens.
    before, after = (load_model(path).generate("Once upon a time, Lily", max_new_tokens=24, temperature=0)[0]
                     for path in (run, imported))
    assert after.text == before.text and [order[i] for i in after.token_ids] == before.token_ids
    assert len(before.token_ids) > 0


@pytest.mark.parametrize("spec, vocab_size", [("bpe:300", 320), ("bytes", 264)])
def test_byte_level_import_exports_back_identically(tmp_path, spec, vocab_size):
    run, _, _ = make_tokenizer_run(tmp_path / "run", spec, vocab_size)
    imported = export_import_by_cli(tmp_path, run)
    assert main(["export", str(imported), "--format", "llama2c", "--out", str(tmp_path / "again")]) == 0
    for name in ("model.bin", "tokenizer.bin"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "l2c" / name).read_bytes(), name


def merge_pairs(tokenizer_json: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tokenizer_json["model"]["merges"]]


def relabelled_for_run_c(tokenizer) -> tuple[list[bytes], list[float], list[int]]:
    """(pieces, scores, order) of tokenizer.bin as the exporter writes it for `tokenizer`."""
    from tinystories.llama2c import byte_level_pieces, byte_level_vocab_order

    values = json.loads(tokenizer._hf.to_str())
    order = byte_level_vocab_order(values, tokenizer.vocab_size, tokenizer.eot_id)
    pieces, scores = byte_level_pieces(values, tokenizer.vocab_size)
    return [pieces[i] for i in order], [scores[i] for i in order], order


def test_byte_level_import_recovers_the_training_merges(tmp_path):
    """Each merge is rebuilt as the very pair the trainer merged, in the same order."""
    from tinystories.llama2c import byte_level_tokenizer_from_pieces
    from tinystories.tokenizer import make_tokenizer

    original = make_tokenizer("bpe:300", ROUND_TRIP_SENTENCES)
    pieces, scores, _ = relabelled_for_run_c(original)
    rebuilt = byte_level_tokenizer_from_pieces(pieces, scores)
    assert merge_pairs(json.loads(rebuilt._hf.to_str())) == merge_pairs(json.loads(original._hf.to_str()))


def test_gpt2_vocabulary_rebuilds_exactly(gpt2_dir):
    """GPT-2's 50,000 merges, many of whose tokens split into earlier tokens in several ways
    ('abc' = 'ab'+'c' = 'a'+'bc'), come back as vocab.bpe has them, and encode the same."""
    from tinystories.llama2c import byte_level_tokenizer_from_pieces
    from tinystories.tokenizer import gpt2_tokenizer

    original = gpt2_tokenizer(gpt2_dir)
    pieces, scores, order = relabelled_for_run_c(original)
    rebuilt = byte_level_tokenizer_from_pieces(pieces, scores)
    expected = merge_pairs(json.loads(original._hf.to_str()))
    assert merge_pairs(json.loads(rebuilt._hf.to_str())) == expected
    made = {a + b for a, b in expected}
    ambiguous = sum(1 for a, b in expected
                    if sum((a + b)[:cut] in made and (a + b)[cut:] in made for cut in range(1, len(a + b))) > 1)
    assert ambiguous > 1000  # so a naive "first split that exists" would have been caught
    for text in ROUND_TRIP_TEXTS + ROUND_TRIP_SENTENCES[:4]:
        ids = rebuilt.encode(text)
        assert [order[i] for i in ids] == original.encode(text) and rebuilt.decode(ids) == text


def test_byte_level_vocab_without_eot_at_1_is_refused(tmp_path):
    pieces = [b"x", b"y", b"z"] + [bytes([b]) for b in range(256)]
    write_tokenizer_bin_by_hand(tmp_path / "tok.bin", pieces, [0.0] * len(pieces))
    write_model_bin_by_hand(tmp_path / "model.bin", vocab=len(pieces), shared=True)
    assert main(["import", "llama2c", str(tmp_path / "model.bin"), "--tokenizer", str(tmp_path / "tok.bin"),
                 "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
