"""Generation throughput on CPU: tokens/s of `LanguageModel.generate` vs Hugging Face `generate`.

For the `tiny` and `small` presets (random weights; speed does not depend on them) at batch 1 and
batch 16: our generate as users get it (static KV cache, decode step compiled by the warm-up call),
the same with the eager step, without the cache, with dynamic int8 linears, and transformers'
LlamaForCausalLM.generate on the same shapes and the same weights (our fused qkv / gate-up matrices
split into HF's q/k/v and gate/up; both use 'rotate halves' RoPE). Logits of the two models are
checked to agree before anything is timed. Every run decodes greedily from a 16-token prompt for
exactly `--new-tokens` tokens (the <|endoftext|> logit is zeroed so no story ends early; HF gets
min_new_tokens). tokens/s = batch x new tokens / wall time, prefill included; best of `--repeats`.

int8 quality: bits per byte of fp32 vs int8 on the first `--stories` validation stories, for a
trained run given with `--run` (random weights otherwise, which only shows the perturbation).

    python benchmarks/generate_throughput.py [--run RUN] [--new-tokens 64] [--repeats 2] [--no-append]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from functools import partial
from itertools import islice
from pathlib import Path

from common import append_results, markdown_table, peers_model_config  # noqa: E402

import torch  # noqa: E402

from tinystories.config import get_preset  # noqa: E402
from tinystories.generate import LanguageModel, quantize_int8  # noqa: E402
from tinystories.model import GPT  # noqa: E402


class PlainTokenizer:
    """Enough of a tokenizer for timing: ids are given directly; EOT is id 0."""

    spec = "benchmark"
    eot_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [1 + (ord(c) % (self.vocab_size - 1)) for c in text]

    def decode(self, ids) -> str:
        return ""


def random_model(preset: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(peers_model_config(preset)).eval()
    with torch.no_grad():
        model.tok_emb.weight[0] = 0.0  # EOT (id 0) logit is 0: random stories do not end early
    return model


def to_hf(model: GPT):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinystories.export_hf import hf_config, hf_state_dict

    values = hf_config(model.config, "llama", bos_id=0, eos_id=0, dtype="float32")
    for key in ("architectures", "model_type", "torch_dtype", "dtype"):
        values.pop(key, None)
    hf = LlamaForCausalLM(LlamaConfig(**values)).eval()
    weights = {k: v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.config, weights, "llama"), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf


def check_logits_agree(model: GPT, hf) -> float:
    tokens = torch.randint(1, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)[0]
        theirs = hf(tokens).logits
    difference = float((ours - theirs).abs().max())
    if difference > 1e-4:
        raise SystemExit(f"HF and our logits differ by {difference}: the weight mapping is wrong")
    return difference


def time_round_robin(functions: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function over `repeats` rounds, the functions taking turns in each round
    (on shared cores the load changes over time; turns spread it evenly), after one warm-up each."""
    for function in functions.values():
        function()  # warm-up (allocations, lazy init)
    best = {name: float("inf") for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run", help="a trained run for the int8 bits-per-byte comparison")
    parser.add_argument("--stories", type=int, default=100, help="validation stories for the bpb comparison")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared cores, OpenMP threads that spin-wait for a busy "
                             "core make 2-thread timings erratic)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    rows = []
    for preset in args.presets:
        rows += preset_rows(preset, args)
    table = markdown_table(["model", "params", "batch", "implementation", "tokens/s", "vs HF"], rows)
    bpb_table = int8_quality(args)
    print(table)
    print()
    print(bpb_table)
    if not args.no_append:
        notes = (f"Notes: greedy decoding, {args.prompt_tokens}-token prompt, exactly {args.new_tokens} new tokens "
                 f"per row, random weights (speed does not depend on them), fp32 on CPU, best of {args.repeats} "
                 f"timed runs taken in turns after a warm-up (no cache: one run), {args.threads} torch thread(s). "
                 "The CPU is shared with other engineers' jobs, so figures vary between runs.")
        append_results("Generation throughput (benchmarks/generate_throughput.py)",
                       table + "\n\n" + bpb_table + "\n\n" + notes)
    return 0


def greedy_run(language_model: LanguageModel, prompts: list[str], new_tokens: int, use_cache: bool = True) -> None:
    completions = language_model.generate(prompts, max_new_tokens=new_tokens, temperature=0, use_cache=use_cache)
    assert all(len(c.token_ids) == new_tokens for c in completions)


def hf_run(hf, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """HF greedy generate of exactly `new_tokens`; the first row's new tokens."""
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out[0, ids.shape[1]:].tolist()


def preset_rows(preset: str, args: argparse.Namespace) -> list[list[object]]:
    """The table rows of one preset: every implementation at every batch size, timed in turns."""
    N = args.new_tokens
    prompt = "".join(chr(65 + i % 26) for i in range(args.prompt_tokens - 1))  # P-1 tokens after the leading EOT
    model = random_model(preset)
    lm = LanguageModel(model, PlainTokenizer(model.config.vocab_size))
    variants = {"ours (default: static KV cache, compiled step)": lm,
                "ours, eager step (compile=False)": LanguageModel(model, lm.tokenizer, compile=False),
                "ours, int8 + KV cache (eager)": LanguageModel(quantize_int8(model), lm.tokenizer)}
    hf = None
    if not args.no_hf:
        hf = to_hf(model)
        print(f"{preset}: HF logits agree within {check_logits_agree(model, hf):.1e}", file=sys.stderr)
    rows = []
    for batch in args.batches:
        prompts = [prompt] * batch
        functions = {name: partial(greedy_run, variant, prompts, N) for name, variant in variants.items()}
        if hf is not None:
            ids = torch.tensor([[0] + lm.tokenizer.encode(prompt)] * batch)
            functions["HF transformers generate"] = partial(hf_run, hf, ids, N)
            # same greedy tokens (a check that the two decode the same model)
            ours_tokens = lm.generate(prompt, max_new_tokens=N, temperature=0)[0].token_ids
            agree = sum(a == b for a, b in zip(ours_tokens, hf_run(hf, ids[:1], N)))
            print(f"{preset} b{batch}: greedy tokens agree with HF on {agree}/{N}", file=sys.stderr)
        results = time_round_robin(functions, args.repeats)
        results["ours, no cache"] = time_round_robin({"": partial(greedy_run, lm, prompts, N, False)}, 1)[""]
        hf_rate = batch * N / results["HF transformers generate"] if hf is not None else None
        for name, seconds in results.items():
            rate = batch * N / seconds
            versus = f"{rate / hf_rate:.2f}x" if hf_rate else ""
            rows.append([preset, f"{model.num_parameters() / 1e6:.1f}M", batch, name, f"{rate:,.0f}", versus])
            print(" | ".join(str(c) for c in rows[-1]), file=sys.stderr)
    return rows


def int8_quality(args) -> str:
    """bits per byte of fp32 vs int8 on validation stories."""
    from tinystories.evaluate import evaluate_text
    from tinystories.generate import load_model

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinystories" / "valid.txt.gz"
    if not data.is_file():
        return "(int8 bits per byte: skipped, no validation text found)"
    from tinystories.data import read_stories

    stories = list(islice(read_stories(data), args.stories))
    if args.run:
        fp32, source = load_model(args.run), f"trained run {args.run}"
    else:
        from tinystories.tokenizer import BytesTokenizer

        config = get_preset("tiny").model
        config.vocab_size = 257
        torch.manual_seed(0)
        fp32, source = LanguageModel(GPT(config).eval(), BytesTokenizer()), "random-weight tiny (bytes tokenizer)"
    int8 = LanguageModel(quantize_int8(fp32.model), fp32.tokenizer, fp32.config)
    a, b = evaluate_text(fp32, stories), evaluate_text(int8, stories)
    rows = [["fp32", f"{a['bits_per_byte']:.4f}", ""],
            ["int8 (dynamic, all linears)", f"{b['bits_per_byte']:.4f}",
             f"{b['bits_per_byte'] - a['bits_per_byte']:+.4f} ({(b['bits_per_byte'] / a['bits_per_byte'] - 1) * 100:+.2f}%)"]]
    return (f"int8 quality on the first {len(stories)} validation stories, {source}:\n\n"
            + markdown_table(["weights", "bits per byte", "cost vs fp32"], rows))


if __name__ == "__main__":
    sys.exit(main())
