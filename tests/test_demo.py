"""`tinystories demo` / `make demo`: the whole pipeline, offline on the bundled slice by default."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tinystories.cli import main
from tinystories.data import load_meta

REPO_ROOT = Path(__file__).resolve().parents[1]
# A model small enough that the demo's training, three 300-token stories and eval take seconds.
SMALL_DEMO = ["n_layer=1", "d_model=32", "n_head=2", "context_length=32", "batch_size=4", "eval_tokens=256",
              "sample_tokens=8", "compile=false", "eval_every=3", "warmup_steps=1", "device=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def demo_args(out: Path, *extra: str) -> list[str]:
    sets = [arg for item in SMALL_DEMO for arg in ("--set", item)]
    return ["demo", "--out", str(out), "--max-steps", "3", "--tokenizer", "bytes", "--eval-samples", "0",
            "--no-progress", *sets, *extra]


def test_demo_without_input_trains_on_the_bundled_slice_and_reports(small_bundled_slice, tmp_path, capsys):
    from tinystories.evaluate import evaluate_shards
    from tinystories.generate import load_model

    out = tmp_path / "demo"
    assert main(demo_args(out)) == 0
    captured = capsys.readouterr()
    assert (f"[1/4] preparing bytes shards in {out / 'data-bytes'} from the bundled TinyStories slice "
            f"({small_bundled_slice})") in captured.err
    meta = load_meta(out / "data-bytes")
    assert [e["path"] for e in meta["sources"]["train"]] == [str(small_bundled_slice / "train.txt.gz")]
    assert [e["path"] for e in meta["sources"]["val"]] == [str(small_bundled_slice / "valid.txt.gz")]
    headers = re.findall(r"^--- story (\d) \((.*), seed 0\) ---$", captured.out, flags=re.M)
    assert headers == [("1", "temperature=0.0"), ("2", "temperature=0.8, top_p=0.95"),
                       ("3", "temperature=1.0, top_k=40")]
    for prompt in ("Once upon a time", "Tom and his dog", "The little bird"):
        assert f"\n{prompt}" in captured.out
    # The table's figure is the run's best checkpoint evaluated on the prepared validation shards.
    table_bpb = float(re.search(r"^\| bits_per_byte \| ([\d.]+) \|$", captured.out, flags=re.M).group(1))
    expected = evaluate_shards(load_model(out / "run", checkpoint="best"), out / "data-bytes")["bits_per_byte"]
    assert table_bpb == pytest.approx(expected, abs=5e-5)
    assert (out / "run" / "loss.png").is_file()


def test_demo_hub_source_offline_fails_in_one_line_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(demo_args(tmp_path / "demo", "--data-source", "hub")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinystories: error: cannot download")
    assert "offline" in lines[0] and "bundled" in lines[0]
    assert not (tmp_path / "demo").exists()


def test_demo_input_and_data_source_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["demo", "--input", str(tmp_path / "x.txt"), "--data-source", "bundled"])
    assert caught.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_passes_the_data_source_through():
    def demo_command(*variables: str) -> str:
        # Run from inside `make test`, the outer make's flags would add "Entering directory" lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        lines = subprocess.run(["make", "--no-print-directory", "-n", "demo", *variables], cwd=REPO_ROOT,
                               env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()
        return lines[-1]

    assert demo_command().endswith("-m tinystories demo --out out/demo --max-minutes 15")
    assert demo_command("DATA_SOURCE=hub", "DEMO_MINUTES=5").endswith(
        "demo --out out/demo --max-minutes 5 --data-source hub")
