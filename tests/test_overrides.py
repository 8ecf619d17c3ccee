"""The one KEY=VALUE parser (linmu_cli.overrides) behind recipe overrides, `--set` and `--model-args`."""

import math

import pytest

from linmu_cli.errors import LinmuError
from linmu_cli.evaluation.manifest import parse_arg_string
from linmu_cli.overrides import load_yaml, parse_overrides, parse_value, set_dotted, split_args


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0.05", 0.05),
        ("1e-4", 1e-4),  # YAML 1.1 (PyYAML) reads this as a string; recipes mean a number
        ("-5E+3", -5000.0),
        ("3", 3),
        ("true", True),
        ("[2,8,8]", [2, 8, 8]),
        ("null", None),
        ("", None),
        ("runs/x", "runs/x"),
        ("[4,8", "[4,8"),  # not YAML: stays the text, and the schema names the key
    ],
)
def test_values_are_typed_like_yaml_scalars(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_yaml_exponent_floats_in_files_and_nan():
    assert load_yaml("lr: 1e-4\nname: 1e4x\n") == {"lr": 1e-4, "name": "1e4x"}
    assert math.isnan(parse_value(".nan"))


def test_dotted_keys_stay_flat_and_nest_on_demand():
    flat = parse_overrides(["stages.stage1.steps=50", "output=runs/x", "stages.stage1.steps=7"])
    assert flat == {"output": "runs/x", "stages.stage1.steps": 7}
    tree: dict = {"stages": {"stage1": None}}
    for key, value in flat.items():
        set_dotted(tree, key, value)
    assert tree == {"stages": {"stage1": {"steps": 7}}, "output": "runs/x"}
    with pytest.raises(LinmuError, match="'output' is not a mapping"):
        set_dotted(tree, "output.x", 1)


@pytest.mark.parametrize("item", ["steps", "=3", "a..b=1", "a.=1"])
def test_an_item_that_is_not_key_value_is_one_line(item):
    with pytest.raises(LinmuError, match=r"^--set .*expected FIELD=VALUE"):
        parse_overrides([item], flag="--set", expected="FIELD=VALUE")


def test_callers_choose_the_typing():
    assert parse_overrides(["dt_min=abc", "x=0.5"], typed=str) == {"dt_min": "abc", "x": "0.5"}


def test_model_arg_strings_keep_lmms_eval_typing():
    """Commas inside quotes / brackets stay in the value; `yes` and `Answer: yes` stay strings (not YAML)."""
    args = parse_arg_string("pretrained=out/,max_num_frames=64,fps=0.5,interleave_visuals=True,"
                            "system_prompt='a, b',x=[1,2],seed=,y=yes,z=Answer: yes")  # fmt: skip
    assert args == {"pretrained": "out/", "max_num_frames": 64, "fps": 0.5, "interleave_visuals": True,
                    "system_prompt": "'a, b'", "x": "[1,2]", "seed": "", "y": "yes", "z": "Answer: yes"}  # fmt: skip
    assert split_args(" a=1,, b=2 ") == ["a=1", " b=2"]
    with pytest.raises(LinmuError, match="model arg 'fps': expected KEY=VALUE"):
        parse_arg_string("max_num_frames=4,fps")
