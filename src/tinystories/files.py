"""Writing files so that nobody ever sees half of one: write a temporary file beside the target, then
rename it over the target (a rename within one folder is atomic). On any error, or an interrupt, the
temporary file is removed and the target is untouched."""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tinystories.errors import UserError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; when the block succeeds it becomes `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid + random suffix: two processes (or threads) writing the same target never share a temp file
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, values: Any) -> None:
    """`values` as indented JSON with a final newline."""
    write_text_atomic(path, json.dumps(values, indent=2) + "\n")


class OutputPathError(UserError):
    """An output path that cannot be written: a folder where a file goes, a file where a folder goes."""


def check_output_path(path: str | os.PathLike, option: str, *, folder: bool = False) -> None:
    """Before any work: refuse a `path` (the `option` the user gave) that cannot become a file (or,
    with `folder`, a folder) because it is the other kind, or a file stands where a parent folder goes."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a folder; expected a file name" if not folder else "a file; expected a folder"
        raise OutputPathError(f"{option} {path}: is {kind}")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {path}: {ancestor} is a file, not a folder")
