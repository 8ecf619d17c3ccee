"""The one way every command turns a model name into a loaded model: `load_model`.

`linmu convert`, `linmu distill`, `linmu eval` (and plain lmms-eval's `--model linmu`), `linmu bench --model` and
evals/study.py all load through here, so a name means the same thing everywhere (`sources.resolve_source`: a
local directory, a hub id in the HF cache, an alias, `tiny-*`, `random:*`), dtype and device are applied the same
way, and a damaged checkpoint is the same one-line LinmuError whichever command met it. Teacher and LinMU
checkpoints load alike (the LinMU classes are registered with transformers' Auto classes).

`load_linmu_tensors` is the one different operation: it copies only the M-MATE tensors of a saved LinMU stage
onto a student freshly converted from the teacher in memory (what a distillation stage starts from), so the
frozen weights stay shared with the teacher instead of being loaded a second time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from linmu_cli.errors import LinmuError
from linmu_cli.models.family import family_for_model_type
from linmu_cli.sources import check_device, parse_dtype, read_model_type, resolve_source


@dataclass
class Loaded:
    """A loaded model with its processor, the name it was asked for and the directory it came from."""

    model: nn.Module
    processor: object | None  # None only for a bare weights directory loaded without require_processor
    source: str
    where: Path | None  # the checkpoint directory (tokenizer, chat template to copy); None: built in memory

    @property
    def is_linmu(self) -> bool:
        """True for a LinMU checkpoint (its M-MATE config is on the model), False for a source VLM."""
        return hasattr(self.model, "mate_config")


@contextmanager
def load_errors(where: Path, what: str) -> Iterator[None]:
    """Turn a library's failure to read checkpoint files into one LinmuError saying what to do.

    Truncated or corrupt safetensors (SafetensorError), missing weight files (OSError), shapes that do not match
    the config (RuntimeError / ValueError): none of them is a linmu bug, all mean the files need replacing. Running
    out of memory is not a damaged checkpoint: it passes through unchanged (the bench reports it as such)."""
    try:
        yield
    except LinmuError:
        raise
    except Exception as exc:  # the loader's own error types vary by transformers version and file format
        from linmu_cli.bench.timing import is_oom

        if is_oom(exc):
            raise
        detail = " ".join(str(exc).split())
        detail = (detail if len(detail) <= 300 else detail[:297] + "...").rstrip(".")
        raise LinmuError(f"cannot load the {what} in {where}: {type(exc).__name__}: {detail}. The checkpoint "
                         "looks incomplete or damaged: copy (or convert) it again") from None  # fmt: skip


def _target(device: str | torch.device) -> torch.device:
    """DEVICE checked (a LinmuError for one that does not exist here); `meta` builds weightless shape models."""
    return torch.device("meta") if str(device) == "meta" else check_device(device)


def load_model(
    source: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    seed: int = 0,
    teacher_only: bool = False,
    require_processor: bool = False,
) -> Loaded:
    """Load SOURCE (directory, hub id in the HF cache, alias, `tiny-*`, `random:*`) in eval mode on DEVICE.

    `dtype="auto"` keeps a checkpoint's saved dtype; the built-in models are float32 (`random:*` bfloat16 on
    CUDA). `attn_implementation` is the teacher's attention (and a LinMU model's vision tower's; its decoder runs
    M-MATE regardless). `seed` seeds the built-in models' weights. `teacher_only` refuses a LinMU checkpoint
    (what converting or distilling needs); `require_processor` makes a checkpoint without a loadable processor an
    error instead of `processor=None` (a bare weights directory is still convertible, not evaluable).
    Every bad input is a LinmuError naming what was wrong."""
    torch_dtype = parse_dtype(dtype)
    target = _target(device)
    name = str(source)
    kind, where = resolve_source(name)
    if kind == "tiny":
        from linmu_cli.tiny import build_tiny_teacher

        model, processor = build_tiny_teacher(str(where), seed=seed)
        if torch_dtype != "auto":
            model = model.to(torch_dtype)
        model = model.to(target)
    elif kind == "random":
        from linmu_cli.archs import build_random_teacher

        if torch_dtype == "auto":
            torch_dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
        model, processor = build_random_teacher(str(where), torch_dtype, target, seed=seed)
    else:
        return _load_dir(name, Path(where), torch_dtype, target, attn_implementation, teacher_only,
                         require_processor)  # fmt: skip
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    return Loaded(model.eval(), processor, name, None)


def _load_dir(name: str, where: Path, dtype: torch.dtype | str, device: torch.device, attn: str | None,
              teacher_only: bool, require_processor: bool) -> Loaded:  # fmt: skip
    model_type, archs = read_model_type(where)
    if model_type.startswith("linmu_") and teacher_only:
        raise LinmuError(f"{where} is already a LinMU checkpoint ({model_type}); pass the teacher it was "
                         "converted from instead")  # fmt: skip
    family_for_model_type(model_type, archs)  # an unsupported model: one error naming the supported families
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import linmu_cli.models  # noqa: F401  (registers the LinMU classes with the Auto classes)

    extra = {"attn_implementation": attn} if attn else {}
    with load_errors(where, "model"):
        model = AutoModelForImageTextToText.from_pretrained(where, dtype=dtype, device_map=None, **extra)
    model = model.to(device).eval()
    processor = None
    if require_processor:
        with load_errors(where, "processor"):
            processor = AutoProcessor.from_pretrained(where)
    else:
        try:
            processor = AutoProcessor.from_pretrained(where)
        except Exception:  # a bare weights directory is still convertible
            processor = None
    return Loaded(model, processor, name, where)


def load_linmu_tensors(student: nn.Module, src: Path) -> None:
    """Copy every M-MATE tensor of the LinMU checkpoint SRC into STUDENT (in place, keeping the saved dtype).

    Only the `.self_attn.` tensors are read: the rest of STUDENT is the teacher's, shared, and stays so."""
    from safetensors import safe_open

    params = dict(student.named_parameters())
    wanted = {n for n in params if ".self_attn." in n}
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise LinmuError(f"{src} has no .safetensors weights: copy (or distill) that stage again")
    with load_errors(src, "M-MATE tensors"):
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if key in wanted:
                        params[key].data = f.get_tensor(key).to(params[key].device)
                        wanted.discard(key)
    if wanted:
        raise LinmuError(f"{src} lacks {len(wanted)} M-MATE tensors (e.g. {sorted(wanted)[0]}): "
                         "was it written with a different model section?")  # fmt: skip


__all__ = ["Loaded", "load_errors", "load_linmu_tensors", "load_model"]
