"""Training throughput on this CPU: our GPT against Hugging Face's LlamaForCausalLM of the same shape.

For each preset, one training step (forward + backward + AdamW) is timed for our model and for
`transformers.LlamaForCausalLM` with the same hidden size, MLP width, layers, heads, vocabulary, RoPE theta,
RMSNorm epsilon and tied embeddings (attn_implementation='sdpa'), eager and under torch.compile.
MFU is the model's training FLOPs per second (ModelConfig.flops_per_token) over this machine's fp32 matmul
peak, measured here with a large matmul. Prints a markdown table and appends it to benchmarks/RESULTS.md.

    python benchmarks/train_throughput.py                     # tiny and small, eager + compiled, with HF
    python benchmarks/train_throughput.py --presets tiny --steps 3 --no-hf --no-compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


import torch  # noqa: E402

from common import append_results, load_average, markdown_table, peers_model_config  # noqa: E402
from tinystories.config import ModelConfig, get_preset  # noqa: E402
from tinystories.model import GPT  # noqa: E402


def measure_matmul_peak(size: int = 4096, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of a size x size matmul: the roofline the MFU figures are measured against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up the BLAS threads
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


class CpuShare:
    """CPU time that *other* processes used while this one ran, from /proc/stat (Linux only)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return None
        jiffies = [int(value) for value in fields]
        busy = sum(jiffies) - jiffies[3] - jiffies[4]  # everything but idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()

    def others(self) -> float | None:
        """Average number of cores kept busy by other processes since this object was made."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - own) / wall)


def hf_llama(config: ModelConfig) -> torch.nn.Module | None:
    """LlamaForCausalLM with our config's shape, or None if transformers is missing or the shape isn't Llama."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    if (config.norm, config.position, config.mlp, config.bias, config.sliding_window) != \
            ("rmsnorm", "rope", "swiglu", False, None):
        return None
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.context_length, rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings, hidden_act="silu",
        attention_bias=False, mlp_bias=False, attention_dropout=0.0, use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(hf_config)


def time_training(loss_of_step: Callable[[], torch.Tensor], model: torch.nn.Module, warmup: int, steps: int):
    """(seconds of the warm-up steps, which include compiling; seconds of each timed step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step():
        loss = loss_of_step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup_seconds = sum(timed(step) for _ in range(warmup))
    return warmup_seconds, [timed(step) for _ in range(steps)]


def run_preset(name: str, args, peak: float) -> list[list[object]]:
    config = peers_model_config(name)
    batch_size = args.batch_size or get_preset(name).train.batch_size
    T = config.context_length
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, config.vocab_size, (batch_size, T), generator=generator)
    targets = torch.randint(0, config.vocab_size, (batch_size, T), generator=generator)
    flops_per_step = config.flops_per_token(T) * batch_size * T

    implementations: list[tuple[str, Callable[[], torch.nn.Module], Callable]] = [
        ("ours", lambda: GPT(config), lambda model: (lambda: model(idx, targets)[1])),
    ]
    if not args.no_hf:
        if hf_llama(config) is None:
            print(f"{name}: no Hugging Face comparison (transformers missing or not a Llama shape)")
        else:
            # HF shifts labels inside: labels=idx scores T-1 next tokens per row, the same work.
            implementations.append(("HF Llama", lambda: hf_llama(config),
                                    lambda model: (lambda: model(input_ids=idx, labels=idx).loss)))
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])

    rows, ms_per_step = [], {}
    for mode in modes:
        for label, build, make_loss in implementations:
            torch.manual_seed(0)
            model = build().train()
            parameters = sum(p.numel() for p in model.parameters())
            runnable = torch.compile(model) if mode == "compiled" else model
            print(f"{name} {label} {mode}: {parameters / 1e6:.2f}M parameters, batch {batch_size}x{T} ...",
                  flush=True)
            try:
                warmup_seconds, seconds = time_training(make_loss(runnable), model, args.warmup, args.steps)
            except Exception as error:  # e.g. torch.compile unavailable: report it, go on
                message = str(error).strip().splitlines()[0][:80] if str(error).strip() else ""
                rows.append([name, label, mode, "failed", f"{type(error).__name__}: {message}", "", "", ""])
                continue
            median = statistics.median(seconds)
            ms_per_step[label, mode] = median
            ratio = ""
            if label == "ours" and ("HF Llama", mode) in ms_per_step:
                ratio = f"{ms_per_step['HF Llama', mode] / median:.2f}x"
            elif label == "HF Llama" and ("ours", mode) in ms_per_step:
                ratio = f"{median / ms_per_step['ours', mode]:.2f}x"
            rows.append([name, label, mode, f"{batch_size * T / median:,.0f}", f"{median * 1000:,.0f}",
                         f"{flops_per_step / median / peak:.0%}", ratio, f"{warmup_seconds:.0f}"])
            print("   ", rows[-1], flush=True)
            del model, runnable
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small", help="comma-separated preset names (default tiny,small)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per measurement (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (they include compiling)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the preset's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face Llama comparison")
    parser.add_argument("--no-save", action="store_true", help="print only; don't append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = load_average()
    share = CpuShare()
    peak = measure_matmul_peak()
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s on {args.threads} threads", flush=True)

    rows = []
    for name in args.presets.split(","):
        rows += run_preset(name.strip(), args, peak)
    peak_after = measure_matmul_peak()
    others = share.others()
    load_after = load_average()

    headers = ["preset", "model", "mode", "tokens/s", "ms/step", "MFU", "ours/HF speed", "warm-up s"]
    table = markdown_table(headers, rows)
    notes = [
        f"fp32 matmul peak (4096x4096 matmul, best of 5, {args.threads} threads): {peak / 1e9:.0f} GFLOP/s before, "
        f"{peak_after / 1e9:.0f} after; MFU = ModelConfig.flops_per_token x tokens/s / the 'before' peak "
        "(the same FLOPs for both models: they have the same shape).",
        f"Median of {args.steps} timed steps after {args.warmup} warm-up steps (warm-up includes compiling); "
        "a step is forward + backward + AdamW(fused=True) on random tokens, fp32; batch = the preset's unless "
        "--batch-size. HF: transformers.LlamaForCausalLM, attn_implementation='sdpa', same shape and tying.",
    ]
    if others is not None:
        shared = "other processes shared the CPU" if others > 0.1 else "the CPU was otherwise idle"
        loads = (f"; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
                 if load_before and load_after else "")
        notes.append(f"During this run {shared}: they kept {others:.2f} cores busy on average{loads}.")
    body = table + "\n\nNotes: " + " ".join(notes)
    print()
    print(body)
    if not args.no_save:
        append_results("Training throughput (benchmarks/train_throughput.py)", body)
        print("\nappended to benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
