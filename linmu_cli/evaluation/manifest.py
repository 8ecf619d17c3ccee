"""lmms-eval 0.7.x model registration (registry v2): the `lmms_eval.models` entry point loads `manifests`.

Kept free of heavy imports: lmms-eval loads every entry point when `lmms_eval.models` is first imported.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "linmu"
CLASS_PATH = "linmu_cli.evaluation.plugin.LinMU"


def manifests() -> list[Any]:
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


# The model args of `linmu` (lmms-eval's --model_args, linmu eval's --model-args), with their types. Here and not
# in plugin.py so that `linmu eval` checks them before lmms-eval and torch are imported.
MODEL_ARG_TYPES: dict[str, str] = {
    "pretrained": "str",
    "device": "str",
    "dtype": "str",
    "batch_size": "int",
    "max_batch_size": "int",
    "max_num_frames": "int",
    "fps": "float",
    "max_pixels": "int",
    "min_pixels": "int",
    "max_new_tokens": "int",
    "system_prompt": "str",
    "attn_implementation": "str",
    "seed": "int",
    "interleave_visuals": "bool",
}
MODEL_ARGS = tuple(MODEL_ARG_TYPES)
_EXAMPLES = {"batch_size": 4, "max_batch_size": 8, "max_num_frames": 64, "fps": 1.0, "max_pixels": 401408,
             "min_pixels": 3136, "max_new_tokens": 64, "seed": 0, "interleave_visuals": "true"}  # fmt: skip
_LOWER_BOUNDS = {"batch_size": 1, "max_batch_size": 1, "max_num_frames": 2, "max_pixels": 1, "min_pixels": 1,
                 "max_new_tokens": 1}  # fmt: skip
_NONE = (None, "", "none", "None", "null")


def parse_arg_string(text: str) -> dict:
    """`k=v,k2=v2` -> dict, split and keyed by `linmu_cli.overrides` like every other KEY=VALUE input, each value
    typed as lmms-eval's `simple_parse_args_string` types it (true/false, integers, floats, else strings; YAML
    typing would turn `system_prompt=Answer: yes` into a mapping); a quoted or braced value may hold commas."""
    from linmu_cli.overrides import parse_overrides, split_args

    return parse_overrides(
        split_args(text), flag="model arg", expected="KEY=VALUE pairs separated by commas", typed=_typed
    )


def _typed(value: str):
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.isnumeric():
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def coerce_model_args(args: dict, error: type[Exception] = ValueError) -> dict:
    """Each model arg converted to its type; a value that is not (`max_num_frames=abc`, `fps=abc`,
    `batch_size=0`) raises `error` naming the arg, what it takes and an example."""
    out = {}
    for key, value in args.items():
        kind = MODEL_ARG_TYPES.get(key)
        if kind is None or kind == "str" or value in _NONE:
            out[key] = None if value in _NONE and kind not in (None, "str") else value
            continue
        if key == "batch_size" and str(value).startswith("auto"):
            out[key] = value
            continue
        try:
            if kind == "bool":
                if isinstance(value, bool) or str(value).lower() in ("true", "false", "1", "0"):
                    converted = value if isinstance(value, bool) else str(value).lower() in ("true", "1")
                else:
                    raise ValueError
            elif kind == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                converted = int(value) if not isinstance(value, str) else int(value.strip())
            else:
                if isinstance(value, bool):
                    raise ValueError
                converted = float(value)
                if converted != converted or converted in (float("inf"), float("-inf")):
                    raise ValueError
        except (TypeError, ValueError):
            what = {"int": "an integer", "float": "a number", "bool": "true or false"}[kind]
            raise error(f"model arg {key}={value}: {key} takes {what}, e.g. {key}={_EXAMPLES[key]}") from None
        low = _LOWER_BOUNDS.get(key)
        if low is not None and converted < low:
            raise error(f"model arg {key}={value}: must be at least {low}")
        if key == "fps" and converted <= 0:
            raise error(f"model arg fps={value}: must be a positive number of frames per second")
        out[key] = converted
    return out
