"""What a run writes besides checkpoints: the resolved config, run.json (git commit, attempts),
metrics.jsonl, Weights & Biases, TensorBoard, and the progress bar. Rank 0 only; every other rank gets no-ops.

Also the throughput accounting those metrics report: :func:`flops_per_token` and :class:`Throughput`,
which sums token counts on the device and reads them at log steps only (DESIGN.md "Scale": no host
synchronisation inside a step except at log steps)."""

from __future__ import annotations

import errno
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[3]


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"  # offline: a local run folder, `wandb sync` it later
    project: str = "omnitrain"
    entity: str | None = None
    name: str | None = None  # None: the run directory's name
    tags: list[str] | None = None


@dataclass
class TensorBoardConfig:
    # every metrics.jsonl number as a scalar (same names, e.g. loss/text) in <run_dir>/tensorboard, read with
    # `tensorboard --logdir runs/`. Off by default: metrics.jsonl and the offline wandb run already hold them.
    enabled: bool = False
    flush_secs: int = 30  # how often the event file is written out (also at the end of the run)


class StorageError(ValueError):
    """A write the file system refused for a reason the user can fix (disk full, read-only, no permission, a file
    where a folder should be): one line naming the path and what to do. A ValueError, so the CLI prints that line."""


# errno -> what to do. Anything else (EIO, a bug such as EBADF) keeps its traceback.
_FIXES = {
    errno.ENOSPC: "the disk is full: free space there (or set run_dir elsewhere), then start again: resume=auto continues from "
                  "the last checkpoint",
    errno.EDQUOT: "the disk quota is used up: free space there (or set run_dir elsewhere), then start again: resume=auto "
                  "continues from the last checkpoint",
    errno.EROFS: "the file system is read-only: set run_dir (or out_dir) to a writable folder",
    errno.EACCES: "no permission to write there: fix the folder's permissions or set run_dir (or out_dir) elsewhere",
    errno.EPERM: "no permission to write there: fix the folder's permissions or set run_dir (or out_dir) elsewhere",
    errno.ENOTDIR: "a part of that path is a file, not a folder: set run_dir (or out_dir) to a folder path",
    errno.EEXIST: "a file is in the way of a folder: move it, or set run_dir (or out_dir) elsewhere",
}  # fmt: skip


def storage_error(e: OSError, what: str, path: Path | str) -> StorageError | None:
    """The one-line error for ``e`` (raised while writing ``what`` at ``path``), or None when the user cannot fix it."""
    fix = _FIXES.get(e.errno or 0)
    if fix is None:
        return None
    where = e.filename or path
    return StorageError(f"cannot write {what} at {where}: {e.strerror or errno.errorcode.get(e.errno or 0)}. {fix}")


def remove_quietly(path: Path) -> None:
    """Remove a file or folder that a failed write left behind (a ``.tmp``); errors are ignored (the disk may be full)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


@contextmanager
def writing(what: str, path: Path | str, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a user-fixable OSError inside the block into a one-line :class:`StorageError` naming ``path``; first remove
    ``cleanup`` (the ``.tmp`` being written), so that the next start finds no half-written leftovers."""
    try:
        yield
    except OSError as e:
        err = storage_error(e, what, path)
        if cleanup is not None:
            remove_quietly(cleanup)
        if err is None:
            raise
        raise err from e


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
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if lines and not _parses(lines[-1]):  # the last line, cut short by a full disk or a kill
        lines.pop()
    keep = [line for line in lines if json.loads(line).get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with writing("metrics", tmp, cleanup=tmp):  # a rewrite in place cut short (disk full) would lose the kept lines too
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


class RunLog:
    """Rank-0 writer of a run's files; ``enabled=False`` on other ranks makes every call a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, config: dict[str, Any], wandb_cfg: WandbConfig, total_steps: int, start_step: int,
                 world_size: int, resumed_from: Path | None, notes: dict[str, Any] | None = None,
                 tensorboard: TensorBoardConfig | None = None) -> None:  # fmt: skip
        """``notes``: more keys for this attempt's run.json entry (e.g. ``world_size_changed``)."""
        self.run_dir, self.enabled = Path(run_dir), enabled
        self._bar = self._wandb = self._tb = None
        if not enabled:
            return
        with writing("the run files", self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
            info_path = self.run_dir / "run.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {"attempts": []}
            info["attempts"].append({
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": sys.argv, "host": socket.gethostname(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
                "world_size": world_size, "resumed_from": str(resumed_from) if resumed_from else None, "start_step": start_step,
                "python": platform.python_version(), **git_commit(), **(notes or {}),
            })  # fmt: skip
            info_path.write_text(json.dumps(info, indent=2) + "\n")
            self.metrics = open(self.run_dir / "metrics.jsonl", "a")
        self._start_wandb(wandb_cfg, config)
        if tensorboard is not None and tensorboard.enabled:
            self._start_tensorboard(tensorboard, start_step)
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

    def _start_tensorboard(self, cfg: TensorBoardConfig, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # (~0.1 s) needs the tensorboard package
        except ImportError as e:
            raise ValueError(f"tensorboard.enabled=true needs the tensorboard package ({e}): pip install tensorboard, "
                             "or set tensorboard.enabled=false") from e  # fmt: skip
        # a resumed run drops the events a killed attempt logged after its last checkpoint (as truncate_metrics does)
        with writing("the TensorBoard events", self.run_dir / "tensorboard"):
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None,
                                     flush_secs=cfg.flush_secs)  # fmt: skip

    def log(self, step: int, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **row}
        with writing("metrics", self.run_dir / "metrics.jsonl"):
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and key != "step":
                    self._tb.add_scalar(key, value, global_step=step)
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
        with writing("metrics", self.run_dir / "metrics.jsonl"):
            self.metrics.close()
        if self._tb is not None:
            with writing("the TensorBoard events", self.run_dir / "tensorboard"):
                self._tb.close()
        if self._wandb is not None:
            offline = self._wandb.settings.mode == "offline"
            run_folder = Path(self._wandb.dir).parent  # <run_dir>/wandb/offline-run-<time>-<id>
            self._wandb.finish()
            if offline:  # compute nodes often have no internet: upload from a machine that has
                print(f"wandb: offline run in {run_folder}; upload it with `wandb sync {run_folder}`", flush=True)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list of rows (the last row of each step wins)."""
    rows: dict[int, dict[str, Any]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


# ----------------------------------------------------------------------------- throughput accounting
def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per processed token of a ``Transformer`` (``Transformer.flops_per_token``: 6 N + 12 L D T, the
    output projection counted whether tied or not)."""
    return model.flops_per_token(seq_len)


class Throughput:
    """Token counts of the steps since the last read, summed on the device (no host read per step).

    ``add(counts)`` per step (a 1-d tensor, the same names every step); ``read()`` at a log step: the
    sums since the previous read as Python numbers, the seconds since then and the number of steps
    (one host sync). Timing an interval rather than a step is what makes the figure right on a GPU,
    where the host runs ahead of the device between syncs."""

    def __init__(self, names: list[str], device: torch.device | str) -> None:
        self.names, self.device = names, device
        self._start()

    def _start(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, counts: torch.Tensor) -> None:
        self.sums += counts.to(self.sums.dtype)
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (validation, a checkpoint save) out of the interval's time."""
        self.t0 += seconds

    def read(self) -> tuple[dict[str, float], float, int]:
        """(sums since the last read by name, seconds, steps); restarts the interval."""
        values = self.sums.tolist()  # the host sync of a log step
        out = (dict(zip(self.names, values, strict=True)), time.perf_counter() - self.t0, self.steps)
        self._start()
        return out
