"""``eval_in_training``: `omnitrain eval` tasks on the training model every N steps (issue 24, item 1).

The scores a run writes at its last step (``eval/step_N``) must equal `omnitrain eval` (``run_eval``, one process) of
the model it exported, whatever the strategy; eval steps must survive a kill -9 and a resume (none twice, none
missing, in metrics.jsonl and in ``eval/``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omnitrain.cli import compose, recipes_dir, train
from omnitrain.eval.harness import EvalConfig, ModelSpec, run_eval
from omnitrain.eval.mmlu import MMLUConfig
from omnitrain.eval.report import CompareConfig, compare
from omnitrain.eval.results import read_results, read_samples
from omnitrain.eval.tasks import PerplexityConfig
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.train.runlog import read_metrics
from tests.synthetic import make_omni_sources
from tests.train.eval_helpers import LIMIT, eval_overrides, make_eval_assets, slow_after
from tests.train.test_train import TRAIN, overrides, start, wait_for_step

STEPS, EVERY = 10, 5
LL_ATOL = 1e-4  # fp32 log-likelihoods of the same weights, other batch shapes (measured: ~1e-6)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return make_omni_sources(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_eval_assets(tmp_path_factory.mktemp("assets"))


def run_in_process(shards: dict[str, Path], run_dir: Path, *extra: str) -> dict:
    """`omnitrain train` in this process (cli.train: the loop with the in-training evaluator)."""
    cfg, plain = compose(TRAIN, overrides(shards, run_dir, *extra), recipes_dir())
    return train(cfg, plain)


def one_process_eval(model: Path, assets: dict[str, Path], out: Path) -> Path:
    """`omnitrain eval` of an exported model, on the tasks and limits the runs evaluate inside training."""
    cfg = EvalConfig(model=ModelSpec(kind="omnitrain", path=str(model), tokenizers=TokenizerPaths(text=str(assets["tokenizer"]))),
                     tasks=["mmlu", "perplexity"], limit=LIMIT, batch_size=3, out_dir=out, report=False, resume=False,
                     progress=False, mmlu=MMLUConfig(source=str(assets["mmlu"])),
                     perplexity=PerplexityConfig(paths=[str(assets["text"])], chunk_chars=120))  # fmt: skip
    run_eval(cfg)
    return out


def assert_same_scores(run: Path, step: int, reference: Path) -> None:
    got, want = read_results(run / "eval" / f"step_{step}"), read_results(reference)
    assert got["model"]["checkpoint_step"] == step
    assert got["tasks"]["mmlu"]["metrics"]["acc"]["value"] == want["tasks"]["mmlu"]["metrics"]["acc"]["value"]
    ppl = got["tasks"]["perplexity"]["metrics"]["perplexity"]["value"], want["tasks"]["perplexity"]["metrics"]["perplexity"]["value"]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-5)
    mine = {s["id"]: s for s in read_samples(run / "eval" / f"step_{step}") if s["task"] == "mmlu"}
    for s in read_samples(reference):
        if s["task"] == "mmlu":
            assert mine[s["id"]]["loglikelihoods"] == pytest.approx(s["loglikelihoods"], abs=LL_ATOL)
            assert mine[s["id"]]["output"] == s["output"]


def eval_steps(run: Path) -> tuple[list[int], list[int]]:
    """(steps with eval/ metrics in metrics.jsonl, each line counted; eval/step_N folders)."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = sorted(r["step"] for r in lines if "eval/mmlu/acc" in r)
    folders = sorted(int(p.name.removeprefix("step_")) for p in (run / "eval").iterdir())
    return logged, folders


def test_the_training_model_is_scored_every_n_steps_as_omnitrain_eval_scores_its_export(shards, assets, tmp_path):
    run = tmp_path / "run"
    summary = run_in_process(shards, run, f"steps={STEPS}", *eval_overrides(assets, EVERY))
    assert summary["step"] == STEPS
    assert eval_steps(run) == ([0, 5, 10], [0, 5, 10])  # step 0: the baseline
    rows = {r["step"]: r for r in read_metrics(run)}
    assert rows[0]["eval/mmlu/acc"] == read_results(run / "eval" / "step_0")["tasks"]["mmlu"]["metrics"]["acc"]["value"]
    assert rows[10]["eval/perplexity/perplexity"] < rows[0]["eval/perplexity/perplexity"]  # it learned the text range
    assert_same_scores(run, STEPS, one_process_eval(run / "model", assets, tmp_path / "eval"))
    # the steps are ordinary eval results: `omnitrain eval compare` reads them as columns
    table = compare(CompareConfig(results=[str(run / "eval" / f"step_{s}") for s in (0, 5, 10)], out_dir=tmp_path / "cmp"))
    assert "mmlu" in table.read_text()


def run_two_ranks(shards: dict[str, Path], run: Path, *extra: str) -> None:
    launcher_vars = ("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    args = overrides(shards, run, f"steps={STEPS}", "strategy.devices=2", "strategy.accelerator=cpu", "data.batch_size=2", *extra)
    proc = subprocess.run([sys.executable, "-m", "omnitrain.cli", "train", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy,audio_layout", [("ddp", "flat"), ("fsdp", "flat"), ("fsdp", "delay")])
def test_two_ranks_split_the_items_and_score_as_one_process(strategy, audio_layout, shards, assets, tmp_path):
    """Items dealt out over 2 ranks, the model used as the strategy holds it (FSDP2: sharded), scores summed; a delay
    model's ranks pad their forward calls with grouped [1, 1, K] positions."""
    run = tmp_path / "run"
    run_two_ranks(shards, run, f"strategy={strategy}", f"model.audio_layout={audio_layout}", *eval_overrides(assets, EVERY))
    assert eval_steps(run) == ([0, 5, 10], [0, 5, 10])
    assert_same_scores(run, STEPS, one_process_eval(run / "model", assets, tmp_path / "eval"))


def test_eval_steps_survive_a_kill_and_a_resume(shards, assets, tmp_path):
    """Killed after eval step 15 but before its checkpoint (ckpt_every=10): the resumed run redoes 15 and replaces
    its folder; every eval step once in metrics.jsonl and in eval/."""
    run = tmp_path / "run"
    extra = ("steps=20", "ckpt_every=10", *eval_overrides(assets, EVERY))
    proc = start(shards, run, *extra, prelude=slow_after(16))
    wait_for_step(proc, run, 16)
    proc.kill()
    proc.wait()
    first = read_results(run / "eval" / "step_15")["created"] if (run / "eval" / "step_15").is_dir() else None
    run_in_process(shards, run, *extra)
    assert eval_steps(run) == ([0, 5, 10, 15, 20], [0, 5, 10, 15, 20])
    assert not list((run / "eval").glob("*.tmp"))
    if first is not None:  # (written by the killed attempt, then redone)
        assert read_results(run / "eval" / "step_15")["model"]["checkpoint_step"] == 15
