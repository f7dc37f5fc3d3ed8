"""What bounds a batch-1 decode step on the CPU: one token reads every weight once, so the step can go no
faster than memory streams the weights. For a preset's weight shapes (random fp32), side by side:

  stream         torch's sum over every weight tensor: how fast this machine reads them at all
  F.linear       the one-row matmul each decode step does (MKL, weights (out, in) row-major, as stored)
  column-major   the same product with the weights laid out transposed (values unchanged)
  numpy          numpy's one-row matmul on the same memory (OpenBLAS)
  mul+sum        the product as a multiply and a sum, every product in one graph compiled by inductor:
                 what the compiled decode step does at batch 1 (`decoding.few_row_product`)

and the tokens/s each would allow if the step were nothing but those products.

    python benchmarks/decode_bound.py                    # small, 1 thread
    python benchmarks/decode_bound.py --preset tiny --threads 2 --no-append
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE] + [str(HERE)]
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import append_results, best_times, markdown_table  # noqa: E402

from tinystories.config import get_preset  # noqa: E402
from tinystories.decoding import few_row_product  # noqa: E402
from tinystories.model import GPT  # noqa: E402


def weight_shapes(preset: str) -> list[tuple[int, int]]:
    """(out, in) of every matrix a decode step multiplies by: each block's linears, then the head."""
    model = GPT(get_preset(preset).model)
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def products(shapes: list[tuple[int, int]]) -> dict[str, object]:
    """One function per way of doing every product of one decode step."""
    weights = [torch.randn(shape) for shape in shapes]
    transposed = [w.t().contiguous().t() for w in weights]  # same values, column-major
    rows = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}  # (1, in)
    arrays = [w.numpy() for w in weights]
    vectors = {size: row[0].numpy() for size, row in rows.items()}
    every_product = torch.compile(lambda *ws: [few_row_product(rows[w.shape[1]], w.t()) for w in ws],
                                  fullgraph=True, dynamic=False)
    return {
        "stream": lambda: [w.sum() for w in weights],
        "F.linear": lambda: [F.linear(rows[w.shape[1]], w) for w in weights],
        "column-major": lambda: [F.linear(rows[w.shape[1]], w) for w in transposed],
        "numpy": lambda: [a @ vectors[a.shape[1]] for a in arrays],
        "mul+sum": lambda: every_product(*weights),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as batch-1 decoding)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-append", action="store_true", help="print only; don't append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = weight_shapes(args.preset)
    megabytes = sum(n * k for n, k in shapes) * 4 / 1e6
    seconds = best_times(products(shapes), args.rounds, warmups=3)
    body = markdown_table(
        ["way", "ms per token", "GB/s of weights", "tokens/s if the step were only this"],
        [[name, f"{value * 1e3:.2f}", f"{megabytes / 1e3 / value:.1f}", f"{1 / value:,.0f}"]
         for name, value in seconds.items()])
    notes = (f"\n\n`{args.preset}`: {len(shapes)} matrices, {megabytes:.1f} MB of fp32 weights read per token; "
             f"{args.threads} torch thread(s); best of {args.rounds} rounds, the ways taking turns.")
    print(body + notes)
    if not args.no_append:
        append_results(f"Batch-1 decode bound: {args.preset} (benchmarks/decode_bound.py)", body + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
