"""Ours vs the peers' own code, side by side in one run: a training step (nanoGPT's model.py and Hugging Face
transformers' LlamaForCausalLM), a whole `tinystories train` run, and greedy generation (HF).

- train step: one optimizer step (forward + backward + fused AdamW) of our GPT, of nanoGPT's GPT
  (imported from ../shared/peers/nanogpt, unmodified; its own architecture: LayerNorm, learned
  positions, GELU) and of LlamaForCausalLM, all of the same width, depth, heads, vocabulary and
  context, on the same random batch; eager and torch.compile'd. tokens/s = batch x context / step time.
  Shapes: d128 L4 H4 batch 32, d288 L6 H6 batch 16 (the issue's), and the `tiny` and `small` presets.
- train run: `tinystories train --preset tiny` as users run it (compiled, Muon, evaluations off)
  for a few dozen steps in a subprocess; its steady tokens/s beside nanoGPT's compiled step at the
  same shape, measured in this run.
- generate: our `LanguageModel.generate` vs `LlamaForCausalLM.generate` on our weights converted to
  HF (benchmarks/generate_throughput.py's `to_hf`; the logits are checked to agree first), greedy,
  `--new-tokens` tokens per row from a 16-token prompt.

The models take turns within each round of timing (the shared CPU's load changes over time) and the
best round counts. CPU: fp32. Prints markdown tables and appends them to benchmarks/RESULTS.md.

    python benchmarks/peers.py                                  # everything on CPU
    python benchmarks/peers.py --only train --shapes tiny --rounds 2 --no-append
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

# benchmarks/ would shadow stdlib modules if it came first on the path: move it to the back (see common.py)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE] + [str(_HERE)]

import torch  # noqa: E402

from common import append_results, markdown_table, peers_model_config  # noqa: E402
from common import best_times as common_best_times  # noqa: E402
from generate_throughput import PlainTokenizer, check_logits_agree, random_model, to_hf  # noqa: E402
from train_throughput import hf_llama  # noqa: E402
from tinystories.config import ModelConfig  # noqa: E402
from tinystories.generate import LanguageModel  # noqa: E402
from tinystories.model import GPT  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(functions: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """common.best_times, waiting for the device around each timing."""
    return common_best_times(functions, rounds, synchronize=lambda: synchronize(device))


NANOGPT = _HERE.parent.parent / "shared" / "peers" / "nanogpt"
# name -> (d_model, n_layer, n_head, batch); vocabulary 4096 and context 256 throughout
SHAPES = {"d128": (128, 4, 4, 32), "d288": (288, 6, 6, 16), "tiny": (128, 4, 4, 16), "small": (384, 8, 6, 32)}


def nanogpt_model(config: ModelConfig) -> torch.nn.Module | None:
    """nanoGPT's GPT with our config's width, depth, heads, vocabulary and context (its own architecture)."""
    if not (NANOGPT / "model.py").is_file():
        return None
    sys.path.insert(0, str(NANOGPT))
    try:
        from model import GPT as NanoGPT, GPTConfig  # nanoGPT's own module, unmodified
    finally:
        sys.path.remove(str(NANOGPT))
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count
        return NanoGPT(GPTConfig(block_size=config.context_length, vocab_size=config.vocab_size,
                                 n_layer=config.n_layer, n_head=config.n_head, n_embd=config.d_model,
                                 dropout=0.0, bias=False))


def training_step(model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor],
                  device: torch.device, compile_model: bool) -> Callable[[], None]:
    """One optimizer step of `model` (fused AdamW, as our trainer uses) as a function of no arguments."""
    runnable = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            loss = loss_of(runnable)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def shape_config(shape: str) -> tuple[ModelConfig, int]:
    d_model, n_layer, n_head, batch = SHAPES[shape]
    preset = peers_model_config(shape if shape in ("tiny", "small") else "tiny")  # the same model in every column
    return dataclasses.replace(preset, d_model=d_model, n_layer=n_layer, n_head=n_head, d_ff=None
                               if shape not in ("tiny", "small") else preset.d_ff), batch


def compare_training(shape: str, rounds: int, device: torch.device, compile_model: bool) -> list[object]:
    config, batch_size = shape_config(shape)
    torch.manual_seed(0)
    models = {"ours": GPT(config), "nanoGPT": nanogpt_model(config), "HF": hf_llama(config)}
    T = config.context_length
    idx = torch.randint(0, config.vocab_size, (batch_size, T), generator=torch.Generator().manual_seed(0)).to(device)
    targets = torch.roll(idx, -1, dims=1)
    losses = {"ours": lambda m: m(idx, targets)[1], "nanoGPT": lambda m: m(idx, targets)[1],
              # HF shifts labels inside: labels=idx scores T-1 next tokens per row, the same work
              "HF": lambda m: m(input_ids=idx, labels=idx).loss}
    steps = {name: training_step(model.to(device).train(), losses[name], device, compile_model)
             for name, model in models.items() if model is not None}
    seconds = best_times(steps, rounds, device)
    rate = {name: batch_size * T / value for name, value in seconds.items()}
    cells = [f"{rate[name]:,.0f}" if name in rate else "-" for name in ("ours", "nanoGPT", "HF")]
    ratios = [f"{rate['ours'] / rate[name]:.2f}x" if name in rate else "-" for name in ("nanoGPT", "HF")]
    return [f"{shape}: d{config.d_model} L{config.n_layer} H{config.n_head}, batch {batch_size} "
            f"({models['ours'].num_parameters() / 1e6:.1f}M)", "compiled" if compile_model else "eager",
            *cells, *ratios]


def train_run_tokens_per_second(steps: int = 60, skip: int = 20) -> float:
    """Steady tokens/s of `tinystories train --preset tiny` (median of its 5-step log intervals after `skip`)."""
    from tinystories.data import prepare

    data = _HERE / "out" / "shards-bpe4096"
    prepare(None, data, "bpe:4096", progress=False)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        subprocess.run([sys.executable, "-m", "tinystories", "train", "--preset", "tiny", "--data", str(data),
                        "--out", str(out), "--max-steps", str(steps), "--eval-every", str(10 * steps),
                        "--device", "cpu", "--no-progress", "--set", "log_every=5", "--set", "sample_tokens=0"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONPATH=str(_HERE.parent / "src")))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_second"] for r in records if "train_loss" in r and r["step"] > skip)


def compare_train_run(rounds: int) -> list[object]:
    """A whole `tinystories train --preset tiny` run vs nanoGPT's compiled step at tiny's shape (batch 16)."""
    config, batch_size = shape_config("tiny")
    torch.manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (batch_size, config.context_length))
    targets = torch.roll(idx, -1, dims=1)
    nano = training_step(nanogpt_model(config).train(), lambda m: m(idx, targets)[1], torch.device("cpu"), True)
    before = batch_size * config.context_length / best_times({"nanoGPT": nano}, rounds, torch.device("cpu"))["nanoGPT"]
    ours = train_run_tokens_per_second()
    after = batch_size * config.context_length / best_times({"nanoGPT": nano}, rounds, torch.device("cpu"))["nanoGPT"]
    nanogpt = max(before, after)
    return ["`tinystories train --preset tiny` (Muon, compiled, whole run)", "compiled", f"{ours:,.0f}",
            f"{nanogpt:,.0f} (its step)", "-", f"{ours / nanogpt:.2f}x", "-"]


def compare_generation(preset: str, batch_size: int, new_tokens: int, prompt_tokens: int, rounds: int,
                       device: torch.device) -> list[object]:
    """Our default `LanguageModel.generate` (static KV cache, compiled decode step: the warm-up call
    compiles it, the timed calls reuse it) against HF `generate` on the same weights, greedy."""
    model = random_model(preset)  # EOT's logit is zero: no row stops early
    hf = to_hf(model)
    check_logits_agree(model, hf)  # on the CPU, before moving: the two are the same model
    model.to(device)
    hf.to(device)
    lm = LanguageModel(model, PlainTokenizer(model.config.vocab_size))
    prompt = "".join(chr(65 + i % 26) for i in range(prompt_tokens - 1))  # P - 1 tokens after the leading EOT
    ids = torch.tensor([[0] + lm.tokenizer.encode(prompt)] * batch_size, device=device)
    produced: dict[str, list[int]] = {}

    def ours() -> None:
        completions = lm.generate([prompt] * batch_size, max_new_tokens=new_tokens, temperature=0)
        assert all(len(c.token_ids) == new_tokens for c in completions)
        produced["ours"] = completions[0].token_ids

    def hugging_face() -> None:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompt_tokens + new_tokens
        produced["HF"] = out[0, prompt_tokens:].tolist()

    seconds = best_times({"ours": ours, "HF": hugging_face}, rounds, device)
    agree = next((i for i, (a, b) in enumerate(zip(produced["ours"], produced["HF"])) if a != b), new_tokens)
    print(f"{preset} batch {batch_size}: the first {agree} of {new_tokens} greedy tokens agree with HF's",
          file=sys.stderr)
    rate = {name: batch_size * new_tokens / value for name, value in seconds.items()}
    return [preset, f"{model.num_parameters() / 1e6:.1f}M", "generate (greedy; static KV cache, compiled step)",
            f"{batch_size} x {new_tokens} new", f"{rate['ours']:,.0f}", f"{rate['HF']:,.0f}",
            f"{rate['ours'] / rate['HF']:.2f}x"]


def training_table(args, device: torch.device) -> str:
    torch.set_num_threads(args.threads)
    rows = []
    for shape in [name.strip() for name in args.shapes.split(",") if name.strip()]:
        for compile_model in (False, True):
            rows.append(compare_training(shape, args.rounds, device, compile_model))
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    if device.type == "cpu" and args.train_run:
        rows.append(compare_train_run(args.rounds))
        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    table = markdown_table(["shape", "mode", "ours tokens/s", "nanoGPT tokens/s", "HF tokens/s", "ours/nanoGPT",
                            "ours/HF"], rows)
    import transformers

    return table + (f"\n\nNotes: device {device}, fp32 (bf16 autocast on CUDA); one step = forward + backward + "
                    f"fused AdamW on one random batch, vocabulary 4096, context 256. nanoGPT: its model.py at "
                    f"../shared/peers/nanogpt (LayerNorm, learned positions, GELU, no bias); HF: LlamaForCausalLM, "
                    f"transformers {transformers.__version__}, attn_implementation='sdpa'; ours: the preset's "
                    f"architecture (RMSNorm, RoPE, SwiGLU, tied; fused head + cross-entropy). Best of {args.rounds} "
                    f"rounds in which the models take turns, after one warm-up call each (compiling); "
                    f"{args.threads} torch threads. The train-run row is a `tinystories train --preset tiny "
                    f"--max-steps 60` subprocess (Muon, compiled, 2 threads), median of its 5-step intervals after "
                    f"step 20, beside nanoGPT's compiled step at the same shape timed before and after it.")


def generation_table(args, device: torch.device) -> str:
    torch.set_num_threads(args.gen_threads)
    rows = []
    for preset in [name.strip() for name in args.presets.split(",") if name.strip()]:
        for batch in [int(b) for b in args.gen_batches.split(",")]:
            rows.append(compare_generation(preset, batch, args.new_tokens, args.prompt_tokens, args.rounds, device))
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    table = markdown_table(["preset", "params", "task", "shape", "ours tokens/s", "HF tokens/s", "ours/HF"], rows)
    return table + (f"\n\nNotes: device {device}, fp32; greedy from a {args.prompt_tokens}-token prompt, exactly "
                    f"{args.new_tokens} new tokens per row, random weights (EOT logit zeroed), our weights converted "
                    f"into HF's LlamaForCausalLM (logits checked to agree). Best of {args.rounds} rounds, ours and "
                    f"HF taking turns, after one warm-up call each; {args.gen_threads} torch thread(s).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["train", "generate", "all"], default="all")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"training shapes, of {', '.join(SHAPES)}")
    parser.add_argument("--no-train-run", dest="train_run", action="store_false",
                        help="skip the whole `tinystories train` run")
    parser.add_argument("--presets", default="tiny,small", help="generation presets (default tiny,small)")
    parser.add_argument("--gen-batches", default="1,8", help="comma-separated generation batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds; the best counts (default 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for training (default: every core, as `tinystories train`)")
    parser.add_argument("--gen-threads", type=int, default=1, help="torch threads for generation (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--no-append", action="store_true", help="print only; don't append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sections = []
    if args.only in ("train", "all"):
        sections.append(("Training step: ours vs nanoGPT vs HF (benchmarks/peers.py)", training_table(args, device)))
    if args.only in ("generate", "all"):
        sections.append(("Generation: ours vs HF (benchmarks/peers.py)", generation_table(args, device)))
    for title, body in sections:
        print(f"## {title}\n\n{body}\n")
        if not args.no_append:
            append_results(title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
