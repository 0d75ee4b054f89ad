"""Sweeps (omnitrain.sweep): short run folders with their overrides inside, a sweep.md summary, and Hydra's
launchers (joblib locally, submitit for Slurm arrays) chosen with hydra/launcher=..."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest

from omnitrain import sweep
from omnitrain.cli import COMMANDS, main, recipes_dir
from tests.synthetic import make_omni_sources

TRAIN = next(c for c in COMMANDS if c.name == "train")


def tiny(shards: dict[str, Path], sweep_dir: Path, *extra: str) -> list[str]:
    """A tiny model, 3 steps, no checkpoint but the last, no export: ~1 s a run after start-up."""
    srcs = ",".join(f"{k}:{{path:'{v}'}}" for k, v in shards.items())
    return [f"run_dir={sweep_dir}", "steps=3", "ckpt_every=10", "threads=1", "wandb.mode=disabled", "export=false",
            "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "data.seq_len=64",
            "data.batch_size=2", "optim.warmup_steps=1", "~data.sources", f"+data.sources={{{srcs}}}", *extra]  # fmt: skip


def test_expand_is_the_cartesian_product_in_hydras_order_and_names_are_short():
    jobs = sweep.expand(["optim.lr=1e-3,3e-3", "seed=0,1", "steps=5", "hydra/launcher=joblib"])
    assert [j[0::2] for j in jobs] == [["optim.lr=0.001", "steps=5"], ["optim.lr=0.001", "steps=5"],
                                       ["optim.lr=0.003", "steps=5"], ["optim.lr=0.003", "steps=5"]]  # fmt: skip
    assert [j[1] for j in jobs] == ["seed=0", "seed=1", "seed=0", "seed=1"]
    assert sweep.task_overrides(jobs[0]) == ["optim.lr=0.001", "seed=0", "steps=5"]  # the launcher does not change the hash
    names = [sweep.run_name(i, sweep.task_overrides(j)) for i, j in enumerate(jobs)]
    assert all(re.fullmatch(r"\d-[0-9a-f]{8}", n) for n in names) and len(set(n[2:] for n in names)) == 4
    assert sweep.run_name(0, ["b=2", "a=1"]) == sweep.run_name(0, ["a=1", "b=2"])  # order-free
    assert sweep.swept_keys(jobs) == ["optim.lr", "seed"]
    with pytest.raises(sweep.ConfigError, match="key=a,b,c"):
        sweep.expand(["optim.lr=interval(1e-4,1e-2)"])


def test_cfg_prints_each_runs_config_with_its_short_folder(capsys):
    assert main(["train", "--cfg", "-m", "optim.lr=1e-3,2e-3", "run_dir=runs/sweep"]) == 0
    dirs = re.findall(r"^run_dir: (\S+)$", capsys.readouterr().out, re.M)
    assert [d.rsplit("/", 1)[0] for d in dirs] == ["runs/sweep"] * 2 and [d[11:13] for d in dirs] == ["0-", "1-"]


def test_summary_lists_final_metrics_and_the_overrides_that_differ(tmp_path):
    runs = {"0-aaaaaaaa": ("1e-3", "done", 2.5), "1-bbbbbbbb": ("3e-3", "error: disk full", 2.0)}
    for i, (name, (lr, status, loss)) in enumerate(runs.items()):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(json.dumps({"index": i, "name": name, "status": status,
                                                                "overrides": ["steps=2", f"optim.lr={lr}"]}))  # fmt: skip
        rows = [{"step": 0, "val/text": 9.0},
                {"step": 1, "loss": 3.0, "loss/text": 3.1, "tokens": 100, "elapsed": 1.0},
                {"step": 2, "loss": loss, "loss/text": 2.6, "loss/image": 2.4, "tokens": 200, "elapsed": 1.5, "val/text": 2.7}]  # fmt: skip
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text, jobs = sweep.summarize(tmp_path)
    assert (tmp_path / "sweep.md").read_text() == text and [j["name"] for j in jobs] == list(runs)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| run | optim.lr | loss | loss/image | loss/text | val/text | step | tokens | steps/s | status |"
    assert table[2] == "| 0-aaaaaaaa | 1e-3 | 2.5 | 2.4 | 2.6 | 2.7 | 2 | 200 | 2 | done |"
    assert table[3].startswith("| 1-bbbbbbbb | 3e-3 | 2 |") and table[3].endswith("| error: disk full |")


@pytest.mark.slow  # ~20 s: 2 joblib (loky) workers each import torch and Lightning
def test_a_4_run_sweep_with_the_joblib_launcher(tmp_path, capsys):
    shards = make_omni_sources(tmp_path / "shards")
    out = tmp_path / "sweep"
    args = tiny(shards, out, "optim.lr=1e-3,3e-3", "seed=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert main(["train", "-m", *args]) == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name[:2] for p in folders] == ["0-", "1-", "2-", "3-"] and all(len(p.name) == 10 for p in folders)
    swept = []
    for p in folders:
        job = json.loads((p / "sweep.json").read_text())
        assert job["status"] == "done" and job["name"] == p.name and (p / "metrics.jsonl").is_file()
        swept.append([o for o in job["overrides"] if o.startswith(("optim.lr=", "seed="))])
    assert swept == [["optim.lr=0.001", "seed=0"], ["optim.lr=0.001", "seed=1"], ["optim.lr=0.003", "seed=0"],
                     ["optim.lr=0.003", "seed=1"]]  # fmt: skip
    summary = (out / "sweep.md").read_text()
    rows = [line.split(" | ") for line in summary.splitlines() if re.match(r"\| \d-", line)]
    assert [(r[0][2:], r[1], r[2]) for r in rows] == [(p.name, *(o.split("=")[1] for o in s)) for p, s in zip(folders, swept, strict=True)]
    assert all(float(r[3]) > 0 and r[-1] == "done |" for r in rows)  # the final loss, the status
    assert summary in capsys.readouterr().out  # also printed


def test_the_submitit_slurm_launcher_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        cfg = compose(TRAIN.recipe, ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                     "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=720"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 8, 720)
    assert launcher.submitit_folder.endswith("/.submitit/%j")  # in the sweep dir, one folder per Slurm job


def test_the_submitit_slurm_launcher_submits_one_array_of_the_runs(tmp_path, monkeypatch):
    """What a Slurm sweep would submit (nothing reaches sbatch): one job array, a task per run, with the
    launcher's sbatch options; each task calls the pickled sweep job on its node."""
    import submitit
    from hydra.core.utils import JobReturn, JobStatus

    submitted = []

    def map_array(executor, fn, *args):  # in place of sbatch: record the array, run nothing
        script = executor._executor._make_submission_file_text("python -m submitit.core._submit DIR", "uid")
        submitted.append((script, fn, list(zip(*args, strict=True))))
        done = JobReturn(status=JobStatus.COMPLETED, _return_value="submitted")
        return [type("Job", (), {"results": lambda self: [done]})() for _ in args[0]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    overrides = ["run_dir=" + str(tmp_path / "sweep"), "optim.lr=1e-3,3e-3", "hydra/launcher=submitit_slurm",
                 "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=720"]  # fmt: skip
    assert main(["train", "-m", *overrides]) == 0
    [(script, launcher, jobs)] = submitted
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --gpus-per-node=8" in script and "#SBATCH --time=720" in script
    assert "#SBATCH --job-name=omnitrain_train" in script
    assert [job[0][-1] for job in jobs] == ["optim.lr=0.001", "optim.lr=0.003"] and [job[2] for job in jobs] == [0, 1]
    assert isinstance(launcher.task_function, sweep.SweepJob) and launcher.task_function.swept == ["optim.lr"]
    assert pickle.loads(pickle.dumps(launcher.task_function)) == launcher.task_function  # as it travels to the node
