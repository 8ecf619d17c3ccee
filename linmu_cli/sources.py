"""Where a teacher comes from: a local directory, the HF cache (hub id), a short alias or an embedded tiny model.

linmu never downloads silently: a hub id resolves through the local Hugging Face cache, and when it is not
there (and the hub is unreachable or HF_HUB_OFFLINE=1) the error says how to get the files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from linmu_cli.errors import LinmuError
from linmu_cli.models.family import families, family_for_model_type

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
    from linmu_cli.archs import ARCHS

    return sorted([*TINY_ALIASES, *HUB_ALIASES, *(f"random:{a}" for a in ARCHS)])


@dataclass
class Teacher:
    """A loaded source model with its processor and where it came from."""

    model: nn.Module
    processor: object | None
    source: str
    local_dir: Path | None  # files to copy (tokenizer, processor, chat template) when loaded from disk


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


def parse_dtype(name: str) -> torch.dtype | str:
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


def load_pretrained(where: Path, what: str, load):
    """Run a transformers `from_pretrained` call; a damaged checkpoint becomes one LinmuError saying what to do.

    Truncated or corrupt safetensors (SafetensorError), missing weight files (OSError), shapes that do not match
    the config (RuntimeError / ValueError): none of them is a linmu bug, all mean the files need replacing."""
    try:
        return load()
    except LinmuError:
        raise
    except Exception as exc:  # the loader's own error types vary by transformers version and file format
        detail = " ".join(str(exc).split())
        detail = (detail if len(detail) <= 300 else detail[:297] + "...").rstrip(".")
        raise LinmuError(f"cannot load the {what} in {where}: {type(exc).__name__}: {detail}. The checkpoint "
                         "looks incomplete or damaged: copy (or convert) it again") from None  # fmt: skip


def load_teacher(source: str, dtype: str = "auto", device: str = "cpu", seed: int = 0) -> Teacher:
    """Load a supported source VLM (never a LinMU checkpoint) with its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = parse_dtype(dtype)
    kind, where = resolve_source(source)
    if kind == "tiny":
        from linmu_cli.tiny import build_tiny_teacher

        model, processor = build_tiny_teacher(where, seed=seed)
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        return Teacher(model.to(device), processor, source, None)
    if kind == "random":
        from linmu_cli.archs import build_random_teacher

        if torch_dtype == "auto":
            torch_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        model, processor = build_random_teacher(str(where), torch_dtype, device, seed=seed)
        return Teacher(model, processor, source, None)
    model_type, archs = read_model_type(where)
    if model_type.startswith("linmu_"):
        raise LinmuError(f"{where} is already a LinMU checkpoint ({model_type}); convert its teacher instead")
    family_for_model_type(model_type, archs)  # raises with the supported list
    model = load_pretrained(
        Path(where),
        "model",
        lambda: AutoModelForImageTextToText.from_pretrained(where, dtype=torch_dtype, device_map=None),
    ).to(device)
    try:
        processor = AutoProcessor.from_pretrained(where)
    except Exception:  # a bare weights directory is still convertible
        processor = None
    return Teacher(model.eval(), processor, source, Path(where))


__all__ = [
    "HUB_ALIASES",
    "TINY_ALIASES",
    "Teacher",
    "check_device",
    "families",
    "known_aliases",
    "load_pretrained",
    "load_teacher",
    "read_model_type",
    "resolve_source",
]
