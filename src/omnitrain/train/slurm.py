"""``omnitrain slurm submit``: freeze the code and the config into the run directory, then sbatch.

    omnitrain slurm submit experiment=pretrain strategy=ddp strategy.devices=8 strategy.num_nodes=4 run_dir=runs/big

What lands in ``run_dir`` before the job starts:

* ``code/``: ``src/ recipes/ data_pipelines/ slurm/`` of this checkout (the files git tracks, plus
  untracked ones it does not ignore; a plain copy outside git) and ``code/COMMIT`` ``{commit, dirty}``,
  which ``run.json`` then records for every attempt. The job imports this copy, never the live
  checkout, so editing the checkout while the job waits or is requeued changes nothing.
* ``config.yaml``: the resolved config; ``overrides.txt``: the overrides, one per line, that
  ``slurm/train.sbatch`` gives ``omnitrain train`` (composed against ``code/recipes``), with
  ``run_dir`` made absolute.
* ``slurm-<jobid>.out``: the job's log, appended to across requeues.

The job's shape comes from the config: ``--nodes`` = ``strategy.num_nodes``, ``--ntasks-per-node`` =
``strategy.devices`` (one task per GPU), ``--gpus-per-node`` = ``strategy.devices`` (0 with
``strategy.accelerator=cpu``, which also asks ``--cpus-per-task`` = ``threads``). Everything else is
sbatch's business: the ``#SBATCH`` defaults in ``slurm/train.sbatch`` (time 24 h, ``--signal=USR1@120``,
``--requeue``), sbatch's own ``SBATCH_PARTITION`` / ``SBATCH_ACCOUNT`` / ``SBATCH_TIMELIMIT`` / ``SBATCH_QOS``
environment variables, and ``OMNITRAIN_SBATCH_ARGS`` (extra flags, given last so they win), e.g.
``OMNITRAIN_SBATCH_ARGS="--partition=h100 --time=48:00:00 --cpus-per-task=12"``.

Relative paths: the job runs in the directory you submitted from (``sbatch --chdir``), so
``data.sources.*.path``, ``init_from`` and ``resume`` mean what they mean to ``omnitrain train`` there.
On several nodes that directory must be on a filesystem every node sees.

Before anything is written, ``omnitrain plan``'s checks run (``omnitrain.train.plan``: data paths, shards,
layout, memory per GPU for ``cluster.gpu``); a job that cannot start is refused here, not after the queue
wait. ``dry_run=true`` prints the plan, the sbatch script and the command, and stops. A refused ``sbatch``
leaves the run directory as it was (a new one is removed) and the error names the cause it reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from omnitrain.config import to_dict
from omnitrain.train.loop import TrainConfig
from omnitrain.train.plan import PlanConfig, plan
from omnitrain.train.runlog import REPO, git_commit

SNAPSHOT_DIRS = ("src", "recipes", "data_pipelines", "slurm")
SUBMIT_ONLY = ("cluster", "dry_run")  # keys of SubmitConfig that are not the job's: never in config.yaml / overrides.txt


@dataclass
class SubmitConfig(PlanConfig):
    """``omnitrain slurm submit``: the training config, the cluster its plan checks assume, and ``dry_run``."""

    dry_run: bool = False  # print the plan, the sbatch script and the command; submit nothing
    data_checks: bool = True  # false: data paths this host cannot see (mounted on the compute nodes only) do not stop the submit


# sbatch's stderr -> what to do (the first that matches); anything else is shown as sbatch said it
SBATCH_HINTS = [
    (("unable to contact slurm controller", "unable to resolve", "unable to establish control machine", "connection refused",
      "zero bytes were transmitted",
      "socket timed out", "could not establish a configuration source"),
     "the Slurm controller is unreachable from this host: check `scontrol ping`, SLURM_CONF and the controller's DNS name, "
     "or submit from a login node"),
    (("invalid partition",), "fix the partition: SBATCH_PARTITION or OMNITRAIN_SBATCH_ARGS=--partition=... (`sinfo -s` lists them)"),
    (("invalid account",), "fix the account: SBATCH_ACCOUNT or OMNITRAIN_SBATCH_ARGS=--account=... (`sacctmgr show assoc user=$USER`)"),
    (("invalid qos",), "fix the QOS: SBATCH_QOS or OMNITRAIN_SBATCH_ARGS=--qos=..."),
    (("time limit",), "fix the time limit: SBATCH_TIMELIMIT or OMNITRAIN_SBATCH_ARGS=--time=HH:MM:SS within the partition's MaxTime"),
    (("node configuration is not available", "more processors requested", "invalid generic resource", "gres"),
     "no node has this shape: check strategy.devices (tasks and GPUs per node), strategy.num_nodes and --cpus-per-task "
     "against `sinfo -o '%P %D %c %G'`"),
]  # fmt: skip


def sbatch_hint(stderr: str) -> str:
    """What to do about sbatch's error message ``stderr``."""
    low = stderr.lower()
    for needles, hint in SBATCH_HINTS:
        if any(n in low for n in needles):
            return hint
    return "see sbatch's message above; OMNITRAIN_SBATCH_ARGS passes any sbatch flag"


def submit(cfg: Any, overrides: list[str]) -> str:
    """Check the job (``omnitrain plan``), snapshot code + config into ``cfg.run_dir`` and sbatch
    ``slurm/train.sbatch``; returns the job id ("" for a dry run).

    Args:
        cfg: a ``SubmitConfig`` (or a plain ``TrainConfig``: the default cluster, no dry run).
        overrides: the Hydra overrides the config was composed with; the job composes them again.
    """
    dry_run = getattr(cfg, "dry_run", False)
    sbatch = shutil.which("sbatch")
    if sbatch is None and not dry_run:
        raise FileNotFoundError("no Slurm here: `sbatch` is not on PATH. Run `omnitrain train ...` directly, or submit "
                                "from a Slurm login node (or add Slurm's bin folder to PATH)")  # fmt: skip
    strategy = cfg.strategy
    if strategy.devices < 1:
        raise ValueError(f"strategy.devices={strategy.devices}: Slurm needs the number of GPUs (tasks) per node, e.g. strategy.devices=8")
    if any("\n" in o for o in overrides):
        raise ValueError(f"an override contains a newline: {overrides}")
    run_dir = Path(cfg.run_dir).resolve()
    _check_no_live_job(run_dir)
    train_cfg = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    plan(cfg if isinstance(cfg, PlanConfig) else PlanConfig(**train_cfg), data_checks=getattr(cfg, "data_checks", True))  # raises

    # what the job gets: the resolved training config, and the overrides it composes again (against train.yaml)
    plain = to_dict(TrainConfig(**train_cfg)) | {"run_dir": str(run_dir)}
    kept = [o for o in overrides if o.lstrip("~+").split("=", 1)[0].split(".")[0] not in SUBMIT_ONLY + ("run_dir",)]
    quoted = str(run_dir).replace("'", "\\'")  # a Hydra quoted string: multirun dirs hold '=', ',' and '~'
    job_overrides = "".join(o + "\n" for o in kept + [f"run_dir='{quoted}'"])

    # sbatch: the shape from the config, the rest from train.sbatch, SBATCH_* and OMNITRAIN_SBATCH_ARGS
    cpu = strategy.accelerator == "cpu"
    name = run_dir.name
    if name in ("bash", "interactive"):  # Lightning ignores the Slurm environment of jobs named so
        name = f"omnitrain-{name}"
    code = run_dir / "code"
    cmd = [sbatch or "sbatch", "--parsable", f"--job-name={name}", f"--chdir={os.getcwd()}", f"--output={run_dir}/slurm-%j.out",
           f"--nodes={strategy.num_nodes}", f"--ntasks-per-node={strategy.devices}",
           f"--gpus-per-node={0 if cpu else strategy.devices}"]  # fmt: skip
    if cpu:
        cmd.append(f"--cpus-per-task={max(cfg.threads, 1)}")
    cmd += shlex.split(os.environ.get("OMNITRAIN_SBATCH_ARGS", ""))
    cmd += [str(code / "slurm" / "train.sbatch"), str(run_dir)]
    if dry_run:
        script = REPO / "slurm" / "train.sbatch"
        print(f"--- {code}/slurm/train.sbatch (a snapshot of {script})\n{script.read_text()}--- {run_dir}/overrides.txt\n{job_overrides}"
              f"--- command\n{shlex.join(cmd)}\ndry run: nothing written, nothing submitted", flush=True)  # fmt: skip
        return ""

    # --- the snapshot (code, COMMIT, resolved config, overrides), undone if sbatch refuses the job
    existed = run_dir.exists()
    kept_before = _set_aside(run_dir) if existed else []
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        commit = snapshot_code(REPO, code)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True))
        (run_dir / "overrides.txt").write_text(job_overrides)
        env = {**os.environ, "OMNITRAIN_PYTHON": os.environ.get("OMNITRAIN_PYTHON", sys.executable)}  # the job runs this interpreter
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            said = " ".join((res.stderr.strip() or res.stdout.strip()).split())
            raise ValueError(f"sbatch failed (exit {res.returncode}): {said}. {sbatch_hint(said)}. Nothing was submitted and "
                             f"{run_dir} is as it was\n  command: {shlex.join(cmd)}")  # fmt: skip
    except BaseException:
        if existed:
            _put_back(run_dir, kept_before)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    for path in kept_before:
        _remove(path)
    job_id = res.stdout.strip().split(";")[0]
    (run_dir / "slurm_job_id").write_text(job_id + "\n")
    state = "dirty" if commit["dirty"] else "clean"
    print(f"submitted job {job_id}: {strategy.num_nodes} node(s) x {strategy.devices} task(s), code {str(commit['commit'])[:12]} ({state}), "
          f"run {run_dir}, logs {run_dir}/slurm-{job_id}.out and {run_dir}/logs/{job_id}/rank-<r>.out", flush=True)  # fmt: skip
    return job_id


SUBMIT_FILES = ("code", "config.yaml", "overrides.txt")


def _set_aside(run_dir: Path) -> list[Path]:
    """Rename what a submission replaces in an existing ``run_dir`` to ``<name>.before-submit``; returns those."""
    kept = []
    for name in SUBMIT_FILES:
        if (run_dir / name).exists():
            aside = run_dir / f"{name}.before-submit"
            _remove(aside)
            (run_dir / name).rename(aside)
            kept.append(aside)
    return kept


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _put_back(run_dir: Path, kept: list[Path]) -> None:
    """Undo a refused submission in an existing ``run_dir``: drop what it wrote, restore what it set aside."""
    for name in (*SUBMIT_FILES, "code.tmp"):
        _remove(run_dir / name)
    for aside in kept:
        aside.rename(run_dir / aside.name.removesuffix(".before-submit"))


def snapshot_code(root: Path, dest: Path) -> dict[str, Any]:
    """Copy ``SNAPSHOT_DIRS`` of the checkout ``root`` to ``dest`` (replacing it); write and return COMMIT."""
    if not (root / "src" / "omnitrain").is_dir():
        raise FileNotFoundError(f"omnitrain runs from {root}, which is not a checkout (no src/omnitrain): "
                                "`omnitrain slurm submit` snapshots a checkout; install with `pip install -e .`")  # fmt: skip
    commit = git_commit(root)
    tracked, untracked = _git_files(root, "--cached"), _git_files(root, "--others")
    if tracked:  # what git tracks plus untracked files it does not ignore (a new module must travel too)
        files = sorted({f for f in tracked + untracked if (root / f).is_file()})  # deleted-but-tracked files are skipped
        commit["dirty"] = bool(commit["dirty"] or untracked)
    else:  # not a git checkout (or a snapshot being resubmitted): a plain copy
        files = [str(p.relative_to(root)) for d in SNAPSHOT_DIRS for p in sorted((root / d).rglob("*"))
                 if p.is_file() and "__pycache__" not in p.parts]  # fmt: skip
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for f in files:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, tmp / f)
    (tmp / "COMMIT").write_text(json.dumps(commit) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return commit


def _git_files(root: Path, which: str) -> list[str]:
    """``git ls-files --cached`` or ``--others`` (not ignored) under SNAPSHOT_DIRS; [] outside a git work tree."""
    cmd = ["git", "-C", str(root), "ls-files", "-z", which, "--exclude-standard", "--", *SNAPSHOT_DIRS]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [f for f in out.split("\0") if f]


def _check_no_live_job(run_dir: Path) -> None:
    """Refuse to replace the snapshot under a job of this run that is still queued or running."""
    id_file = run_dir / "slurm_job_id"
    if not id_file.is_file():
        return
    job = id_file.read_text().strip()
    try:
        res = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    except OSError:
        return  # no squeue to ask: sbatch will tell what is wrong
    if res.returncode == 0 and res.stdout.strip():
        raise ValueError(f"job {job} of {run_dir} is still {res.stdout.strip().lower()}: a new submission would replace the code "
                         f"it runs. Wait for it, `scancel {job}`, or pick another run_dir")  # fmt: skip
