"""Eval results in lm-evaluation-harness's schema, and ``omnitrain eval list``.

``omnitrain eval`` writes ``results_lm_eval.json`` beside its own ``results.json`` (the name matches the
``results_*.json`` that tools reading lm-eval output folders look for); ``omnitrain eval to-lm-eval
results=<results.json or out_dir>`` converts an older one. The schema (lm-eval 0.4)::

    {"results": {"mmlu": {"alias": "mmlu", "acc,none": 0.31, "acc_stderr,none": 0.01}, "mmlu_stem": {...}},
     "groups": {}, "group_subtasks": {"mmlu": ["mmlu_stem", ...]}, "configs": {"mmlu": {"task": "mmlu", ...}},
     "versions": {"mmlu": 1}, "n-shot": {"mmlu": 0}, "higher_is_better": {"mmlu": {"acc": true}},
     "n-samples": {"mmlu": {"original": 14042, "effective": 100}}, "config": {"model": "omnitrain", "model_args": ...},
     "git_hash": ..., "date": ..., "model_name": ..., "total_evaluation_time_seconds": ...}

A metric with no standard error (corpus WER, perplexity) has ``"N/A"`` there, as in lm-eval. Breakdowns
(MMLU's subjects and categories) are results of their own, ``<task>_<group>``, listed in ``group_subtasks``.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnitrain.eval import results as R

LM_EVAL_FILE = "results_lm_eval.json"
LOWER_IS_BETTER = ("wer", "cer", "perplexity", "nll_per_token", "bits_per_byte")


def _entry(alias: str, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"alias": alias}
    for name, m in metrics.items():
        out[f"{name},none"] = m.get("value")
        stderr = m.get("stderr")
        out[f"{name}_stderr,none"] = stderr if isinstance(stderr, (int, float)) else "N/A"
    return out


def to_lm_eval(res: dict[str, Any]) -> dict[str, Any]:
    """An omnitrain ``results.json`` (as a dict) -> the same numbers in lm-eval's results schema."""
    model, config = res.get("model") or {}, res.get("config") or {}
    out: dict[str, Any] = {"results": {}, "groups": {}, "group_subtasks": {}, "configs": {}, "versions": {}, "n-shot": {},
                           "higher_is_better": {}, "n-samples": {}}  # fmt: skip
    seconds = 0.0
    for task, t in res.get("tasks", {}).items():
        metrics = t.get("metrics") or {}
        out["results"][task] = _entry(task, metrics)
        subtasks = []
        for group, gm in (t.get("groups") or {}).items():
            name = f"{task}_{group}"
            out["results"][name] = _entry(f" - {group}", gm)
            subtasks.append(name)
        out["group_subtasks"][task] = subtasks
        task_cfg = t.get("config") or {}
        out["configs"][task] = {"task": task, "output_type": "omnitrain", **task_cfg}
        out["versions"][task] = res.get("schema_version", R.SCHEMA_VERSION)
        out["n-shot"][task] = int(task_cfg.get("num_fewshot", 0) or 0)
        out["higher_is_better"][task] = {m: m not in LOWER_IS_BETTER for m in metrics}
        n = t.get("items") or 0
        out["n-samples"][task] = {"original": n, "effective": n}
        seconds += float(t.get("seconds") or 0.0)
    created = res.get("created")
    try:
        date = dt.datetime.fromisoformat(created).timestamp() if created else None
    except ValueError:
        date = None
    out["config"] = {"model": "omnitrain", "model_args": f"path={model.get('path')}", "batch_size": config.get("batch_size"),
                     "limit": config.get("limit"), "model_kind": model.get("kind"), "checkpoint_step": model.get("checkpoint_step"),
                     "layout_hash": model.get("layout_hash")}  # fmt: skip
    out.update({"git_hash": res.get("git_commit"), "date": date, "model_name": model.get("name"),
                "total_evaluation_time_seconds": str(seconds)})  # fmt: skip
    return out


def write_lm_eval(out_dir: Path, res: dict[str, Any]) -> Path:
    """``results_lm_eval.json`` in ``out_dir``, written atomically."""
    path = Path(out_dir) / LM_EVAL_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(R._clean(to_lm_eval(res)), indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


@dataclass
class ToLmEvalConfig:
    results: str | None = None  # an omnitrain eval out_dir or its results.json
    out: str | None = None  # where to write (None: results_lm_eval.json beside it)


def convert(cfg: ToLmEvalConfig) -> Path:
    """``omnitrain eval to-lm-eval``: an omnitrain results.json -> lm-eval's schema."""
    if not cfg.results:
        raise ValueError("pass results=<an omnitrain eval out_dir or its results.json>")
    res = R.read_results(cfg.results)
    src = Path(cfg.results)
    folder = src if src.is_dir() else src.parent
    if cfg.out:
        path = Path(cfg.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(R._clean(to_lm_eval(res)), indent=2, default=str) + "\n")
    else:
        path = write_lm_eval(folder, res)
    print(f"eval to-lm-eval: {len(res.get('tasks', {}))} task(s) in lm-eval's schema -> {path}", flush=True)
    return path


TASK_INFO = {  # name -> (what it measures, what the model must do); the configs are in recipes/eval.yaml
    "mmlu": ("57-subject multiple choice, accuracy (per subject and category)", "loglikelihood"),
    "humaneval": ("Python function completion, pass@k in a sandbox", "generate (or humaneval.samples)"),
    "docvqa": ("questions on document images, ANLS", "image + text -> text (omnitrain) or tesseract"),
    "speech_wer": ("read speech transcription, corpus WER and CER", "audio -> text (omnitrain) or pocketsphinx"),
    "reading": ("text shown in an image, exact match and characters in place", "image -> text (omnitrain)"),
    "perplexity": ("held-out text, perplexity per token and bits per byte", "loglikelihood"),
    "tts": ("speech it generates from text, heard by an ASR: WER, CER, voice latency", "text -> audio (omnitrain + codec)"),
    "s2s": ("spoken answers to spoken questions, heard by an ASR: exact match, WER, voice latency", "audio -> audio (omnitrain + codec)"),
}


@dataclass
class ListTasksConfig:
    pass


def list_tasks(cfg: ListTasksConfig | None = None) -> list[str]:
    """``omnitrain eval list``: our tasks, what each measures and what it needs."""
    from omnitrain.eval.tasks import TASKS

    width = max(len(name) for name in TASKS)
    for name in TASKS:
        what, needs = TASK_INFO.get(name, ("", ""))
        print(f"{name:<{width}}  {what}; needs {needs}")
    print("\nomnitrain eval tasks=[mmlu,...] model.path=<run>  runs them; any lm-evaluation-harness task runs through\n"
          "python -m omnitrain.lm_eval --model omnitrain --model_args path=<run> --tasks <names>  (list them: python -m omnitrain.lm_eval ls tasks)")  # fmt: skip
    return list(TASKS)
