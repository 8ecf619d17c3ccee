"""The two models the bench compares: a teacher and its LinMU conversion, sharing one copy of the weights.

`--arch` builds the published architecture with random weights (`linmu_cli.archs`), `--model DIR` loads a
source checkpoint (converted in memory) or a LinMU checkpoint (its teacher rebuilt from the shared tensors).
Also the small model facts the measurements need: cache keyword, next M-RoPE positions, weight bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from linmu_cli.errors import LinmuError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass
class BuiltModels:
    """The teacher, the LinMU student sharing its weights, and where they came from (for the report)."""

    teacher: nn.Module
    student: nn.Module
    source: str

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as (teacher, student, source)."""
        return iter((self.teacher, self.student, self.source))


def cache_kw(model: nn.Module) -> str:
    """The keyword this model's forward takes its cache under (`past_key_values` or `cache`)."""
    from linmu_cli.models.modeling_linmu import _cache_arg

    cls = model.family.model_class if hasattr(model, "family") else type(model)
    return _cache_arg(cls)


def cache_of(out: Any) -> Any:
    """The cache a forward returned: LinMU's `cache`, else transformers' `past_key_values`."""
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def next_positions(model: nn.Module, prompt_len: int, batch: int, device: torch.device) -> torch.Tensor:
    """(3, batch, 1) M-RoPE position of the first generated token: prompt length + the prompt's rope delta."""
    pos = torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)
    delta = getattr(getattr(model, "model", None), "rope_deltas", None)
    if isinstance(delta, torch.Tensor):
        pos = pos + delta.to(device=device, dtype=torch.long).reshape(-1, 1)[:1]
    return pos.view(1, batch, 1).expand(3, batch, 1).contiguous()


def text_model(model: nn.Module) -> nn.Module:
    """The language model of a teacher (transformers layout) or a LinMU model (through its family)."""
    return model.family.text_model(model) if hasattr(model, "family") else model.model.language_model


def model_bytes(model: nn.Module, skip: set[int] | None = None) -> int:
    """Bytes of a module's distinct parameters and buffers, leaving out the storages in `skip` (shared ones)."""
    seen = set(skip or ())
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _share(dst: nn.Module, name: str, tensor: torch.Tensor) -> None:
    from linmu_cli.models.modeling_linmu import _set_tensor

    _set_tensor(dst, name, tensor)


def teacher_from_student(student: nn.Module) -> nn.Module:
    """The source-family model a LinMU checkpoint came from, sharing every tensor with it: non-attention
    weights as they are, attention weights from Local-Swin's copies (Flex-MA's when Local-Swin is off)."""
    family = student.family
    data = student.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "mate"):
        data.pop(key, None)
    config = family.config_class(**data)
    with torch.device("meta"):
        teacher = family.model_class._from_config(config, attn_implementation="sdpa")
    for name, tensor in [*student.named_parameters(remove_duplicate=False),
                         *student.named_buffers(remove_duplicate=False)]:  # fmt: skip
        if ".self_attn." not in name:
            _share(teacher, name, tensor)
    for s_layer, t_layer in zip(family.decoder_layers(student), family.decoder_layers(teacher), strict=True):
        src = s_layer.self_attn.swin if hasattr(s_layer.self_attn, "swin") else s_layer.self_attn.flex
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for attr in ("weight", "bias"):
                t = getattr(getattr(src, proj), attr, None)
                if t is not None and getattr(getattr(t_layer.self_attn, proj), attr, None) is not None:
                    getattr(t_layer.self_attn, proj)._parameters[attr] = t
    leftover = [n for n, t in [*teacher.named_parameters(), *teacher.named_buffers()] if t.is_meta]
    if leftover:
        raise LinmuError(
            f"cannot rebuild the teacher of this LinMU checkpoint: {leftover[:3]} have no source"
        )
    return teacher.eval()


def prefill_backend(device: torch.device, requested: str | None) -> str:
    """Inference needs no backward: on CUDA prefer fla's forward (2.5x mamba-ssm's at 64k tokens, docs/design.md §9)."""
    if requested:
        return requested
    if device.type == "cuda":
        from linmu_cli.ops.ssd import _backend_import_error

        if _backend_import_error("fla") is None:
            return "fla"
    return "auto"


def build_models(model: str | None, arch: str | None, dtype: torch.dtype, device: torch.device,
                 mate_fields: dict[str, Any]) -> BuiltModels:  # fmt: skip
    """The teacher and the LinMU student sharing its weights (a source converted in memory, or a LinMU
    checkpoint with its teacher rebuilt from the shared tensors), and where they came from."""
    from linmu_cli.config import MateConfig
    from linmu_cli.models import convert_model

    if arch is not None:
        from linmu_cli.archs import build_random_model

        teacher = build_random_model(arch, dtype, device)
        source = f"--arch {arch} (random weights)"
    else:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise LinmuError(
                f"--model {model}: no config.json there; pass a checkpoint directory or use --arch"
            )
        from linmu_cli.loading import load_model

        loaded = load_model(path, dtype=dtype, device=device)
        if loaded.is_linmu:
            if mate_fields:
                raise LinmuError("--set / --ssd-backend change a conversion; --model is already converted "
                                 "(its M-MATE fields are in its config.json)")  # fmt: skip
            from linmu_cli.layers.mate import set_ssd_backend

            student = loaded.model
            set_ssd_backend(student, prefill_backend(device, None))  # a runtime setting: not in config.json
            return BuiltModels(teacher_from_student(student), student, f"--model {path} (LinMU checkpoint)")
        teacher = loaded.model
        source = f"--model {path}"
    fields = dict(mate_fields)
    fields["ssd_backend"] = prefill_backend(device, fields.get("ssd_backend"))
    mate = MateConfig.from_dict(fields)
    with torch.device(device):  # new M-MATE parameters are created where they run
        student = convert_model(teacher, mate)
    return BuiltModels(teacher, student, source)


def config_and_weights(
    model: str | None, arch: str | None, dtype: torch.dtype
) -> tuple[PretrainedConfig, int]:
    """The model config and its weight bytes in `dtype`, without building it (meta device): what the memory
    check needs before anything big is allocated."""
    from linmu_cli.archs import TINY_ARCHS, build_random_model

    if arch is not None:
        if arch in TINY_ARCHS:
            tiny = build_random_model(arch, dtype, "cpu")
            return tiny.config, model_bytes(tiny)
        meta = build_random_model(arch, dtype, "meta")
        size = torch.tensor([], dtype=dtype).element_size()
        return meta.config, sum(p.numel() for p in meta.parameters()) * size
    from transformers import AutoConfig

    import linmu_cli.models  # noqa: F401  (registers the LinMU config classes)

    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise LinmuError(f"--model {model}: no config.json there; pass a checkpoint directory or use --arch")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as exc:
        raise LinmuError(
            f"--model {model}: cannot read its config.json ({type(exc).__name__}: {exc})"
        ) from None
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return config, weights


__all__ = ["BuiltModels", "build_models", "cache_kw", "cache_of", "config_and_weights", "model_bytes",
           "next_positions", "prefill_backend", "teacher_from_student", "text_model"]  # fmt: skip
