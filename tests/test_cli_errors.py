"""Issue 14 (CLI / convert half): every bad input is one red line and exit code 2, no traceback, nothing written;
`--help` / `--version` answer without importing torch; the CPU thread policy."""

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from linmu_cli.cli import app, cpu_threads

runner = CliRunner()


def linmu(*args, env=None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def one_clear_line(code: int, text: str, message: str) -> None:
    assert code == 2, text
    assert message in text, text
    assert "Traceback" not in text and text.strip().startswith("error:")
    assert len(text.strip().splitlines()) == 1, text


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A real teacher checkpoint on disk (the tiny Qwen2-VL), to damage copies of."""
    from linmu_cli.conversion import convert

    root = tmp_path_factory.mktemp("teacher")
    convert("tiny-qwen2-vl", root / "student", save_teacher=root / "teacher")
    return root / "teacher"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- 25: start-up ---------------------------------------------------------------------------------------------


def test_help_and_version_answer_without_torch():
    """The console entry imports neither torch nor transformers before a command body runs."""
    code = (
        "import sys, runpy; sys.argv = ['linmu', '--help']\n"
        "try:\n    runpy.run_module('linmu_cli', run_name='__main__', alter_sys=True)\n"
        "except SystemExit: pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'lmms_eval') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in res.stdout, res.stdout + res.stderr
    # `python -m linmu_cli` (what accelerate / torchrun run) takes the same light path
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "linmu_cli", "--version"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    assert res.returncode == 0 and "linmu_cli.cli" in imported and not imported & {"torch", "transformers"}
    for argv in (["--version"], ["--help"], ["eval", "--help"], ["convert", "x"]):
        start = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "linmu_cli", *argv], capture_output=True, text=True, timeout=60
        )
        seconds = time.perf_counter() - start
        assert seconds < 4, (
            argv,
            seconds,
        )  # was 10-17 s (6 s idle); ~0.6 s now, slack for a loaded CI machine
        if argv == ["--version"]:
            assert res.returncode == 0 and res.stdout.strip() == "linmu 0.1.0"
        if argv == ["convert", "x"]:
            assert res.returncode == 2 and "Missing argument" in res.stderr


def test_import_linmu_cli_still_registers_the_auto_classes():
    code = (
        "import linmu_cli\nfrom transformers import AutoConfig\n"
        "print(type(AutoConfig.for_model('linmu_qwen2_vl')).__name__, linmu_cli.MateConfig().text_window)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "512" and "LinMU" in res.stdout


# --- 26: threads ----------------------------------------------------------------------------------------------


def test_cpu_thread_policy_is_overridable(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LINMU_NUM_THREADS", "3")
    assert cpu_threads() == (3, "LINMU_NUM_THREADS")
    monkeypatch.setenv("LINMU_NUM_THREADS", "zero")
    code, text = linmu("doctor")
    one_clear_line(code, text, "LINMU_NUM_THREADS='zero'")
    monkeypatch.delenv("LINMU_NUM_THREADS")
    n, why = cpu_threads()
    usable = len(os.sched_getaffinity(0))
    assert 1 <= n <= usable and "usable core" in why
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads() == (1, "OMP_NUM_THREADS")


def test_cli_run_uses_the_policy_in_a_real_process():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["LINMU_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-m", "linmu_cli", "doctor"], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "cpu threads" in res.stdout and "1 (LINMU_NUM_THREADS)" in res.stdout


# --- 12 / 27: convert's bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "dt_min=abc"], "--set dt_min=abc: dt_min takes a number"),
        (
            ["--set", "vision_window=5"],
            "vision_window takes a list of integers, e.g. --set vision_window=[2,8,8]",
        ),
        (["--set", "d_init=abc"], "d_init takes a number"),
        (["--set", "use_flex=maybe"], "use_flex takes true or false"),
        (["--device", "banana"], "unknown device 'banana'"),
        (
            ["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"],
            "device cuda",
        ),
    ],
)
def test_convert_bad_values(args, message, tmp_path):
    code, text = linmu("convert", "tiny-qwen2-vl", tmp_path / "o", *args)
    one_clear_line(code, text, message)
    assert not list(tmp_path.iterdir())


def test_damaged_checkpoints_are_one_line(teacher, tmp_path):
    truncated = _copy(teacher, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    zero = _copy(teacher, tmp_path / "zero")
    (zero / "model.safetensors").write_bytes(b"")
    noise = _copy(teacher, tmp_path / "noise")
    (noise / "model.safetensors").write_bytes(os.urandom(4096))
    missing = _copy(teacher, tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    listed = _copy(teacher, tmp_path / "listed")
    (listed / "config.json").write_text("[1, 2]")
    for src, message in ((truncated, "SafetensorError"), (zero, "SafetensorError"), (noise, "SafetensorError"),
                         (missing, "OSError"), (listed, "holds a JSON list")):  # fmt: skip
        out = tmp_path / f"out-{src.name}"
        code, text = linmu("convert", src, out)
        one_clear_line(code, text, message)
        assert str(src) in text and not out.exists()
    # and the same checkpoint loaded the way `linmu eval` / lmms-eval's `--model linmu` load it
    import torch

    from linmu_cli.errors import LinmuError
    from linmu_cli.loading import load_model

    with pytest.raises(LinmuError, match="cannot load the model in .*truncated: SafetensorError"):
        load_model(str(truncated), device=torch.device("cpu"), require_processor=True)


def test_mistyped_path_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text = linmu("convert", "nope/", "o", env={"HF_HUB_OFFLINE": "1"})
    one_clear_line(code, text, "nope/: no such directory")
    assert "download" not in text
    code, text = linmu("convert", "./models/qwen", "o")
    one_clear_line(code, text, "no such directory")
    code, text = linmu(
        "convert", "someone/some-model", "o", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    )
    one_clear_line(code, text, "`hf download someone/some-model`")
    assert "huggingface-cli" not in text


# --- 17: --save-teacher -------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_dir", ["out", "out/teacher", "."])
def test_save_teacher_overlapping_out_is_refused_before_writing(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, text = linmu("convert", "tiny-qwen2-vl", "out", "--save-teacher", teacher_dir)
    one_clear_line(code, text, "overlap")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# --- 12: disks ------------------------------------------------------------------------------------------------


def test_unwritable_output_is_refused_before_loading(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, text = linmu("convert", "tiny-qwen2-vl", blocker / "out")
    one_clear_line(code, text, "is not a directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if (
            os.access(ro, os.W_OK) and os.geteuid() == 0
        ):  # root writes anyway: a read-only mount is the real case
            pytest.skip("root ignores directory permissions")
        code, text = linmu("convert", "tiny-qwen2-vl", ro / "out")
        one_clear_line(code, text, "not writable")
    finally:
        ro.chmod(0o700)


def test_full_disk_while_writing_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC in the middle of save_pretrained (the teacher is written, the student is not): one line, and
    neither directory nor a temporary is left."""
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained
    calls = []

    def save(self, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the student, after the teacher went through
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(path) / "model.safetensors"))
        return real(self, path, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save)
    code, text = linmu("convert", "tiny-qwen2-vl", tmp_path / "out", "--save-teacher", tmp_path / "teacher")
    one_clear_line(code, text, "No space left on device")
    assert "nothing was written" in text and len(calls) == 2
    assert not list(tmp_path.iterdir())


def test_convert_prints_no_shard_bars(tmp_path):
    code, text = linmu("convert", "tiny-qwen2-vl", tmp_path / "out")
    assert code == 0, text
    assert "Writing model shards" not in text and "%|" not in text
    assert json.loads((tmp_path / "out" / "linmu.json").read_text())["source"] == "tiny-qwen2-vl"
