"""Distillation recipes: typed dataclasses loaded from YAML, with torchtune-style `key.sub=value` overrides.

Every key is checked against the schema: an unknown or mistyped key is an error naming the closest valid one,
and each value is type-checked, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from linmu_cli.config import MateConfig
from linmu_cli.errors import LinmuError

STAGES = ("stage1", "stage2", "stage3")
GROUPS = ("flex", "swin", "fusion", "lora")


@dataclass
class DataConfig:
    source: str = (
        "synthetic"  # "synthetic" (built-in, generated from the seed) | "manifest" (LLaVA JSON/JSONL)
    )
    manifest: str | None = None  # path of the JSON / JSONL manifest
    media_root: str | None = None  # image / video paths in the manifest are relative to this
    tasks: list[str] = field(
        default_factory=lambda: ["image_color", "video_count", "video_order", "video_when"]
    )
    frames: int | list[int] = 16  # frames sampled uniformly per video; a list: one drawn per sample (seeded)
    fps: float | None = None  # cap on sampled frames per second of video (None: no cap)
    size: int = 56  # synthetic frame / image side in pixels
    max_pixels: int | None = None  # per image / frame, passed to the processor
    max_tokens: int = 8192  # longer samples are skipped
    heldout: int = 4  # held-out samples for the fidelity report
    on_error: str = "skip"  # "skip" bad samples (counted, reported) | "raise"
    allow_outside_root: bool = False  # accept absolute media paths and `..` paths that leave media_root


@dataclass
class LossConfig:
    hidden: float = 1.0  # per-layer relative hidden-state regression
    kl: float = 0.0  # token-level KL(teacher || student) on logits
    temperature: float = 2.0
    ce: float = 0.0  # optional next-token cross-entropy on text tokens
    vision_weight: float = (
        1.0  # weight of vision-token errors relative to text tokens (HEED: OCR regresses first)
    )


@dataclass
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    )


@dataclass
class StageConfig:
    steps: int = 100
    lr: float = 1e-3
    schedule: str = "cosine"  # "constant" | "linear" | "cosine" (decay to 10% after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    train: list[str] = field(default_factory=lambda: ["flex", "fusion"])  # parameter groups that learn
    mode: str = "layerwise"  # "layerwise" (teacher-forced per layer) | "end_to_end"
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSettings | None = None
    save_every: int = 50  # step checkpoints (atomic) every N optimizer steps
    log_every: int = 1
    gradient_checkpointing: bool = False
    init_from: str | None = None  # start from this checkpoint instead of the previous stage's output


@dataclass
class DistributedConfig:
    strategy: str = "ddp"  # "ddp" | "fsdp" (used when launched with several processes)


@dataclass
class Recipe:
    teacher: str = "tiny-qwen2-vl"
    output: str = "runs/linmu"
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda"
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # M-MATE fields (see `linmu convert --help`)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def mate(self) -> MateConfig:  # the model section is type-checked by _check_model on load
        return MateConfig.from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "stage1": {"train": ["flex", "fusion"], "mode": "layerwise"},
    "stage2": {"train": ["flex", "swin", "fusion"], "mode": "layerwise"},
    "stage3": {
        "train": ["flex", "swin", "fusion", "lora"],
        "mode": "end_to_end",
        "loss": {"kl": 1.0},
        "lora": {},
    },  # fmt: skip
}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses; ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except LinmuError as exc:
                errors.append(str(exc))
        raise LinmuError(errors[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LinmuError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise LinmuError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise LinmuError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise LinmuError(f"{where}: expected a finite number, got {value!r}")
    if tp is Any or (
        isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        return value
    raise LinmuError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build(cls, data: dict[str, Any], where: str = "recipe"):
    """Instantiate dataclass `cls` from `data`, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise LinmuError(f"unknown key {where}.{key}{_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` (value parsed as YAML) in the raw recipe dict."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise LinmuError(f"override {item!r}: expected key.sub=value, e.g. stages.stage1.steps=50")
    value = yaml.safe_load(text) if text.strip() else None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LinmuError(f"override {item!r}: {part!r} is not a mapping")
    node[parts[-1]] = value


def _check_model(model: dict[str, Any]) -> dict[str, Any]:
    """Type-check the M-MATE fields like every other key (`text_window: true` is not an int, `vision_window: 5`
    is not a list), naming the closest field for a typo, then let MateConfig check the values."""
    hints = typing.get_type_hints(MateConfig)
    names = [f.name for f in dataclasses.fields(MateConfig)]
    checked = {}
    for key, value in model.items():
        if key not in names:
            raise LinmuError(f"unknown key recipe.model.{key}{_suggest(key, names)}")
        checked[key] = _coerce(value, hints[key], f"recipe.model.{key}")
    try:
        MateConfig.from_dict(checked)
    except LinmuError as exc:
        raise LinmuError(f"recipe.model: {exc}") from None
    return checked


def _at_least(where: str, value: float, low: float, strict: bool = False) -> None:
    if value < low or (strict and value == low):
        raise LinmuError(f"{where}={value!r}: must be {'>' if strict else '>='} {low:g}")


def _validate(recipe: Recipe) -> Recipe:
    recipe.model = _check_model(recipe.model)
    _at_least("recipe.seed", recipe.seed, 0)
    d = recipe.data
    if d.source not in ("synthetic", "manifest"):
        raise LinmuError(f"recipe.data.source={d.source!r}: choose 'synthetic' or 'manifest'")
    if d.source == "manifest" and not d.manifest:
        raise LinmuError("recipe.data.manifest: required when data.source is 'manifest'")
    if d.on_error not in ("skip", "raise"):
        raise LinmuError(f"recipe.data.on_error={d.on_error!r}: choose 'skip' or 'raise'")
    counts = d.frames if isinstance(d.frames, list) else [d.frames]
    if not counts or min(counts) < 2:
        raise LinmuError(
            f"recipe.data.frames={d.frames!r}: need at least 2 frames per video (an int or a list)"
        )
    if not d.tasks and d.source == "synthetic":
        raise LinmuError("recipe.data.tasks: name at least one synthetic task")
    _at_least("recipe.data.heldout", d.heldout, 1)  # the fidelity report averages over held-out samples
    _at_least("recipe.data.size", d.size, 28)
    _at_least("recipe.data.max_tokens", d.max_tokens, 1)
    if d.max_pixels is not None:
        _at_least("recipe.data.max_pixels", d.max_pixels, 28 * 28)
    if d.fps is not None:
        _at_least("recipe.data.fps", d.fps, 0, strict=True)
    if recipe.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise LinmuError(f"recipe.dtype={recipe.dtype!r}: choose auto, float32, bfloat16 or float16")
    if recipe.device not in ("auto", "cpu", "cuda") and not recipe.device.startswith("cuda:"):
        raise LinmuError(f"recipe.device={recipe.device!r}: choose auto, cpu or cuda")
    if recipe.distributed.strategy not in ("ddp", "fsdp"):
        raise LinmuError(f"recipe.distributed.strategy={recipe.distributed.strategy!r}: choose ddp or fsdp")
    for name, st in recipe.stages.items():
        where = f"recipe.stages.{name}"
        for group in st.train:
            if group not in GROUPS:
                raise LinmuError(f"{where}.train: unknown group {group!r}{_suggest(group, list(GROUPS))}")
        if ("lora" in st.train) != (st.lora is not None):
            raise LinmuError(
                f"{where}: 'lora' in train needs a lora section (and a lora section needs 'lora' in train)"
            )
        if st.mode not in ("layerwise", "end_to_end"):
            raise LinmuError(f"{where}.mode={st.mode!r}: choose 'layerwise' or 'end_to_end'")
        if st.mode == "layerwise" and (st.loss.kl or st.loss.ce or "lora" in st.train):
            raise LinmuError(f"{where}: layerwise stages regress hidden states only (no kl / ce / lora); "
                             "use mode: end_to_end")  # fmt: skip
        if st.schedule not in ("constant", "linear", "cosine"):
            raise LinmuError(f"{where}.schedule={st.schedule!r}: choose constant, linear or cosine")
        for key in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(st, key) < 1:
                raise LinmuError(f"{where}.{key}: must be >= 1")
        _at_least(f"{where}.lr", st.lr, 0, strict=True)
        _at_least(f"{where}.warmup_steps", st.warmup_steps, 0)
        _at_least(f"{where}.weight_decay", st.weight_decay, 0)
        _at_least(f"{where}.max_grad_norm", st.max_grad_norm, 0, strict=True)
        for key in ("hidden", "kl", "ce", "vision_weight"):
            _at_least(f"{where}.loss.{key}", getattr(st.loss, key), 0)
        _at_least(f"{where}.loss.temperature", st.loss.temperature, 0, strict=True)
        if not (st.loss.hidden or st.loss.kl or st.loss.ce):
            raise LinmuError(f"{where}.loss: hidden, kl and ce are all 0, so nothing would be learned")
        if st.lora is not None:
            _at_least(f"{where}.lora.rank", st.lora.rank, 1)
            _at_least(f"{where}.lora.alpha", st.lora.alpha, 0, strict=True)
            if not 0 <= st.lora.dropout < 1:
                raise LinmuError(f"{where}.lora.dropout={st.lora.dropout!r}: must be in [0, 1)")
            if not st.lora.target_modules:
                raise LinmuError(f"{where}.lora.target_modules: name at least one module")
    return recipe


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from the defaults when `path` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LinmuError(f"recipe {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LinmuError(f"recipe {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise LinmuError(f"recipe {path}: the top level must be a mapping")
    for item in overrides or []:
        apply_override(raw, item)
    stages_raw = raw.get("stages") or {}
    if not isinstance(stages_raw, dict):
        raise LinmuError("recipe.stages: expected a mapping stage1 / stage2 / stage3")
    for name in stages_raw:
        if name not in STAGES:
            raise LinmuError(f"unknown key recipe.stages.{name}{_suggest(name, list(STAGES))}")
    raw["stages"] = {}
    recipe = build(Recipe, raw)
    recipe.stages = {
        name: build(
            StageConfig,
            _deep_merge(STAGE_DEFAULTS[name], stages_raw.get(name) or {}),
            f"recipe.stages.{name}",
        )
        for name in STAGES
    }
    return _validate(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
