"""The trainer with each audio layout (issue 23): the same flat shards, model.audio_layout switched, per-level
stats in metrics.jsonl, and an interrupted run resumed to exactly the uninterrupted losses. What holds a model
records its audio layout and refuses another (resume, init_from, a model folder), model.audio_layout decides the
loader's, and depth finds its frame rows on the host (DPO with grouped rows: tests/train/test_posttrain.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from omnitrain.cli import COMMANDS, compose, recipes_dir
from omnitrain.model.io import load_model
from omnitrain.train.build import resolve
from omnitrain.train.checkpoint import CheckpointError
from omnitrain.train.loop import train
from omnitrain.train.plan import AudioShape, flops_per_token, frame_share
from omnitrain.train.runlog import read_metrics
from tests.model.test_audio_layouts import make_speech_shards, speech_layout

TRAIN = next(c for c in COMMANDS if c.name == "train")
STEPS = 8


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    return make_speech_shards(tmp_path_factory.mktemp("speech") / "speech", speech_layout())


def config(shards: Path, run_dir: Path, layout: str, steps: int = STEPS, *extra: str) -> tuple:
    return compose(TRAIN, [f"run_dir={run_dir}", f"steps={steps}", "ckpt_every=4", "threads=1", "wandb.mode=disabled",
                           "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                           f"model.audio_layout={layout}", "data.seq_len=96", "data.batch_size=4",
                           "optim.warmup_steps=2", "optim.lr=3e-3", "optim.schedule=constant", "~data.sources",
                           f"+data.sources={{speech:{{path:'{shards}'}}}}", *extra], recipes_dir())  # fmt: skip


def run(shards: Path, run_dir: Path, layout: str, steps: int = STEPS, *extra: str) -> dict:
    cfg, plain = config(shards, run_dir, layout, steps, *extra)
    assert cfg.data.audio_layout == layout  # one switch: the data recipe follows model.audio_layout
    return train(cfg, plain)


@pytest.mark.parametrize("layout", ["flat", "delay", "depth"])
def test_each_layout_trains_logs_levels_and_resumes_exactly(speech, tmp_path, layout):
    run(speech, tmp_path / "ref", layout)
    rows = read_metrics(tmp_path / "ref")
    assert all(r["loss"] == r["loss"] for r in rows)  # finite (what a tiny run learns is the benchmark's to report)
    if layout != "flat":
        assert all(f"loss/audio_l{lvl}" in rows[-1] for lvl in range(3))
        # MFU's FLOPs count the level heads (delay) / the depth transformer at the manifests' share of frames, as the plan
        cfg = resolve(config(speech, tmp_path / "ref", layout)[0])[0]
        per_position = flops_per_token(cfg.model, cfg.data.seq_len, AudioShape(3, 32, frame_share(cfg, 3)))
        assert rows[-1]["flops_per_s"] == pytest.approx(rows[-1]["processed_tokens_per_s"] * per_position, rel=1e-9)
    # stopped after the step-4 checkpoint (a constant schedule: the lr does not depend on the total), resumed to the end
    run(speech, tmp_path / "cut", layout, steps=4)
    run(speech, tmp_path / "cut", layout)
    assert {r["step"]: r["loss"] for r in read_metrics(tmp_path / "cut")} == {r["step"]: r["loss"] for r in rows}


def test_checkpoints_and_models_record_the_audio_layout_and_refuse_another(speech, tmp_path):
    """A delay model has exactly a flat one's weights, so the record is what stops a silent switch: resume and
    init_from under another layout are refused with the layout to use; the shards serve every layout."""
    run(speech, tmp_path / "delay", "delay", 4)
    ckpt = tmp_path / "delay" / "checkpoints" / "step_000000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["audio_layout"] == "delay" and len(meta["layout_hash"]) == 16  # the shards' token layout hash, as for flat
    for other in ("flat", "depth"):
        with pytest.raises(CheckpointError, match=f"trained with model.audio_layout=delay, this run has model.audio_layout={other}: "
                                                  "resume with model.audio_layout=delay"):  # fmt: skip
            run(speech, tmp_path / "delay", other, 8)
    assert not (tmp_path / "delay" / "checkpoints" / "step_000000008").exists()  # refused before any step
    # a checkpoint from before meta.json recorded it: the run's config.yaml says which layout wrote it
    meta.pop("audio_layout")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trained with model.audio_layout=delay"):
        run(speech, tmp_path / "delay", "flat", 8)
    config_yaml = tmp_path / "delay" / "config.yaml"  # ... and one from before the audio layouts existed was flat
    config_yaml.write_text(config_yaml.read_text().replace("audio_layout: delay", "x: 0"))
    with pytest.raises(CheckpointError, match="trained with model.audio_layout=flat, this run has model.audio_layout=delay"):
        run(speech, tmp_path / "delay", "delay", 8)
    with pytest.raises(ValueError, match="holds a model trained with model.audio_layout=delay, this run builds model.audio_layout=flat"):
        run(speech, tmp_path / "from_delay", "flat", 4, f"init_from={tmp_path / 'delay'}")
    model, _ = load_model(tmp_path / "delay")  # eval and generate build the layout config.json records
    assert model.cfg.audio_layout == "delay"


def test_a_model_folder_whose_weights_contradict_its_audio_layout_is_refused(speech, tmp_path):
    run(speech, tmp_path / "depth", "depth", 4)
    folder = tmp_path / "depth" / "model"
    config = json.loads((folder / "config.json").read_text())
    config["model"]["audio_layout"] = "delay"  # config.json of another export beside depth weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json says model.audio_layout=delay but model.safetensors holds a depth transformer"):
        load_model(folder)
    config["model"]["audio_layout"] = "depth"
    (folder / "config.json").write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith("depth.")}
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match="config.json says model.audio_layout=depth but model.safetensors holds no depth"):
        load_model(folder)


def test_the_loader_takes_the_models_audio_layout(speech, tmp_path):
    """model.audio_layout is the one switch: a config whose data.audio_layout was never set (built in Python, or a
    recipe without the interpolation) follows the model; a different grouped layout for the data is refused."""
    cfg, _ = config(speech, tmp_path / "r", "delay", 4, "data.audio_layout=flat")
    assert cfg.data.audio_layout == "flat" and resolve(cfg)[0].data.audio_layout == "delay"
    cfg, _ = config(speech, tmp_path / "r", "delay", 4, "data.audio_layout=depth")
    with pytest.raises(ValueError, match="data.audio_layout=depth but model.audio_layout=delay: .* Drop data.audio_layout"):
        resolve(cfg)
    cfg, _ = config(speech, tmp_path / "r", "flat", 4, "data.audio_layout=delay")
    with pytest.raises(ValueError, match="data.audio_layout=delay but model.audio_layout=flat"):
        resolve(cfg)


def test_depth_finds_its_frame_rows_on_the_host_with_the_same_losses(speech, tmp_path, monkeypatch):
    """The depth transformer runs on the positions whose target is a frame; finding them with ``nonzero`` on the device
    is a device-to-host sync, so the trainer finds them in the loader's host batch (train.step.host_side). The model
    then never searches itself during a training step, and the losses are those of the in-model search to the bit."""
    from omnitrain.model import audio_layouts
    from omnitrain.train import step

    searched = []
    in_model = audio_layouts.frame_rows
    monkeypatch.setattr(audio_layouts, "frame_rows", lambda targets: searched.append(1) or in_model(targets))  # the model's calls
    run(speech, tmp_path / "host", "depth", 3, "log_every=1")
    assert searched == []
    monkeypatch.setattr(step, "host_side", lambda batch, audio_layout: batch)  # as before: the model searches on the device
    run(speech, tmp_path / "device", "depth", 3, "log_every=1")
    assert len(searched) == 3
    losses = [{k: v for k, v in r.items() if k.startswith(("loss", "acc"))} for r in read_metrics(tmp_path / "host")]
    assert losses == [{k: v for k, v in r.items() if k.startswith(("loss", "acc"))} for r in read_metrics(tmp_path / "device")]
    assert len(losses) == 3 and "loss/audio_l2" in losses[0]
