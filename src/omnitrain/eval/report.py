"""``report.md`` + PNG charts for one eval, and ``omnitrain eval compare`` for several.

Reference figures come from ``evals/*.yaml`` (one file per benchmark; ``evals/README.md`` gives the
format): the random baseline, published figures of other models, GPT-4o's launch figures. Each is
``{name, value, source}`` in the unit of our metric (a fraction for accuracy, pass@k and ANLS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from omnitrain.eval.results import read_results

CHECKOUT_EVALS = Path(__file__).resolve().parents[3] / "evals"


@dataclass
class CompareConfig:
    results: list[str] = field(default_factory=list)  # eval out_dirs or results.json files, one column each
    out_dir: Path = Path("runs/eval/compare")
    references: Path | None = None  # None: the checkout's evals/


def load_references(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """task name -> its evals/<name>.yaml (``metric``, ``references``: [{name, value, source}])."""
    folder = (
        Path(folder) if folder is not None else (Path("evals") if Path("evals").is_dir() else CHECKOUT_EVALS)
    )
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        spec = yaml.safe_load(f.read_text()) or {}
        out[spec.get("task", f.stem)] = spec
    return out


def _fmt(v: Any, stderr: Any = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    s = f"{v:.4f}"
    return s + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) and not math.isnan(stderr) else "")


def _bar_chart(
    path: Path,
    title: str,
    labels: list[str],
    values: list[float],
    errors: list[float],
    ours: list[bool],
    xlabel: str,
) -> None:
    import matplotlib  # ~0.3 s with pyplot; the Agg backend is chosen here, not on import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    colors = ["tab:blue" if o else "tab:gray" for o in ours]
    y = range(len(labels))
    ax.barh(list(y), values, xerr=[e or 0 for e in errors], color=colors, capsize=3)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.set_xlim(0, max(1.0, max(values, default=1) * 1.15))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: Path, references: Path | None = None) -> Path:
    """report.md with a table per task beside its reference figures, and one PNG chart per task."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = load_references(references)
    m = results["model"]
    name = m.get("name") or "model"
    lines = [f"# Eval report: {name}", "",
             f"model `{m.get('path')}` ({m.get('kind')}), checkpoint step {m.get('checkpoint_step')}, layout `{m.get('layout_hash')}`"
             + (f" (audio layout {m['audio_layout']})" if m.get("audio_layout") else "") + ", "
             f"git `{results.get('git_commit')}`, {results.get('created')}, results schema v{results['schema_version']}", "",
             "| task | metric | value ± stderr | n | items/s |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for task, t in results["tasks"].items():
        for metric, v in t["metrics"].items():
            lines.append(
                f"| {task} | {metric} | {_fmt(v['value'], v.get('stderr'))} | {v['n']} | {t.get('items_per_s') or 0:.2f} |"
            )
    for task, t in results["tasks"].items():
        spec = refs.get(task, {})
        metric = spec.get("metric") or next(iter(t["metrics"]))
        ours = t["metrics"].get(metric)
        lines += ["", f"## {spec.get('title', task)}", ""]
        if spec.get("protocol"):
            lines += [spec["protocol"].strip(), ""]
        lines += [f"| system | {metric} | source |", "|---|---:|---|"]
        rows = [(name, ours["value"], ours.get("stderr"), True, "this run")] if ours else []
        rows += [
            (r["name"], float(r["value"]), None, False, r.get("source", ""))
            for r in spec.get("references", [])
        ]
        lines += [f"| {'**' + n + '**' if o else n} | {_fmt(v, e)} | {src} |" for n, v, e, o, src in rows]
        if rows:
            png = f"{task}.png"
            lower = spec.get("lower_is_better", metric in ("wer", "cer"))
            _bar_chart(out_dir / png, f"{spec.get('title', task)}: {metric}", [r[0] for r in rows], [r[1] for r in rows],
                       [r[2] for r in rows], [r[3] for r in rows], metric + (" (lower is better)" if lower else ""))  # fmt: skip
            lines += ["", f"![{task}]({png})"]
        cats = [g for g in ("stem", "humanities", "social_sciences", "other") if g in t.get("groups", {})]
        if cats:  # MMLU's four groups, then every subject
            lines += [
                "",
                "Category groups (lm-eval's subject -> category assignment):",
                "",
                "| group | acc ± stderr | n |",
                "|---|---:|---:|",
            ]
            lines += [
                f"| {g} | {_fmt(t['groups'][g]['acc']['value'], t['groups'][g]['acc']['stderr'])} | {t['groups'][g]['acc']['n']} |"
                for g in cats
            ]
            subj = {k: v for k, v in t["groups"].items() if k not in cats}
            _bar_chart(out_dir / f"{task}_groups.png", f"{task}: acc by category", cats, [t["groups"][g]["acc"]["value"] for g in cats],
                       [t["groups"][g]["acc"]["stderr"] for g in cats], [True] * len(cats), "acc")  # fmt: skip
            lines += ["", f"![{task} groups]({task}_groups.png)", "", "<details><summary>per subject</summary>", "",
                      "| subject | acc ± stderr | n |", "|---|---:|---:|"]  # fmt: skip
            lines += [
                f"| {s} | {_fmt(v['acc']['value'], v['acc']['stderr'])} | {v['acc']['n']} |"
                for s, v in subj.items()
            ]
            lines += ["", "</details>"]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _column_name(res: dict[str, Any]) -> str:
    m = res["model"]
    step = m.get("checkpoint_step")
    return f"{m.get('name')}" + (f" @{step}" if step is not None else "")


def compare(cfg: CompareConfig) -> Path:
    """A side-by-side table (+ chart) of several results: rows are task/metric (and MMLU's groups)."""
    if len(cfg.results) < 1:
        raise ValueError("eval compare needs results=[<eval out_dir or results.json>, ...] (one column each)")
    runs = [read_results(p) for p in cfg.results]
    names = [_column_name(r) for r in runs]
    rows: dict[str, list[Any]] = {}
    for k, r in enumerate(runs):
        for task, t in r["tasks"].items():
            entries = [(f"{task} {m}", v) for m, v in t["metrics"].items()]
            entries += [
                (f"{task} {g}", t["groups"][g]["acc"])
                for g in ("stem", "humanities", "social_sciences", "other")
                if g in t.get("groups", {})
            ]
            for key, v in entries:
                rows.setdefault(key, [None] * len(runs))[k] = v
    refs = load_references(cfg.references)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Eval comparison",
        "",
        "| | " + " | ".join(names) + " | references |",
        "|---|" + "---:|" * len(names) + "---|",
    ]
    for key, vals in rows.items():
        task, metric = key.split(" ", 1)
        spec = refs.get(task, {})
        ref = (
            ", ".join(f"{r['name']} {float(r['value']):.3f}" for r in spec.get("references", []))
            if metric == spec.get("metric")
            else ""
        )
        lines.append(
            f"| {key} | "
            + " | ".join(_fmt(v["value"], v.get("stderr")) if v else "–" for v in vals)
            + f" | {ref} |"
        )
    lines += ["", "Columns: " + "; ".join(f"{n} = `{p}` (git `{r.get('git_commit')}`)" for n, p, r in zip(names, cfg.results, runs, strict=True)), "",
              "![comparison](compare.png)"]  # fmt: skip
    _compare_chart(out / "compare.png", names, rows)
    path = out / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"eval compare: {len(runs)} results, {len(rows)} rows -> {path}")
    return path


def _compare_chart(path: Path, names: list[str], rows: dict[str, list[Any]]) -> None:
    import matplotlib  # ~0.3 s with pyplot; the Agg backend is chosen here, not on import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys) + 2), 4))
    width = 0.8 / len(names)
    x = np.arange(len(keys))
    for k, n in enumerate(names):
        vals = [
            rows[key][k]["value"] if rows[key][k] and rows[key][k]["value"] is not None else 0 for key in keys
        ]
        errs = [(rows[key][k].get("stderr") or 0) if rows[key][k] else 0 for key in keys]
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, yerr=errs, label=n, capsize=2)
    ax.set_xticks(x, keys, rotation=30, ha="right")
    ax.legend(fontsize=8)
    ax.set_title("omnitrain eval compare")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
