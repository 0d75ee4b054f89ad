"""A resumable score cache for ``omnitrain eval``: a killed run restarts where it stopped.

``<out_dir>/cache/loglikelihood.jsonl`` holds one line per scored request, appended and flushed after
every batch: ``{"k": sha1 of the model input and continuation ids, "v": [logprob, is_greedy]}``. The
first line is the fingerprint of the model that wrote it (name, path, GGUF file, checkpoint step,
layout hash, max_length and a checksum of the weights); a cache written by another model is refused
rather than mixed in. A line cut short by a kill is dropped (its batch is scored again).
lm-evaluation-harness offers the same with ``--use_cache`` (sqlite, per request).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch


def fingerprint(info: dict[str, Any], model: torch.nn.Module, max_length: int) -> dict[str, Any]:
    """What identifies the scores of ``model``: its identity in results.json plus a weight checksum."""
    with torch.no_grad():
        checksum = sum(float(p.detach().abs().sum(dtype=torch.float64)) for p in model.parameters())  # no fp64 copies
    keys = ("name", "kind", "path", "gguf_file", "checkpoint_step", "layout_hash")
    return {**{k: info.get(k) for k in keys}, "max_length": max_length, "weights_abs_sum": f"{checksum:.9e}"}


def request_key(model_input: tuple[int, ...], continuation: list[int]) -> str:
    h = hashlib.sha1(json.dumps([list(model_input), list(continuation)]).encode())
    return h.hexdigest()


class ScoreCache:
    """Append-only ``{key: (logprob, is_greedy)}`` on disk, tied to one model's fingerprint."""

    def __init__(self, path: Path, fp: dict[str, Any], resume: bool = True) -> None:
        self.path, self.fp = Path(path), fp
        self.scores: dict[str, tuple[float, bool]] = {}
        if resume and self.path.is_file() and self.path.stat().st_size:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"fingerprint": fp}) + "\n")
        self.loaded = len(self.scores)

    def _load(self) -> None:
        lines = self.path.read_text().split("\n")
        try:
            head = json.loads(lines[0])["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.path} is not an omnitrain score cache ({e}): move it away, or pass resume=false "
                             "to start the scores afresh") from e  # fmt: skip
        if head != self.fp:
            diff = {k: (head.get(k), v) for k, v in self.fp.items() if head.get(k) != v}
            raise ValueError(f"{self.path} holds scores of another model (cached vs now: {diff}): choose another out_dir, "
                             "or pass resume=false to discard them")  # fmt: skip
        good = [lines[0]]
        for line in lines[1:]:
            try:
                r = json.loads(line)
                self.scores[r["k"]] = (float(r["v"][0]), bool(r["v"][1]))
                good.append(line)
            except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                continue  # the empty tail, or a line cut short by a kill
        if len(good) != len([ln for ln in lines if ln]):  # rewrite without the broken line, so appends stay parseable
            self.path.write_text("\n".join(good) + "\n")

    def get(self, key: str) -> tuple[float, bool] | None:
        return self.scores.get(key)

    def add(self, items: list[tuple[str, tuple[float, bool]]]) -> None:
        with self.path.open("a") as f:
            for k, (lp, greedy) in items:
                self.scores[k] = (lp, greedy)
                f.write(json.dumps({"k": k, "v": [lp, greedy]}) + "\n")
            f.flush()
