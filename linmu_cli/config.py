"""M-MATE hyper-parameters: one dataclass, saved inside the converted checkpoint's config (but for the kernel choice).

Every size of the method that the paper does not pin down is a field here (docs/design.md §1): recipes and the
`linmu convert` options set them, and `validate()` rejects values that cannot work before any weight moves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from linmu_cli.errors import LinmuError

logger = logging.getLogger(__name__)

SCAN_AXES = "thw"
SSD_BACKENDS = ("auto", "torch", "fla", "mamba")
RUNTIME_FIELDS = ("ssd_backend",)  # chosen per run, never saved in a checkpoint
FUSION_MODES = ("token", "head")

# How a field's annotation reads in an error ("dt_min takes a number").
_TAKES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
          "int | None": "an integer or null", "list[int]": "a list of integers",
          "list[str]": "a list of strings"}  # fmt: skip


class MateTypeError(LinmuError):
    """A field holding a value of the wrong type (`dt_min="abc"`, `vision_window=5`).

    It carries its parts so that each caller words it its own way: `--set dt_min=abc: dt_min takes a number,
    e.g. --set dt_min=0.001` at the CLI, `recipe.model.dt_min: expected float, got 'abc'` in a recipe.
    """

    def __init__(self, name: str, value: Any, annotation: str, example: str) -> None:
        self.name, self.value, self.annotation, self.example = name, value, annotation, example
        finite = annotation == "float" and isinstance(value, float) and not math.isfinite(value)
        self.takes = "a finite number" if finite else _TAKES.get(annotation, annotation)
        super().__init__(
            f"invalid M-MATE field {name}={value!r}: {name} takes {self.takes}, e.g. {name}={example}"
        )


def _fits(annotation: str, value: Any) -> bool:
    """Whether `value` has the type the annotation string names (bools are not ints; floats are finite)."""
    if annotation.endswith(" | None"):
        return value is None or _fits(annotation.removesuffix(" | None"), value)
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation == "str":
        return isinstance(value, str)
    if annotation.startswith("list[") and annotation.endswith("]"):
        return isinstance(value, (list, tuple)) and all(_fits(annotation[5:-1], v) for v in value)
    return True


def _example(f: dataclasses.Field) -> str:
    """A field's default written as a command-line value: [2,8,8], true, null."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_types(fields: Mapping[str, Any]) -> None:
    """Raise MateTypeError for the first known field whose value is not of its annotated type, so that a wrong
    type is named before a comparison fails on it with a raw TypeError (`0 < "abc"`); unknown names are left to
    `MateConfig.from_dict`."""
    for f in dataclasses.fields(MateConfig):
        if f.name in fields and not _fits(str(f.type), fields[f.name]):
            raise MateTypeError(f.name, fields[f.name], str(f.type), _example(f))


@dataclass
class MateConfig:
    """Configuration of every M-MATE block of a converted decoder."""

    # Branches (ablations switch one off).
    use_flex: bool = True
    use_swin: bool = True
    # Flex-MA (docs/design.md §3).
    bidirectional: bool = True  # backward scan inside visual segments
    scan_orders: list[str] = field(default_factory=lambda: ["thw", "twh", "hwt"])  # Rotary Major-Scan cycle
    chunk_size: int | None = None  # SSD chunk length; None = the kernel's default
    d_conv: int = 4  # short causal depthwise conv on x, B, C; 0 disables it
    dt_min: float = 0.001
    dt_max: float = 0.1
    a_init_min: float = 1.0
    a_init_max: float = 16.0
    d_init: float = 1.0  # skip connection D
    output_gate: bool = True  # per-token SiLU gate before the per-head RMSNorm output
    # The per-head RMSNorm on Flex-MA's output; false keeps the output's magnitude (gate and per-channel scale
    # only): the length-generalization study's switch (docs/quality.md).
    output_norm: bool = True
    # How many of Flex-MA's heads get that norm: the first N query heads (index 0..N-1, the order of q_proj's
    # outputs; a kv group's heads are contiguous, so a multiple of heads / kv_heads norms whole groups). The
    # others keep magnitude exactly as `output_norm: false` does (gate and per-channel scale only). None: every
    # head. Needs `output_norm: true`; 0 <= N <= heads (the head count is checked where the block is built).
    output_norm_heads: int | None = None
    # Local-Swin (docs/design.md §4).
    vision_window: list[int] = field(default_factory=lambda: [2, 8, 8])  # (wt, wh, ww) in merged tokens
    shift_windows: bool = True  # shift by half a window on odd layers
    text_window: int = 512  # keys a text token sees, itself included
    # Fusion (docs/design.md §5).
    fusion: str = "token"  # "token": one weight per token; "head": one per token and head
    fusion_init: float = 0.5  # initial Flex-MA weight a_t (sigmoid of the bias)
    # Initial Flex-MA weight on vision tokens only: a learned per-block bias (`fuse_vision`, one per fusion
    # output) added to the fusion logit of every vision token, starting at logit(this) - logit(fusion_init).
    # None: no such bias, one fusion bias for every token. The length study's "fusion toward Flex-MA on vision
    # tokens" (docs/quality.md). Needs both branches.
    fusion_vision_init: float | None = None
    # Flex-MA and Local-Swin use one set of Q/K/V/O (Flex-MA's parameters; both start as the teacher's anyway):
    # about 18% fewer dense FLOPs per layer (issue 11). Only with both branches on.
    shared_projections: bool = False
    # Kernel choice: a runtime setting like transformers' attn_implementation, not a checkpoint field. to_dict()
    # (what config.json saves) leaves it out and from_saved() ignores a value an older checkpoint carries; set it
    # per run (`--ssd-backend`, a recipe's model section, `linmu_cli.layers.mate.set_ssd_backend`).
    ssd_backend: str = field(default="auto", metadata={"runtime": True})

    def validate(self) -> MateConfig:
        """Raise LinmuError naming the first invalid field (MateTypeError for a wrong type); return self."""
        check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

        def bad(name: str, why: str) -> None:
            raise LinmuError(f"invalid M-MATE field {name}={getattr(self, name)!r}: {why}")

        if not (self.use_flex or self.use_swin):
            bad("use_flex", "at least one of use_flex / use_swin must be true")
        if not self.scan_orders:
            bad("scan_orders", "give at least one scan order, e.g. ['thw']")
        for order in self.scan_orders:
            if not isinstance(order, str) or sorted(order) != sorted(SCAN_AXES):
                bad("scan_orders", f"{order!r} is not a permutation of 't', 'h', 'w' (e.g. 'thw', 'hwt')")
        if not isinstance(self.text_window, int) or self.text_window < 1:
            bad("text_window", "must be a positive integer")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            bad("chunk_size", "must be a positive integer (or null for the kernel's default)")
        if not isinstance(self.d_conv, int) or self.d_conv < 0:
            bad("d_conv", "must be 0 (off) or a positive kernel size")
        if len(self.vision_window) != 3 or any(not isinstance(v, int) or v < 1 for v in self.vision_window):
            bad("vision_window", "must be three positive integers (wt, wh, ww)")
        if not 0 < self.dt_min <= self.dt_max:
            bad("dt_min", "need 0 < dt_min <= dt_max")
        if not 0 < self.a_init_min <= self.a_init_max:
            bad("a_init_min", "need 0 < a_init_min <= a_init_max")
        if self.fusion not in FUSION_MODES:
            bad("fusion", f"choose one of {', '.join(FUSION_MODES)}")
        if not 0.0 < self.fusion_init < 1.0:
            bad("fusion_init", "the initial Flex-MA weight must lie strictly between 0 and 1")
        if self.fusion_vision_init is not None:
            if not 0.0 < self.fusion_vision_init < 1.0:
                bad(
                    "fusion_vision_init",
                    "the initial Flex-MA weight on vision tokens must lie strictly between 0 and 1",
                )
            if not (self.use_flex and self.use_swin):
                bad("fusion_vision_init", "there is no fusion with one branch off; leave it null")
        if not isinstance(self.shared_projections, bool):
            bad("shared_projections", "must be true or false")
        if self.output_norm_heads is not None:
            if self.output_norm_heads < 0:
                bad(
                    "output_norm_heads",
                    "must be 0 or more (the first N heads get the norm), or null for every head",
                )
            if not self.output_norm:
                bad("output_norm_heads", "needs output_norm: true (output_norm: false already keeps every head's "
                    "magnitude; for no normed head at all, leave output_norm_heads null)")  # fmt: skip
        if self.ssd_backend not in SSD_BACKENDS:
            bad("ssd_backend", f"choose one of {', '.join(SSD_BACKENDS)}")
        return self

    def normed_heads(self, heads: int) -> int:
        """How many of a block's `heads` Flex-MA heads get the per-head RMSNorm (the first ones): `heads` when
        `output_norm_heads` is None, 0 with `output_norm: false`. LinmuError when it exceeds `heads`."""
        if not self.output_norm:
            return 0
        if self.output_norm_heads is None:
            return heads
        if self.output_norm_heads > heads:
            raise LinmuError(
                f"invalid M-MATE field output_norm_heads={self.output_norm_heads}: the model has {heads} attention "
                f"heads, so at most {heads} can get the norm"
            )
        return self.output_norm_heads

    def to_dict(self) -> dict[str, Any]:
        """The fields a checkpoint saves: every M-MATE size, not the runtime kernel choice (RUNTIME_FIELDS)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MateConfig:
        """Build from a (possibly partial) dict; unknown keys are an error naming the valid ones."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise LinmuError(
                f"unknown M-MATE field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}"
            )
        return cls(**data).validate()

    @classmethod
    def from_saved(cls, data: dict[str, Any] | None) -> MateConfig:
        """From a checkpoint's saved `mate` dict. Checkpoints written before the kernel choice became a runtime
        setting carry `ssd_backend`: it is ignored (the kernel is chosen where the model runs, "auto" unless set)."""
        data = dict(data or {})
        dropped = {k: data.pop(k) for k in RUNTIME_FIELDS if k in data}
        if any(v != "auto" for v in dropped.values()):
            logger.info("ignoring %s saved in the checkpoint's M-MATE config: a runtime setting", dropped)
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> MateConfig:
        """A validated copy with `changes` (runtime fields carried over unless changed)."""
        runtime = {k: getattr(self, k) for k in RUNTIME_FIELDS}
        return MateConfig.from_dict({**self.to_dict(), **runtime, **changes})
