"""Step checkpoints of a stage: trainable tensors, optimizer, scheduler, RNG and data positions.

Format (docs/design.md §7; issue 14 items 1 and 9): `step-N/tensors.safetensors` holds every tensor and array,
`step-N/state.json` everything else (with references to those tensors), the SHA-256 of the tensor file and the
format version. Nothing is ever unpickled, so a forged file in a run directory cannot run code on `--resume`.
A checkpoint is written into a temporary directory, fsynced and renamed, so a crash (even SIGKILL) leaves the
last good checkpoint loadable; `find_intact` verifies checkpoints newest first and falls back past broken ones.
Only the newest `keep` are kept.

The tensors are full (gathered from FSDP shards), so one checkpoint loads into any number of processes and
any strategy (FSDP shards them again); `place_rank` maps the per-rank data positions and RNG onto the new
number. torch.distributed.checkpoint is not used: its file reader unpickles the `.metadata` file (and
`torch.load`s non-tensor entries), which is exactly what a run directory must never be asked to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = 2  # 1: train_state.pt (a pickle; refused since issue 14)
STATE = "state.json"
TENSORS = "tensors.safetensors"
LEGACY = "train_state.pt"


class CorruptCheckpoint(Exception):
    """A step checkpoint that cannot be used (truncated, zero bytes, checksum mismatch, old pickle format)."""


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


def seeded_rng_state(*entropy: int) -> dict[str, Any]:
    """The python / numpy / torch (/ CUDA) generator states that seeding from `entropy` gives, without
    touching this process's current generators."""
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    saved = rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too
    state = rng_state()
    set_rng_state(saved)
    return state


def place_rank(state: dict[str, Any], rank: int, world: int, seed: int) -> tuple[int, dict[str, Any]]:
    """Data position and RNG state of `rank` when the checkpoint `state` resumes with `world` processes.

    The run's samples form one global order; sample i goes to rank i mod world as that rank's position
    i // world (`data.SampleStream`). With the checkpoint's own number of processes every rank gets back its
    own position and RNG, so the run continues bit for bit. With another number, every rank continues the
    global order at the first sample after the last one any rank read, rounded up to a multiple of `world`:
    no sample is read twice, and none is passed over when that sample number is already a multiple of
    `world` (always when going down to one process; otherwise fewer than `world` are), unless bad samples
    made the old ranks drift apart (then the ones the slower ranks had not reached are passed over). Rank r
    keeps old rank r's RNG when there was one; a new rank's is seeded from (seed, step, rank)."""
    positions = [int(p) for p in state["data_positions"]]
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]] * len(positions)
    if len(positions) == world:
        return positions[rank], rngs[rank]
    old = len(positions)
    after_last = max(((p - 1) * old + r + 1 for r, p in enumerate(positions) if p > 0), default=0)
    rng = rngs[rank] if rank < old else seeded_rng_state(seed, int(state["step"]), rank)
    return -(-after_last // world), rng


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def step_dirs(root: Path) -> list[Path]:
    """Every `step-N` directory under `root`, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and p.is_dir())


# --------------------------------------------------------------------------- encoding without pickle


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of `obj`; tensors and arrays go into `tensors` and are referenced by key."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "iub" else obj.copy())
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state cannot hold a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- save / load


def save(root: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as step-N atomically (temp dir, fsync, rename) and prune to the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    save_file(tensors, str(tmp / TENSORS))
    meta = {"format": FORMAT, "tensors_sha256": _sha256(tmp / TENSORS), "state": encoded}
    (tmp / STATE).write_text(json.dumps(meta))
    for name in (TENSORS, STATE):
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(root)
    for old in step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (no tensors): cheap, for deciding what a resume may change."""
    if not (path / STATE).is_file():
        if (path / LEGACY).is_file():
            raise CorruptCheckpoint(
                f"{LEGACY} is the old pickle format, which linmu no longer loads (unpickling can run code)"
            )
        raise CorruptCheckpoint(f"no {STATE}")
    try:
        meta = json.loads((path / STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpoint(f"{STATE} is unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("state"), dict):
        raise CorruptCheckpoint(f"{STATE} is not a linmu checkpoint of format {FORMAT}")
    return meta


def load(path: Path) -> dict[str, Any]:
    """Verify (checksum) and decode one checkpoint; raises CorruptCheckpoint saying what is wrong."""
    meta = read_meta(path)
    tensor_file = path / TENSORS
    if not tensor_file.is_file():
        raise CorruptCheckpoint(f"no {TENSORS}")
    if _sha256(tensor_file) != meta.get("tensors_sha256"):
        raise CorruptCheckpoint(f"{TENSORS} does not match its checksum (truncated or overwritten)")
    try:
        tensors = load_file(str(tensor_file))
        return _decode(meta["state"], tensors)
    except Exception as exc:  # safetensors raises its own SafetensorError; a bad reference is a KeyError
        raise CorruptCheckpoint(f"{TENSORS} is unreadable ({type(exc).__name__}: {exc})") from None


@dataclass
class Found:
    """The newest intact checkpoint of a stage and the broken ones newer than it."""

    path: Path | None
    state: dict[str, Any] | None
    broken: list[tuple[Path, str]] = field(default_factory=list)


def find_intact(root: Path) -> Found:
    """Verify step checkpoints newest first; the first that loads wins, the newer broken ones are listed."""
    found = Found(None, None)
    for path in reversed(step_dirs(root)):
        try:
            found.state, found.path = load(path), path
            return found
        except CorruptCheckpoint as exc:
            found.broken.append((path, str(exc)))
    return found


def newest_meta(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint whose JSON part parses, with that JSON (for checks before any tensor is read)."""
    for path in reversed(step_dirs(root)):
        try:
            return path, read_meta(path)["state"]
        except CorruptCheckpoint:
            continue
    return None


def set_aside(path: Path, why: str) -> Path:
    """Move a checkpoint that must not be resumed from out of the `step-N` namespace (kept for inspection)."""
    target = path.with_name(f".{why}-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)
    return target
