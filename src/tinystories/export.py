"""Use a trained model elsewhere: export a run to Hugging Face, GGUF, llama2.c or a safetensors
directory, and import llama2.c checkpoints as runs.

    export(run, "hf", out)           transformers: config.json + model.safetensors + tokenizer files
    export(run, "gguf", out)         llama.cpp: out/model.gguf, or the file out if it ends in .gguf (Llama-style,
                                     tokenizer embedded)
    export(run, "llama2c", out)      llama2.c: out/model.bin (legacy v0) + out/tokenizer.bin
    export(run, "safetensors", out)  ours: config.json + model.safetensors + tokenizer (load_run reads it)
    import_llama2c(model_bin, tokenizer_bin, out)   a run directory generate/eval/train --init-from accept

Every output appears whole or not at all: it is written into a hidden temporary directory (or file)
beside `out`, which is then renamed to `out`. The format writers live in export_hf.py, export_gguf.py and
llama2c.py; this module finds the weights and tokenizer files and handles the directories.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from tinystories.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, build_model, load_inference_weights, load_run_config,
                                    resolve_checkpoint, save_checkpoint)
from tinystories.config import RunConfig, TrainConfig
from tinystories.errors import UserError
from tinystories.export_gguf import check_gguf_compatible, write_gguf
from tinystories.export_hf import (SAMPLE_PROMPT, SAMPLE_TOKENS, CardFacts, checkpoint_evaluation, hf_architecture,
                                   hf_config, hf_state_dict, model_card, tokenizer_config, training_command)
from tinystories.files import atomic_path, check_output_path, write_json_atomic, write_text_atomic
from tinystories.llama2c import (byte_level_pieces, byte_level_tokenizer_from_pieces, byte_level_vocab_order,
                                 check_llama2c_compatible, is_byte_level_vocab, read_llama2c_bin, write_llama2c_bin)
from tinystories.tokenizer import EOT, byte_level_tokenizer, unicode_to_bytes
from tinystories.vocab_bin import TOKENIZER_BIN, Llama2cTokenizer, read_tokenizer_bin, write_tokenizer_bin

FORMATS = ("hf", "gguf", "llama2c", "safetensors")
IMPORT_FORMATS = ("llama2c",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_JSON, TOKENIZER_META = "tokenizer.json", "tokenizer_meta.json"
GGUF_FILE, LLAMA2C_FILE = "model.gguf", "model.bin"
METRICS_FILE = "metrics.jsonl"  # what training logs (tinystories.train); the shipped models carry theirs


class ExportError(UserError):
    """Bad export/import input: unknown format or dtype, missing run, output in the way."""


@dataclass
class ExportSource:
    """What an export reads from a run: its config, fp32 weights (our names) and tokenizer files."""

    run_config: RunConfig
    weights: dict[str, torch.Tensor]  # includes lm_head.weight (== tok_emb.weight when tied)
    home: Path  # the directory holding config.json and the tokenizer files
    checkpoint: Path
    meta: dict[str, Any]  # tokenizer_meta.json
    name: str = ""  # the run as the user named it (a path or a shipped model's name)
    which: str = "best"  # the checkpoint exported: 'best' or 'last'

    def tokenizer_json(self) -> dict[str, Any]:
        """The run's HF tokenizer.json; for the 'bytes' kind (which has none) an equivalent one."""
        path = self.home / TOKENIZER_JSON
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise ExportError(f"{path}: unreadable tokenizer file ({error})") from None
        if self.meta.get("kind") == "bytes":
            return bytes_tokenizer_json(int(self.meta.get("eot_id", 256)))
        raise ExportError(f"{self.home}: no {TOKENIZER_JSON} for tokenizer kind {self.meta.get('kind')!r}")


def bytes_tokenizer_json(eot_id: int = 256) -> dict[str, Any]:
    """A byte-level BPE with no merges that encodes exactly like the 'bytes' tokenizer (id = byte)."""
    from tokenizers import AddedToken, models

    tokenizer = byte_level_tokenizer(models.BPE(vocab=unicode_to_bytes(), merges=[]))
    tokenizer.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    values = json.loads(tokenizer.to_str())
    if tokenizer.token_to_id(EOT) != eot_id:
        raise ExportError(f"bytes tokenizer: expected {EOT} at id {eot_id}, it would be {tokenizer.token_to_id(EOT)}")
    return values


def load_source(run: str | os.PathLike, checkpoint: str = "best") -> ExportSource:
    """Read a run (or checkpoint, or self-contained directory) for export."""
    directory, home = resolve_checkpoint(run, checkpoint)
    run_config = load_run_config(home)
    model = build_model(run_config.model, load_inference_weights(directory), source=str(directory))
    weights = {name: tensor.detach().float().contiguous() for name, tensor in model.state_dict().items()}
    meta_path = home / TOKENIZER_META
    if not meta_path.is_file():
        raise ExportError(f"{home}: no {TOKENIZER_META}; the run's tokenizer is needed for export")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExportError(f"{meta_path}: unreadable ({error})") from None
    return ExportSource(run_config, weights, home, directory, meta, name=str(run), which=checkpoint)


def check_out_dir(out: Path, force: bool = False) -> None:
    """Refuse an --out directory that cannot be (re)written: a file, a path under a file, a non-empty
    directory without `force`, or an unreadable directory."""
    check_output_path(out, "--out", folder=True)
    try:
        if out.is_dir() and any(out.iterdir()) and not force:
            raise ExportError(f"--out {out}: directory exists and is not empty (use --force to replace it)")
    except OSError as error:
        raise ExportError(f"--out {out}: cannot read it ({error.strerror or error})") from None


def check_out_file(out: Path, force: bool = False) -> None:
    """Refuse an --out file that exists (without `force`), is a folder, or sits under a file."""
    check_output_path(out, "--out")
    if out.exists() and not force:
        raise ExportError(f"--out {out}: file exists (use --force to replace it)")


@contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False, protect: Path | None = None) -> Iterator[Path]:
    """Yield a fresh hidden directory beside `out`; on success it replaces `out` in one rename.

    `out` may not exist, or be empty; with `force` an existing one is replaced. On any error the
    temporary directory is removed and `out` is untouched. `protect` (the source run) may not be
    `out` nor inside it.
    """
    out = Path(out)
    check_out_dir(out, force)
    if protect is not None:
        source, target = protect.resolve(), out.resolve()
        if source == target or target in source.parents:
            raise ExportError(f"--out {out}: would overwrite the model being exported; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield temporary
        temporary.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(temporary, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def is_gguf_file_target(format: str, out: str | os.PathLike) -> bool:
    """`export --format gguf --out NAME.gguf` writes that one file (unless NAME.gguf is a directory)."""
    return format == "gguf" and Path(out).suffix == ".gguf" and not Path(out).is_dir()


def export(run: str | os.PathLike, format: str, out: str | os.PathLike, *, checkpoint: str = "best",
           dtype: str = "float32", force: bool = False) -> Path:
    """Export `run` to `out` in `format` ('hf' | 'gguf' | 'llama2c' | 'safetensors'). Returns `out`.

    `out` is a directory, or for gguf also a file name ending in .gguf (`is_gguf_file_target`).
    """
    _check_options(format, dtype)
    out = Path(out)
    as_file = is_gguf_file_target(format, out)
    (check_out_file if as_file else check_out_dir)(out, force)  # refuse before reading the model
    source = load_source(run, checkpoint)
    COMPATIBILITY_CHECKS[format](source.run_config.model)  # refuse before creating anything
    if as_file:
        with atomic_path(out) as temporary:
            write_gguf_file(source, temporary, dtype)
        return out
    with atomic_directory(out, force, protect=source.home) as directory:
        WRITERS[format](source, directory, dtype)
    return out


def _check_options(format: str, dtype: str) -> None:
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if format == "llama2c" and dtype != "float32":
        raise ExportError(f"--dtype {dtype}: llama2c's legacy .bin format is float32 only")
    if format == "gguf" and dtype == "bfloat16":
        raise ExportError("--dtype bfloat16: gguf export writes float32 or float16")


def _cast(weights: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    return {name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in weights.items()}


def _tokenizer_files(home: Path) -> list[Path]:
    return [home / name for name in (TOKENIZER_JSON, TOKENIZER_META, TOKENIZER_BIN) if (home / name).is_file()]


def write_safetensors_dir(source: ExportSource, directory: Path, dtype: str) -> None:
    """config.json (RunConfig) + model.safetensors + the tokenizer files: what load_run reads."""
    weights = dict(source.weights)
    if source.run_config.model.tie_embeddings:
        weights.pop("lm_head.weight", None)  # shared with tok_emb.weight
    metadata = {"format": "pt", "model_config": json.dumps(source.run_config.model.to_dict())}
    save_file(_cast(weights, dtype), str(directory / WEIGHTS_FILE), metadata=metadata)
    source.run_config.save(directory / CONFIG_FILE)
    for path in _tokenizer_files(source.home):
        shutil.copyfile(path, directory / path.name)


def write_hf_dir(source: ExportSource, directory: Path, dtype: str) -> None:
    """A transformers model directory (Llama, Mistral or GPT-2 class) with a fast tokenizer."""
    config = source.run_config.model
    family = hf_architecture(config)
    if source.meta.get("kind") == "llama2c":
        # llama2.c's models end a story with BOS (1), not </s> (2): generate stops at either, like run.c.
        bos_id, eos_id, stop_ids = 1, 2, [2, 1]
    else:
        bos_id = eos_id = int(source.meta["eot_id"])
        stop_ids = eos_id
    state = hf_state_dict(config, source.weights, family)
    save_file(_cast(state, dtype), str(directory / "model.safetensors"), metadata={"format": "pt"})
    write_json_atomic(directory / "config.json", hf_config(config, family, bos_id=bos_id, eos_id=eos_id, dtype=dtype))
    write_json_atomic(directory / "generation_config.json",
                      {"bos_token_id": bos_id, "eos_token_id": stop_ids, "do_sample": False})
    write_json_atomic(directory / TOKENIZER_JSON, source.tokenizer_json())
    token_config = tokenizer_config(source.meta, config.context_length)
    write_json_atomic(directory / "tokenizer_config.json", token_config)
    write_json_atomic(directory / "special_tokens_map.json",
                      {key: token_config[key] for key in ("bos_token", "eos_token", "unk_token")})
    write_text_atomic(directory / "README.md", model_card(card_facts(source, family)))


def card_facts(source: ExportSource, family: str) -> CardFacts:
    """What the hf model card states, each read from the run's files or measured on the exported weights."""
    config = source.run_config.model
    evaluation = checkpoint_evaluation(read_metrics(source.home / METRICS_FILE), source.which)
    return CardFacts(name=source.name, family=family, config=config,
                     tokenizer=source.run_config.tokenizer or str(source.meta.get("spec", "unknown")),
                     parameters=config.num_parameters(), evaluation=evaluation,
                     command=training_command(source.run_config),
                     eval_tokens=source.run_config.train.eval_tokens if evaluation else None,
                     origin=_checkpoint_metadata(source.checkpoint).get("source"), sample=sample_story(source),
                     story_prefix="" if source.meta.get("kind") == "llama2c" else EOT)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl ([] when there is none). A last line cut short by a killed
    run, or any line that is not a JSON object, is left out."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    except (OSError, UnicodeDecodeError) as error:
        raise ExportError(f"{path}: unreadable ({error})") from None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _checkpoint_metadata(directory: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), "pt") as file:
        return file.metadata() or {}


def sample_story(source: ExportSource) -> str:
    """The prompt and the exported checkpoint's greedy continuation (what `tinystories generate` prints)."""
    from tinystories.generate import load_model

    lm = load_model(str(source.checkpoint), checkpoint=source.which)
    return SAMPLE_PROMPT + lm.generate(SAMPLE_PROMPT, max_new_tokens=SAMPLE_TOKENS, temperature=0)[0].text


def _llama2c_scores(source: ExportSource) -> list[float] | None:
    if source.meta.get("kind") != "llama2c":
        return None
    _, scores, _ = read_tokenizer_bin(source.home / TOKENIZER_BIN)
    return scores


def write_gguf_file(source: ExportSource, path: Path, dtype: str) -> None:
    write_gguf(path, source.run_config.model, source.weights, source.tokenizer_json(),
               source.meta, scores=_llama2c_scores(source), dtype=dtype, name=source.home.name or "tinystories")


def write_gguf_dir(source: ExportSource, directory: Path, dtype: str) -> None:
    write_gguf_file(source, directory / GGUF_FILE, dtype)


def write_llama2c_dir(source: ExportSource, directory: Path, dtype: str) -> None:
    """model.bin (legacy v0) + tokenizer.bin.

    An imported llama2.c model goes back as it came (its tokenizer.bin copied). A byte-level BPE is
    relabelled for run.c (see `byte_level_vocab_order`: EOT at id 1, byte b at id 3 + b); the
    embedding and classifier rows are permuted with it, so the model computes the same thing.
    """
    config = source.run_config.model
    if source.meta.get("kind") == "llama2c":
        write_llama2c_bin(directory / LLAMA2C_FILE, config, source.weights)
        shutil.copyfile(source.home / TOKENIZER_BIN, directory / TOKENIZER_BIN)
        return
    tokenizer_json = source.tokenizer_json()
    order = byte_level_vocab_order(tokenizer_json, config.vocab_size, int(source.meta["eot_id"]))
    write_llama2c_bin(directory / LLAMA2C_FILE, config, source.weights, vocab_order=order)
    pieces, scores = byte_level_pieces(tokenizer_json, config.vocab_size)
    write_tokenizer_bin(directory / TOKENIZER_BIN, [pieces[i] for i in order], [scores[i] for i in order])


def _no_check(config) -> None:
    """The safetensors directory holds any model tinystories can build."""


COMPATIBILITY_CHECKS = {"hf": hf_architecture, "gguf": check_gguf_compatible, "llama2c": check_llama2c_compatible,
                        "safetensors": _no_check}
WRITERS = {"hf": write_hf_dir, "gguf": write_gguf_dir, "llama2c": write_llama2c_dir,
           "safetensors": write_safetensors_dir}


def import_model(format: str, model_path: str | os.PathLike, out: str | os.PathLike, *,
                 tokenizer: str | os.PathLike | None = None, force: bool = False) -> Path:
    """`tinystories import FORMAT MODEL --tokenizer T --out RUN`; only 'llama2c' for now."""
    if format not in IMPORT_FORMATS:
        raise ExportError(f"import format {format!r}: expected one of {', '.join(IMPORT_FORMATS)}")
    if tokenizer is None:
        raise ExportError("import llama2c needs --tokenizer TOKENIZER.bin (llama2.c's tokenizer file)")
    return import_llama2c(model_path, tokenizer, out, force=force)


def import_llama2c(model_bin: str | os.PathLike, tokenizer_bin: str | os.PathLike, out: str | os.PathLike,
                   *, force: bool = False) -> Path:
    """Turn a legacy llama2.c checkpoint + tokenizer.bin into a run directory `out`.

    The run has config.json (RMSNorm eps 1e-5, RoPE theta 10000, SwiGLU with d_ff = hidden_dim, no
    biases, n_kv_head from the header, tied per the sign of vocab_size), checkpoints/best and
    checkpoints/last, and a tokenizer: a 'llama2c' one (tokenizer.bin, tokenizer.json,
    tokenizer_meta.json) for a sentencepiece vocabulary, or, for a byte-level vocabulary our own
    llama2c export wrote (EOT at id 1, byte b at id 3 + b), the byte-level BPE rebuilt from it as a
    kind 'bpe' tokenizer (tokenizer.json, tokenizer_meta.json) with the file's ids.
    """
    model_bin, tokenizer_bin = Path(model_bin), Path(tokenizer_bin)
    for path, what in ((model_bin, "MODEL"), (tokenizer_bin, "--tokenizer")):
        if not path.exists():
            raise ExportError(f"{what} {path}: no such file")
        if not path.is_file():
            raise ExportError(f"{what} {path}: is a folder; expected a llama2.c .bin file")
    check_out_dir(Path(out), force)  # before reading the model
    config, weights = read_llama2c_bin(model_bin)
    pieces, scores, _ = read_tokenizer_bin(tokenizer_bin, vocab_size=config.vocab_size)
    if is_byte_level_vocab(pieces):
        tokenizer = byte_level_tokenizer_from_pieces(pieces, scores, source=str(tokenizer_bin))
    else:
        tokenizer = Llama2cTokenizer(pieces, scores, source=str(tokenizer_bin))
    model = build_model(config, weights, source=str(model_bin))
    run_config = RunConfig(model=config, train=TrainConfig(), tokenizer=tokenizer.spec)
    metadata = {"source": f"llama2.c checkpoint {model_bin.name}"}
    with atomic_directory(out, force) as directory:
        run_config.save(directory / CONFIG_FILE)
        tokenizer.save(directory)
        save_checkpoint(directory / "checkpoints" / "last", model, metadata=metadata)
        save_checkpoint(directory / "checkpoints" / "best", model, metadata=metadata)
    return Path(out)
