"""`linmu distill` under hostile or unlucky conditions (issue 14): forged and corrupt checkpoints, media paths
outside the root, --force with bad input, kills at awkward moments, two processes, NaN, resume overrides,
--stage, bad values, noisy decoders, accelerate on CPU. Every case first reproduces the reported failure."""

import gc
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import corrupt_mp4
from safetensors.torch import load_file
from typer.testing import CliRunner

from linmu_cli.cli import app
from linmu_cli.distillation import checkpoint, distill, load_recipe
from linmu_cli.distillation.trainer import lr_lambda
from linmu_cli.errors import LinmuError

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny.yaml"
SHORT = ["stages.stage1.steps=6", "stages.stage2.steps=4", "stages.stage3.steps=4", "data.heldout=2",
         "stages.stage1.save_every=3", "stages.stage2.save_every=2", "stages.stage3.save_every=2"]  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path, stage: str | None = None) -> list[tuple[str, int, float]]:
    return [(r["stage"], r["step"], r["loss"]) for r in records(out) if stage in (None, r["stage"])]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def listing(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One complete short run; tests work on copies of it."""
    out = tmp_path_factory.mktemp("base") / "run"
    distill(RECIPE, [f"output={out}", *SHORT])
    return out


def copy_run(base: Path, tmp_path: Path, name: str = "run") -> Path:
    out = tmp_path / name
    shutil.copytree(base, out)
    return out


def crash_in_stage1(out: Path) -> None:
    """What a kill during stage 1 after its step-3 checkpoint leaves (metrics up to step 5)."""
    for d in ("stage1", "stage2", "stage3", "final", "checkpoints/stage2", "checkpoints/stage3"):
        shutil.rmtree(out / d, ignore_errors=True)
    shutil.rmtree(out / "checkpoints" / "stage1" / "step-0000006")
    (out / "report.json").unlink()
    kept = [r for r in records(out) if r["stage"] == "stage1" and r["step"] <= 5]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def cli(*args: str):
    """`linmu distill RECIPE ARGS...` in process; `.text` is the output with line wrapping undone."""
    res = CliRunner().invoke(app, ["distill", str(RECIPE), *args])
    res.text = " ".join(res.output.split())
    return res


# --------------------------------------------------------------------------- security


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_forged_checkpoint_is_never_unpickled_and_stale_temporaries_go(base, tmp_path):
    """Items 1, 9, 16: a pickle planted as the newest step checkpoint runs no code; the resume falls back to
    the intact step-3, says so, cleans what a SIGKILL left and reproduces the uninterrupted stage exactly."""
    out = copy_run(base, tmp_path)
    crash_in_stage1(out)
    ckpts = out / "checkpoints" / "stage1"
    assert sorted(p.name for p in (ckpts / "step-0000003").iterdir()) == ["state.json", "tensors.safetensors"]
    marker = tmp_path / "pwned"
    (ckpts / "step-0000005").mkdir()
    (ckpts / "step-0000005" / "train_state.pt").write_bytes(pickle.dumps({"x": _Exploit(marker)}))
    stale = [out / ".stage1.tmp-999999", out / ".final.tmp-4242", ckpts / ".tmp-step-0000004-999999"]
    for p in stale:
        p.mkdir()
    res = cli(f"output={out}", *SHORT, "--stage", "stage1", "--resume")
    assert res.exit_code == 0, res.output
    assert not marker.exists()
    assert "step-0000005 is unusable" in res.text and "old pickle format" in res.text
    assert "resuming at step 3" in res.text and "removed 3 temporary" in res.text
    assert not any(p.exists() for p in stale)
    assert losses(out) == losses(base, "stage1")
    assert same_weights(out / "stage1", base / "stage1")
    with pytest.raises(checkpoint.CorruptCheckpoint, match="pickle"):
        checkpoint.load(ckpts / ".corrupt-step-0000005")


@pytest.mark.parametrize("damage", ["truncate", "zero", "random", "state"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(base, tmp_path, damage):
    """Item 9: truncated, zero-byte or random tensors, or a broken state.json: verified, the previous wins."""
    root = copy_run(base, tmp_path) / "checkpoints" / "stage1"
    tensors = root / "step-0000006" / "tensors.safetensors"
    data = tensors.read_bytes()
    if damage == "truncate":
        tensors.write_bytes(data[: len(data) // 2])
    elif damage == "zero":
        tensors.write_bytes(b"")
    elif damage == "random":
        tensors.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:
        (root / "step-0000006" / "state.json").write_text('{"format": 2, "sta')
    found = checkpoint.find_intact(root)
    assert found.path == root / "step-0000003" and found.state["step"] == 3
    assert [p.name for p, _ in found.broken] == ["step-0000006"]


def _manifest(tmp_path: Path, rows: list) -> Path:
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def _row(key: str, path) -> dict:
    return {key: path, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}


def test_manifest_media_paths_stay_inside_media_root(tmp_path):
    """Item 2: `../outside/secret.png` and absolute paths were read and trained on; now refused before anything
    is written, unless data.allow_outside_root says so."""
    from PIL import Image

    from linmu_cli.distillation.data import ManifestSource

    media, outside = tmp_path / "media", tmp_path / "outside"
    media.mkdir(), outside.mkdir()
    Image.fromarray(np.full((56, 56, 3), 7, np.uint8)).save(outside / "secret.png")
    ok = [_row("image", "ok.png")] * 3
    out = tmp_path / "run"
    for bad, why in (("../outside/secret.png", "leaves data.media_root"),
                     (str(outside / "secret.png"), "is absolute")):  # fmt: skip
        manifest = _manifest(tmp_path, [_row("image", bad), *ok])
        over = [
            f"output={out}",
            "data.source=manifest",
            f"data.manifest={manifest}",
            "data.heldout=1",
            f"data.media_root={media}",
        ]
        res = cli(*over)
        assert res.exit_code == 2 and why in res.text and "row 0" in res.text, res.output
        assert not out.exists()
        cfg = load_recipe(RECIPE, [*over, "data.allow_outside_root=true"]).data
        assert ManifestSource(cfg).example(0).media.getpixel((0, 0)) == (7, 7, 7)  # explicitly allowed


# --------------------------------------------------------------------------- data loss


def test_force_checks_teacher_and_data_before_deleting_the_old_run(base, tmp_path):
    """Item 3: `--force` with a typo'd teacher or a missing manifest destroyed final/ and every checkpoint."""
    out = copy_run(base, tmp_path)
    before = listing(out)
    for bad in (["teacher=tiny-qwen2-vll"], ["data.source=manifest", f"data.manifest={tmp_path}/none.jsonl"]):
        res = cli(f"output={out}", *SHORT, *bad, "--force")
        assert res.exit_code == 2, res.output
        assert listing(out) == before


def test_kill_after_stage3_before_final_is_finished_by_resume(base, tmp_path):
    """Item 4: stage3/ existed but final/ (and report.json's stage3) did not, and --resume said 'complete'."""
    out = copy_run(base, tmp_path)
    shutil.rmtree(out / "final")
    report = json.loads((out / "report.json").read_text())
    del report["stage3"]
    (out / "report.json").write_text(json.dumps(report))
    res = cli(f"output={out}", *SHORT, "--resume")
    assert res.exit_code == 0, res.output
    assert "finished the outputs of" in res.text
    assert same_weights(out / "final", base / "final")
    assert json.loads((out / "report.json").read_text()) == json.loads((base / "report.json").read_text())


def test_a_second_process_on_the_same_output_is_refused(tmp_path):
    """Item 5: two runs on one OUTPUT both exited 0 with mixed results; the second now names the holder."""
    out = tmp_path / "run"
    out.mkdir()
    code = ("import sys, time; from pathlib import Path; from linmu_cli.io import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1]), 'x'):\n    print('held', flush=True); time.sleep(60)")  # fmt: skip
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out / ".linmu.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LinmuError, match=rf"in use by another linmu process \(pid {holder.pid} on "):
            distill(RECIPE, [f"output={out}", *SHORT], stage="stage1")
        assert [p.name for p in out.iterdir()] == [".linmu.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_resume_applies_an_lr_override_and_refuses_fixed_fields(base, tmp_path):
    """Item 7: `--resume stages.stage1.lr=...` kept the checkpoint's lr while recipe.yaml recorded the new one."""
    out = copy_run(base, tmp_path)
    crash_in_stage1(out)
    res = cli(f"output={out}", *SHORT, "stages.stage1.batch_size=1", "--stage", "stage1", "--resume")
    assert res.exit_code == 2 and "stages.stage1.batch_size: 2 -> 1" in res.text, res.output
    res = cli(f"output={out}", *SHORT, "stages.stage1.lr=1e-4", "--stage", "stage1", "--resume")
    assert res.exit_code == 0, res.output
    cfg = load_recipe(RECIPE, [*SHORT, "stages.stage1.lr=1e-4"]).stages["stage1"]
    lrs = {r["step"]: r["lr"] for r in records(out)}
    assert lrs[3] == pytest.approx(3e-3 * lr_lambda(cfg)(3))  # before the resume: the old lr
    assert all(lrs[s] == pytest.approx(1e-4 * lr_lambda(cfg)(s)) for s in (4, 5, 6))
    stage = json.loads((out / "stage1" / "stage.json").read_text())
    assert stage["resume_changes"] == [{"step": 3, "changes": [["stages.stage1.lr", 0.003, 0.0001]]}]


def test_resume_never_redescribes_a_finished_stage(base, tmp_path):
    """Item 23: `--resume stages.stage3.steps=40` skipped stage 3 but rewrote recipe.yaml to say 40."""
    out = copy_run(base, tmp_path)
    recorded = (out / "recipe.yaml").read_bytes()
    res = cli(f"output={out}", *SHORT, "stages.stage3.steps=40", "--resume")
    assert (
        res.exit_code == 2
        and "stages.stage3.steps: 4 -> 40" in res.text
        and "--stage stage3 --force" in res.text
    )
    assert (out / "recipe.yaml").read_bytes() == recorded


def test_metrics_survive_a_kill_before_the_first_checkpoint_and_a_torn_line(base, tmp_path):
    """Items 8, 10: a kill before stage 2's first checkpoint duplicated its steps; a line torn mid-append
    made the run impossible to resume. The resumed run now equals the uninterrupted one, metrics included."""
    out = copy_run(base, tmp_path)
    for d in ("stage2", "stage3", "final", "checkpoints/stage2", "checkpoints/stage3"):
        shutil.rmtree(out / d)
    kept = [r for r in records(out) if r["stage"] == "stage1" or (r["stage"], r["step"]) == ("stage2", 1)]
    torn = "".join(json.dumps(r) + "\n" for r in kept) + '{"stage": "stage2", "step": 2, "lo'
    (out / "metrics.jsonl").write_text(torn)
    res = cli(f"output={out}", *SHORT, "--resume")
    assert res.exit_code == 0, res.output
    assert "dropped 1 torn line" in res.text
    assert losses(out) == losses(base)
    assert same_weights(out / "final", base / "final")


def test_nan_stop_keeps_a_checkpoint_that_resumes(tmp_path):
    """Item 6: the 'last good checkpoint' held the diverged weights; it is now set aside, the one before named,
    and resuming from it with a lower lr (applied, item 7) trains on with finite losses."""
    out = tmp_path / "nan"
    over = [f"output={out}", "data.heldout=1", "stages.stage1.steps=8", "stages.stage1.max_grad_norm=1e30",
            "stages.stage1.schedule=constant", "stages.stage1.warmup_steps=0", "stages.stage1.save_every=1"]  # fmt: skip
    with pytest.raises(
        LinmuError, match="the loss became unusable .its gradient norm is nan. at step 4"
    ) as exc:
        distill(RECIPE, [*over, "stages.stage1.lr=30"], stage="stage1")
    ckpts = out / "checkpoints" / "stage1"
    assert f"Last good checkpoint: {ckpts / 'step-0000002'}." in str(exc.value)
    assert (ckpts / ".diverged-step-0000003").is_dir()
    distill(RECIPE, [*over, "stages.stage1.lr=1e-3"], stage="stage1", resume=True)
    assert [r["step"] for r in records(out)] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in records(out))


def test_failed_run_leaves_nothing_and_the_corrected_rerun_starts(tmp_path):
    """Item 16: a run failing before its first checkpoint left OUTPUT/recipe.yaml (an empty OUTPUT), and the
    corrected rerun was refused ('already holds a run')."""
    out = tmp_path / "run"
    over = [f"output={out}", "data.heldout=1", "stages.stage1.steps=3", "stages.stage1.max_grad_norm=1e30",
            "stages.stage1.schedule=constant", "stages.stage1.warmup_steps=0"]  # fmt: skip
    with pytest.raises(LinmuError, match="became nan"):
        distill(RECIPE, [*over, "stages.stage1.lr=1e30"], stage="stage1")
    assert not out.exists()
    distill(RECIPE, over, stage="stage1")
    assert (out / "stage1" / "stage.json").is_file()


def test_stage_runs_one_stage_and_force_replaces_only_it_and_what_follows(base, tmp_path):
    """Item 22: `--stage stage2 --force` deleted the whole run and then failed; without --force a stage could
    only run with --resume. Now: stage2 alone, then stage3 alone, stage1 untouched throughout."""
    out = copy_run(base, tmp_path)
    stage1 = listing(out / "stage1")
    res = cli(f"output={out}", *SHORT, "--stage", "stage2")
    assert res.exit_code == 2 and "--force to retrain stage2 (replacing stage2, stage3)" in res.text
    res = cli(f"output={out}", *SHORT, "teacher=tiny-qwen2-vll", "--stage", "stage2", "--force")
    assert res.exit_code == 2 and (out / "final").is_dir()
    res = cli(f"output={out}", *SHORT, "--stage", "stage2", "--force")
    assert res.exit_code == 0, res.output
    assert "removed stage2, stage3 and final" in res.text and "stage2: starting from" in res.text
    assert not (out / "stage3").exists() and not (out / "final").exists()
    assert set(json.loads((out / "report.json").read_text())) == {"stage1", "stage2"}
    assert listing(out / "stage1") == stage1 and same_weights(out / "stage2", base / "stage2")
    res = cli(f"output={out}", *SHORT, "--stage", "stage3")
    assert res.exit_code == 0, res.output
    assert same_weights(out / "final", base / "final") and losses(out) == losses(base)


def test_force_on_an_interrupted_stage_starts_it_over(base, tmp_path):
    """Item 22: `--stage stage1 --force` on a stage killed midway retrains it from the start (its step
    checkpoints go with it), never resuming from what it replaces."""
    out = copy_run(base, tmp_path)
    crash_in_stage1(out)
    res = cli(f"output={out}", *SHORT, "--stage", "stage1", "--force")
    assert res.exit_code == 0, res.output
    assert "stage1: starting from conversion" in res.text and "resuming" not in res.text
    assert losses(out) == losses(base, "stage1") and same_weights(out / "stage1", base / "stage1")


# --------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.text_window=true", "recipe.model.text_window: expected int, got True"),
        ("model.vision_window=5", "recipe.model.vision_window: expected a list"),
        ("model.dt_min=abc", "recipe.model.dt_min: expected float"),
        ("model.text_windw=8", "did you mean 'text_window'"),
        ("stages.stage1.warmup_steps=-1", "warmup_steps=-1: must be >= 0"),
        ("stages.stage1.lr=.inf", "stages.stage1.lr: expected a finite number, got inf"),
        ("stages.stage1.lr=.nan", "stages.stage1.lr: expected a finite number, got nan"),
        ("stages.stage3.loss.temperature=0", "temperature=0.0: must be > 0"),
        ("data.heldout=0", "data.heldout=0: must be >= 1"),
        ("stages.stage2.max_grad_norm=0", "max_grad_norm=0.0: must be > 0"),
    ],
)
def test_recipe_values_that_cannot_work_are_refused(override, message):
    """Items 12-13: these were accepted (NaN at step 1, ZeroDivisionError, a bool taken as an int)."""
    with pytest.raises(LinmuError, match="^recipe|^unknown") as exc:
        load_recipe(RECIPE, [override])
    assert message in str(exc.value)


def test_bad_manifests_and_outputs_are_one_line_errors(tmp_path):
    """Item 12: rows that are scalars, a `video` that is a number, output= an existing file: tracebacks."""
    out = tmp_path / "run"
    for rows, message in (([1, 2, 3], "row 0 is int"), ([_row("video", 5), *[_row("image", "a.png")] * 2],
                                                         "'video' must be a path")):  # fmt: skip
        res = cli(f"output={out}", "data.source=manifest", f"data.manifest={_manifest(tmp_path, rows)}")
        assert res.exit_code == 2 and message in res.text, res.output
        assert len(res.output.strip().splitlines()) == 1 and not out.exists()
    (tmp_path / "file").write_text("x")
    res = cli(f"output={tmp_path / 'file'}")
    assert res.exit_code == 2 and "is a file, not a run directory" in res.text


def test_corrupt_video_is_counted_without_decoder_noise(tmp_path, capfd):
    """Item 15: a corrupt mp4 printed ffmpeg's decoder noise (thousands of lines for a long video) before the
    one-line skip; now nothing reaches stderr and the sample is a counted skip."""
    import decord

    from linmu_cli.distillation.data import SkipSample, read_video

    path = corrupt_mp4(tmp_path / "v.mp4")
    decord.logging.set_level(decord.logging.INFO)  # decord's default: the noise the issue saw

    def raw_decode() -> None:
        reader = decord.VideoReader(str(path))
        try:
            reader.get_batch(list(range(len(reader)))).asnumpy()
        finally:  # release the reader (and its decoder threads, which still log) before reading the capture
            del reader

    with pytest.raises(Exception):  # noqa: B017 (decord raises its own error types)
        raw_decode()
    gc.collect()
    assert "[mpeg4 @" in capfd.readouterr().err
    with pytest.raises(SkipSample, match="corrupt video"):
        read_video(path, 8, None)
    assert capfd.readouterr().err == ""


def test_accelerate_launch_on_cpu_says_it_runs_one_process(tmp_path):
    """Item 24: `accelerate launch --num_processes 2` on CPU silently ran a single process."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "-m", "linmu_cli",
           "distill", str(RECIPE), f"output={out}"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode != 0 and "torchrun --nproc_per_node N -m linmu_cli distill" in res.stderr, (
        res.stderr[-2000:]
    )
    assert not out.exists()


def test_stale_temporaries_of_dead_processes_are_removed_and_a_finished_rename_is_completed(tmp_path):
    """Item 16 (linmu_cli.io, shared with convert / eval): `.NAME.tmp-PID` of a live process stays, of a dead
    one goes; a kill between atomic_directory's two renames (NAME gone, `.NAME.old-PID` and the complete
    `.NAME.tmp-PID` left) puts the new result in place instead of losing both."""
    from linmu_cli.io import remove_stale_temporaries

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    live = tmp_path / f".eval.tmp-{os.getpid()}"
    gone = tmp_path / f".convert.tmp-{pid}"
    for d in (live, gone, tmp_path / f".stage2.old-{pid}", tmp_path / f".stage2.tmp-{pid}"):
        d.mkdir()
    (tmp_path / f".stage2.tmp-{pid}" / "stage.json").write_text("{}")
    removed = remove_stale_temporaries(tmp_path)
    assert live.is_dir() and not gone.exists()
    assert (tmp_path / "stage2" / "stage.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "stage2"])
    assert len(removed) == 2
    remove_stale_temporaries(tmp_path, any_pid=True)  # the caller holds the directory's lock
    assert not live.exists()


def test_unwritable_output_and_a_full_disk_are_one_line_errors(base, tmp_path, monkeypatch):
    """Item 12 (distill): a read-only place failed with a traceback after the teacher loaded; a full disk
    while writing a checkpoint ended in `OSError: No space left on device`."""
    import errno

    res = cli("output=/proc/linmu-run", *SHORT)
    assert res.exit_code == 2 and "cannot write /proc/linmu-run" in res.text, res.output
    out = copy_run(base, tmp_path)
    crash_in_stage1(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "checkpoints"))

    monkeypatch.setattr(checkpoint, "save", full)
    res = cli(f"output={out}", *SHORT, "--stage", "stage1", "--resume")
    assert res.exit_code == 2 and "No space left on device" in res.text and "then --resume" in res.text
    assert "Traceback" not in res.output
    assert (out / "checkpoints" / "stage1" / "step-0000003" / "state.json").is_file()


def test_resume_continues_with_the_recorded_cpu_thread_count(tmp_path):
    """CPU kernels round differently with another thread count (a resumed run left the trajectory in the last bits
    when the thread policy picked 1 thread on a busy machine and 2 on an idle one): a resume takes the count
    recorded in the checkpoint, or in a finished stage's stage.json."""
    from types import SimpleNamespace

    from linmu_cli.distillation.trainer import _use_recorded_threads

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    said: list[str] = []
    run = SimpleNamespace(device=torch.device("cpu"), out=tmp_path, print=lambda *a, **k: said.append(a[0]))
    try:
        _use_recorded_threads(run, {"cpu_threads": want})
        assert torch.get_num_threads() == want and "trained with" in said[0]
        torch.set_num_threads(before)
        (tmp_path / "stage1").mkdir()
        (tmp_path / "stage1" / "stage.json").write_text(json.dumps({"cpu_threads": want}))
        _use_recorded_threads(run, None)
        assert torch.get_num_threads() == want
        torch.set_num_threads(before)
        _use_recorded_threads(SimpleNamespace(device=torch.device("meta"), out=tmp_path, print=print), None)
        assert torch.get_num_threads() == before  # not on other devices
    finally:
        torch.set_num_threads(before)
