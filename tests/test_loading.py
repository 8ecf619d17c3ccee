"""`linmu_cli.loading.load_model`: the one loader every command uses (issue 16)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from linmu_cli.errors import LinmuError
from linmu_cli.loading import Loaded, load_linmu_tensors, load_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny teacher saved to disk and its LinMU conversion: (teacher_dir, linmu_dir)."""
    from linmu_cli.conversion import convert

    root = tmp_path_factory.mktemp("loading")
    report = convert("tiny-qwen2-vl", root / "linmu", save_teacher=root / "teacher")
    return report.teacher_out, report.out


def _ids() -> torch.Tensor:
    return torch.randint(0, 900, (1, 12), generator=torch.Generator().manual_seed(3))


def test_tiny_alias_is_built_in_memory_seeded_in_eval_mode():
    loaded = load_model("tiny-qwen2-vl")
    assert isinstance(loaded, Loaded) and loaded.where is None and loaded.source == "tiny-qwen2-vl"
    assert type(loaded.model).__name__ == "Qwen2VLForConditionalGeneration" and not loaded.is_linmu
    assert not loaded.model.training and loaded.processor is not None
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    again, other = load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl", seed=1)
    first = next(loaded.model.parameters())
    assert torch.equal(first, next(again.model.parameters()))
    assert not torch.equal(first, next(other.model.parameters()))


def test_the_loader_is_the_package_level_load_model():
    import linmu_cli

    assert linmu_cli.load_model is load_model and "load_model" in linmu_cli.__all__


def test_attn_implementation_is_applied_to_built_in_models_too():
    model = load_model("tiny-qwen2-vl", attn_implementation="eager").model
    assert model.config._attn_implementation == "eager"
    assert load_model("tiny-qwen2-vl").model.config._attn_implementation == "sdpa"


def test_local_dirs_load_teacher_and_linmu_checkpoints_alike(converted):
    teacher_dir, linmu_dir = converted
    teacher, student = load_model(teacher_dir), load_model(str(linmu_dir))
    assert not teacher.is_linmu and teacher.where == teacher_dir and teacher.processor is not None
    assert student.is_linmu and student.where == linmu_dir and student.processor is not None
    assert type(student.model).__name__.startswith("LinMU") and not student.model.training
    with torch.no_grad():  # the saved teacher is the tiny alias it was converted from
        torch.testing.assert_close(teacher.model(input_ids=_ids()).logits,
                                   load_model("tiny-qwen2-vl").model(input_ids=_ids()).logits)  # fmt: skip
    with pytest.raises(LinmuError, match="already a LinMU checkpoint .*pass the teacher"):
        load_model(linmu_dir, teacher_only=True)
    assert not load_model(teacher_dir, teacher_only=True).is_linmu


def test_dtype_is_applied_to_every_kind_of_source(converted):
    teacher_dir, linmu_dir = converted
    for source in ("tiny-qwen2-vl", teacher_dir, linmu_dir):
        for dtype in ("bfloat16", torch.bfloat16):
            model = load_model(source, dtype=dtype).model
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, (source, dtype)
    # "auto" keeps the dtype the checkpoint was saved in
    assert {p.dtype for p in load_model(linmu_dir).model.parameters()} == {torch.float32}
    with pytest.raises(LinmuError, match="unknown dtype 'int3'"):
        load_model("tiny-qwen2-vl", dtype="int3")
    with pytest.raises(LinmuError, match=r"torch\.int8 is not one linmu loads"):
        load_model("tiny-qwen2-vl", dtype=torch.int8)


def test_bad_path_and_bad_device_are_one_clear_line(tmp_path):
    for source, message in ((str(tmp_path / "no" / "such"), "no such directory"),
                            ("./models/qwen", "no such directory"),
                            ("qwen9-vl", "unknown model 'qwen9-vl'"),
                            (str(tmp_path), "has no config.json")):  # fmt: skip
        with pytest.raises(LinmuError, match=message) as err:
            load_model(source)
        assert "\n" not in str(err.value)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(LinmuError, match="is a file"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(LinmuError, match="unknown device 'tpu'"):
        load_model("tiny-qwen2-vl", device="tpu")


def test_hub_id_missing_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LinmuError) as err:
        load_model("someone/some-model")
    text = str(err.value)
    assert "HF_HUB_OFFLINE is set" in text and "`hf download someone/some-model`" in text and "\n" not in text


def test_a_bare_weights_dir_has_no_processor_unless_one_is_required(converted, tmp_path):
    teacher_dir, _ = converted
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(teacher_dir / name, bare / name)
    assert load_model(bare).processor is None  # still convertible
    with pytest.raises(LinmuError, match=f"cannot load the processor in {bare}"):
        load_model(bare, require_processor=True)
    # distillation encodes its samples with the teacher's processor: refused before OUTPUT is written
    from linmu_cli.distillation import distill

    recipe = Path(__file__).parents[1] / "recipes" / "tiny.yaml"
    with pytest.raises(LinmuError, match=f"cannot load the processor in {bare}"):
        distill(recipe, [f"teacher={bare}", f"output={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


def test_damaged_weights_are_one_error_naming_the_checkpoint(converted, tmp_path):
    _, linmu_dir = converted
    broken = tmp_path / "broken"
    shutil.copytree(linmu_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(LinmuError, match=f"cannot load the model in {broken}: SafetensorError") as err:
        load_model(broken)
    assert "copy (or convert) it again" in str(err.value)
    from linmu_cli.models import convert_model

    student = convert_model(load_model("tiny-qwen2-vl").model, load_model(linmu_dir).model.mate_config)
    with pytest.raises(LinmuError, match=f"cannot load the M-MATE tensors in {broken}: SafetensorError"):
        load_linmu_tensors(student, broken)


def test_load_linmu_tensors_copies_only_the_m_mate_tensors(converted):
    _, linmu_dir = converted
    from linmu_cli.models import convert_model

    saved = load_model(linmu_dir).model
    teacher = load_model("tiny-qwen2-vl", seed=5).model  # other frozen weights than the saved ones
    student = convert_model(teacher, saved.mate_config, seed=9)
    before = {n: p.clone() for n, p in student.named_parameters()}
    load_linmu_tensors(student, linmu_dir)
    wanted = dict(saved.named_parameters())
    changed = 0
    for name, param in student.named_parameters():
        if ".self_attn." in name:
            assert torch.equal(param, wanted[name]), name
            changed += not torch.equal(param, before[name])
        else:  # the teacher's tensors stay the teacher's
            assert torch.equal(param, before[name]), name
    assert changed > 0
