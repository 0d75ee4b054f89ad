"""``omnitrain slurm submit`` and ``slurm/train.sbatch``: the sbatch command it builds, its errors, and
on a real one-node Slurm (tests/slurm_cluster.py, root only) a job that is preempted with SIGUSR1,
requeues itself, resumes from its checkpoint and ends with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omnitrain.cli import main
from omnitrain.data.loader import LoaderConfig, SourceSpec
from omnitrain.train import checkpoint
from omnitrain.train.loop import TrainConfig
from omnitrain.train.runlog import git_commit, read_metrics
from omnitrain.train.slurm import submit
from omnitrain.train.strategy import StrategyConfig
from tests.conftest import REPO
from tests.synthetic import make_omni_sources

STEPS = 120  # ~11 steps/s on one core: ~11 s of training, the signal lands within the first ~10 steps
# relative data paths on purpose: the job must run in the submit directory (sbatch --chdir)
TINY = [f"steps={STEPS}", "ckpt_every=1000", "threads=1", "wandb.mode=disabled", "export=false", "strategy.accelerator=cpu",
        "model.dim=64", "model.n_layers=2", "data.seq_len=256", "~data.sources",
        "+data.sources={text:{path:src/text},caption:{path:src/caption},speech:{path:src/speech}}"]  # fmt: skip
OMNITRAIN = [sys.executable, "-m", "omnitrain.cli"]


def path_without(binary: str) -> str:
    return os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / binary).exists())


def fake_sbatch(folder: Path, script: str) -> Path:
    """An ``sbatch`` on PATH that records its arguments in ``folder/argv`` and runs ``script``."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "sbatch"
    exe.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{folder}/argv"\n{script}\n')
    exe.chmod(0o755)
    return folder


def test_without_sbatch_submit_says_no_slurm_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", path_without("sbatch"))
    with pytest.raises(FileNotFoundError, match="no Slurm here: `sbatch` is not on PATH"):
        submit(TrainConfig(run_dir=tmp_path / "run"), [])
    assert main(["slurm", "submit", f"run_dir={tmp_path / 'run'}"]) == 1  # the CLI: one line, no traceback
    err = capsys.readouterr().err
    assert "no Slurm here" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_submit_snapshots_code_config_and_overrides_and_shapes_the_job(tmp_path, monkeypatch, capsys):
    bin_dir = fake_sbatch(tmp_path / "bin", "echo 4242")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("OMNITRAIN_SBATCH_ARGS", raising=False)
    monkeypatch.chdir(tmp_path)
    sources = {name: SourceSpec(path=str(path.relative_to(tmp_path))) for name, path in make_omni_sources(tmp_path / "src").items()}
    cfg = TrainConfig(run_dir=Path("runs/big"), strategy=StrategyConfig(name="ddp", devices=2, num_nodes=3, accelerator="cpu"), threads=2,
                      data=LoaderConfig(sources=sources, seq_len=128))  # fmt: skip
    assert submit(cfg, ["run_dir=runs/big", "strategy=ddp", "strategy.devices=2"]) == "4242"
    run = tmp_path / "runs" / "big"
    argv = (bin_dir / "argv").read_text().splitlines()
    for flag in ("--nodes=3", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=2", f"--chdir={tmp_path}",
                 f"--output={run}/slurm-%j.out", "--job-name=big"):  # fmt: skip
        assert flag in argv
    assert argv[-2:] == [str(run / "code" / "slurm" / "train.sbatch"), str(run)]  # the snapshot's script, not the checkout's
    assert (run / "overrides.txt").read_text().splitlines() == ["strategy=ddp", "strategy.devices=2", f"run_dir='{run}'"]
    assert json.loads((run / "code" / "COMMIT").read_text())["commit"] == git_commit(REPO)["commit"]
    for f in ("src/omnitrain/train/loop.py", "src/omnitrain/train/slurm.py", "recipes/train.yaml", "slurm/train.sbatch"):
        assert (run / "code" / f).read_bytes() == (REPO / f).read_bytes(), f
    assert (run / "slurm_job_id").read_text().strip() == "4242"
    assert "submitted job 4242" in capsys.readouterr().out

    monkeypatch.setenv("OMNITRAIN_SBATCH_ARGS", "--partition=nope")  # extra flags come last; a refusal is reported
    bin_dir = fake_sbatch(tmp_path / "bin", 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1')
    cfg.run_dir = Path("runs/other")
    with pytest.raises(ValueError, match="sbatch failed \\(exit 1\\): sbatch: error: invalid partition specified: nope"):
        submit(cfg, [])
    assert (bin_dir / "argv").read_text().splitlines()[-3] == "--partition=nope"


def wait_until(what: str, ready, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"; job log:\n{log.read_text()[-3000:]}" if log and log.exists() else ""))


@pytest.mark.slow
def test_a_preempted_slurm_job_requeues_resumes_and_matches_an_uninterrupted_run(cluster, tmp_path):
    make_omni_sources(tmp_path / "src")
    no_slurm_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    sub = subprocess.run([*OMNITRAIN, "slurm", "submit", "run_dir=job", *TINY], cwd=tmp_path, env=cluster.env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    run = tmp_path / "job"
    job = (run / "slurm_job_id").read_text().strip()
    assert f"submitted job {job}" in sub.stdout
    log = run / f"slurm-{job}.out"
    # the reference, uninterrupted and outside Slurm, meanwhile on the node's other core
    ref = subprocess.Popen([*OMNITRAIN, "train", "run_dir=ref", *TINY], cwd=tmp_path, env=no_slurm_env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip

    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

    def trained_or_ended() -> bool:
        metrics = run / "metrics.jsonl"  # complete lines only: a line being written is no JSON yet
        return (metrics.is_file() and metrics.read_text().count("\n") >= 5) or cluster.job(job).get("JobState") in ended

    try:
        wait_until("5 trained steps", trained_or_ended, 90, log)
        cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@120 does before the time limit
        wait_until("the requeued job to end", lambda: cluster.job(job).get("JobState") in ended, 120, log)
        assert cluster.job(job)["JobState"] == "COMPLETED", log.read_text()[-3000:]
        out = ref.communicate(timeout=120)[0]
        assert ref.returncode == 0, out
    finally:
        ref.kill()

    # preempted at step k: saved, requeued itself, restarted as the same job and resumed from step k
    first, second = json.loads((run / "run.json").read_text())["attempts"]
    k = second["start_step"]
    assert 5 <= k < STEPS
    assert second["resumed_from"] == str(checkpoint.step_dir(run, k))
    assert first["slurm_job_id"] == second["slurm_job_id"] == job
    assert (first["slurm_restart_count"], second["slurm_restart_count"]) == (None, "1")
    assert cluster.job(job)["Restarts"] == "1"
    text = (run / "logs" / job / "rank-0.out").read_text()  # each rank's own log, both attempts appended
    assert f"SIGUSR1: saved step {k} and stopped" in text and f"scontrol requeue {job}: ok" in text
    assert "srun finished (exit 0)" in log.read_text() and f"rank logs: {run}/logs/{job}/rank-<r>.out" in log.read_text()
    assert [p.name for p in checkpoint.complete_checkpoints(run)] == [f"step_{k:09d}", f"step_{STEPS:09d}"]
    # the job ran the snapshot, not the checkout
    assert second["argv"][0] == str(run / "code" / "src" / "omnitrain" / "cli.py")
    assert second["commit"] == json.loads((run / "code" / "COMMIT").read_text())["commit"] == first["commit"]

    # every step once, and exactly the losses of the uninterrupted run (fp32 on CPU: bit-identical)
    got, want = read_metrics(run), read_metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
