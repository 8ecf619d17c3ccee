"""Recipes on their typed schema (linmu_cli.distillation.recipe): every shipped recipe loads, every key is typed
and range-checked with a one-line error naming it, `model` is a MateConfig checked by MateConfig itself."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import linmu_cli
from linmu_cli.config import MateConfig, MateTypeError
from linmu_cli.distillation.recipe import STAGES, LossConfig, Recipe, build_recipe, dump_recipe, load_recipe
from linmu_cli.errors import LinmuError

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny.yaml"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path):
    recipe = load_recipe(path)
    assert set(recipe.stages) == set(STAGES) and isinstance(recipe.model, MateConfig)
    assert recipe.mate is recipe.model
    again = build_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again.to_dict() == recipe.to_dict()


def test_defaults_and_stage_defaults():
    recipe = load_recipe(None)
    assert recipe.to_dict() == Recipe().to_dict()
    assert recipe.stages["stage1"].train == ["flex", "fusion"] and recipe.stages["stage1"].lora is None
    assert recipe.stages["stage3"].mode == "end_to_end" and recipe.stages["stage3"].loss.kl == 1.0
    assert recipe.stages["stage3"].lora.rank == 16
    assert recipe.to_dict()["model"] == MateConfig().to_dict()


def test_overrides_are_typed_and_nested():
    recipe = load_recipe(RECIPE, ["stages.stage1.lr=1e-4", "data.frames=[4,8]", "model.vision_window=[1,2,2]",
                                  "stages.stage3.lora.rank=4", "seed=3"])  # fmt: skip
    assert recipe.stages["stage1"].lr == 1e-4 and recipe.data.frames == [4, 8] and recipe.seed == 3
    assert recipe.model.vision_window == [1, 2, 2] and recipe.stages["stage3"].lora.rank == 4
    assert isinstance(load_recipe(RECIPE, ["stages.stage1.lr=1"]).stages["stage1"].lr, float)


def test_a_model_config_object_is_accepted():
    recipe = build_recipe({"model": MateConfig(text_window=8)})
    assert recipe.model.text_window == 8 and recipe.to_dict()["model"]["text_window"] == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.frames=abc", "recipe.data.frames: expected int, got 'abc'"),
        ("data.frames=[4,x]", "recipe.data.frames[1]: expected int, got 'x'"),
        ("data.frames=[1,8]", "recipe.data.frames=[1, 8]: need at least 2 frames"),
        ("data.source=foo", "recipe.data.source='foo': choose 'synthetic' or 'manifest'"),
        ("data.source=manifest", "recipe.data.manifest: required when data.source is 'manifest'"),
        ("data.tasks=[]", "recipe.data.tasks: name at least one synthetic task"),
        ("data.max_pixels=10", "recipe.data.max_pixels=10: must be >= 784"),
        ("data.fps=0", "recipe.data.fps=0.0: must be > 0"),
        ("data=3", "recipe.data: expected a mapping, got 3"),
        ("dtype=int8", "recipe.dtype='int8': choose 'auto', 'float32', 'bfloat16' or 'float16'"),
        ("device=tpu", "recipe.device='tpu': choose auto, cpu or cuda"),
        ("vision_compile=maybe", "recipe.vision_compile='maybe': choose 'auto', 'on' or 'off'"),
        ("fast_vision=3", "recipe.fast_vision: expected bool, got 3"),
        ("seed=-1", "recipe.seed=-1: must be >= 0"),
        ("seed=1.5", "recipe.seed: expected int, got 1.5"),
        ("teacher=5", "recipe.teacher: expected str, got 5"),
        ("distributed.strategy=x", "recipe.distributed.strategy='x': choose 'ddp' or 'fsdp'"),
        ("stages=5", "recipe.stages: expected a mapping stage1 / stage2 / stage3"),
        ("stages.stage1=5", "recipe.stages.stage1: expected a mapping, got 5"),
        ("stages.stage1.steps=0", "recipe.stages.stage1.steps=0: must be >= 1"),
        (
            "stages.stage1.gradient_checkpointing=maybe",
            "recipe.stages.stage1.gradient_checkpointing='maybe': choose true, false, 'all', 'every_other'",
        ),
        (
            "stages.stage1.gradient_checkpointing=1",
            "recipe.stages.stage1.gradient_checkpointing=1: choose true",
        ),
        ("stages.stage1.schedule=step", "recipe.stages.stage1.schedule='step': choose 'constant', 'linear'"),
        (
            "stages.stage1.train=[flex,swn]",
            "recipe.stages.stage1.train: unknown group 'swn'; did you mean 'swin'?",
        ),
        ("stages.stage1.loss.hidden=0", "recipe.stages.stage1.loss: hidden, kl and ce are all 0"),
        ("stages.stage3.lora=null", "recipe.stages.stage3: 'lora' in train needs a lora section"),
        ("stages.stage3.lora.dropout=1", "recipe.stages.stage3.lora.dropout=1.0: must be in [0, 1)"),
        (
            "stages.stage3.lora.target_modules=[]",
            "recipe.stages.stage3.lora.target_modules: name at least one",
        ),
        ("stages.stage3.lora.rnak=2", "unknown key recipe.stages.stage3.lora.rnak; did you mean 'rank'?"),
        ("model=3", "recipe.model: expected a mapping, got 3"),
        ("model.d_init=.nan", "recipe.model.d_init: expected a finite number, got nan"),
        ("model.chunk_size=x", "recipe.model.chunk_size: expected int, got 'x'"),
        ("model.scan_orders=[thw,5]", "recipe.model.scan_orders: expected list[str], got ['thw', 5]"),
        ("model.fusion_init=1.5", "recipe.model: invalid M-MATE field fusion_init=1.5"),
        ("teacher.name=x", "'teacher' is not a mapping"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(override, message):
    with pytest.raises(LinmuError) as exc:
        load_recipe(RECIPE, [override])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [1\n")
    with pytest.raises(LinmuError, match="is not valid YAML"):
        load_recipe(bad)
    bad.write_text("- 1\n")
    with pytest.raises(LinmuError, match="the top level must be a mapping"):
        load_recipe(bad)
    with pytest.raises(LinmuError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(LinmuError, match="expected key.sub=value"):
        load_recipe(RECIPE, ["steps"])


def test_sections_are_usable_on_their_own():
    """benchmarks/distill_throughput.py builds these directly."""
    assert LossConfig(kl=1.0).kl == 1.0 and LossConfig(kl=1).kl == 1.0


def test_mate_config_checks_its_own_types():
    """Every path gets the type check, not only the CLI: a wrong type is a LinmuError, never a raw TypeError."""
    with pytest.raises(MateTypeError, match="dt_min='abc': dt_min takes a number, e.g. dt_min=0.001"):
        MateConfig.from_dict({"dt_min": "abc"})
    with pytest.raises(
        MateTypeError, match="vision_window takes a list of integers, e.g. vision_window=\\[2,8,8\\]"
    ):
        MateConfig(vision_window=5).validate()
    with pytest.raises(MateTypeError, match="use_flex takes true or false"):
        MateConfig.from_dict({"use_flex": 1})
    with pytest.raises(MateTypeError, match="chunk_size takes an integer or null, e.g. chunk_size=null"):
        MateConfig.from_dict({"chunk_size": 1.5})
    with pytest.raises(LinmuError, match="dt_min takes a number"):
        linmu_cli.convert("tiny-qwen2-vl", "/nonexistent/never-written", mate={"dt_min": "abc"})
    assert MateConfig.from_dict({"vision_window": (1, 2, 2), "dt_max": 1}).vision_window == (1, 2, 2)


def test_output_norm_heads_is_checked_and_read_by_the_blocks(tmp_path):
    """`output_norm_heads`: the first N heads get the per-head norm; N >= 0, only with `output_norm: true`, at most the
    model's head count (checked where the blocks are built, before anything is written)."""
    assert MateConfig().normed_heads(4) == 4 and MateConfig(output_norm=False).normed_heads(4) == 0
    assert MateConfig.from_dict({"output_norm_heads": 2}).normed_heads(4) == 2
    assert MateConfig.from_dict({"output_norm_heads": 0}).normed_heads(4) == 0
    assert load_recipe(RECIPE, ["model.output_norm_heads=2"]).model.output_norm_heads == 2
    with pytest.raises(
        MateTypeError, match="output_norm_heads takes an integer or null, e.g. output_norm_heads=null"
    ):
        MateConfig.from_dict({"output_norm_heads": 1.5})
    with pytest.raises(LinmuError, match="invalid M-MATE field output_norm_heads=-1: must be 0 or more"):
        MateConfig.from_dict({"output_norm_heads": -1})
    for heads in (0, 2):
        with pytest.raises(LinmuError, match=f"output_norm_heads={heads}: needs output_norm: true"):
            MateConfig.from_dict({"output_norm": False, "output_norm_heads": heads})
    with pytest.raises(
        LinmuError, match="recipe.model: invalid M-MATE field output_norm_heads=2: needs output_norm"
    ):
        load_recipe(RECIPE, ["model.output_norm=false", "model.output_norm_heads=2"])
    with pytest.raises(
        LinmuError, match="output_norm_heads=99: the model has 4 attention heads, so at most 4"
    ):
        linmu_cli.convert("tiny-qwen2-vl", tmp_path / "out", mate={"output_norm_heads": 99})
    assert not (tmp_path / "out").exists()


def test_recipes_load_without_pydantic():
    """The GPU machine's image has no pydantic (2026-12-02): the schema needs only the standard library and PyYAML,
    so `linmu distill` and its benchmark import there. A subprocess with pydantic made unimportable loads a recipe
    and the trainer."""
    code = (
        "import sys; sys.modules['pydantic'] = None; sys.modules['pydantic_core'] = None\n"
        "from linmu_cli.distillation import load_recipe\n"
        "import linmu_cli.distillation.trainer, linmu_cli.distillation.objectives\n"
        f"r = load_recipe({str(RECIPE)!r}, ['stages.stage1.lr=1e-4'])\n"
        "assert r.stages['stage1'].lr == 1e-4\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_stage_can_set_its_own_frames():
    """`stages.<stage>.frames` overrides data.frames for that stage only (a short-to-long curriculum)."""
    recipe = load_recipe(RECIPE, ["stages.stage2.frames=[4,8]", "stages.stage3.frames=8"])
    assert recipe.stages["stage1"].frames is None and recipe.stages["stage1"].data(recipe.data) is recipe.data
    assert recipe.stages["stage2"].data(recipe.data).frames == [4, 8]
    assert recipe.stages["stage3"].data(recipe.data).frames == 8 and recipe.data.frames != 8
    with pytest.raises(LinmuError, match=r"recipe.stages.stage2.frames=1: need at least 2 frames"):
        load_recipe(RECIPE, ["stages.stage2.frames=1"])
