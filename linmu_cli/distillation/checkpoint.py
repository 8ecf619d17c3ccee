"""Step checkpoints of a stage: trainable tensors, optimizer, scheduler, RNG and data positions.

Written into a temporary directory and renamed, so a crash (even SIGKILL) leaves the last good checkpoint
loadable; only the newest `keep` are kept.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def latest(root: Path) -> Path | None:
    """Newest complete checkpoint under `root` (temporary directories are ignored)."""
    if not root.is_dir():
        return None
    done = sorted(
        p for p in root.iterdir() if p.name.startswith("step-") and (p / "train_state.pt").is_file()
    )
    return done[-1] if done else None


def save(root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "train_state.pt")
    with open(tmp / "train_state.pt", "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(p for p in root.iterdir() if p.name.startswith("step-"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> dict[str, Any]:
    return torch.load(path / "train_state.pt", map_location="cpu", weights_only=False)
