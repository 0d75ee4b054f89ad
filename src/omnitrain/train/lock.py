"""One live run per run directory: ``run_dir/train.lock`` (issue 22).

Two ``omnitrain train`` into one run_dir would interleave their metrics and overwrite each other's
checkpoints. Rank 0 takes the lock before anything is read or written in run_dir (``take``), and every
rank learns the outcome by a broadcast, so that a refusal stops all ranks at once (no rank left waiting
in a collective). The lock file holds the owner: PID, host, start time, SLURM_JOB_ID when set, and the
process's start time in clock ticks (``/proc/<pid>/stat``), so that a PID reused by another process
does not look like the owner.

Taking over, with one line saying so:
- a lock whose process is dead on this host (a ``kill -9``, a crash);
- a lock of the same Slurm job on any host (``scontrol requeue``: the job restarts, maybe elsewhere);
- a lock left by this very process (an earlier ``train()`` call in it that raised).
Anything else is refused, naming the owner. The lock is removed when the run ends, and at exit.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

from omnitrain.train.runlog import remove_quietly, writing

LOCK_NAME = "train.lock"
_CREATED: set[Path] = set()  # run directories that acquire() created (release may remove them again if still empty)


class RunDirBusy(ValueError):
    """run_dir is owned by another live run (a ValueError: the CLI prints the one line)."""


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (None: no /proc, or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the "(comm)" field


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the owner's process (on this host) still runs: its PID exists and, when recorded, started when it did."""
    pid = int(owner.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    recorded, now = owner.get("proc_start"), _proc_start(pid)
    return recorded is None or now is None or recorded == now


def me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "proc_start": _proc_start(os.getpid())}  # fmt: skip


def describe(owner: dict[str, Any]) -> str:
    job = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"PID {owner.get('pid')} on {owner.get('host')}{job}, started {owner.get('started')}"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # empty or cut short (a crash while writing it): nobody can own it


def acquire(run_dir: Path) -> tuple[Path, str | None]:
    """Take ``run_dir``'s lock for this process (creating run_dir). Returns (the lock file, a line to print when an
    old lock was taken over, else None). Raises RunDirBusy naming a live owner, StorageError if run_dir is unwritable."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    mine = me()
    with writing("the run directory", run_dir):
        if not run_dir.exists():
            _CREATED.add(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:  # the common case, atomic: no lock yet
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = None
        if fd is not None:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(mine) + "\n")
            return path, None
        owner = _read(path)
        note = _takeover(owner, mine, path)
        tmp = path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(mine) + "\n")
        os.replace(tmp, path)
    if (_read(path) or {}).get("pid") != mine["pid"]:  # another start took it over in the same instant
        raise RunDirBusy(f"run_dir {run_dir} was just taken by another run ({describe(_read(path) or {})})")
    return path, note


def _takeover(owner: dict[str, Any] | None, mine: dict[str, Any], path: Path) -> str | None:
    """None or the line to print when ``owner``'s lock may be taken over; raises RunDirBusy when it may not."""
    if owner is None:
        return f"warning: {path} was unreadable (a start killed while writing it): taken over"
    same_host = owner.get("host") == mine["host"]
    if same_host and owner.get("pid") == mine["pid"] and owner.get("proc_start") == mine["proc_start"]:
        return None  # this process: an earlier train() in it raised before releasing
    if same_host and not _alive(owner):
        return f"warning: taking over {path} from a run that is gone ({describe(owner)})"
    if not same_host and owner.get("slurm_job_id") and owner.get("slurm_job_id") == mine["slurm_job_id"]:
        return f"taking over {path} from an earlier start of this Slurm job ({describe(owner)}): requeued"
    check = "" if same_host else f" (it cannot be checked from {mine['host']})"
    raise RunDirBusy(f"run_dir {path.parent} is in use by another run: {describe(owner)}{check}. Wait for it to end, "
                     f"choose another run_dir, or, if that run is dead, delete {path} and start again")  # fmt: skip


def release(path: Path | None, remove_empty_dir: bool = False) -> None:
    """Remove the lock if this process still holds it; ``remove_empty_dir``: also run_dir, if :func:`acquire` created
    it and nothing else was written (a start that failed early leaves no trace)."""
    if path is None or (_read(path) or {}).get("pid") != os.getpid():
        return
    remove_quietly(path)
    if remove_empty_dir and path.parent in _CREATED:
        try:
            path.parent.rmdir()  # only if empty
        except OSError:
            pass


def take(fabric: Any, run_dir: Path) -> Path | None:
    """Rank 0 takes run_dir's lock; every rank raises the same one-line error when it is refused. Returns the lock
    file on rank 0 (None on the other ranks). The lock is released by :func:`release`, or at exit."""
    path, error = None, None
    if fabric.global_rank == 0:
        try:
            path, note = acquire(Path(run_dir))
            if note:
                print(note, flush=True)
            atexit.register(release, path)
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised on all
            error = e
    if fabric.world_size > 1:
        shared = fabric.broadcast(None if error is None else str(error), src=0)
        if error is None and shared is not None:
            raise RunDirBusy(shared)
    if error is not None:
        raise error
    return path
