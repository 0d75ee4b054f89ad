"""The eval results format (its one owner): ``results.json`` + ``samples.jsonl`` in an eval's out_dir.

``results.json`` (``schema_version`` 1)::

    {"schema_version": 1, "created": iso time, "git_commit": "abc1234",
     "model": {"name", "kind", "path", "checkpoint_step", "layout_hash", "audio_layout", ...},
     "config": {... the resolved eval config ...},
     "tasks": {"mmlu": {"metrics": {"acc": {"value", "stderr", "n"}, ...},
                        "groups": {"stem": {"acc": {...}}, "abstract_algebra": {...}, ...},
                        "seconds": float, "items_per_s": float, "config": {...}}}}

``samples.jsonl``: one line per scored item: ``{"task", "id", "prompt", "output", "target", "score", ...}``.
A reader refuses a newer ``schema_version`` (it cannot know what changed) and names both versions.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def metric(values: list[float]) -> dict[str, float | int]:
    """Mean, standard error of the mean (sample std / sqrt(n), as lm-eval's ``mean_stderr``) and n."""
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else float("nan")
    return {"value": mean, "stderr": math.sqrt(var / n) if n > 1 else float("nan"), "n": n}


def git_commit(where: Path | None = None) -> str | None:
    try:
        cwd = where or Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return (out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def new_results(model: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "created": dt.datetime.now().isoformat(timespec="seconds"),
            "git_commit": git_commit(), "model": model, "config": config, "tasks": {}}  # fmt: skip


def _clean(x: Any) -> Any:
    """NaN -> null (JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_results(out_dir: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` atomically (a crash leaves the previous one)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(_clean(results), indent=2, default=str) + "\n")
    tmp.replace(out_dir / "results.json")
    return out_dir / "results.json"


def write_samples(out_dir: Path, samples: Iterable[dict[str, Any]], append: bool = False) -> Path:
    path = Path(out_dir) / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for s in samples:
            f.write(json.dumps(_clean(s), default=str) + "\n")
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """A ``results.json`` (or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass an eval out_dir or its results.json")
    data = json.loads(path.read_text())
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise ValueError(f"{path} has no schema_version: not an omnitrain eval results file")
    if version > SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema_version {version}; this omnitrain reads up to {SCHEMA_VERSION}: upgrade omnitrain"
        )
    return data


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    path = path / "samples.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
