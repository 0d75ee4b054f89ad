"""Training checkpoints (atomic, the last K kept) and the consolidated model export.

A run directory::

    run_dir/
      config.yaml  run.json  layout.json  metrics.jsonl
      checkpoints/
        step_000000200/            a complete checkpoint: only whole ones carry this name
          state/                   Fabric's save: model + optimizer (+ step); a folder of shards for FSDP / DeepSpeed
          rank_00000.pt ...        per rank: loader state and RNG states
          meta.json                step, tokens, world size, layout hash (written last)
        step_000000300.tmp/        a save in progress (or killed mid-way): ignored, removed by the next save
      model/                       consolidated export: model.safetensors + config.json + layout.json

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA_VERSION = 1
MODEL_SCHEMA_VERSION = 1
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


# --- consolidated model: one folder a single process can load (eval, generation, HF export) ---


def save_model(model: torch.nn.Module, out_dir: Path, layout_dir: Path | None = None, extra: dict | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """``model.safetensors`` + ``config.json`` (+ ``layout.json``) in ``out_dir``, written atomically.
    ``state_dict``: a full state dict gathered from a sharded model (default: ``model.state_dict()``)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    if model.cfg.tie_embeddings:
        sd.pop("output.weight", None)  # the same tensor as tok_embeddings.weight: safetensors refuses shared memory
    save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
    config = {"schema_version": MODEL_SCHEMA_VERSION, "kind": "omnitrain-model", "model": asdict(model.cfg), **(extra or {})}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if layout_dir is not None and (Path(layout_dir) / "layout.json").is_file():
        shutil.copy(Path(layout_dir) / "layout.json", tmp / "layout.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def load_model(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """A consolidated model folder (``save_model``) or a run directory (its ``model/``) -> (Transformer, TokenLayout or None)."""
    from safetensors.torch import load_file

    from omnitrain.config import from_dict
    from omnitrain.model import ModelConfig, Transformer
    from omnitrain.tokenizer.layout import TokenLayout

    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not an omnitrain model folder (no config.json): pass a run directory or its model/ export")
    config = json.loads((path / "config.json").read_text())
    if config.get("kind") != "omnitrain-model":
        raise ValueError(f"{path}/config.json is not an omnitrain model (kind={config.get('kind')!r}); "
                         "for a Hugging Face folder use omnitrain.hf.load_hf_llama")  # fmt: skip
    if config.get("schema_version") != MODEL_SCHEMA_VERSION:
        raise ValueError(f"{path}: model schema_version {config.get('schema_version')}, this omnitrain reads {MODEL_SCHEMA_VERSION}")
    model = Transformer(from_dict(ModelConfig, config["model"]))
    sd = load_file(path / "model.safetensors", device="cpu")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not (m == "output.weight" and model.cfg.tie_embeddings)]:
        raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    layout = TokenLayout.load(path) if (path / "layout.json").is_file() else None
    if layout is not None:
        model.set_modalities(layout.modality_of(np.arange(model.cfg.vocab_size)))
    return model.to(device).eval(), layout
