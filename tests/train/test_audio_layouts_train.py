"""The trainer with each audio layout (issue 23): the same flat shards, model.audio_layout switched, per-level
stats in metrics.jsonl, and an interrupted run resumed to exactly the uninterrupted losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnitrain.cli import COMMANDS, compose, recipes_dir
from omnitrain.train.loop import train
from omnitrain.train.runlog import read_metrics
from tests.model.test_audio_layouts import make_speech_shards, speech_layout

TRAIN = next(c for c in COMMANDS if c.name == "train")
STEPS = 8


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    return make_speech_shards(tmp_path_factory.mktemp("speech") / "speech", speech_layout())


def run(shards: Path, run_dir: Path, layout: str, steps: int = STEPS) -> dict:
    cfg, plain = compose(TRAIN, [f"run_dir={run_dir}", f"steps={steps}", "ckpt_every=4", "threads=1", "wandb.mode=disabled",
                                 "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                                 f"model.audio_layout={layout}", "data.seq_len=96", "data.batch_size=4",
                                 "optim.warmup_steps=2", "optim.lr=3e-3", "optim.schedule=constant", "~data.sources",
                                 f"+data.sources={{speech:{{path:'{shards}'}}}}"], recipes_dir())  # fmt: skip
    assert cfg.data.audio_layout == layout  # one switch: the data recipe follows model.audio_layout
    return train(cfg, plain)


@pytest.mark.parametrize("layout", ["flat", "delay", "depth"])
def test_each_layout_trains_logs_levels_and_resumes_exactly(speech, tmp_path, layout):
    run(speech, tmp_path / "ref", layout)
    rows = read_metrics(tmp_path / "ref")
    assert all(r["loss"] == r["loss"] for r in rows)  # finite (what a tiny run learns is the benchmark's to report)
    if layout != "flat":
        assert all(f"loss/audio_l{lvl}" in rows[-1] for lvl in range(3))
    # stopped after the step-4 checkpoint (a constant schedule: the lr does not depend on the total), resumed to the end
    run(speech, tmp_path / "cut", layout, steps=4)
    run(speech, tmp_path / "cut", layout)
    assert {r["step"]: r["loss"] for r in read_metrics(tmp_path / "cut")} == {r["step"]: r["loss"] for r in rows}
