"""Ours vs Hugging Face transformers, side by side in one run: a training step and greedy generation.

For each preset, on the same machine, the same shapes and (for generation) the same weights:

- train: one optimizer step (forward + backward + fused AdamW) of our GPT and of transformers'
  LlamaForCausalLM of the same shape (benchmarks/train_throughput.py's `hf_llama`), on the same random
  batch. tokens/s = batch x context / step time.
- generate: our `LanguageModel.generate` (KV cache) vs `LlamaForCausalLM.generate` on our weights
  converted to HF (benchmarks/generate_throughput.py's `to_hf`; the logits are checked to agree first),
  greedy, `--new-tokens` tokens per row from a 16-token prompt. tokens/s = batch x new tokens / time.

Ours and HF take turns within each round of timing (the shared CPU's load changes over time) and the
best round counts. CPU: fp32. CUDA (--device cuda): bf16 autocast for training, fp32 generation, with a
device synchronize around each timed call. Prints a markdown table and appends it to benchmarks/RESULTS.md.

    python benchmarks/peers.py                                # tiny and small on CPU
    python benchmarks/peers.py --presets tiny --rounds 2 --no-append
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

# benchmarks/ would shadow stdlib modules if it came first on the path: move it to the back (see common.py)
_HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE] + [str(_HERE)]

import torch  # noqa: E402

from common import append_results, load_average, machine_description, markdown_table  # noqa: E402
from generate_throughput import PlainTokenizer, check_logits_agree, random_model, to_hf  # noqa: E402
from train_throughput import hf_llama  # noqa: E402
from tinystories.config import get_preset  # noqa: E402
from tinystories.generate import LanguageModel  # noqa: E402
from tinystories.model import GPT  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(functions: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Best wall time of each function over `rounds`, the functions taking turns in each round, after one
    untimed call each (warm-up: allocations, lazy init, compiling)."""
    for function in functions.values():
        function()
    synchronize(device)
    best = {name: float("inf") for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            synchronize(device)
            started = time.perf_counter()
            function()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


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


def compare_training(preset: str, batch_size: int, rounds: int, device: torch.device,
                     compile_model: bool) -> list[object] | None:
    config = get_preset(preset).model
    torch.manual_seed(0)
    hf = hf_llama(config)
    if hf is None:
        print(f"{preset}: no HF training comparison (transformers missing or not a Llama shape)", file=sys.stderr)
        return None
    ours = GPT(config)
    T = config.context_length
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (batch_size, T), generator=generator).to(device)
    targets = torch.roll(idx, -1, dims=1)
    ours.to(device).train()
    hf.to(device).train()
    steps = {
        # HF shifts labels inside: labels=idx scores T-1 next tokens per row, the same work
        "ours": training_step(ours, lambda m: m(idx, targets)[1], device, compile_model),
        "HF": training_step(hf, lambda m: m(input_ids=idx, labels=idx).loss, device, compile_model),
    }
    seconds = best_times(steps, rounds, device)
    rate = {name: batch_size * T / value for name, value in seconds.items()}
    return [preset, f"{ours.num_parameters() / 1e6:.1f}M", "train step", f"{batch_size} x {T}",
            f"{rate['ours']:,.0f}", f"{rate['HF']:,.0f}", f"{rate['ours'] / rate['HF']:.2f}x"]


def compare_generation(preset: str, batch_size: int, new_tokens: int, prompt_tokens: int, rounds: int,
                       device: torch.device) -> list[object]:
    model = random_model(preset)  # EOT's logit is zero: no row stops early
    hf = to_hf(model)
    check_logits_agree(model, hf)  # on the CPU, before moving: the two are the same model
    model.to(device)
    hf.to(device)
    lm = LanguageModel(model, PlainTokenizer(model.config.vocab_size))
    prompt = "".join(chr(65 + i % 26) for i in range(prompt_tokens - 1))  # P - 1 tokens after the leading EOT
    ids = torch.tensor([[0] + lm.tokenizer.encode(prompt)] * batch_size, device=device)

    def ours() -> None:
        completions = lm.generate([prompt] * batch_size, max_new_tokens=new_tokens, temperature=0)
        assert all(len(c.token_ids) == new_tokens for c in completions)

    def hugging_face() -> None:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] == prompt_tokens + new_tokens

    seconds = best_times({"ours": ours, "HF": hugging_face}, rounds, device)
    rate = {name: batch_size * new_tokens / value for name, value in seconds.items()}
    return [preset, f"{model.num_parameters() / 1e6:.1f}M", "generate (greedy, KV cache)",
            f"{batch_size} x {new_tokens} new", f"{rate['ours']:,.0f}", f"{rate['HF']:,.0f}",
            f"{rate['ours'] / rate['HF']:.2f}x"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="comma-separated presets (default tiny,small)")
    parser.add_argument("--train-batch", type=int, default=8, help="sequences per training step (default 8)")
    parser.add_argument("--gen-batches", default="1,8", help="comma-separated generation batch sizes (default 1,8)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best counts (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier timings on a shared machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models for the training step")
    parser.add_argument("--no-append", action="store_true", help="print only; don't append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    load_before = load_average()
    started = time.perf_counter()
    rows = []
    for preset in [name.strip() for name in args.presets.split(",") if name.strip()]:
        row = compare_training(preset, args.train_batch, args.rounds, device, args.compile)
        if row is not None:
            rows.append(row)
            print(" | ".join(map(str, row)), file=sys.stderr, flush=True)
        for batch in [int(b) for b in args.gen_batches.split(",")]:
            rows.append(compare_generation(preset, batch, args.new_tokens, args.prompt_tokens, args.rounds, device))
            print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    load_after = load_average()

    table = markdown_table(["preset", "params", "task", "shape", "ours tokens/s", "HF tokens/s", "ours/HF"], rows)
    import transformers

    precision = "bf16 autocast training, fp32 generation" if device.type == "cuda" else "fp32"
    notes = (f"Notes: device {device}, {precision}, {'compiled' if args.compile else 'eager'} training step "
             f"(forward + backward + fused AdamW on one random batch); generation greedy from a "
             f"{args.prompt_tokens}-token prompt, exactly {args.new_tokens} new tokens per row, random weights "
             f"(EOT logit zeroed), our weights converted into HF's LlamaForCausalLM (logits checked to agree). "
             f"Best of {args.rounds} rounds in which ours and HF take turns, after one warm-up call each; "
             f"transformers {transformers.__version__}, attn_implementation='sdpa'; {args.threads} torch thread(s); "
             f"{time.perf_counter() - started:.0f} s in all.")
    if load_before and load_after:
        notes += (f" Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after: the CPU is shared "
                  "with other engineers' jobs, so the ratios are the figures to read, not the absolute rates.")
    body = table + "\n\n" + notes
    print(body)
    if not args.no_append:
        append_results("Ours vs Hugging Face transformers (benchmarks/peers.py)", body)
        print(f"\nappended to benchmarks/RESULTS.md ({machine_description()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
