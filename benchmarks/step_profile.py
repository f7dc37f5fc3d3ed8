"""Where a training step's time goes, and what each speed lever gained: `tiny`'s step (forward, backward,
optimizer) with the levers switched one at a time, side by side in one process, then a kernel-level
profile of the step before and after.

Levers (each row changes one thing from 'ours', the default):
  plain-loss   logits materialised and F.cross_entropy (instead of tinystories.loss's fused head + CE)
  torch-muon   torch.optim.Muon (bf16 Newton-Schulz, one matrix at a time) instead of ours (fp32, batched)
  before       both of the above: the step as it was before this work
  autotune     torch.compile(mode="max-autotune"): inductor's own C++ GEMM templates tried against ATen's
  eager        no torch.compile

    python benchmarks/step_profile.py                        # tiny, batch 16, every lever, then the profiles
    python benchmarks/step_profile.py --levers ours,before --no-profile --no-append

With --against-nanogpt SHAPE (a shape of benchmarks/peers.py: d128, d288, tiny, small) the rows are
instead peers.py's compiled step (fused AdamW for every model) at that shape, taken apart:
  ours               our GPT as the peers benchmark times it
  ours-plain-loss    the same with the logits materialised and F.cross_entropy (nanoGPT's loss)
  ours-nanogpt-arch  our code with nanoGPT's architecture: LayerNorm, learned positions, GELU
  nanogpt            nanoGPT's own model.py (../shared/peers/nanogpt)
then the kernel profiles of `ours` and `nanogpt`: where the two steps' time differs.

    python benchmarks/step_profile.py --against-nanogpt d288
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE] + [str(HERE)]
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import append_results, best_times, markdown_table  # noqa: E402
from tinystories.config import get_preset  # noqa: E402
from tinystories.model import GPT  # noqa: E402
from tinystories.optim import Optimizers, build_optimizer  # noqa: E402
from tinystories.train_state import deterministic_algorithms  # noqa: E402

CPU = torch.device("cpu")
LEVERS = ["ours", "plain-loss", "torch-muon", "before", "autotune", "eager"]
PEER_LEVERS = ["ours", "ours-plain-loss", "ours-nanogpt-arch", "nanogpt"]
NANOGPT_ARCHITECTURE = dict(norm="layernorm", position="learned", mlp="gelu", d_ff=None)


def plain_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss the way most code computes it: all the logits, then cross-entropy over them."""
    logits, _ = model(idx)  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


def with_torch_muon(optimizer: Optimizers) -> Optimizers:
    """The same groups, with torch's own Muon for the hidden matrices."""
    ours = optimizer.optimizers[0]
    group = ours.param_groups[0]
    theirs = torch.optim.Muon(group["params"], lr=group["lr"], weight_decay=group["weight_decay"])
    theirs.param_groups[0]["peak_lr"] = group["peak_lr"]
    return Optimizers([theirs, *optimizer.optimizers[1:]])


def training_step(lever: str, batch_size: int):
    preset = get_preset("tiny")
    torch.manual_seed(0)
    model = GPT(preset.model)
    optimizer = build_optimizer(model, preset.train, CPU)
    if lever in ("torch-muon", "before"):
        optimizer = with_torch_muon(optimizer)
    loss_of = (lambda m, x, y: plain_loss(m, x, y)) if lever in ("plain-loss", "before") else \
        (lambda m, x, y: m(x, y)[1])
    runnable = model if lever == "eager" else torch.compile(model, mode="max-autotune-no-cudagraphs"
                                                              if lever == "autotune" else None)
    idx = torch.randint(0, preset.model.vocab_size, (batch_size, preset.model.context_length),
                        generator=torch.Generator().manual_seed(0))
    targets = torch.roll(idx, -1, dims=1)

    def step() -> None:
        with deterministic_algorithms(True, CPU):
            loss_of(runnable, idx, targets).backward()
            optimizer.step()
            optimizer.zero_grad()

    return step


def peer_step(lever: str, shape: str):
    """peers.py's compiled step (fused AdamW) at `shape`, for one of PEER_LEVERS."""
    import dataclasses

    import peers

    config, batch_size = peers.shape_config(shape)
    if lever == "ours-nanogpt-arch":
        config = dataclasses.replace(config, **NANOGPT_ARCHITECTURE)
    torch.manual_seed(0)
    model = peers.nanogpt_model(config) if lever == "nanogpt" else GPT(config)
    idx = torch.randint(0, config.vocab_size, (batch_size, config.context_length),
                        generator=torch.Generator().manual_seed(0))
    targets = torch.roll(idx, -1, dims=1)
    loss_of = (lambda m: plain_loss(m, idx, targets)) if lever == "ours-plain-loss" else (lambda m: m(idx, targets)[1])
    return peers.training_step(model.train(), loss_of, CPU, compile_model=True), batch_size * config.context_length


def profile_table(step, steps: int = 3) -> tuple[str, float]:
    """Self CPU time per step by kernel (inductor kernels named), top 12, and the step's total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        totals[event.key][0] += event.self_cpu_time_total / steps / 1000
        totals[event.key][1] += event.count // steps
    total = sum(value for value, _ in totals.values())
    rows = [[f"`{name[:70]}`", count, f"{ms:.1f}", f"{100 * ms / total:.1f}%"]
            for name, (ms, count) in sorted(totals.items(), key=lambda item: -item[1][0])[:12]]
    return markdown_table(["kernel / op", "calls / step", "self ms / step", "share"], rows), total


def lever_table(steps: dict, levers: list[str], tokens: int, rounds: int) -> str:
    """Each lever's best step time, tokens/s and speed against 'ours', as markdown."""
    seconds = best_times(steps, rounds, warmups=2)
    reference = seconds.get("ours", next(iter(seconds.values())))
    rows = [[f"`{name}`", f"{1000 * seconds[name]:.0f}", f"{tokens / seconds[name]:,.0f}",
             f"{reference / seconds[name]:.2f}x"] for name in levers]
    return markdown_table(["step", "ms", "tokens/s", "speed vs ours"], rows)


def selected_steps(args) -> tuple[dict, int, str, tuple[str, str]]:
    """(lever -> step function, tokens per step, the table's notes, the two levers to profile)."""
    if args.against_nanogpt:
        built = {name: peer_step(name, args.against_nanogpt) for name in PEER_LEVERS}
        tokens = built["ours"][1]
        notes = (f"Notes: benchmarks/peers.py's compiled step at shape {args.against_nanogpt} (fused AdamW for "
                 f"every model, fp32), {tokens:,} tokens per step; `ours-nanogpt-arch` is our code with "
                 f"{NANOGPT_ARCHITECTURE}")
        return {name: step for name, (step, _) in built.items()}, tokens, notes, ("nanogpt", "ours")
    levers = [name.strip() for name in args.levers.split(",") if name.strip()]
    notes = (f"Notes: `tiny` ({get_preset('tiny').model.num_parameters() / 1e6:.1f}M parameters, compiled unless "
             f"'eager', Muon + AdamW), batch {args.batch_size} "
             f"x 256, forward + backward + optimizer step on one random batch, deterministic mode on (the default)")
    return ({name: training_step(name, args.batch_size) for name in levers},
            args.batch_size * get_preset("tiny").model.context_length, notes, ("before", "ours"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of {', '.join(LEVERS)}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-append", action="store_true")
    parser.add_argument("--against-nanogpt", metavar="SHAPE", default=None,
                        help="take apart peers.py's compiled step at SHAPE (d128, d288, tiny, small) against nanoGPT's")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    import torch._inductor.config as inductor

    inductor.cpp.enable_kernel_profile = True  # compiled kernels show up by name in the profile
    steps, tokens, notes, profiled = selected_steps(args)
    levers = list(steps)
    body = lever_table(steps, levers, tokens, args.rounds)
    body += (f"\n\n{notes}; best of {args.rounds} rounds with the variants taking turns; "
             f"{torch.get_num_threads()} threads.")
    if args.profile:
        for name in profiled:
            if name in steps:
                table, total = profile_table(steps[name])
                body += f"\n\nProfile of `{name}` ({total:.0f} ms of self CPU time per step under the profiler):\n\n" + table
    print(body)
    if not args.no_append:
        append_results("A training step's time, lever by lever (benchmarks/step_profile.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
