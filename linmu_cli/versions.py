"""Installed package versions, for the reports that record what produced a result (doctor, eval, bench)."""

from __future__ import annotations

import importlib.metadata as md


def package_version(name: str) -> str | None:
    """The installed distribution's version, or None when it is not installed.

    Reads the package metadata, not `module.__version__`: it needs no import (so asking about torch or lmms-eval
    costs nothing) and it works for distributions whose import name differs (`fla-core` is imported as `fla`).
    `lmms_eval` and `lmms-eval` name the same distribution.
    """
    try:
        return md.version(name.replace("_", "-"))
    except md.PackageNotFoundError:
        return None


__all__ = ["package_version"]
