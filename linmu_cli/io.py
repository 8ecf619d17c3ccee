"""Writing outputs so that a crash never leaves a half-written result under the final name."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from linmu_cli.errors import LinmuError


def check_output_dir(out: Path, force: bool) -> None:
    """Fail before any work when OUT holds something and --force was not given."""
    if out.exists() and not out.is_dir():
        raise LinmuError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LinmuError(f"{out} exists and is not empty; pass --force to replace it")


@contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` by rename, on error it is removed."""
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
