"""`linmu distill --resume` on another number of processes (gloo on CPU), and the stage-run object.

What "the same trajectory" means across a world-size change (checkpoint.place_rank): the weights, AdamW
moments, schedule and step continue bit for bit from the checkpoint (re-sharded under FSDP), and the global
sample order continues at the first sample no rank had read. With batch_size=1 and grad_accum scaled by the
change, every optimizer step then averages the gradients of the same samples, batched the same way, as the
uninterrupted run: its losses agree up to the order of floating-point sums (DDP's all-reduce against
accumulation in one process), as FSDP's agree with DDP's.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from linmu_cli.distillation import checkpoint, distill

RECIPE = Path(__file__).parents[2] / "recipes" / "tiny.yaml"
STAGE1 = [
    "data.heldout=1",
    "stages.stage1.steps=6",
    "stages.stage1.save_every=3",
    "stages.stage1.batch_size=1",
]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and all(
        abs(x - y) <= 1e-4 * max(1.0, abs(x)) for (_, x), (_, y) in zip(a, b, strict=True)
    )


def launch(out: Path, processes: int, extra: list[str], port: int) -> None:
    args = ["-m", "linmu_cli", "distill", str(RECIPE), f"output={out}", *STAGE1, "--stage", "stage1", *extra]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port),
                *args]  # fmt: skip
    res = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def stop_after_step_3(src: Path, dst: Path) -> Path:
    """A copy of a finished stage-1 run as a kill after its step-3 checkpoint leaves it."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "stage1")
    shutil.rmtree(dst / "checkpoints" / "stage1" / "step-0000006")
    kept = [
        line for line in (dst / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4
    ]
    (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in kept))
    return dst


def last_state(out: Path) -> dict:
    return checkpoint.load(checkpoint.step_dirs(out / "checkpoints" / "stage1")[-1])


def test_resume_on_another_number_of_processes_continues_the_trajectory(tmp_path):
    """2 processes (FSDP) stopped at step 3 resume on 1 with grad_accum 2, and 1 process with grad_accum 2
    resumes on 2 (FSDP) with grad_accum 1: the steps continue, no sample is read twice or passed over, and
    the losses and weights are those of the uninterrupted runs."""
    two, one = tmp_path / "two", tmp_path / "one"
    launch(two, 2, ["distributed.strategy=fsdp", "stages.stage1.grad_accum=1"], 29561)
    distill(RECIPE, [f"output={one}", *STAGE1, "stages.stage1.grad_accum=2"], stage="stage1")
    assert close(losses(two), losses(one))  # the two layouts of the same global batches

    down = stop_after_step_3(two, tmp_path / "down")
    distill(RECIPE, [f"output={down}", *STAGE1, "stages.stage1.grad_accum=2"], stage="stage1", resume=True)
    assert losses(down)[:3] == losses(two)[:3] and close(losses(down), losses(two))
    assert last_state(down)["data_positions"] == [12]  # samples 0..11, each once
    stage = json.loads((down / "stage1" / "stage.json").read_text())
    assert stage["resume_changes"] == [
        {"step": 3, "changes": [["stages.stage1.grad_accum", 1, 2], ["processes", 2, 1]]}
    ]

    up = stop_after_step_3(one, tmp_path / "up")
    launch(up, 2, ["distributed.strategy=fsdp", "stages.stage1.grad_accum=1", "--resume"], 29562)
    assert losses(up)[:3] == losses(one)[:3] and close(losses(up), losses(one))
    assert last_state(up)["data_positions"] == [6, 6]  # rank r read samples r, r + 2, ... up to 11
    for a, b in ((down, two), (up, one)):
        x, y = (
            load_file(str(a / "stage1" / "model.safetensors")),
            load_file(str(b / "stage1" / "model.safetensors")),
        )
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-4, atol=1e-6) for k in x)


def test_place_rank_maps_positions_and_rng_between_world_sizes():
    """The arithmetic behind the test above, including drift from skipped samples and new ranks' RNG."""
    rng = [{"torch": torch.tensor([r])} for r in range(2)]
    state = {"data_positions": [5, 5], "rng": rng, "step": 3}
    assert checkpoint.place_rank(state, 1, 2, seed=0) == (5, rng[1])  # same world: exactly what it had
    assert checkpoint.place_rank(state, 0, 1, seed=0) == (10, rng[0])  # 0..9 were read
    pos, _ = checkpoint.place_rank(state, 2, 4, seed=0)
    assert pos == 3  # 10 rounded up to 12 = 3 x 4: samples 10 and 11 are passed over, none read twice
    drift = {"data_positions": [7, 5], "rng": rng, "step": 3}  # rank 0 skipped two bad samples
    assert checkpoint.place_rank(drift, 0, 1, seed=0)[0] == 13  # after rank 0's last read, sample 12
    a = checkpoint.place_rank({"data_positions": [4], "rng": rng[:1], "step": 2}, 1, 2, seed=0)[1]
    b = checkpoint.place_rank({"data_positions": [4], "rng": rng[:1], "step": 2}, 1, 2, seed=0)[1]
    assert torch.equal(a["torch"], b["torch"]) and not torch.equal(a["torch"], torch.get_rng_state())


def test_stage_run_reports_progress_and_the_api_stays_quiet(tmp_path, capsys):
    """The Python API prints nothing; the progress callback sees the start and every step of each stage."""
    seen = []
    distill(RECIPE, [f"output={tmp_path / 'run'}", *STAGE1, "stages.stage1.steps=3"], stage="stage1",
            progress=seen.append)  # fmt: skip
    assert [(p.stage, p.step, p.steps) for p in seen] == [("stage1", s, 3) for s in range(4)]
    assert seen[0].loss is None and all(p.loss > 0 and p.tokens_per_s > 0 for p in seen[1:])
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_optimizer_states_load_into_any_strategy():
    """One process and DDP save AdamW states keyed by index, FSDP by parameter name: each converts to the
    other (what a resume on another strategy or world loads), and a round trip changes nothing."""
    from linmu_cli.distillation.parallel import Single, by_index, by_name

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    named = by_name(model, saved)
    assert (
        list(named["state"]) == ["0.bias", "1.weight", "1.bias"]
        and named["param_groups"][0]["params"][0] == "0.bias"
    )
    assert by_name(model, named) is named and by_index(model, saved) is saved
    other = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    Single().load_optimizer_state(model, other, named)
    again = other.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    assert all(
        torch.equal(again["state"][i][k], saved["state"][i][k])
        for i in saved["state"]
        for k in saved["state"][i]
    )
