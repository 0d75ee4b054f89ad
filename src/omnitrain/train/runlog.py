"""What a run writes besides checkpoints: the resolved config, run.json (git commit, attempts),
metrics.jsonl, Weights & Biases, and the progress bar. Rank 0 only; every other rank gets no-ops."""

from __future__ import annotations

import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[3]


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"  # offline: a local run folder, `wandb sync` it later
    project: str = "omnitrain"
    entity: str | None = None
    name: str | None = None  # None: the run directory's name
    tags: list[str] | None = None


def git_commit(where: Path = REPO) -> dict[str, Any]:
    """The commit the code comes from: a snapshot's COMMIT file (``omnitrain slurm submit``), else git."""
    snap = where / "COMMIT"
    if snap.is_file():
        return json.loads(snap.read_text())
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())  # fmt: skip
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (a run killed after its last checkpoint logs steps the
    resumed run will log again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


class RunLog:
    """Rank-0 writer of a run's files; ``enabled=False`` on other ranks makes every call a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, config: dict[str, Any], wandb_cfg: WandbConfig, total_steps: int, start_step: int,
                 world_size: int, resumed_from: Path | None) -> None:  # fmt: skip
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._bar = self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        info_path = self.run_dir / "run.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {"attempts": []}
        info["attempts"].append({
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv, "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
            "world_size": world_size, "resumed_from": str(resumed_from) if resumed_from else None, "start_step": start_step,
            "python": platform.python_version(), **git_commit(),
        })  # fmt: skip
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        self.metrics = open(self.run_dir / "metrics.jsonl", "a")
        self._start_wandb(wandb_cfg, config)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                         mininterval=0.5 if sys.stderr.isatty() else 10.0)  # fmt: skip

    def _start_wandb(self, cfg: WandbConfig, config: dict[str, Any]) -> None:
        if cfg.mode == "disabled":
            return
        import wandb  # wandb: ~0.3 s to import, only when wandb.mode is not disabled

        id_file = self.run_dir / "wandb_id"
        # our own id (wandb 0.31 has no wandb.util.generate_id): 8 lowercase hex chars, kept across resumes
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self._wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or self.run_dir.name, tags=cfg.tags,
                                 dir=str(self.run_dir), mode=cfg.mode, id=run_id, resume="allow", config=config)  # fmt: skip

    def log(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **row}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._bar is not None and "loss" in row:  # (a row of held-out losses before training has no step loss)
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def print(self, msg: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(msg)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self.metrics.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of rows (the last row of each step wins)."""
    rows: dict[int, dict[str, Any]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]
