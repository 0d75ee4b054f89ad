"""Cluster operations (issue 20): preemption signals during start-up and across ranks, wandb offline on
compute nodes, ``slurm/train.sbatch``'s defaults, and ``omnitrain slurm submit``'s dry run and failures.
The Slurm points also run on the real one-node local Slurm (``tests/train/slurm_cluster.py``, root only)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omnitrain.cli import COMMANDS, compose, recipes_dir
from omnitrain.train import loop
from omnitrain.train.preemption import Preemption
from omnitrain.train.runlog import RunLog, WandbConfig, read_metrics
from tests.synthetic import make_omni_sources

TRAIN = next(c for c in COMMANDS if c.name == "train")
OMNITRAIN = [sys.executable, "-m", "omnitrain.cli"]


def tiny(sources: str, steps: int) -> list[str]:
    """A tiny CPU run on the synthetic sources under ``sources`` (relative paths: the job runs in the submit dir)."""
    return [f"steps={steps}", "ckpt_every=1000", "threads=1", "wandb.mode=disabled", "export=false", "strategy.accelerator=cpu",
            "model.dim=64", "model.n_layers=2", "data.seq_len=128", "data.batch_size=2", "~data.sources",
            f"+data.sources={{text:{{path:{sources}/text}},caption:{{path:{sources}/caption}},speech:{{path:{sources}/speech}}}}"]  # fmt: skip


# ----------------------------------------------------------------------------- preemption
class _Fabric:
    """What Preemption.requested needs of Fabric, on a gloo process group."""

    def __init__(self, world_size: int) -> None:
        import torch

        self.world_size, self.device = world_size, torch.device("cpu")

    def all_reduce(self, t, reduce_op: str):  # noqa: ANN001, ANN201
        import torch.distributed as dist

        assert reduce_op == "max"
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t


def _signal_rank(rank: int, port: int, signals: list[int], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    preempt = Preemption()
    try:
        if signals[rank]:
            os.kill(os.getpid(), signals[rank])  # delivered before the next bytecode: the handler has run on return
        agreed = preempt.requested(_Fabric(2))
    finally:
        preempt.restore()
    Path(f"{out}.{rank}").write_text(str(agreed))
    dist.destroy_process_group()


@pytest.mark.parametrize("signals, want", [((signal.SIGUSR1, signal.SIGTERM), signal.SIGUSR1),
                                           ((signal.SIGTERM, 0), signal.SIGTERM), ((0, 0), 0)],
                         ids=["usr1+term->requeue", "term->stop", "none"])  # fmt: skip
def test_ranks_agree_on_one_signal_and_usr1_on_any_rank_means_requeue(signals, want, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_signal_rank, args=(port, [int(s) for s in signals], str(tmp_path / "agreed")), nprocs=2)
    assert [int((tmp_path / f"agreed.{r}").read_text()) for r in (0, 1)] == [want, want]


def test_a_term_after_a_usr1_keeps_the_requeue_and_restore_gives_the_signals_back():
    before = signal.getsignal(signal.SIGUSR1)
    preempt = Preemption.install()
    assert Preemption.install() is preempt  # train() takes over what `omnitrain train` installed before its imports
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.signal == signal.SIGUSR1
    finally:
        preempt.restore()
    assert signal.getsignal(signal.SIGUSR1) == before and Preemption.install() is not preempt
    Preemption.install().restore()


def test_a_usr1_during_start_up_stops_before_the_first_step_and_requeues(tmp_path, monkeypatch, capsys):
    sources = make_omni_sources(tmp_path / "src")
    bin_dir = tmp_path / "bin"  # a fake scontrol that records the requeue
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" > "{bin_dir}/requeued"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    build_run = loop.build_run

    def build_run_signalled(*args):  # noqa: ANN002, ANN202
        os.kill(os.getpid(), signal.SIGUSR1)  # what Slurm's --signal=USR1@120 does to a job still starting up
        return build_run(*args)

    monkeypatch.setattr(loop, "build_run", build_run_signalled)
    cfg, plain = compose(TRAIN, [f"run_dir={tmp_path / 'run'}", *tiny(str(tmp_path / "src"), 5)], recipes_dir())
    summary = loop.train(cfg, plain)
    assert summary["preempted"] and summary["step"] == 0
    assert "SIGUSR1: during start-up, before step 1 (nothing new to save) and stopped" in capsys.readouterr().out
    assert (bin_dir / "requeued").read_text().split() == ["requeue", "777"]
    assert not (tmp_path / "run" / "checkpoints").exists() and read_metrics(tmp_path / "run") == []
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored
    assert sources


# ----------------------------------------------------------------------------- wandb offline on compute nodes
def test_pretrain_logs_wandb_offline_and_the_run_prints_the_sync_command(tmp_path, capsys):
    cfg, _ = compose(TRAIN, ["experiment=pretrain"], recipes_dir())
    assert cfg.wandb.mode == "offline"
    log = RunLog(tmp_path, True, {"a": 1}, WandbConfig(mode="offline"), 1, 0, 1, None)
    log.close()
    out = capsys.readouterr().out
    folder = next((tmp_path / "wandb").glob("offline-run-*"))
    assert f"upload it with `wandb sync {folder}`" in out


# ----------------------------------------------------------------------------- slurm submit: dry run, refusals
def _fake_sbatch(folder: Path, script: str) -> Path:
    """An ``sbatch`` that records that it ran (``folder/called``) and runs ``script``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sbatch").write_text(f'#!/usr/bin/env bash\ntouch "{folder}/called"\n{script}\n')
    (folder / "sbatch").chmod(0o755)
    return folder


def _submit(cwd: Path, *overrides: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    env.pop("OMNITRAIN_SBATCH_ARGS", None)
    return subprocess.run([*OMNITRAIN, "slurm", "submit", *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_plan_the_script_and_the_command_and_submits_nothing(tmp_path):
    make_omni_sources(tmp_path / "src")
    bin_dir = _fake_sbatch(tmp_path / "bin", "echo 1")
    res = _submit(tmp_path, "run_dir=job", "dry_run=true", "cluster.gpu=a100", *tiny("src", 5), path=f"{bin_dir}:{os.environ['PATH']}")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "omnitrain plan: 1 node(s) x 1 a100" in out and "plan ok" in out  # the same checks as omnitrain plan
    assert "#SBATCH --exclusive" in out and "TORCH_NCCL_ASYNC_ERROR_HANDLING" in out  # the script it would submit
    assert f"--ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 {tmp_path}/job/code/slurm/train.sbatch {tmp_path}/job" in out
    assert "steps=5\n" in out and "dry_run" not in out.split("--- command")[0].split("overrides.txt")[1]  # the job's overrides
    assert "dry run: nothing written, nothing submitted" in out
    assert not (tmp_path / "job").exists() and not (bin_dir / "called").exists()


def test_submit_refuses_a_job_that_cannot_start_before_writing_or_calling_sbatch(tmp_path):
    bin_dir = _fake_sbatch(tmp_path / "bin", "echo 1")
    res = _submit(tmp_path, "run_dir=job", *tiny("nowhere", 5), path=f"{bin_dir}:{os.environ['PATH']}")
    assert res.returncode == 1 and "CANNOT START: source 'text': nowhere/text does not exist" in res.stdout
    assert not (tmp_path / "job").exists() and not (bin_dir / "called").exists()


def test_data_checks_false_submits_a_job_whose_data_only_the_compute_nodes_see(tmp_path):
    bin_dir = _fake_sbatch(tmp_path / "bin", "echo 1")
    res = _submit(tmp_path, "run_dir=job", "data_checks=false", *tiny("nowhere", 5), path=f"{bin_dir}:{os.environ['PATH']}")
    assert res.returncode == 0, res.stderr
    assert "NOT CHECKED (data_checks=false): source 'text': nowhere/text does not exist" in res.stdout
    assert (bin_dir / "called").exists() and "CANNOT START" not in res.stdout


@pytest.mark.parametrize("stderr, hint", [
    ("sbatch: error: Unable to contact slurm controller (connect failure)", "the Slurm controller is unreachable from this host"),
    ('sbatch: error: slurm_set_addr: Unable to resolve "ctl.cluster"', "the Slurm controller is unreachable from this host"),
    ("sbatch: error: invalid partition specified: gpu", "fix the partition: SBATCH_PARTITION"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified", "fix the account"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)", "fix the time limit"),
], ids=["controller", "dns", "partition", "account", "time"])  # fmt: skip
def test_a_refused_submit_names_the_cause_and_leaves_nothing_behind(stderr, hint, tmp_path):
    make_omni_sources(tmp_path / "src")
    bin_dir = _fake_sbatch(tmp_path / "bin", f"echo '{stderr}' >&2; exit 1")
    res = _submit(tmp_path, "run_dir=job", *tiny("src", 5), path=f"{bin_dir}:{os.environ['PATH']}")
    assert res.returncode == 1 and (bin_dir / "called").exists()
    assert "sbatch failed (exit 1)" in res.stderr and hint in res.stderr and "Nothing was submitted" in res.stderr
    assert not (tmp_path / "job").exists()  # no half-written run folder, no script


def test_a_refused_resubmit_puts_the_previous_snapshot_back(tmp_path):
    make_omni_sources(tmp_path / "src")
    run = tmp_path / "job"
    (run / "code").mkdir(parents=True)
    (run / "code" / "COMMIT").write_text("old\n")
    (run / "overrides.txt").write_text("steps=3\n")
    (run / "checkpoints").mkdir()
    bin_dir = _fake_sbatch(tmp_path / "bin", "echo 'sbatch: error: invalid partition specified: x' >&2; exit 1")
    res = _submit(tmp_path, "run_dir=job", *tiny("src", 5), path=f"{bin_dir}:{os.environ['PATH']}")
    assert res.returncode == 1 and "fix the partition" in res.stderr
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "code", "overrides.txt"]
    assert (run / "code" / "COMMIT").read_text() == "old\n" and (run / "overrides.txt").read_text() == "steps=3\n"


# ----------------------------------------------------------------------------- on the real local Slurm
def _wait(what: str, ready, timeout: float, logs: list[Path]) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    text = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.is_file())
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{text}")


def _catches_usr1(run: Path) -> bool:
    """Whether a task of the job (``omnitrain.cli ... run_dir=<run>``) has its SIGUSR1 handler installed."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if "omnitrain.cli" in cmdline and str(run) in cmdline:
            caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
            if caught >> (signal.SIGUSR1 - 1) & 1:
                return True
    return False


@pytest.mark.slow
def test_on_slurm_a_usr1_while_the_job_starts_up_requeues_it_and_the_requeued_job_completes(cluster, tmp_path):
    make_omni_sources(tmp_path / "src")
    sub = subprocess.run([*OMNITRAIN, "slurm", "submit", "run_dir=job", *tiny("src", 6)], cwd=tmp_path, env=cluster.env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    run = tmp_path / "job"
    job = (run / "slurm_job_id").read_text().strip()
    logs = [run / f"slurm-{job}.out", run / "logs" / job / "rank-0.out"]
    # the task's handler is in place right after `python -m omnitrain.cli` starts: it is still importing torch
    _wait("the job's task to start", lambda: _catches_usr1(run), 60, logs)
    cluster.run("scancel", "--signal=USR1", job)
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    _wait("the requeued job to end", lambda: cluster.job(job).get("JobState") in ended, 150, logs)
    assert cluster.job(job)["JobState"] == "COMPLETED" and cluster.job(job)["Restarts"] == "1", logs[1].read_text()[-3000:]
    text = logs[1].read_text()
    assert "SIGUSR1: during start-up, before step 1 (nothing new to save) and stopped" in text and f"scontrol requeue {job}: ok" in text
    attempts = json.loads((run / "run.json").read_text())["attempts"]
    assert [a["start_step"] for a in attempts] == [0, 0] and [r["step"] for r in read_metrics(run)] == list(range(1, 7))


@pytest.mark.slow
def test_on_slurm_dry_run_submits_nothing_and_refusals_name_the_real_cause(cluster, tmp_path):
    make_omni_sources(tmp_path / "src")
    env = {k: v for k, v in cluster.env.items() if k != "OMNITRAIN_SBATCH_ARGS"}

    def submit(*extra: str, env: dict = env) -> subprocess.CompletedProcess:
        return subprocess.run([*OMNITRAIN, "slurm", "submit", "run_dir=job", *tiny("src", 5), *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    dry = submit("dry_run=true")
    assert dry.returncode == 0 and "dry run: nothing written" in dry.stdout, dry.stderr
    assert cluster.run("squeue", "-h").stdout.strip() == "" and not (tmp_path / "job").exists()
    partition = submit(env={**env, "OMNITRAIN_SBATCH_ARGS": "--partition=nope"})  # the real sbatch refuses it
    assert partition.returncode == 1 and "invalid partition specified: nope" in partition.stderr and "fix the partition" in partition.stderr
    bad_conf = tmp_path / "slurm.conf"  # a controller whose name does not resolve (a login node with a stale config)
    bad_conf.write_text(cluster.conf.read_text().replace(f"SlurmctldHost={cluster.host}", "SlurmctldHost=nosuchhost.invalid"))
    dns = submit(env={**env, "SLURM_CONF": str(bad_conf)})
    assert dns.returncode == 1 and 'Unable to resolve "nosuchhost.invalid"' in dns.stderr
    assert "the Slurm controller is unreachable from this host" in dns.stderr
    assert not (tmp_path / "job").exists() and cluster.run("squeue", "-h").stdout.strip() == ""


def test_the_training_step_carries_the_ranks_signals_and_usr1_anywhere_wins():
    """``Preemption.slots`` summed over ranks (the step's collective) and ``agreed`` give ``requested``'s answer."""
    import signal as sig

    from omnitrain.train.preemption import Preemption

    def summed(*received):
        ranks = []
        for s in received:
            p = Preemption.__new__(Preemption)
            p.signal = s
            ranks.append(p.slots())
        return [sum(col) for col in zip(*ranks, strict=True)]

    assert Preemption.agreed(summed(None, None)) == 0
    assert Preemption.agreed(summed(sig.SIGTERM, None)) == sig.SIGTERM
    assert Preemption.agreed(summed(sig.SIGTERM, sig.SIGUSR1)) == sig.SIGUSR1
    assert Preemption.agreed(summed(sig.SIGUSR1, sig.SIGUSR1)) == sig.SIGUSR1
