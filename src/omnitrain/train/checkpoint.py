"""Training checkpoints (atomic, verified, the last K kept); the consolidated model export goes through model I/O.

A run directory::

    run_dir/
      config.yaml  run.json  layout.json  metrics.jsonl  train.lock (omnitrain.train.lock)
      checkpoints/
        step_000000200/            a complete checkpoint: only whole ones carry this name
          state/                   Fabric's save: model + optimizer (+ step); a folder of shards for FSDP / DeepSpeed
          rank_00000.pt ...        per rank: loader state and RNG states
          meta.json                step, tokens, world size, batch shape, layout hash, model.audio_layout, size + sha256
                                   of every file (written last)
        step_000000300.tmp/        a save in progress (or killed mid-way): ignored, removed by the next save
        step_000000100.damaged/    failed its checksums on resume=auto: set aside (kept for inspection), never loaded
      model/                       consolidated export: model.safetensors + config.json + layout.json (omnitrain.model.io)

Atomicity: everything is written into ``step_N.tmp``; after a barrier, rank 0 writes ``meta.json``,
fsyncs and renames the folder to ``step_N`` (``rename`` is atomic on POSIX file systems, Lustre and
GPFS included). A crash at any point before the rename leaves the previous checkpoint as the latest.

Integrity (issue 22): ``meta.json`` lists every other file of the checkpoint (the per-rank files of FSDP's
distributed checkpoint and DeepSpeed's folder included) with its size and SHA-256. Every rank hashes a share of
the files, after the writes (from the page cache) and before the rename; resuming verifies them the same way
*before* any state is loaded. ``resume=auto`` sets a damaged checkpoint aside and falls back to the newest intact
one; an explicit ``resume=<folder>`` refuses a damaged one. Why SHA-256: it is hardware-accelerated where training
runs (SHA-NI on x86 since Ice Lake / Zen, ARMv8 crypto extensions), 1.17 GB/s on one core here against 1.03 for
BLAKE2b, and ``sha256sum`` checks a file by hand; CRC32 (2.3 GB/s) is not worth 32-bit checksums. The cost on a 150m
checkpoint: benchmarks/bench_checkpoint_hash.py. Schema 1 checkpoints (no checksums) still load, unverified.

Audio layout (issue 23). The token layout hash says what ids mean; it is the shards' and stays the same for every
``model.audio_layout`` (flat, delay, depth: the loader regroups the same flat shards). How a model arranges audio
is recorded beside it, in meta.json's ``audio_layout``, and a resume under another one is refused
(:func:`check_audio_layout`): a delay model has exactly a flat one's weights, so nothing else would notice.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnitrain.train.runlog import remove_quietly, storage_error

SCHEMA_VERSION = 2  # 2: meta.json carries "files" (size + sha256 of each file) and "batch"
READABLE_SCHEMAS = (1, 2)
_STEP_DIR = re.compile(r"^step_(\d{9})$")
_CHUNK = 8 << 20  # bytes read per hash update


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: one line naming the file and what to do (a ValueError: the CLI prints it)."""


class SchemaError(CheckpointError):
    """A checkpoint of another omnitrain version: not damaged, so never set aside; refused on every rank alike."""


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
    None; otherwise a checkpoint folder, which must exist and be complete. Nothing is verified here
    (cheap; :func:`choose` is what training resumes through)."""
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


def choose(fabric: Any, run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from, verified against its checksums (every rank checks a share of the files; all
    ranks reach the same answer). ``auto``: the newest intact one; each damaged newer one is set aside as
    ``step_N.damaged`` with one line saying what was wrong; none intact while damaged ones exist is an error (not a
    silent fresh start). An explicit folder that fails is refused. ``never``: None."""
    if resume != "auto":
        path = resolve_resume(run_dir, resume)
        problem = _verify_shared(fabric, path) if path is not None else None
        if problem:
            others = [str(p) for p in complete_checkpoints(run_dir) if p.resolve() != path.resolve()]
            raise CheckpointError(f"resume={resume} is damaged: {problem}. Resume from another checkpoint (resume=auto"
                                  + (f", or one of {others}" if others else "") + "), or start afresh in a new run_dir")  # fmt: skip
        return path
    names = [p.name for p in complete_checkpoints(run_dir)] if fabric.global_rank == 0 else None
    names = _broadcast(fabric, names)  # rank 0's listing: every rank walks the same candidates (rank 0 renames some)
    root = Path(run_dir) / "checkpoints"
    for name in reversed(names):
        problem = _verify_shared(fabric, root / name)
        if problem is None:
            return root / name
        if fabric.global_rank == 0:
            aside = _set_aside(root / name)
            print(f"checkpoint {name} is damaged: {problem}. Moved it to {aside.name} (delete it once looked at); "
                  "falling back to the previous checkpoint", flush=True)  # fmt: skip
    damaged = sorted(p.name for p in root.glob("step_*.damaged*")) if root.is_dir() else []
    if damaged:
        raise CheckpointError(f"no intact checkpoint left in {root} (damaged: {damaged}): start afresh in a new run_dir, "
                              "or move the damaged folders away and start again here with resume=never")  # fmt: skip
    return None


def verify(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """Check the sizes and SHA-256 of this rank's share of the files ``meta.json`` lists. Returns the first problem as
    a phrase naming the file, or None (intact, or a schema 1 checkpoint, which has no checksums)."""
    try:
        meta = read_meta(path)
    except SchemaError:
        raise
    except CheckpointError as e:
        return str(e)
    files: dict[str, dict[str, Any]] = meta.get("files") or {}
    for name in _share({n: f["bytes"] for n, f in files.items()}, rank, world_size):
        file, want = path / name, files[name]
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{file} has {size} bytes, meta.json records {want['bytes']} (truncated or overwritten)"
        digest = sha256_file(file)
        if digest != want["sha256"]:
            return f"{file} fails its checksum (sha256 {digest[:16]}..., meta.json records {want['sha256'][:16]}...)"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json; a missing, unreadable or invalid one is a one-line CheckpointError naming it."""
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} cannot be read ({e})") from e
    if not isinstance(meta, dict) or not {"step", "world_size"} <= set(meta):
        raise CheckpointError(f"{file} is not a checkpoint's meta.json (no step / world_size)")
    if meta.get("schema_version") not in READABLE_SCHEMAS:
        raise SchemaError(f"{file}: schema_version {meta.get('schema_version')}, this omnitrain reads {list(READABLE_SCHEMAS)}: "
                              "resume it with the omnitrain version that wrote it")  # fmt: skip
    return meta


def audio_layout_of(path: Path) -> str | None:
    """The ``model.audio_layout`` checkpoint ``path`` was trained with: its meta.json's ``audio_layout``; a checkpoint
    written before that was recorded falls back to its run's ``config.yaml`` (the start that wrote the run's newest
    files; a model config without the key predates the audio layouts: flat); None when neither says."""
    meta = read_meta(path)
    if "audio_layout" in meta:
        return str(meta["audio_layout"])
    try:
        import yaml

        model = yaml.safe_load((Path(path).parent.parent / "config.yaml").read_text())["model"]
        return str(model.get("audio_layout", "flat"))
    except (OSError, KeyError, TypeError, AttributeError, ValueError):  # (yaml's errors are ValueErrors) no readable record
        return None


def check_audio_layout(path: Path, audio_layout: str) -> None:
    """Refuse to resume checkpoint ``path`` as a model of another ``model.audio_layout`` (issue 23). The shards are the
    same for every audio layout and a delay model has exactly a flat one's weights, so nothing else would notice:
    the run would go on training the weights on another arrangement of the same audio."""
    trained = audio_layout_of(path)
    if trained is not None and trained != audio_layout:
        raise CheckpointError(f"checkpoint {path} was trained with model.audio_layout={trained}, this run has "
                              f"model.audio_layout={audio_layout}: resume with model.audio_layout={trained}, or start "
                              f"another layout in a new run_dir (init_from=<this run's model/> starts it from these weights "
                              "only under the same layout)")  # fmt: skip


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def checksums(folder: Path, sizes: dict[str, int], rank: int = 0, world_size: int = 1) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of this rank's share of ``sizes`` (the files of ``folder``)."""
    return {n: {"bytes": sizes[n], "sha256": sha256_file(folder / n)} for n in _share(sizes, rank, world_size)}


def _listing(folder: Path) -> dict[str, int]:
    """Every file below ``folder`` but meta.json, by relative path, with its size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "meta.json"}  # fmt: skip


def _share(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """This rank's files: the biggest first, each to the least loaded rank (the same answer on every rank)."""
    load = [0] * world_size
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = load.index(min(load))
        load[r] += sizes[name] + 1
        if r == rank:
            mine.append(name)
    return mine


def _verify_shared(fabric: Any, path: Path) -> str | None:
    """:func:`verify` split over the ranks; the first problem any rank found (every rank gets the same answer)."""
    found = _gather(fabric, verify(path, fabric.global_rank, fabric.world_size))
    return next((p for p in found if p), None)


def _set_aside(path: Path) -> Path:
    aside, n = path.with_name(path.name + ".damaged"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged{n}")
    os.replace(path, aside)
    return aside


def _broadcast(fabric: Any, obj: Any) -> Any:
    return fabric.broadcast(obj, src=0) if fabric.world_size > 1 else obj


def _gather(fabric: Any, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective with several ranks)."""
    if fabric.world_size == 1:
        return [obj]
    out: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _agree(fabric: Any, error: Exception | None, cleanup: Path) -> None:
    """Raise on every rank if any rank failed (so that no rank waits in a collective the failed one never joins);
    rank 0 then removes ``cleanup`` (the half-written ``.tmp``)."""
    errors = _gather(fabric, None if error is None else str(error))
    first = next((e for e in errors if e), None)
    if first is not None and fabric.global_rank == 0:
        remove_quietly(cleanup)
    if error is not None:
        raise error
    if first is not None:
        raise CheckpointError(f"another rank failed: {first}")


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
    """Write checkpoint ``step`` atomically from every rank, with checksums; keep the newest ``keep_last`` (<= 0: all).

    A user-fixable OS error (disk full, read-only, not a directory) on any rank is, on every rank, one line naming the
    path (runlog.StorageError); the ``.tmp`` folder is removed, so that the next start finds the previous checkpoint
    and room to write."""
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = fabric.global_rank

    def failed(e: OSError) -> Exception:
        return storage_error(e, f"checkpoint step {step}", tmp) or e

    error: Exception | None = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = failed(e)
    _agree(fabric, error, tmp)  # (the barrier before every rank writes)
    try:
        fabric.save(tmp / "state", state)  # every rank takes part (sharded strategies write their own part)
        torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    except OSError as e:
        error = failed(e)
    _agree(fabric, error, tmp)  # every file written
    sizes = _broadcast(fabric, _listing(tmp) if rank == 0 else None)
    files = {k: v for part in _gather(fabric, checksums(tmp, sizes, rank, fabric.world_size)) for k, v in part.items()}
    if rank == 0:
        try:
            meta = {"schema_version": SCHEMA_VERSION, "step": step, "world_size": fabric.world_size, **meta, "files": files}
            _write_synced(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
            if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            for stale in final.parent.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        except OSError as e:
            error = failed(e)
    _agree(fabric, error, tmp)  # (the closing barrier)
    return final


def load(fabric: Any, path: Path, state: dict[str, Any], layout_hash: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Restore ``state`` (model, optimizer, ...) in place from checkpoint ``path`` (verified by :func:`choose`).
    Returns (meta, the per-rank states of *all* ranks that saved it, in rank order). ``layout_hash``: the data's;
    another layout is refused before any state is loaded. A file that does not load is one line naming it."""
    meta = read_meta(path)
    if layout_hash is not None and meta.get("layout_hash") != layout_hash:
        raise ValueError(f"checkpoint {path} was trained with layout {meta.get('layout_hash')}, the data has {layout_hash}: "
                         "resume with the shards it was trained on, or start a new run_dir")  # fmt: skip
    # Fabric restores every key of ``state`` in place, plain values (step, tokens) included, and returns what it
    # did not ask for: with DeepSpeed that is the engine's own bookkeeping (ds_version, ds_config, ...), which must
    # not join ``state``: the next save would hand it back to DeepSpeed, which refuses its reserved keys.
    with _loading(path, path / "state"):
        fabric.load(path / "state", state)
    ranks = []
    for r in range(meta["world_size"]):
        with _loading(path, path / f"rank_{r:05d}.pt"):
            ranks.append(torch.load(path / f"rank_{r:05d}.pt", weights_only=False))
    return meta, ranks


class _loading:
    """Any error inside -> one CheckpointError line naming ``file`` and what to do (never: resume from this one)."""

    def __init__(self, ckpt: Path, file: Path) -> None:
        self.ckpt, self.file = ckpt, file

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, e: BaseException | None, tb: Any) -> bool:
        if e is None or not isinstance(e, Exception) or isinstance(e, CheckpointError):
            return False
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if any(k in str(e) for k in ("size mismatch", "Missing key", "Unexpected key")):
            advice = ("it holds another model or optimizer than this run builds: resume with the config it was saved "
                      "with (config.yaml of its run), or start a new run_dir")  # fmt: skip
        else:
            others = [p.name for p in complete_checkpoints(self.ckpt.parent.parent) if p.name != self.ckpt.name]
            advice = ("the file is damaged: resume from another checkpoint (resume=<folder>"
                      + (f"; in {self.ckpt.parent}: {others}" if others else "") + ") or start afresh in a new run_dir")  # fmt: skip
        raise CheckpointError(f"{self.file} cannot be loaded ({type(e).__name__}: {first}); {advice}") from e


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

