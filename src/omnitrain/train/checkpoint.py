"""Training checkpoints (atomic, the last K kept); the consolidated model export goes through model I/O.

A run directory::

    run_dir/
      config.yaml  run.json  layout.json  metrics.jsonl
      checkpoints/
        step_000000200/            a complete checkpoint: only whole ones carry this name
          state/                   Fabric's save: model + optimizer (+ step); a folder of shards for FSDP / DeepSpeed
          rank_00000.pt ...        per rank: loader state and RNG states
          meta.json                step, tokens, world size, layout hash (written last)
        step_000000300.tmp/        a save in progress (or killed mid-way): ignored, removed by the next save
      model/                       consolidated export: model.safetensors + config.json + layout.json (omnitrain.model.io)

Atomicity: everything is written into ``step_N.tmp``; after a barrier, rank 0 writes ``meta.json``,
fsyncs and renames the folder to ``step_N`` (``rename`` is atomic on POSIX file systems, Lustre and
GPFS included). A crash at any point before the rename leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{9})$")


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:09d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (half-written ``.tmp`` folders are not listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """``auto``: the latest complete checkpoint of ``run_dir`` (None when there is none); ``never``:
    None; otherwise a checkpoint folder, which must exist and be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(
            f"resume={resume}: not a complete checkpoint (no meta.json). Use resume=auto, resume=never, "
            f"or one of: {[str(p) for p in complete_checkpoints(run_dir)] or 'none saved yet'}"
        )
    return path


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(fabric: Any, run_dir: Path, step: int, state: dict[str, Any], rank_state: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically from every rank; keep the newest ``keep_last``."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    fabric.save(tmp / "state", state)  # every rank takes part (sharded strategies write their own part)
    torch.save(rank_state, tmp / f"rank_{fabric.global_rank:05d}.pt")
    fabric.barrier()
    if fabric.global_rank == 0:
        meta = {"schema_version": SCHEMA_VERSION, "step": step, "world_size": fabric.world_size, **meta}
        _write_synced(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in final.parent.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    fabric.barrier()
    return final


def load(fabric: Any, path: Path, state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore ``state`` (model, optimizer, ...) in place from checkpoint ``path``. Returns (meta, the
    per-rank states of *all* ranks that saved it, in rank order)."""
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"checkpoint {path} has schema_version {meta.get('schema_version')}, this omnitrain reads {SCHEMA_VERSION}")
    # Fabric restores every key of ``state`` in place, plain values (step, tokens) included, and returns what it
    # did not ask for: with DeepSpeed that is the engine's own bookkeeping (ds_version, ds_config, ...), which must
    # not join ``state``: the next save would hand it back to DeepSpeed, which refuses its reserved keys.
    fabric.load(path / "state", state)
    ranks = [torch.load(path / f"rank_{r:05d}.pt", weights_only=False) for r in range(meta["world_size"])]
    return meta, ranks


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

