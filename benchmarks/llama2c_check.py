"""Check `tinystories export --format llama2c` against karpathy's real llama2.c `run.c`.

    python benchmarks/llama2c_check.py --run-c-binary /tmp/llama2c/run [--run-c-source /tmp/llama2c/run.c]

For a random-weight Llama-style run (and, unless --no-trained, one trained briefly on a slice of
TinyStories) this script

1. saves the run (config.json, a byte-level BPE tokenizer, checkpoints/best) under --work-dir,
2. exports it with `tinystories export RUN --format llama2c --out DIR`,
3. runs run.c greedily (`-t 0 -n STEPS -z tokenizer.bin`, with `-i PROMPT` or without any prompt),
4. runs our greedy `load_model(run).generate(...)` on the same prompt and compares the text,
5. imports the exported .bin with `tinystories import llama2c` and compares greedy text again,
6. prints a markdown table and appends it to benchmarks/RESULTS.md (not with --no-append).

run.c conventions the comparison has to follow (read off run.c, not guessed):
- run.c starts every sequence with token id 1 (BOS; our exporter puts our <|endoftext|> there) and
  stops when id 1 comes out, as our generate does with eot_id.
- run.c always prepends a dummy " " to the prompt (sentencepiece's add_dummy_prefix) and merges by
  score, so `-i "Once upon"` is fed as " Once upon". Our `generate("Once upon")` encodes "Once upon"
  (no space): we run ours on both forms; only " " + prompt is the same token sequence.
- run.c prints the prompt tokens too and strips a leading space from the piece right after BOS; its
  last line ends with one extra "\\n". -n counts all positions (prompt included).
- Without -i, run.c starts from BOS alone: the same as our generate("").

With --run-c-source, an instrumented copy of run.c (one fprintf of each token id to stderr, built
under --work-dir, never in the repository) also gives run.c's token ids, so tokens are compared
exactly and prompt-tokenization differences are told apart from model differences.

run.c is not part of this repository: get it from karpathy/llama2.c and compile it yourself, e.g.
`gcc -O2 -o /tmp/llama2c/run /tmp/llama2c/run.c -lm`. Without the binary the script says so and
exits 0 (nothing to compare against).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park. They saw"]


# --- building the runs ----------------------------------------------------------------------------


def made_up_sentences(count: int, seed: int = 0) -> list[str]:
    """Simple children's-story sentences from templates (our own text, not TinyStories)."""
    rng = random.Random(seed)
    names = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Zoé", "Leo", "Sue"]
    animals = ["dog", "cat", "bird", "fish", "frog", "bunny", "bear", "duck"]
    adjectives = ["little", "big", "happy", "sad", "red", "blue", "shiny", "funny", "kind", "old"]
    verbs = ["saw", "found", "liked", "wanted", "helped", "hugged", "chased", "made"]
    things = ["ball", "tree", "cake", "box", "toy", "car", "hat", "kite", "café", "garden"]
    places = ["the park", "the house", "the forest", "the beach", "school", "the shop"]
    templates = [
        "Once upon a time, there was a {adj} {animal} named {name}.",
        "{name} {verb} a {adj} {thing} in {place}.",
        "The {animal} was very {adj}, so {name} {verb} it.",
        "One day, {name} went to {place} with a {adj} {thing}.",
        "\"Look at the {thing}!\" said {name}. The {animal} was {adj}.",
        "{name} and {name2} played with the {thing} all day.",
        "The {adj} {animal} {verb} the {thing}, and everyone was happy.",
    ]
    sentences = []
    for _ in range(count):
        sentences.append(rng.choice(templates).format(
            adj=rng.choice(adjectives), animal=rng.choice(animals), name=rng.choice(names),
            name2=rng.choice(names), verb=rng.choice(verbs), thing=rng.choice(things), place=rng.choice(places)))
    return sentences


def llama_model_config(vocab_size: int):
    from tinystories.config import ModelConfig

    return ModelConfig(vocab_size=vocab_size, context_length=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                       norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=True)


def build_random_run(run_dir: Path, seed: int = 0) -> Path:
    """A random-weight Llama-style run with a bpe:300 tokenizer trained on made-up sentences."""
    import torch

    from tinystories.checkpoint import save_checkpoint
    from tinystories.config import RunConfig, TrainConfig
    from tinystories.model import GPT
    from tinystories.tokenizer import make_tokenizer

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    stories = made_up_sentences(400, seed)
    tokenizer = make_tokenizer("bpe:300", stories)
    config = llama_model_config(tokenizer.vocab_size)
    torch.manual_seed(seed)
    model = GPT(config)
    # The default init (small blocks, tied embedding) just repeats the input token greedily. Wider
    # weights make the blocks dominate, so greedy output wanders over the whole vocabulary (control
    # bytes and stray UTF-8 bytes included) and exercises every layer and position.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == "tok_emb.weight":
                parameter.normal_(0.0, 1.0)
            elif parameter.dim() == 2:
                parameter.normal_(0.0, 3.0 / parameter.shape[1] ** 0.5)
    RunConfig(model=config, train=TrainConfig(), tokenizer="bpe:300").save(run_dir / "config.json")
    tokenizer.save(run_dir)
    save_checkpoint(run_dir / "checkpoints" / "best", model)
    return run_dir


def build_trained_run(work: Path, data_dir: Path, stories: int, steps: int) -> Path:
    """A run trained `steps` steps on the first `stories` TinyStories training stories."""
    from tinystories.config import RunConfig, TrainConfig
    from tinystories.data import prepare, read_stories
    from tinystories.train import train

    slice_file = work / "slice" / "train.txt"
    slice_file.parent.mkdir(parents=True, exist_ok=True)
    picked = []
    for story in read_stories(data_dir / "train.txt.gz"):
        picked.append(story)
        if len(picked) == stories:
            break
    slice_file.write_text("\n<|endoftext|>\n".join(picked) + "\n", encoding="utf-8")
    shards = work / "shards"
    meta = prepare([slice_file], shards, "bpe:512", val_fraction=0.05, progress=False)
    config = llama_model_config(int(meta["vocab_size"]))
    recipe = TrainConfig(batch_size=16, max_steps=steps, lr=3e-3, warmup_steps=30, eval_every=steps,
                         eval_tokens=8192, log_every=50, device="cpu", dtype="float32", sample_tokens=0, seed=1337)
    run_dir = work / "trained_run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train(RunConfig(model=config, train=recipe, tokenizer="bpe:512", data=str(shards)), run_dir, resume=False,
          progress=False)
    return run_dir


# --- run.c ----------------------------------------------------------------------------------------


def instrumented_binary(source: Path, work: Path) -> Path | None:
    """Compile a copy of run.c that also writes each token id it feeds/samples to stderr ("TOKEN id")."""
    text = source.read_text()
    if text.count("        pos++;\n") != 1:
        print(f"note: {source}: cannot find the single 'pos++;' line to instrument; comparing text only")
        return None
    patched = work / "run_ids.c"
    patched.write_text(text.replace("        pos++;\n", '        pos++;\n        fprintf(stderr, "TOKEN %d\\n", next);\n'))
    binary = work / "run_ids"
    result = subprocess.run(["gcc", "-O2", "-o", str(binary), str(patched), "-lm"], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"note: could not compile the instrumented run.c ({result.stderr.strip()[:200]}); comparing text only")
        return None
    return binary


def run_c(binary: Path, export_dir: Path, prompt: str | None, steps: int) -> tuple[bytes, list[int] | None]:
    """(stdout bytes without run.c's final newline, token ids if the binary prints them)."""
    command = [str(binary), str(export_dir / "model.bin"), "-t", "0", "-n", str(steps),
               "-z", str(export_dir / "tokenizer.bin"), "-s", "1"]
    if prompt is not None:
        command += ["-i", prompt]
    result = subprocess.run(command, capture_output=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    out = result.stdout
    if out.endswith(b"\n"):
        out = out[:-1]  # run.c's printf("\n") after the loop
    ids = [int(m) for m in re.findall(rb"^TOKEN (-?\d+)$", result.stderr, flags=re.M)]
    return out, (ids if ids else None)


def python_run_c_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """run.c's bpe_encode (dummy " " prefix, per-codepoint lookup with byte fallback at 3+b, then the
    highest-scoring adjacent merge, leftmost on ties), ported line by line, working on C strings."""
    cstr = [piece.split(b"\0", 1)[0] for piece in pieces]  # C sees a piece up to its first NUL
    lookup: dict[bytes, int] = {}
    for i in sorted(range(len(cstr)), key=lambda i: cstr[i], reverse=True):
        lookup[cstr[i]] = i  # bsearch finds some match among duplicates; ids of duplicates rarely matter
    tokens = [lookup.get(b" ", -1)]
    data = text.encode("utf-8")
    i = 0
    while i < len(data):
        j = i + 1
        while j < len(data) and (data[j] & 0xC0) == 0x80 and j - i < 4:
            j += 1
        codepoint = data[i:j]
        if codepoint in lookup:
            tokens.append(lookup[codepoint])
        else:
            tokens.extend(3 + b for b in codepoint)
        i = j
    while True:
        best = (-1e10, -1, -1)
        for k in range(len(tokens) - 1):
            merged = cstr[tokens[k]] + cstr[tokens[k + 1]]
            candidate = lookup.get(merged, -1)
            if candidate != -1 and scores[candidate] > best[0]:
                best = (scores[candidate], candidate, k)
        if best[2] == -1:
            return tokens
        tokens[best[2]:best[2] + 2] = [best[1]]


# --- comparing ------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    case: str
    prompt: str
    tokens: int
    tokens_match: bool | None  # None: run.c's ids unknown (no instrumented binary)
    text_match: bool
    difference: str


def first_difference(a: str | list, b: str | list, what: str) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            if isinstance(a, str):
                return f"{what} {i}: run.c {a[max(0, i - 8):i + 12]!r} vs ours {b[max(0, i - 8):i + 12]!r}"
            return f"{what} {i}: run.c {a[i:i + 5]} vs ours {b[i:i + 5]}"
    if len(a) != len(b):
        return f"{what}: run.c has {len(a)}, ours {len(b)} (one is a prefix of the other)"
    return ""


@dataclass
class Exported:
    """One run exported to llama2.c, with what the comparison needs."""

    label: str
    export_dir: Path
    ours: Any  # tinystories.generate.LanguageModel of the run
    to_llama2c: dict[int, int]  # our id -> llama2c id
    pieces: list[bytes]
    scores: list[float]


def export_for_run_c(label: str, run_dir: Path, work: Path, cli: list[str]) -> Exported:
    from tinystories.generate import load_model
    from tinystories.llama2c import byte_level_vocab_order
    from tinystories.vocab_bin import read_tokenizer_bin

    export_dir = work / f"{label}_llama2c"
    subprocess.run(cli + ["export", str(run_dir), "--format", "llama2c", "--out", str(export_dir), "--force"],
                   check=True, capture_output=True)
    ours = load_model(run_dir)
    tokenizer_json = json.loads((run_dir / "tokenizer.json").read_text(encoding="utf-8"))
    order = byte_level_vocab_order(tokenizer_json, ours.model.config.vocab_size, ours.tokenizer.eot_id)  # llama2c id -> ours
    pieces, scores, _ = read_tokenizer_bin(export_dir / "tokenizer.bin")
    return Exported(label, export_dir, ours, {our_id: new_id for new_id, our_id in enumerate(order)}, pieces, scores)


def import_back(exported: Exported, work: Path, cli: list[str], rows: list[Row]) -> tuple[Any, Callable, str]:
    """(model, ids -> llama2c ids, name) of the export read back: the CLI way, or if `tinystories import
    llama2c` refuses the file, through read_llama2c_bin (a row says which)."""
    from tinystories.generate import load_model

    imported_dir = work / f"{exported.label}_imported"
    imported = subprocess.run(cli + ["import", "llama2c", str(exported.export_dir / "model.bin"), "--tokenizer",
                                     str(exported.export_dir / "tokenizer.bin"), "--out", str(imported_dir), "--force"],
                              capture_output=True, text=True)
    if imported.returncode == 0:
        return load_model(imported_dir), list, "CLI-imported"  # its ids are llama2c ids already
    error = (imported.stderr.strip().splitlines() or ["?"])[-1]
    rows.append(Row(exported.label, "`tinystories import llama2c` of the export", "-", 0, False, False, error))
    return reread_weights(exported, rows), lambda ids: [exported.to_llama2c[t] for t in ids], "re-read weights"


def reread_weights(exported: Exported, rows: list[Row]) -> Any:
    """Our model rebuilt from read_llama2c_bin(model.bin), rows put back in our order; a row compares weights."""
    import torch

    from tinystories.checkpoint import build_model
    from tinystories.generate import LanguageModel
    from tinystories.llama2c import read_llama2c_bin

    ours, label = exported.ours, exported.label
    config, weights = read_llama2c_bin(exported.export_dir / "model.bin")
    rows_back = torch.as_tensor([exported.to_llama2c[i] for i in range(ours.model.config.vocab_size)])
    weights["tok_emb.weight"] = weights["tok_emb.weight"][rows_back]
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] = weights["lm_head.weight"][rows_back]
    original = ours.model.state_dict()
    worst = max((weights[k] - original[k]).abs().max().item() for k in weights)
    same_config = resolved_config(config) == resolved_config(ours.model.config)
    rows.append(Row(label, "read_llama2c_bin(model.bin) vs saved weights", "-", 0, worst == 0.0 and same_config,
                    worst == 0.0 and same_config,
                    f"max abs weight difference {worst:g}; config {'equal' if same_config else 'differs'}"))
    return LanguageModel(build_model(config, weights).eval(), ours.tokenizer)


def resolved_config(config: Any) -> dict[str, Any]:
    return {**config.to_dict(), "d_ff": config.ffn_dim}  # d_ff None means the default width


def run_c_tokens(exported: Exported, binary: Path, id_binary: Path | None, prompt: str | None,
                 c_prompt: list[int], steps: int, rows: list[Row]) -> tuple[str, list[int] | None, list[int]]:
    """(run.c's text, its generated ids if known, its prompt ids `c_prompt`) for `prompt` (None: BOS only).
    With the instrumented binary, `c_prompt` (our port of run.c's bpe_encode) is checked against run.c's."""
    c_bytes, c_ids = run_c(binary, exported.export_dir, prompt, steps)
    if id_binary is not None:
        bytes_again, c_ids = run_c(id_binary, exported.export_dir, prompt, steps)
        assert bytes_again == c_bytes, "the instrumented run.c printed different text"
    if c_ids is None:
        return c_bytes.decode("utf-8", errors="replace"), None, c_prompt
    if prompt is not None and c_ids[:len(c_prompt)] != c_prompt:
        rows.append(Row(exported.label, "run.c prompt tokens vs our port of its bpe_encode", prompt, len(c_prompt),
                        False, False, first_difference(c_ids[:len(c_prompt)], c_prompt, "prompt token")))
    generated = c_ids[len(c_prompt):]
    if 1 in generated:  # run.c stops (printing nothing) when BOS (our EOT) comes out
        generated = generated[:generated.index(1)]
    return c_bytes.decode("utf-8", errors="replace"), generated, c_prompt


def compare_one(exported: Exported, who: str, lm: Any, to_c: Callable, variant: tuple[str, str], prompt: str | None,
                run_c_result: tuple[str, list[int] | None, list[int]], n_new: int) -> Row:
    """One row: `lm`'s greedy continuation of the variant's prompt against run.c's."""
    name, our_prompt = variant
    c_text, c_generated, c_prompt = run_c_result
    completion = lm.generate(our_prompt, temperature=0, max_new_tokens=n_new)[0]
    our_c_ids = to_c(completion.token_ids)
    our_prompt_ids = to_c(lm.encode_prompt(our_prompt)[1:])
    # run.c prints its prompt (no leading space right after BOS), then the generated pieces.
    # run.c prints pieces as C strings, so a NUL byte (token "\\x00") prints nothing.
    text = completion.text.replace("\x00", "")
    text = (text[1:] if text.startswith(" ") else text) if prompt is None else prompt + text
    notes = []
    if our_prompt_ids != c_prompt:
        notes.append(f"prompt tokens differ: run.c {c_prompt} vs ours {our_prompt_ids}")
    if c_generated is None:
        tokens_match, compared = None, len(our_c_ids)
    else:
        tokens_match, compared = c_generated == our_c_ids, max(len(c_generated), len(our_c_ids))
        if not tokens_match:
            notes.append(first_difference(c_generated, our_c_ids, "generated token"))
    if text != c_text:
        notes.append(first_difference(c_text, text, "text char"))
    return Row(exported.label, f"{who}, {name}", prompt if prompt is not None else "(no -i)", compared,
               tokens_match, text == c_text, "; ".join(notes) or "none")


def compare_model(label: str, run_dir: Path, work: Path, binary: Path, id_binary: Path | None,
                  new_tokens: int, cli: list[str]) -> list[Row]:
    exported = export_for_run_c(label, run_dir, work, cli)
    rows: list[Row] = []
    back, back_ids, back_name = import_back(exported, work, cli, rows)
    ours_to_c = lambda ids: [exported.to_llama2c[t] for t in ids]  # noqa: E731
    seq_len = exported.ours.model.config.context_length
    for prompt in [None] + PROMPTS:
        c_prompt = [] if prompt is None else python_run_c_encode(prompt, exported.pieces, exported.scores)
        steps = min(seq_len, len(c_prompt) + new_tokens)
        result = run_c_tokens(exported, binary, id_binary, prompt, c_prompt, steps, rows)
        variants = [("BOS only", "")] if prompt is None else [
            ("' ' + prompt (run.c's input)", " " + prompt), ("prompt as given", prompt)]
        for variant in variants:
            for who, lm, to_c in (("ours", exported.ours, ours_to_c), (back_name, back, back_ids)):
                rows.append(compare_one(exported, who, lm, to_c, variant, prompt, result, steps - len(c_prompt)))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-c-binary", type=Path, default=Path("/tmp/llama2c/run"),
                        help="compiled llama2.c run (default /tmp/llama2c/run)")
    parser.add_argument("--run-c-source", type=Path, default=None,
                        help="run.c, to build an instrumented copy that also reports token ids")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/llama2c/work"))
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--no-trained", action="store_true", help="skip the briefly trained model")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--train-stories", type=int, default=3000)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("TINYSTORIES_DATA", REPO.parent / "shared" / "data" / "tinystories")))
    parser.add_argument("--no-append", action="store_true", help="print the table only (default: also append it "
                                                                 "to benchmarks/RESULTS.md)")
    return parser.parse_args()


def build_runs(args: argparse.Namespace) -> tuple[list[tuple[str, Path]], str]:
    """[(label, run dir)] to compare, and a note on how the trained one was made."""
    runs = [("random", build_random_run(args.work_dir / "random_run"))]
    if args.no_trained:
        return runs, ""
    if not (args.data / "train.txt.gz").is_file():
        print(f"note: no {args.data / 'train.txt.gz'}; skipping the trained model")
        return runs, ""
    started = time.perf_counter()
    runs.append(("trained", build_trained_run(args.work_dir, args.data, args.train_stories, args.train_steps)))
    return runs, (f" The trained model: {args.train_steps} steps (batch 16 x 64) on the first "
                  f"{args.train_stories} TinyStories training stories with a bpe:512 tokenizer "
                  f"({time.perf_counter() - started:.0f} s).")


def yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def summarize(rows: list[Row], instrumented: bool) -> tuple[str, str]:
    """(markdown table, one-line verdict)."""
    from common import markdown_table

    table = markdown_table(
        ["model", "case", "prompt (-i)", "tokens compared", "tokens match", "text match", "first difference"],
        [(r.model, r.case, f"`{r.prompt}`", r.tokens, yes_no(r.tokens_match), yes_no(r.text_match),
          r.difference.replace("|", "\\|").replace("\n", "\\n")) for r in rows])
    equivalent = [r for r in rows if r.case.endswith(("BOS only", "(run.c's input)"))]
    all_match = all(r.text_match and r.tokens_match is not False for r in equivalent)
    import_ok = not any(r.case.startswith("`tinystories import") for r in rows)
    summary = (f"Same input tokens as run.c (BOS only, or ' ' + prompt): {sum(r.text_match for r in equivalent)}/"
               f"{len(equivalent)} cases give the same text{' and tokens' if instrumented else ''} "
               f"-> {'exact match' if all_match else 'MISMATCH'}. `tinystories import llama2c` of our own export: "
               f"{'works' if import_ok else 'fails (see the table)'}.")
    return table, summary


def results_notes(args: argparse.Namespace, instrumented: bool, train_note: str, trained_sample: str | None) -> str:
    notes = (
        f"\n\nrun.c: karpathy/llama2.c run.c at commit bd182289 (code-search copy, compiled with gcc -O2; "
        f"not in this repository){'; token ids from an instrumented copy' if instrumented else ''}. "
        f"Greedy (`-t 0`), up to {args.new_tokens} new tokens within the 64-token context. "
        "Random model: d_model 64, 2 layers, 4 heads, 2 kv heads, SwiGLU, tied, bpe:300 trained on 400 "
        "made-up sentences; weights drawn wide (embedding std 1, matrices std 3/sqrt(fan_in)) so greedy output is "
        "varied." + train_note +
        " The \"' ' + prompt\" rows feed our model the token sequence run.c feeds (run.c prepends a dummy "
        "space to every prompt); 'prompt as given' is what `generate(prompt)` does with the bare prompt and is "
        "expected to differ (different prompt tokens). 'imported' rows use the run made by "
        "`tinystories import llama2c` from the exported files.")
    if trained_sample is not None:
        notes += f" run.c's greedy text for the trained model: `{trained_sample}`."
    return notes


def main() -> int:
    args = parse_args()
    if not args.run_c_binary.is_file() or not os.access(args.run_c_binary, os.X_OK):
        print(f"SKIPPED: no llama2.c run binary at {args.run_c_binary}. Get run.c from karpathy/llama2.c, "
              f"compile it (gcc -O2 -o run run.c -lm) and pass --run-c-binary PATH.")
        return 0
    import torch

    torch.set_num_threads(1)  # the machine's 2 cores are shared
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "tinystories"]
    id_binary = instrumented_binary(args.run_c_source, args.work_dir) if args.run_c_source else None
    started = time.perf_counter()
    runs, train_note = build_runs(args)
    rows = [row for label, run_dir in runs
            for row in compare_model(label, run_dir, args.work_dir, args.run_c_binary, id_binary, args.new_tokens, cli)]
    table, summary = summarize(rows, id_binary is not None)
    print(table)
    print(f"\n{summary} ({time.perf_counter() - started:.0f} s)")
    samples = {label: run_c(args.run_c_binary, args.work_dir / f"{label}_llama2c", PROMPTS[0], 64)[0]
               .decode("utf-8", errors="replace") for label, _ in runs}
    for label, sample in samples.items():
        print(f"run.c, {label} model, -i {PROMPTS[0]!r}: {sample!r}")
    if not args.no_append:
        from common import append_results

        notes = results_notes(args, id_binary is not None, train_note, samples.get("trained"))
        append_results("llama2.c export vs karpathy's run.c (benchmarks/llama2c_check.py)",
                       table + "\n\n" + summary + notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
