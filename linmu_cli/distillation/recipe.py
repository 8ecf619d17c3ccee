"""Distillation recipes: a pydantic schema loaded from YAML, with torchtune-style `key.sub=value` overrides.

Every key is checked against the schema (`extra="forbid"`): an unknown or mistyped key is an error naming the
closest valid one, and values are typed strictly (`true` is not an int, `1.5` is not a step count, NaN is not a
learning rate), so a typo never silently falls back to a default. Each error is one line naming the key's full
path, e.g. `recipe.stages.stage1.lr: expected float, got 'fast'`. The `model` section is a `MateConfig`, checked
by MateConfig itself.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PlainValidator,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from linmu_cli.config import MateConfig, MateTypeError
from linmu_cli.errors import LinmuError
from linmu_cli.overrides import load_yaml, parse_overrides, set_dotted

STAGES = ("stage1", "stage2", "stage3")
GROUPS = ("flex", "swin", "fusion", "lora")

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


# --------------------------------------------------------------------------- errors


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"


def _fail(after: str, before: str = "") -> PydanticCustomError:
    """A recipe error worded around the key's path, which pydantic knows and the validator does not: the
    message reads `{before}recipe.a.b{after}`, e.g. after='=0.0: must be > 0'."""
    return PydanticCustomError("linmu", "{before}<path>{after}", {"before": before, "after": after})


_EXPECTED = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
             "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
             "finite_number": "a finite number"}  # fmt: skip


def _path(loc: tuple[int | str, ...]) -> str:
    """pydantic's loc as a recipe key: ('stages', 'stage1', 'train', 0) -> recipe.stages.stage1.train[0];
    the tags of a union's members (`<list>`) are left out."""
    where = "recipe"
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif not part.startswith("<"):
            where += f".{part}"
    return where


def _message(error: ErrorDetails) -> str:
    """One pydantic error as one line in the recipe's own words."""
    where, kind, ctx = _path(error["loc"]), error["type"], error.get("ctx") or {}
    if kind == "linmu":
        return f"{ctx['before']}{where}{ctx['after']}"
    if kind == "literal_error":
        return f"{where}={error['input']!r}: choose {ctx['expected']}"
    if kind == "extra_forbidden":  # not reached: _Section names the key first, with a suggestion
        return f"unknown key {where}"
    if kind in _EXPECTED:
        return f"{where}: expected {_EXPECTED[kind]}, got {error['input']!r}"
    return f"{where}: {error['msg']}"


# --------------------------------------------------------------------------- value checks


def _at_least(low: float, strict: bool = False) -> AfterValidator:
    """`key=value: must be >= low` (`> low` when strict)."""

    def check(value: float) -> float:
        if value < low or (strict and value == low):
            raise _fail(f"={value!r}: must be {'>' if strict else '>='} {low:g}")
        return value

    return AfterValidator(check)


def _non_empty(why: str) -> AfterValidator:
    def check(value: list) -> list:
        if not value:
            raise _fail(f": {why}")
        return value

    return AfterValidator(check)


def _check_frames(value: int | list[int]) -> int | list[int]:
    counts = value if isinstance(value, list) else [value]
    if not counts or min(counts) < 2:
        raise _fail(f"={value!r}: need at least 2 frames per video (an int or a list)")
    return value


def _check_groups(groups: list[str]) -> list[str]:
    for group in groups:
        if group not in GROUPS:
            raise _fail(f": unknown group {group!r}{_suggest(group, list(GROUPS))}")
    return groups


def _check_dropout(value: float) -> float:
    if not 0 <= value < 1:
        raise _fail(f"={value!r}: must be in [0, 1)")
    return value


def _check_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise _fail(f"={device!r}: choose auto, cpu or cuda")
    return device


def _mate(value: Any) -> MateConfig:
    """The model section, checked by MateConfig itself (types, then values) and worded like the other keys."""
    if isinstance(value, MateConfig):
        value = dataclasses.asdict(value)  # every field, the runtime kernel choice too
    if not isinstance(value, dict):
        raise _fail(f": expected a mapping, got {value!r}")
    names = [f.name for f in dataclasses.fields(MateConfig)]
    for key in value:
        if key not in names:
            raise _fail(f".{key}{_suggest(str(key), names)}", before="unknown key ")
    try:
        return MateConfig.from_dict(value)
    except MateTypeError as exc:
        ann, given = exc.annotation.removesuffix(" | None"), exc.value
        what = "a list" if ann.startswith("list[") and not isinstance(given, (list, tuple)) else ann
        what = "a finite number" if exc.takes == "a finite number" else what
        raise _fail(f".{exc.name}: expected {what}, got {given!r}") from None
    except LinmuError as exc:
        raise _fail(f": {exc}") from None


Count = Annotated[int, _at_least(1)]
NonNegativeInt = Annotated[int, _at_least(0)]
NonNegative = Annotated[float, _at_least(0)]
Positive = Annotated[float, _at_least(0, strict=True)]
# An int or a list of ints, told apart by the value's type so an error names the member that was meant.
Frames = Annotated[
    Annotated[int, Tag("<int>")] | Annotated[list[int], Tag("<list>")],
    Discriminator(lambda v: "<list>" if isinstance(v, list) else "<int>"),
    AfterValidator(_check_frames),
]
# true / false or a policy name (linmu_cli.distillation.recompute says what each one recomputes)
CHECKPOINT_POLICIES = ("all", "every_other", "mlp_only", "none")


def policy_of(setting: bool | str) -> str:
    """A `gradient_checkpointing` value (a bool or a policy name) as a policy name: true is "all", false "none"."""
    if setting is True:
        return "all"
    if setting is False:
        return "none"
    if setting not in CHECKPOINT_POLICIES:
        raise ValueError(
            f"unknown gradient checkpointing policy {setting!r}; choose {', '.join(CHECKPOINT_POLICIES)}"
        )
    return setting


def _check_checkpointing(value: Any) -> bool | str:
    if isinstance(value, bool) or (isinstance(value, str) and value in CHECKPOINT_POLICIES):
        return value
    raise _fail(f"={value!r}: choose true, false, {', '.join(map(repr, CHECKPOINT_POLICIES))}")


Checkpointing = Annotated[bool | str, PlainValidator(_check_checkpointing)]
# Recorded like a checkpoint records it: without the runtime kernel choice (config.RUNTIME_FIELDS), which a
# resume may change.
Mate = Annotated[MateConfig, PlainValidator(_mate), PlainSerializer(MateConfig.to_dict)]


# --------------------------------------------------------------------------- schema


class _Section(BaseModel):
    """A recipe section: strict types (YAML `yes` or 1 is no bool, 1.5 no int), finite floats, known keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """An unknown key names the closest valid one (pydantic's extra="forbid" would only refuse it)."""
        if isinstance(data, dict):
            names = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    raise _fail(f".{key}{_suggest(str(key), names)}", before="unknown key ")
        return data


class DataConfig(_Section):
    """What the student learns from (`data:`)."""

    # "synthetic" (built-in, generated from the seed) | "manifest" (LLaVA JSON/JSONL)
    source: Literal["synthetic", "manifest"] = "synthetic"
    manifest: str | None = None  # path of the JSON / JSONL manifest
    media_root: str | None = None  # image / video paths in the manifest are relative to this
    tasks: list[str] = Field(
        default_factory=lambda: ["image_color", "video_count", "video_order", "video_when"]
    )
    frames: Frames = 16  # frames sampled uniformly per video; a list: one drawn per sample (seeded)
    # cap on sampled frames per second of video (None: no cap)
    fps: Annotated[float, _at_least(0, strict=True)] | None = None
    size: Annotated[int, _at_least(28)] = 56  # synthetic frame / image side in pixels
    # per image / frame, passed to the processor
    max_pixels: Annotated[int, _at_least(28 * 28)] | None = None
    max_tokens: Count = 8192  # longer samples are skipped
    heldout: Count = 4  # held-out samples for the fidelity report (it averages over them)
    on_error: Literal["skip", "raise"] = "skip"  # "skip" bad samples (counted, reported) | "raise"
    allow_outside_root: bool = False  # accept absolute media paths and `..` paths that leave media_root

    @model_validator(mode="after")
    def _source_has_data(self) -> DataConfig:
        if self.source == "manifest" and not self.manifest:
            raise _fail(".manifest: required when data.source is 'manifest'")
        if self.source == "synthetic" and not self.tasks:
            raise _fail(".tasks: name at least one synthetic task")
        return self


class LossConfig(_Section):
    """A stage's objective (`stages.<stage>.loss:`): weighted terms, at least one of hidden / kl / ce on."""

    hidden: NonNegative = 1.0  # per-layer relative hidden-state regression
    kl: NonNegative = 0.0  # token-level KL(teacher || student) on logits
    temperature: Positive = 2.0
    ce: NonNegative = 0.0  # optional next-token cross-entropy on text tokens
    # weight of vision-token errors relative to text tokens (HEED: OCR regresses first)
    vision_weight: NonNegative = 1.0
    # end to end only: the decoder layers whose hidden states are regressed (None: every layer). A subset is
    # a different loss (not the default); the teacher then keeps only those layers' outputs.
    hidden_layers: list[NonNegativeInt] | None = None

    @model_validator(mode="after")
    def _learns_something(self) -> LossConfig:
        if not (self.hidden or self.kl or self.ce):
            raise _fail(": hidden, kl and ce are all 0, so nothing would be learned")
        return self


class LoraSettings(_Section):
    """LoRA on the decoder MLPs (`stages.stage3.lora:`), merged into the weights of final/."""

    rank: Count = 16
    alpha: Positive = 32.0
    dropout: Annotated[float, AfterValidator(_check_dropout)] = 0.0
    target_modules: Annotated[list[str], _non_empty("name at least one module")] = Field(
        default_factory=lambda: ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    )


class StageConfig(_Section):
    """One stage (`stages.<stage>:`), over its STAGE_DEFAULTS."""

    steps: Count = 100
    lr: Positive = 1e-3
    schedule: Literal["constant", "linear", "cosine"] = "cosine"  # cosine: decay to 10% after warmup
    warmup_steps: NonNegativeInt = 0
    weight_decay: NonNegative = 0.0
    batch_size: Count = 1
    grad_accum: Count = 1
    max_grad_norm: Positive = 1.0
    # parameter groups that learn
    train: Annotated[list[str], AfterValidator(_check_groups)] = Field(
        default_factory=lambda: ["flex", "fusion"]
    )
    mode: Literal["layerwise", "end_to_end"] = "layerwise"  # layerwise: teacher-forced per layer
    loss: LossConfig = Field(default_factory=LossConfig)
    lora: LoraSettings | None = None
    save_every: Count = 50  # step checkpoints (atomic) every N optimizer steps
    log_every: Count = 1
    # recompute activations in backward: true = "all" layers, false = "none", or "every_other" (layers 0, 2,
    # ...) / "mlp_only" (each layer's MLP); the loss does not depend on it, memory and time do (recompute.py)
    gradient_checkpointing: Checkpointing = False
    # AdamW implementation: "auto" (torch's default: foreach on CUDA, a per-tensor loop on CPU), "foreach",
    # "fused" (one kernel; rounds differently in the last bits), "for_loop"
    optimizer: Literal["auto", "foreach", "fused", "for_loop"] = "auto"
    # batches prepared ahead in a background thread while the step computes (0: none); exact either way
    prefetch: Annotated[int, _at_least(0)] = 0
    # end to end: the student starts from the teacher's input embeddings (vision features in place) instead of
    # running the frozen, shared vision tower again; equal in float32, bf16 autocast rounding apart on GPU
    share_teacher_embeddings: bool = False
    init_from: str | None = None  # start from this checkpoint instead of the previous stage's output

    @model_validator(mode="after")
    def _coherent(self) -> StageConfig:
        if ("lora" in self.train) != (self.lora is not None):
            raise _fail(": 'lora' in train needs a lora section (and a lora section needs 'lora' in train)")
        if self.mode == "layerwise" and (self.loss.kl or self.loss.ce or "lora" in self.train):
            raise _fail(
                ": layerwise stages regress hidden states only (no kl / ce / lora); use mode: end_to_end"
            )
        if self.mode == "layerwise" and self.share_teacher_embeddings:
            raise _fail(".share_teacher_embeddings: layerwise stages always start from the teacher's states")
        if self.mode == "layerwise" and self.loss.hidden_layers is not None:
            raise _fail(".loss.hidden_layers: layerwise stages train every layer on its own; end_to_end only")
        return self

    @property
    def checkpoint_policy(self) -> str:
        """`gradient_checkpointing` as a policy name (true: "all", false: "none")."""
        return policy_of(self.gradient_checkpointing)


class DistributedConfig(_Section):
    """Multi-process runs (`distributed:`)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # used when launched with several processes


class Recipe(_Section):
    """A whole distillation run: teacher, output, data, the student's M-MATE fields (`model`) and three stages."""

    teacher: str = "tiny-qwen2-vl"
    output: str = "runs/linmu"
    seed: NonNegativeInt = 0
    # "auto" (cuda when available) | "cpu" | "cuda" | "cuda:N"
    device: Annotated[str, AfterValidator(_check_device)] = "auto"
    # "auto": bfloat16 on cuda, float32 on cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: Mate = Field(default_factory=MateConfig)  # M-MATE fields (see `linmu convert --help`)
    # every stage, its STAGE_DEFAULTS under what the recipe gives
    stages: dict[str, StageConfig] = Field(default_factory=dict, validate_default=True)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("stages", mode="before")
    @classmethod
    def _all_stages(cls, stages: Any) -> Any:
        """All three stages, each its defaults deep-merged with what the recipe says about it."""
        stages = stages or {}
        if not isinstance(stages, dict):
            raise _fail(": expected a mapping stage1 / stage2 / stage3")
        for name in stages:
            if name not in STAGES:
                raise _fail(f".{name}{_suggest(str(name), list(STAGES))}", before="unknown key ")
        merged = {}
        for name in STAGES:
            given = stages.get(name) or {}
            merged[name] = _deep_merge(STAGE_DEFAULTS[name], given) if isinstance(given, dict) else given
        return merged

    @property
    def mate(self) -> MateConfig:
        """The model section (kept under this name for the trainer and evals/study.py)."""
        return self.model

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what recipe.yaml and the step checkpoints record)."""
        return self.model_dump()


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


# --------------------------------------------------------------------------- loading


def build_recipe(raw: dict[str, Any]) -> Recipe:
    """A Recipe from plain data (a parsed YAML file with its overrides); the first problem is a LinmuError."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise LinmuError(_message(exc.errors(include_url=False)[0])) from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from the defaults when `path` is None) and apply overrides."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LinmuError(f"recipe {path} not found")
        try:
            raw = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise LinmuError(f"recipe {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise LinmuError(f"recipe {path}: the top level must be a mapping")
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(raw, key, value)
    return build_recipe(raw)


def dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
