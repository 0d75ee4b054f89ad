"""Sweeps: ``omnitrain <command> -m a=1,2 b=x,y`` runs every combination through a Hydra launcher.

    omnitrain train -m experiment=demo optim.lr=1e-3,3e-3 seed=0,1                       # one after the other
    omnitrain train -m ... threads=1 hydra/launcher=joblib hydra.launcher.n_jobs=2        # 2 at a time, locally
    omnitrain train -m ... hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
        hydra.launcher.gpus_per_node=8 hydra.launcher.timeout_min=720                     # a Slurm job array

Each run gets a short folder in the sweep directory (the command's ``run_dir``): ``<index>-<hash>``, where
the hash is of the run's overrides, and ``sweep.json`` inside says which overrides those are. At the end
``sweep.md`` in the sweep directory has one row per run: its overrides that differ between runs, then the
final loss, the loss per modality, the held-out losses, tokens and steps/s, read from its metrics.jsonl.

Hydra's public entry for launching a sweep is ``hydra.main`` (it parses ``sys.argv``); the launcher
plugins (``hydra-joblib-launcher``, ``hydra-submitit-launcher``) are chosen with ``hydra/launcher=...``
as in any Hydra app. Hydra and OmegaConf are imported inside the functions (DESIGN.md: the CLI edge).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnitrain.config import ConfigError

SUMMARY_NAME, JOB_FILE = "sweep.md", "sweep.json"
RESOLVER = "omnitrain_run_name"


def expand(overrides: list[str]) -> list[list[str]]:
    """``a=1,2 b=x,y`` -> the 4 override lists of the cartesian product, in Hydra's basic sweeper's order and
    spelling (so that ``run_name`` here names the folders the launched jobs name themselves)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # hydra (~0.1 s): see cli.compose
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from e
    choices: dict[str, list[str]] = {}  # key -> its values as override strings; a later override of a key wins
    for o in parsed:
        key = o.get_key_element()
        if not o.is_sweep_override():
            choices[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise ConfigError(f"'{o.input_line}': a {o.value_type.name} sweep needs a sweeper plugin (e.g. Optuna); "
                              "give the values as a list: key=a,b,c or key=range(0,4)")  # fmt: skip
    return [list(job) for job in itertools.product(*choices.values())]


def task_overrides(job: list[str]) -> list[str]:
    """The overrides that configure the run (Hydra's ``hydra.overrides.task``): all but ``hydra.*`` / ``hydra/*``."""
    return [o for o in job if not o.lstrip("+~").startswith("hydra")]


def run_name(index: int, overrides: list[str]) -> str:
    """``<index>-<8 hex of the sorted overrides' sha1>``: short, free of ``=`` and ``/``, stable across restarts."""
    digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return f"{index}-{digest}"


def _register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):  # ${omnitrain_run_name:${hydra.job.num},${hydra.overrides.task}}
        OmegaConf.register_new_resolver(RESOLVER, lambda num, task: run_name(int(num), list(task)))


@dataclass
class SweepJob:
    """Hydra's task function: one run of ``command`` in its sweep folder. A picklable object rather than a
    closure, since joblib and submitit run it in other processes (or on other nodes): unpickling registers
    the folder-name resolver there too, before Hydra resolves ``hydra.sweep.subdir`` with it."""

    command: str  # a cli.COMMANDS name, e.g. "train"
    run: Callable[[str, dict[str, Any]], Any]  # (command, plain config) -> result: cli.run_command, pickled by name
    total: int  # runs in the sweep (for the progress line)
    swept: list[str]  # the keys that vary between runs (the progress line shows only those)

    def __post_init__(self) -> None:
        _register_resolver()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _register_resolver()

    def __call__(self, cfg: Any) -> str:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        overrides = list(hc.overrides.task)
        plain = OmegaConf.to_container(cfg, resolve=True)
        plain["run_dir"] = str(run_dir)
        record = {"index": int(hc.job.num), "name": run_dir.name, "overrides": overrides, "status": "running"}
        _write_json(run_dir / JOB_FILE, record)
        shown = [o for o in overrides if o.split("=", 1)[0] in self.swept]
        print(f"[sweep {record['index'] + 1}/{self.total}] {run_dir}: {' '.join(shown)}", flush=True)
        try:
            self.run(self.command, plain)
            record["status"] = "done"
        except (ValueError, FileNotFoundError) as e:  # user-fixable: one line here and in sweep.md, the other runs go on
            if os.environ.get("OMNITRAIN_DEBUG"):
                raise
            record["status"] = f"error: {e}"
            print(f"omnitrain {self.command} [sweep run {run_dir.name}]: error: {e}", file=sys.stderr, flush=True)
        _write_json(run_dir / JOB_FILE, record)
        return record["status"]


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def swept_keys(jobs: list[list[str]]) -> list[str]:
    """The override keys whose value differs between the jobs of a sweep."""
    split = [dict(o.split("=", 1) if "=" in o else (o, "") for o in job) for job in jobs]
    keys = list(dict.fromkeys(k for s in split for k in s))
    return [k for k in keys if len({s.get(k) for s in split}) > 1]


def launch(command: str, run: Callable[[str, dict[str, Any]], Any], recipe: str, recipes: Path, pipelines: Path | None,
           overrides: list[str], sweep_dir: Path) -> int:  # fmt: skip
    """Run the sweep ``overrides`` of ``command`` (each run: ``run(command, plain config)``) through Hydra's multirun (the launcher the overrides choose,
    Hydra's basic one by default) into ``sweep_dir``; then write and print the summary (``sweep.md``).
    Returns the number of runs that did not finish."""
    import hydra

    sweep_dir = Path(sweep_dir).resolve()
    hydra_args = [
        f"hydra.sweep.dir='{sweep_dir}'",
        f"hydra.job.name=omnitrain_{command.replace(' ', '_')}",  # (the Slurm job name under submitit)
        f"hydra.sweep.subdir='${{{RESOLVER}:${{hydra.job.num}},${{hydra.overrides.task}}}}'",
        "hydra.output_subdir=null",  # the config is the run's own config.yaml; the overrides are in sweep.json
        "hydra/job_logging=none", "hydra/hydra_logging=none",  # omnitrain prints its own lines
        *([f"hydra.searchpath=['file://{pipelines}']"] if pipelines else []),
    ]  # fmt: skip
    jobs = expand(overrides)
    job = SweepJob(command, run, len(jobs), swept_keys([task_overrides(j) for j in jobs]))
    main = hydra.main(config_path=str(recipes), config_name=recipe, version_base="1.3")(job)
    # Hydra has no public function that launches a multirun from an argument list: hydra.main reads sys.argv
    argv = sys.argv
    sys.argv = [f"omnitrain {command}", "--multirun", *overrides, *hydra_args]
    try:
        main()
    finally:
        sys.argv = argv
    table, jobs = summarize(sweep_dir)
    print(f"\n{table}\nsummary: {sweep_dir / SUMMARY_NAME}", flush=True)
    return sum(j.get("status") != "done" for j in jobs)


# ----------------------------------------------------------------------------- the summary
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value).replace("|", "\\|")


def summarize(sweep_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """Write ``sweep.md``: a row per run folder of ``sweep_dir`` (those with a ``sweep.json``), in index order.
    Returns its text and the runs' ``sweep.json`` records."""
    from omnitrain.train.runlog import read_metrics  # torch (~2 s): only once the runs are done

    sweep_dir = Path(sweep_dir)
    jobs = sorted((json.loads(p.read_text()) for p in sweep_dir.glob(f"*/{JOB_FILE}")), key=lambda j: j["index"])
    split = [dict(o.split("=", 1) if "=" in o else (o, "") for o in j["overrides"]) for j in jobs]
    differ = swept_keys([j["overrides"] for j in jobs])
    rows, metric_keys = [], ["loss"]
    for job in jobs:
        metrics = read_metrics(sweep_dir / job["name"])
        last = {k: v for r in metrics for k, v in r.items()}  # the latest value of each key (val/* rows come and go)
        # steps/s over the logged interval (elapsed restarts on a resume: the last attempt's rows only)
        tail = [r for r in metrics if "elapsed" in r]
        while len(tail) > 1 and tail[-1]["elapsed"] < tail[-2]["elapsed"]:
            tail = tail[-1:]
        if len(tail) > 1 and tail[-1]["elapsed"] > tail[0]["elapsed"]:
            last["steps/s"] = (tail[-1]["step"] - tail[0]["step"]) / (tail[-1]["elapsed"] - tail[0]["elapsed"])
        for k in last:
            if (k.startswith(("loss/", "val/")) or k in ("tokens", "steps/s")) and k not in metric_keys:
                metric_keys.append(k)
        rows.append((job, last))
    order = ["loss"] + sorted(k for k in metric_keys if k.startswith("loss/")) + sorted(k for k in metric_keys if k.startswith("val/"))
    order += ["step", "tokens", "steps/s"]
    header = ["run", *differ, *order, "status"]
    lines = [f"# sweep {sweep_dir}", "", f"{len(jobs)} runs; every run's overrides are in <run>/{JOB_FILE}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    for (job, last), s in zip(rows, split, strict=True):
        cells = [job["name"], *(s.get(k, "") for k in differ), *(last.get(k) for k in order), job.get("status", "")]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    (sweep_dir / SUMMARY_NAME).write_text(text)
    return text, jobs
