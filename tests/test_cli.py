"""`linmu` command line: convert end to end, and one clear line (exit 2, nothing written) for bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from typer.testing import CliRunner

import linmu_cli  # noqa: F401  (registers the LinMU classes)
from linmu_cli.cli import app

runner = CliRunner()


def linmu(*args, env=None):
    result = runner.invoke(app, list(args), env=env)
    return result.exit_code, result.output


def test_help_lists_every_command():
    code, out = linmu("--help")
    assert code == 0
    for cmd in ("convert", "distill", "eval", "bench", "doctor"):
        assert cmd in out


@pytest.mark.parametrize("alias", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_convert_tiny_writes_a_loadable_checkpoint_and_teacher(alias, tmp_path):
    out, teacher_dir = tmp_path / "out", tmp_path / "teacher"
    code, text = linmu("convert", alias, str(out), "--save-teacher", str(teacher_dir), "--window", "2,2,2")
    assert code == 0, text
    assert "layers converted" in text and "torch" in text
    meta = json.loads((out / "linmu.json").read_text())
    assert meta["source"] == alias and meta["mate"]["vision_window"] == [2, 2, 2]
    student = AutoModelForImageTextToText.from_pretrained(out)
    teacher = AutoModelForImageTextToText.from_pretrained(teacher_dir)
    assert type(student).__name__.startswith("LinMU") and not type(teacher).__name__.startswith("LinMU")
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<|video_pad|>") == student.config.video_token_id
    # every non-attention weight keeps its name and value
    s, t = student.state_dict(), teacher.state_dict()
    kept = [k for k in t if ".self_attn." not in k]
    assert kept and all(torch.equal(s[k], t[k]) for k in kept)
    # converting the written teacher again gives the same student
    code, text = linmu("convert", str(teacher_dir), str(tmp_path / "again"), "--window", "2,2,2")
    assert code == 0, text
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(again[k], s[k]) for k in s)


def test_force_replaces_and_refuses_without_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = linmu("convert", "tiny-qwen2-vl", str(out))
    assert code == 2 and "not empty" in text and "--force" in text
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    code, text = linmu("convert", "tiny-qwen2-vl", str(out), "--force")
    assert code == 0 and (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["qwen9-vl"], "unknown model 'qwen9-vl'"),
        (["tiny-qwen2-vl", "--window", "2,-1,8"], "vision_window"),
        (["tiny-qwen2-vl", "--window", "2,x"], "three integers"),
        (["tiny-qwen2-vl", "--scan-orders", "thw,tth"], "not a permutation"),
        (["tiny-qwen2-vl", "--text-window", "0"], "text_window"),
        (["tiny-qwen2-vl", "--fusion-init", "1.5"], "fusion_init"),
        (["tiny-qwen2-vl", "--set", "no_such_field=1"], "unknown M-MATE field"),
        (["tiny-qwen2-vl", "--ssd-backend", "fla"], "fla"),
        (["tiny-qwen2-vl", "--dtype", "int3"], "unknown dtype"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    out = tmp_path / "out"
    code, text = linmu("convert", args[0], str(out), *args[1:])
    assert code == 2, text
    assert message in text and "Traceback" not in text
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unknown_alias_lists_the_known_ones(tmp_path):
    code, text = linmu("convert", "qwen9-vl", str(tmp_path / "o"))
    assert code == 2 and "tiny-qwen2-vl" in text and "qwen2.5-vl-7b" in text


def test_hub_id_offline_says_how_to_get_it(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code, text = linmu("convert", "Qwen/Qwen2-VL-7B-Instruct", str(tmp_path / "o"), env=env)
    assert code == 2 and "not in the local Hugging Face cache" in text and "local directory" in text
    code, text = linmu("convert", "qwen2-vl-7b", str(tmp_path / "o"), env=env)
    assert code == 2 and "Qwen/Qwen2-VL-7B-Instruct" in text


def test_unsupported_directory_names_what_it_found(tmp_path):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    code, text = linmu("convert", str(src), str(tmp_path / "o"))
    assert code == 2 and "llama (LlamaForCausalLM)" in text and "qwen2_vl" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = linmu("convert", str(empty), str(tmp_path / "o"))
    assert code == 2 and "no config.json" in text


def test_already_converted_is_refused(tmp_path):
    assert linmu("convert", "tiny-qwen2-vl", str(tmp_path / "s"))[0] == 0
    code, text = linmu("convert", str(tmp_path / "s"), str(tmp_path / "o"))
    assert code == 2 and "already a LinMU checkpoint" in text


def test_console_script_and_doctor_run_in_a_real_process():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run(
        [sys.executable, "-m", "linmu_cli", "doctor"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    assert "ssd backend torch" in res.stdout and "ok" in res.stdout
