"""TensorBoard beside metrics.jsonl and wandb (runlog.RunLog): the same numbers under the same names, and a
resumed run replaces the steps a killed attempt logged after its last checkpoint. Also the warmup warning."""

from __future__ import annotations

import pytest

from omnitrain.cli import COMMANDS, compose, recipes_dir
from omnitrain.train.loop import TrainConfig, train
from omnitrain.train.optim import OptimConfig
from omnitrain.train.runlog import read_metrics
from tests.synthetic import make_omni_sources

TRAIN = next(c for c in COMMANDS if c.name == "train")


def tiny(shards, run_dir, *extra: str) -> list[str]:
    srcs = ",".join(f"{k}:{{path:'{v}'}}" for k, v in shards.items())
    return [f"run_dir={run_dir}", "steps=6", "ckpt_every=3", "threads=1", "wandb.mode=disabled", "export=false",
            "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "data.seq_len=64",
            "data.batch_size=2", "optim.warmup_steps=2", "~data.sources", f"+data.sources={{{srcs}}}", *extra]  # fmt: skip


def scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_equal_metrics_jsonl_and_a_resume_replaces_the_lost_steps(tmp_path):
    shards = make_omni_sources(tmp_path / "shards")
    run = tmp_path / "run"
    cfg, plain = compose(TRAIN, tiny(shards, run, "tensorboard.enabled=true"), recipes_dir())
    train(cfg, plain)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows, tb = read_metrics(run), scalars(run)
    assert tb["loss"] == pytest.approx({r["step"]: r["loss"] for r in rows}, rel=1e-6)  # float32 in the event file
    assert tb["loss/text"] == pytest.approx({r["step"]: r["loss/text"] for r in rows if "loss/text" in r}, rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s", "tokens"} <= set(tb)
    # a second attempt from the step-3 checkpoint (as after a kill): steps 4-6 are logged again, once each
    (run / "checkpoints" / "step_000000006").rename(run / "checkpoints" / "gone")
    cfg, plain = compose(TRAIN, tiny(shards, run, "tensorboard.enabled=true", "optim.lr=1e-2"), recipes_dir())
    train(cfg, plain)
    rows, tb = read_metrics(run), scalars(run)
    assert sorted(tb["loss"]) == [1, 2, 3, 4, 5, 6]
    assert tb["lr"] == pytest.approx({r["step"]: r["lr"] for r in rows}, rel=1e-6)  # steps 4-6: the new run's rates


def test_tensorboard_is_off_by_default(tmp_path):
    cfg, _ = compose(TRAIN, [], recipes_dir())
    assert cfg.tensorboard.enabled is False


def test_a_warmup_longer_than_the_run_warns_at_start_up():
    with pytest.warns(UserWarning, match=r"optim.warmup_steps=100 > steps=40: .* set optim.warmup_steps <= steps"):
        TrainConfig(steps=40, optim=OptimConfig(warmup_steps=100))
