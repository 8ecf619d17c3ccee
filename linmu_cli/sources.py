"""What a model name means: a local directory, the HF cache (hub id), a short alias or an embedded tiny model.

`linmu_cli.loading.load_model` turns the answer into a loaded model; this module only resolves names and checks
devices and dtypes, so a bad name fails before any weights load.

linmu never downloads silently: a hub id resolves through the local Hugging Face cache, and when it is not
there (and the hub is unreachable or HF_HUB_OFFLINE=1) the error says how to get the files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from linmu_cli.errors import LinmuError

HUB_ALIASES: dict[str, str] = {
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2-vl-72b": "Qwen/Qwen2-VL-72B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen2.5-vl-32b": "Qwen/Qwen2.5-VL-32B-Instruct",
    "qwen2.5-vl-72b": "Qwen/Qwen2.5-VL-72B-Instruct",
}
# owner/name as the Hub spells them; anything else with a slash ("nope/", "a/b/c", "./x") is a local path
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
TINY_ALIASES: dict[str, str] = {"tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2.5-vl": "qwen2_5_vl"}
DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def known_aliases() -> list[str]:
    """Every model name that is not a path or hub id (for the error that lists them)."""
    from linmu_cli.archs import ARCHS

    return sorted([*TINY_ALIASES, *HUB_ALIASES, *(f"random:{a}" for a in ARCHS)])


def check_device(device: str | torch.device) -> torch.device:
    """The torch device DEVICE names, or a LinmuError saying what exists here (before any weight loads)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LinmuError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LinmuError(f"device {device}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"cuda {torch.version.cuda or 'not built'}); use --device cpu")  # fmt: skip
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LinmuError(f"device {device}: only {torch.cuda.device_count()} GPU(s) here (cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1})")  # fmt: skip
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise LinmuError(f"device {device}: linmu runs on cpu or cuda")
    return dev


def parse_dtype(name: str | torch.dtype) -> torch.dtype | str:
    """The torch dtype a --dtype value names ("auto" stays "auto"); a torch dtype linmu loads in passes through."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise LinmuError(
                f"dtype {name} is not one linmu loads models in; choose float32, bfloat16 or float16"
            )
        return name
    if name not in DTYPES:
        raise LinmuError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of a hub id, from the HF cache; downloads only when online is allowed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            return Path(snapshot_download(repo_id))
        except Exception as exc:  # no network, gated repo, typo: all end the same way for the user
            reason = f"download failed: {type(exc).__name__}"
    raise LinmuError(
        f"{repo_id} is not in the local Hugging Face cache (nor a local directory) and cannot be fetched "
        f"({reason}). On a machine with "
        f"internet run `hf download {repo_id}` and copy the cache (HF_HOME), or pass the "
        "checkpoint's local directory instead of the hub id"
    )


def resolve_source(source: str) -> tuple[str, str | Path]:
    """('tiny', family) | ('random', arch) | ('dir', path): what SOURCE names, or a LinmuError saying what to
    pass instead."""
    if source.startswith("random:"):
        from linmu_cli.archs import ARCHS

        arch = source.removeprefix("random:")
        if arch not in ARCHS:
            raise LinmuError(f"unknown model {source!r}; random-weight teachers: "
                             f"{', '.join('random:' + a for a in ARCHS)}")  # fmt: skip
        return "random", arch
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LinmuError(f"{path} is a file; pass a Hugging Face checkpoint directory")
        if not (path / "config.json").is_file():
            raise LinmuError(f"{path} has no config.json: pass a Hugging Face checkpoint directory")
        return "dir", path
    if source in TINY_ALIASES:
        return "tiny", TINY_ALIASES[source]
    if source in HUB_ALIASES:
        return "dir", _hub_snapshot(HUB_ALIASES[source])
    if _HUB_ID.fullmatch(source):
        return "dir", _hub_snapshot(source)
    if source.startswith((".", "/", "~")) or "/" in source or os.sep in source:
        raise LinmuError(f"{source}: no such directory (and not a hub id like Qwen/Qwen2-VL-7B-Instruct); "
                         "check the path")  # fmt: skip
    raise LinmuError(f"unknown model {source!r}: not a directory, hub id or alias; known aliases: "
                     f"{', '.join(known_aliases())}")  # fmt: skip


def read_model_type(path: Path) -> tuple[str, list[str]]:
    """(model_type, architectures) from PATH/config.json, or a LinmuError saying the checkpoint is damaged."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LinmuError(f"cannot read {path / 'config.json'}: {exc}; is the checkpoint complete?") from None
    if not isinstance(data, dict):
        raise LinmuError(f"{path / 'config.json'} holds a JSON {type(data).__name__}, not an object with "
                         "model_type: the checkpoint is damaged (copy config.json again)")  # fmt: skip
    model_type, archs = data.get("model_type", ""), data.get("architectures") or []
    if not isinstance(model_type, str) or not isinstance(archs, list):
        raise LinmuError(f"{path / 'config.json'}: model_type must be a string and architectures a list")
    return model_type, [str(a) for a in archs]


__all__ = [
    "HUB_ALIASES",
    "TINY_ALIASES",
    "check_device",
    "known_aliases",
    "parse_dtype",
    "read_model_type",
    "resolve_source",
]
