"""`linmu convert`: load a teacher, swap its decoder attention for M-MATE blocks, save a loadable checkpoint."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from linmu_cli import __version__
from linmu_cli.config import MateConfig
from linmu_cli.errors import LinmuError
from linmu_cli.io import atomic_directory, check_output_dir, check_writable
from linmu_cli.loading import load_model
from linmu_cli.models import convert_model
from linmu_cli.ops import select_ssd_backend
from linmu_cli.sources import check_device

# Files of a source checkpoint that belong to the model's weights or config, not to its processor.
_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


@dataclass
class ConvertReport:
    out: Path
    family: str
    layers: int
    params_teacher: int
    params_student: int
    ssd_backend: str
    seconds: float
    mate: dict[str, Any] = field(default_factory=dict)
    teacher_out: Path | None = None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _copy_processor_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        is_model_file = f.name in _MODEL_FILES or f.name.endswith(_WEIGHT_SUFFIXES)
        if f.is_file() and not is_model_file and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)


def _save(model, processor, local_dir: Path | None, out: Path) -> None:
    model.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    if local_dir is not None:
        _copy_processor_files(local_dir, out)


def convert(
    source: str,
    out: str | Path,
    *,
    mate: MateConfig | dict[str, Any] | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    force: bool = False,
    save_teacher: str | Path | None = None,
    seed: int = 0,
) -> ConvertReport:
    """Convert SOURCE (directory, hub id in the HF cache, alias, or tiny-*) into a LinMU checkpoint at OUT.

    Nothing is written under OUT (or the teacher directory) unless the whole conversion succeeds.
    """
    start = time.perf_counter()
    mate = (mate if isinstance(mate, MateConfig) else MateConfig.from_dict(mate)).validate()
    out = Path(out)
    teacher_out = Path(save_teacher) if save_teacher is not None else None
    check_output_dir(out, force)
    if teacher_out is not None:
        _check_distinct(out, teacher_out)
        check_output_dir(teacher_out, force)
    for where in (out, teacher_out):
        if where is not None:
            check_writable(where)
    torch_device = check_device(device)
    backend = select_ssd_backend(torch_device, mate.ssd_backend)
    teacher = load_model(source, dtype=dtype, device=torch_device, seed=seed, teacher_only=True)
    student = convert_model(teacher.model, mate, seed=seed)
    meta = {
        "source": source,
        "seed": seed,
        "mate": mate.to_dict(),
        "linmu_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    # Both directories are built beside their final names and renamed only when both are complete: a failure
    # (full disk, Ctrl-C) leaves neither the teacher nor the student half-written.
    try:
        with (
            atomic_directory(teacher_out, force) if teacher_out is not None else nullcontext() as teacher_tmp
        ):
            if teacher_tmp is not None:
                _save(teacher.model, teacher.processor, teacher.where, teacher_tmp)
            with atomic_directory(out, force) as tmp:
                _save(student, teacher.processor, teacher.where, tmp)
                (tmp / "linmu.json").write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as exc:
        raise LinmuError(f"writing {out} failed: {exc.strerror or exc}"
                         f"{' (' + str(exc.filename) + ')' if exc.filename else ''}; nothing was written. "
                         "Free some space or choose another place") from None  # fmt: skip
    return ConvertReport(
        out=out,
        family=student.family.name,
        layers=len(student.family.decoder_layers(student)),
        params_teacher=count_parameters(teacher.model),
        params_student=count_parameters(student),
        ssd_backend=backend,
        seconds=time.perf_counter() - start,
        mate=mate.to_dict(),
        teacher_out=teacher_out,
    )


def _check_distinct(out: Path, teacher_out: Path) -> None:
    """--save-teacher must be its own directory: not OUT, not inside it, not around it."""
    a, b = out.expanduser().resolve(), teacher_out.expanduser().resolve()
    if a == b or a in b.parents or b in a.parents:
        raise LinmuError(f"--save-teacher {teacher_out} and OUT {out} overlap; give the teacher its own "
                         "directory (e.g. --save-teacher teacher/ beside out/)")  # fmt: skip
