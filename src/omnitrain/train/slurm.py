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
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from omnitrain.config import to_dict
from omnitrain.train.runlog import REPO, git_commit

SNAPSHOT_DIRS = ("src", "recipes", "data_pipelines", "slurm")


def submit(cfg: Any, overrides: list[str]) -> str:
    """Snapshot code + config into ``cfg.run_dir`` and sbatch ``slurm/train.sbatch``; returns the job id.

    Args:
        cfg: the validated ``TrainConfig`` (``omnitrain.train.loop``).
        overrides: the Hydra overrides the config was composed with; the job composes them again.
    """
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise FileNotFoundError("no Slurm here: `sbatch` is not on PATH. Run `omnitrain train ...` directly, or submit "
                                "from a Slurm login node (or add Slurm's bin folder to PATH)")  # fmt: skip
    strategy = cfg.strategy
    if strategy.devices < 1:
        raise ValueError(f"strategy.devices={strategy.devices}: Slurm needs the number of GPUs (tasks) per node, e.g. strategy.devices=8")
    if any("\n" in o for o in overrides):
        raise ValueError(f"an override contains a newline: {overrides}")
    run_dir = Path(cfg.run_dir).resolve()
    _check_no_live_job(run_dir)

    # --- the snapshot: code, COMMIT, resolved config, overrides
    run_dir.mkdir(parents=True, exist_ok=True)
    code = run_dir / "code"
    commit = snapshot_code(REPO, code)
    plain = to_dict(cfg) | {"run_dir": str(run_dir)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True))
    kept = [o for o in overrides if o.lstrip("+").split("=", 1)[0] != "run_dir"]
    quoted = str(run_dir).replace("'", "\\'")  # a Hydra quoted string: multirun dirs hold '=', ',' and '~'
    (run_dir / "overrides.txt").write_text("".join(o + "\n" for o in kept + [f"run_dir='{quoted}'"]))

    # --- sbatch: the shape from the config, the rest from train.sbatch, SBATCH_* and OMNITRAIN_SBATCH_ARGS
    cpu = strategy.accelerator == "cpu"
    name = run_dir.name
    if name in ("bash", "interactive"):  # Lightning ignores the Slurm environment of jobs named so
        name = f"omnitrain-{name}"
    cmd = [sbatch, "--parsable", f"--job-name={name}", f"--chdir={os.getcwd()}", f"--output={run_dir}/slurm-%j.out",
           f"--nodes={strategy.num_nodes}", f"--ntasks-per-node={strategy.devices}",
           f"--gpus-per-node={0 if cpu else strategy.devices}"]  # fmt: skip
    if cpu:
        cmd.append(f"--cpus-per-task={max(cfg.threads, 1)}")
    cmd += shlex.split(os.environ.get("OMNITRAIN_SBATCH_ARGS", ""))
    cmd += [str(code / "slurm" / "train.sbatch"), str(run_dir)]
    env = {**os.environ, "OMNITRAIN_PYTHON": os.environ.get("OMNITRAIN_PYTHON", sys.executable)}  # the job runs this interpreter
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise ValueError(f"sbatch failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}\n  command: {shlex.join(cmd)}\n"
                         "  fix the partition/account/time (SBATCH_PARTITION, SBATCH_ACCOUNT, OMNITRAIN_SBATCH_ARGS) or the job shape")  # fmt: skip
    job_id = res.stdout.strip().split(";")[0]
    (run_dir / "slurm_job_id").write_text(job_id + "\n")
    state = "dirty" if commit["dirty"] else "clean"
    print(f"submitted job {job_id}: {strategy.num_nodes} node(s) x {strategy.devices} task(s), code {str(commit['commit'])[:12]} ({state}), "
          f"run {run_dir}, log {run_dir}/slurm-{job_id}.out", flush=True)  # fmt: skip
    return job_id


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
