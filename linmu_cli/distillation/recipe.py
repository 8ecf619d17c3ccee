"""Distillation recipes: a typed schema loaded from YAML, with torchtune-style `key.sub=value` overrides.

Every key is checked against the schema: an unknown or mistyped key is an error naming the closest valid one, and
values are typed strictly (`true` is not an int, `1.5` is not a step count, NaN is not a learning rate), so a typo
never silently falls back to a default. Each error is one line naming the key's full path, e.g.
`recipe.stages.stage1.lr: expected float, got 'fast'`. The `model` section is a `MateConfig`, checked by
MateConfig itself.

The schema is plain dataclasses with one checker per field (`_Int`, `_Float`, `_Choice`, ...), no validation
library: the recipe loads wherever torch and PyYAML do (the GPU machine's image has no pydantic).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import KW_ONLY, InitVar, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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


def _fail(path: str, after: str, before: str = "") -> LinmuError:
    """One recipe error, worded around the key's path: `{before}recipe.a.b{after}`."""
    return LinmuError(f"{before}{path}{after}")


def _expected(path: str, what: str, value: Any) -> LinmuError:
    return _fail(path, f": expected {what}, got {value!r}")


# --------------------------------------------------------------------------- value checks
# A check takes (value, path) and returns the value to store (ints become floats where a float is meant) or
# raises one LinmuError naming the path.

Check = Callable[[Any, str], Any]


def _int(low: int | None = None) -> Check:
    def check(value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _expected(path, "int", value)
        if low is not None and value < low:
            raise _fail(path, f"={value!r}: must be >= {low:g}")
        return value

    return check


def _float(low: float | None = None, strict: bool = False) -> Check:
    """A finite number stored as float; `>= low` (`> low` when strict)."""

    def check(value: Any, path: str) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _expected(path, "float", value)
        if not math.isfinite(value):
            raise _expected(path, "a finite number", value)
        value = float(value)
        if low is not None and (value < low or (strict and value == low)):
            raise _fail(path, f"={value!r}: must be {'>' if strict else '>='} {low:g}")
        return value

    return check


def _of_type(kind: type, name: str) -> Check:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, kind):
            raise _expected(path, name, value)
        return value

    return check


_str, _bool = _of_type(str, "str"), _of_type(bool, "bool")


def _choice(*options: str) -> Check:
    """One of `options`, told as `choose 'a', 'b' or 'c'`."""
    told = (
        ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}" if len(options) > 1 else repr(options[0])
    )

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in options:
            raise _fail(path, f"={value!r}: choose {told}")
        return value

    return check


def _optional(inner: Check) -> Check:
    return lambda value, path: None if value is None else inner(value, path)


def _list(inner: Check, non_empty: str | None = None) -> Check:
    """A list whose items pass `inner` (an error names the item: `path[1]`); `non_empty`: why it may not be []."""

    def check(value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise _expected(path, "a list", value)
        items = [inner(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if non_empty and not items:
            raise _fail(path, f": {non_empty}")
        return items

    return check


def _then(first: Check, after: Callable[[Any, str], None]) -> Check:
    """`first`, then a check of the whole value."""

    def check(value: Any, path: str) -> Any:
        value = first(value, path)
        after(value, path)
        return value

    return check


def _frames(value: Any, path: str) -> int | list[int]:
    """An int or a list of ints, told apart by the value's type so an error names the member that was meant."""
    value = _list(_int())(value, path) if isinstance(value, list) else _int()(value, path)
    counts = value if isinstance(value, list) else [value]
    if not counts or min(counts) < 2:
        raise _fail(path, f"={value!r}: need at least 2 frames per video (an int or a list)")
    return value


def _groups(groups: list[str], path: str) -> None:
    for group in groups:
        if group not in GROUPS:
            raise _fail(path, f": unknown group {group!r}{_suggest(group, list(GROUPS))}")


def _dropout(value: float, path: str) -> None:
    if not 0 <= value < 1:
        raise _fail(path, f"={value!r}: must be in [0, 1)")


def _device(device: str, path: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise _fail(path, f"={device!r}: choose auto, cpu or cuda")


VISION_COMPILE = ("auto", "on", "off")
# linmu_cli.ops.logit_kl.BACKENDS, not imported here: the recipe loads without the ops (a test keeps them equal)
KL_BACKENDS = ("auto", "torch", "triton")


def _vision_compile(value: Any, path: str) -> str:
    """auto / on / off; YAML 1.1 reads a bare `on` / `off` as true / false, so those mean on / off too."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _choice(*VISION_COMPILE)(value, path)


def _mate(value: Any, path: str) -> MateConfig:
    """The model section, checked by MateConfig itself (types, then values) and worded like the other keys."""
    if isinstance(value, MateConfig):
        value = dataclasses.asdict(value)  # every field, the runtime kernel choice too
    if not isinstance(value, dict):
        raise _expected(path, "a mapping", value)
    names = [f.name for f in dataclasses.fields(MateConfig)]
    for key in value:
        if key not in names:
            raise _fail(path, f".{key}{_suggest(str(key), names)}", before="unknown key ")
    try:
        return MateConfig.from_dict(value)
    except MateTypeError as exc:
        ann, given = exc.annotation.removesuffix(" | None"), exc.value
        what = "a list" if ann.startswith("list[") and not isinstance(given, (list, tuple)) else ann
        what = "a finite number" if exc.takes == "a finite number" else what
        raise _fail(path, f".{exc.name}: expected {what}, got {given!r}") from None
    except LinmuError as exc:
        raise _fail(path, f": {exc}") from None


# true / false or a policy name (linmu_cli.distillation.recompute says what each one recomputes)
CHECKPOINT_POLICIES = ("all", "every_other", "mlp_only", "none", "per_layer")


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


def _checkpointing(value: Any, path: str) -> bool | str:
    if isinstance(value, bool) or (isinstance(value, str) and value in CHECKPOINT_POLICIES):
        return value
    raise _fail(path, f"={value!r}: choose true, false, {', '.join(map(repr, CHECKPOINT_POLICIES))}")


def _section(cls: type[_Section]) -> Check:
    """A nested section from a mapping (or an instance of it)."""

    def check(value: Any, path: str) -> _Section:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise _expected(path, "a mapping", value)
        return cls.build(value, path)

    return check


def _key(check: Check, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A schema field: its check, and its default (a value, or `factory()` for mutable ones)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


# --------------------------------------------------------------------------- schema


@dataclass
class _Section:
    """A recipe section: strict types (YAML `yes` or 1 is no bool, 1.5 no int), finite floats, known keys.

    Built from a mapping with `build(data, path)` (unknown keys name the closest valid one) or directly with
    keywords; either way every field passes its check, then `_coherent` checks the section as a whole.
    """

    where: ClassVar[str] = "recipe"  # the path errors name when a section is built directly
    _: KW_ONLY
    path: InitVar[str | None] = None  # where `build` found the section (its errors name it)

    def __post_init__(self, path: str | None) -> None:
        path = path or self.where
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.metadata["check"](getattr(self, f.name), f"{path}.{f.name}"))
        self._coherent(path)

    def _coherent(self, path: str) -> None:
        """Checks across fields (none by default)."""

    @classmethod
    def build(cls, data: dict[str, Any], path: str = "recipe") -> _Section:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise _fail(path, f".{key}{_suggest(str(key), names)}", before="unknown key ")
        return cls(**data, path=path)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what recipe.yaml and the step checkpoints record)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, MateConfig):  # recorded like a checkpoint records it: no runtime kernel choice
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass
class DataConfig(_Section):
    """What the student learns from (`data:`)."""

    where: ClassVar[str] = "recipe.data"
    # "synthetic" (built-in, generated from the seed) | "manifest" (LLaVA JSON/JSONL)
    source: str = _key(_choice("synthetic", "manifest"), "synthetic")
    manifest: str | None = _key(_optional(_str), None)  # path of the JSON / JSONL manifest
    # image / video paths in the manifest are relative to this
    media_root: str | None = _key(_optional(_str), None)
    tasks: list[str] = _key(
        _list(_str), factory=lambda: ["image_color", "video_count", "video_order", "video_when"]
    )
    # frames sampled uniformly per video; a list: one drawn per sample (seeded)
    frames: int | list[int] = _key(_frames, 16)
    # cap on sampled frames per second of video (None: no cap)
    fps: float | None = _key(_optional(_float(0, strict=True)), None)
    size: int = _key(_int(28), 56)  # synthetic frame / image side in pixels
    # per image / frame, passed to the processor
    max_pixels: int | None = _key(_optional(_int(28 * 28)), None)
    max_tokens: int = _key(_int(1), 8192)  # longer samples are skipped
    heldout: int = _key(_int(1), 4)  # held-out samples for the fidelity report (it averages over them)
    on_error: str = _key(_choice("skip", "raise"), "skip")  # "skip" bad samples (counted, reported) | "raise"
    # accept absolute media paths and `..` paths that leave media_root
    allow_outside_root: bool = _key(_bool, False)

    def _coherent(self, path: str) -> None:
        if self.source == "manifest" and not self.manifest:
            raise _fail(path, ".manifest: required when data.source is 'manifest'")
        if self.source == "synthetic" and not self.tasks:
            raise _fail(path, ".tasks: name at least one synthetic task")


@dataclass
class LossConfig(_Section):
    """A stage's objective (`stages.<stage>.loss:`): weighted terms, at least one of hidden / kl / ce on."""

    where: ClassVar[str] = "recipe.stages.<stage>.loss"
    hidden: float = _key(_float(0), 1.0)  # per-layer relative hidden-state regression
    kl: float = _key(_float(0), 0.0)  # token-level KL(teacher || student) on logits
    temperature: float = _key(_float(0, strict=True), 2.0)
    ce: float = _key(_float(0), 0.0)  # optional next-token cross-entropy on text tokens
    # weight of vision-token errors relative to text tokens (HEED: OCR regresses first)
    vision_weight: float = _key(_float(0), 1.0)
    # end to end only: the decoder layers whose hidden states are regressed (None: every layer). A subset is
    # a different loss (not the default); the teacher then keeps only those layers' outputs.
    hidden_layers: list[int] | None = _key(_optional(_list(_int(0))), None)
    # the kl term's kernel (speed only, same loss): "auto" (the fused Triton kernel on CUDA, the torch formula
    # elsewhere), "torch", "triton" (linmu_cli.ops.logit_kl)
    kl_backend: str = _key(_choice(*KL_BACKENDS), "auto")

    def _coherent(self, path: str) -> None:
        if not (self.hidden or self.kl or self.ce):
            raise _fail(path, ": hidden, kl and ce are all 0, so nothing would be learned")


@dataclass
class LoraSettings(_Section):
    """LoRA on the decoder MLPs (`stages.stage3.lora:`), merged into the weights of final/."""

    where: ClassVar[str] = "recipe.stages.stage3.lora"
    rank: int = _key(_int(1), 16)
    alpha: float = _key(_float(0, strict=True), 32.0)
    dropout: float = _key(_then(_float(), _dropout), 0.0)
    target_modules: list[str] = _key(_list(_str, non_empty="name at least one module"),
                                     factory=lambda: ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])  # fmt: skip


@dataclass
class StageConfig(_Section):
    """One stage (`stages.<stage>:`), over its STAGE_DEFAULTS."""

    where: ClassVar[str] = "recipe.stages.<stage>"
    steps: int = _key(_int(1), 100)
    lr: float = _key(_float(0, strict=True), 1e-3)
    # cosine: decay to 10% after warmup
    schedule: str = _key(_choice("constant", "linear", "cosine"), "cosine")
    warmup_steps: int = _key(_int(0), 0)
    weight_decay: float = _key(_float(0), 0.0)
    batch_size: int = _key(_int(1), 1)
    grad_accum: int = _key(_int(1), 1)
    max_grad_norm: float = _key(_float(0, strict=True), 1.0)
    # parameter groups that learn
    train: list[str] = _key(_then(_list(_str), _groups), factory=lambda: ["flex", "fusion"])
    mode: str = _key(_choice("layerwise", "end_to_end"), "layerwise")  # layerwise: teacher-forced per layer
    loss: LossConfig = _key(_section(LossConfig), factory=lambda: LossConfig())
    lora: LoraSettings | None = _key(_optional(_section(LoraSettings)), None)
    save_every: int = _key(_int(1), 50)  # step checkpoints (atomic) every N optimizer steps
    log_every: int = _key(_int(1), 1)
    # recompute activations in backward: true = "all" layers, false = "none", or "every_other" (layers 0, 2,
    # ...) / "mlp_only" (each layer's MLP); layer-wise only, "per_layer": each layer's backward right after its
    # forward (nothing recomputed, one layer's activations held; not under FSDP). The loss does not depend on it,
    # memory and time do (recompute.py)
    gradient_checkpointing: bool | str = _key(_checkpointing, False)
    # AdamW implementation: "auto" (torch's default: foreach on CUDA, a per-tensor loop on CPU), "foreach",
    # "fused" (one kernel; rounds differently in the last bits), "for_loop"
    optimizer: str = _key(_choice("auto", "foreach", "fused", "for_loop"), "auto")
    # batches prepared ahead in a background thread while the step computes (0: none); exact either way
    prefetch: int = _key(_int(0), 0)
    # end to end: the student starts from the teacher's input embeddings (vision features in place) instead of
    # running the frozen, shared vision tower again; equal in float32, bf16 autocast rounding apart on GPU
    share_teacher_embeddings: bool = _key(_bool, False)
    # this stage's Flex-MA scan kernel (auto | torch | fla | mamba), over model.ssd_backend: a runtime choice,
    # not saved with the stage (the 7B recipe: mamba-ssm's in stage 1, fla's in stages 2-3, the faster per stage)
    ssd_backend: str | None = _key(_optional(_choice("auto", "torch", "fla", "mamba")), None)
    init_from: str | None = _key(
        _optional(_str), None
    )  # start from this checkpoint, not the previous stage's
    # this stage's frames per video, over data.frames (e.g. a short-to-long curriculum across the stages)
    frames: int | list[int] | None = _key(_optional(_frames), None)

    def data(self, data: DataConfig) -> DataConfig:
        """The data this stage learns from: `data`, with this stage's `frames` if it sets them."""
        return data if self.frames is None else dataclasses.replace(data, frames=self.frames)

    def _coherent(self, path: str) -> None:
        if ("lora" in self.train) != (self.lora is not None):
            raise _fail(
                path, ": 'lora' in train needs a lora section (and a lora section needs 'lora' in train)"
            )
        if self.mode == "layerwise" and (self.loss.kl or self.loss.ce or "lora" in self.train):
            raise _fail(
                path,
                ": layerwise stages regress hidden states only (no kl / ce / lora); use mode: end_to_end",
            )
        if self.mode == "layerwise" and self.share_teacher_embeddings:
            raise _fail(
                path, ".share_teacher_embeddings: layerwise stages always start from the teacher's states"
            )
        if self.mode == "end_to_end" and self.gradient_checkpointing == "per_layer":
            raise _fail(
                path,
                ".gradient_checkpointing: per_layer needs layer-wise training (each layer's backward on its own); "
                "end_to_end stages take all, every_other, mlp_only or none",
            )
        if self.mode == "layerwise" and self.loss.hidden_layers is not None:
            raise _fail(
                path, ".loss.hidden_layers: layerwise stages train every layer on its own; end_to_end only"
            )

    @property
    def checkpoint_policy(self) -> str:
        """`gradient_checkpointing` as a policy name (true: "all", false: "none")."""
        return policy_of(self.gradient_checkpointing)


@dataclass
class DistributedConfig(_Section):
    """Multi-process runs (`distributed:`)."""

    where: ClassVar[str] = "recipe.distributed"
    strategy: str = _key(_choice("ddp", "fsdp"), "ddp")  # used when launched with several processes


def _stages(stages: Any, path: str) -> dict[str, StageConfig]:
    """All three stages, each its STAGE_DEFAULTS deep-merged with what the recipe says about it."""
    stages = stages or {}
    if not isinstance(stages, dict):
        raise _fail(path, ": expected a mapping stage1 / stage2 / stage3")
    for name in stages:
        if name not in STAGES:
            raise _fail(path, f".{name}{_suggest(str(name), list(STAGES))}", before="unknown key ")
    built = {}
    for name in STAGES:
        given = stages.get(name) or {}
        if isinstance(given, StageConfig):
            built[name] = given
            continue
        merged = _deep_merge(STAGE_DEFAULTS[name], given) if isinstance(given, dict) else given
        built[name] = _section(StageConfig)(merged, f"{path}.{name}")
    return built


@dataclass
class Recipe(_Section):
    """A whole distillation run: teacher, output, data, the student's M-MATE fields (`model`) and three stages."""

    teacher: str = _key(_str, "tiny-qwen2-vl")
    output: str = _key(_str, "runs/linmu")
    seed: int = _key(_int(0), 0)
    # "auto" (cuda when available) | "cpu" | "cuda" | "cuda:N"
    device: str = _key(_then(_str, _device), "auto")
    # "auto": bfloat16 on cuda, float32 on cpu
    dtype: str = _key(_choice("auto", "float32", "bfloat16", "float16"), "auto")
    # the frozen vision tower (the teacher's, and the student's in its reports and in stage 3 without shared
    # embeddings) through linmu_cli.vision: one SDPA call per run of equal-length frames, not one per frame;
    # the same weights and, with vision_compile off, the same numbers as transformers' tower. Speed only: a
    # resume may change it (like `device`, it is not part of what a stage's result depends on)
    fast_vision: bool = _key(_bool, False)
    # fast_vision's rotary / MLP activation fused with torch.compile: "auto" (on CUDA only), "on", "off";
    # compiled, bf16 rounds differently in the last bits
    vision_compile: str = _key(_vision_compile, "auto")
    data: DataConfig = _key(_section(DataConfig), factory=lambda: DataConfig())
    model: MateConfig = _key(_mate, factory=MateConfig)  # M-MATE fields (see `linmu convert --help`)
    # every stage, its STAGE_DEFAULTS under what the recipe gives
    stages: dict[str, StageConfig] = _key(_stages, factory=dict)
    distributed: DistributedConfig = _key(_section(DistributedConfig), factory=lambda: DistributedConfig())

    @property
    def mate(self) -> MateConfig:
        """The model section (kept under this name for the trainer and evals/study.py)."""
        return self.model

    def ssd_backend_of(self, stage: str) -> str:
        """The Flex-MA scan kernel `stage` trains with: its own `ssd_backend`, else the model's."""
        return self.stages[stage].ssd_backend or self.model.ssd_backend


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
    return Recipe.build(raw)


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
