"""`key=value` from the command line, parsed in one place.

Three inputs take this form: recipe overrides (`linmu distill RECIPE stages.stage1.steps=50`), `linmu convert
--set dt_max=0.05`, and the model args of `linmu eval --model-args` / lmms-eval's `--model_args k=v,k=v`. They
share the splitting, the key rules and the one-line errors here; each checks its values against its own schema
(the recipe, MateConfig, `evaluation.manifest.MODEL_ARG_TYPES`).

Values are typed like YAML scalars (`0.05`, `true`, `[2,8,8]`, `null`), with `1e-4` a number as in YAML 1.2
(PyYAML follows YAML 1.1, where an exponent without a dot is a string). Model args keep lmms-eval's own typing,
passed in as `typed`, so `linmu eval` and plain lmms-eval read a string the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

from linmu_cli.errors import LinmuError

# YAML 1.2 floats without a dot (1e-4, 5E+3); YAML 1.1 (PyYAML) reads them as strings.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


@cache
def _loader() -> type:
    """yaml.SafeLoader plus the YAML 1.2 exponent floats (imported on first use: `linmu --help` stays light)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))
    return Loader


def load_yaml(text: str) -> Any:
    """YAML text -> Python, as recipes and override values read it (`1e-4` is a float); raises yaml.YAMLError."""
    import yaml

    return yaml.load(text, Loader=_loader())  # noqa: S506 (a SafeLoader subclass)


def parse_value(text: str) -> Any:
    """One value typed like a YAML scalar; empty is None, and text YAML cannot parse stays a string."""
    import yaml

    if not text.strip():
        return None
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def split_args(text: str) -> list[str]:
    """lmms-eval's `k=v,k2=v2` -> ['k=v', 'k2=v2']; a quoted or bracketed value may hold commas."""
    items, depth, quote, current = [], 0, None, ""
    for ch in text.strip():
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        current += ch
    items.append(current)
    return [item for item in items if item.strip()]


def parse_overrides(
    items: Iterable[str],
    *,
    flag: str = "override",
    expected: str = "key.sub=value, e.g. stages.stage1.steps=50",
    typed: Callable[[str], Any] = parse_value,
) -> dict[str, Any]:
    """`['a.b=1', 'c=x']` -> `{'a.b': 1, 'c': 'x'}` (dotted keys kept; `set_dotted` nests them), later items
    winning. `flag` and `expected` word the error for an item that is not KEY=VALUE (`--set 'dt_max'`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not all(part.strip() for part in key.split(".")):
            raise LinmuError(f"{flag} {item!r}: expected {expected}")
        out.pop(key, None)  # a repeated key counts where it was given last
        out[key] = typed(text)
    return out


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """`tree['a']['b'] = value` for key 'a.b', creating the mappings on the way (an empty YAML section, None,
    counts as one); a scalar on the way is an error."""
    node = tree
    *path, last = [part.strip() for part in key.split(".")]
    for part in path:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise LinmuError(f"override {key}={value!r}: {part!r} is not a mapping")
    node[last] = value
