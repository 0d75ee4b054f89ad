"""The trainer, one process: it learns, writes its run files, resumes exactly after kill -9, survives a
kill during a checkpoint write, saves and stops on SIGUSR1, and never trains on a non-finite loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omnitrain.cli import COMMANDS, compose, main, recipes_dir
from omnitrain.model import io as model_io
from omnitrain.train import checkpoint
from omnitrain.train.loop import train
from omnitrain.train.optim import OptimConfig, lr_at, param_groups
from omnitrain.train.runlog import read_metrics
from tests.synthetic import make_omni_sources

STEPS = 40
TRAIN = next(c for c in COMMANDS if c.name == "train")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return make_omni_sources(tmp_path_factory.mktemp("shards"))


def overrides(shards: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    """A tiny model on the synthetic shards: ~40 ms a step on 2 cores."""
    srcs = ",".join(f"{k}:{{path:'{v}'}}" for k, v in shards.items())
    return [f"run_dir={run_dir}", f"steps={STEPS}", "ckpt_every=10", "threads=1", "wandb.mode=disabled",
            "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "data.seq_len=128", "data.batch_size=4", "optim.warmup_steps=4", "optim.lr=3e-3",
            "~data.sources", f"+data.sources={{{srcs}}}", *extra]  # fmt: skip


def run_in_process(shards: dict[str, Path], run_dir: Path, *extra: str) -> dict:
    cfg, plain = compose(TRAIN, overrides(shards, run_dir, *extra), recipes_dir())
    return train(cfg, plain)


def start(shards: dict[str, Path], run_dir: Path, *extra: str, prelude: str = "") -> subprocess.Popen:
    """`omnitrain train` in a subprocess (``prelude``: Python run first, e.g. to plant a fault)."""
    code = f"{prelude}\nimport sys\nfrom omnitrain.cli import main\nsys.exit(main(['train', *{overrides(shards, run_dir, *extra)!r}]))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """An uninterrupted run: every other run must reproduce its losses exactly."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_in_process(shards, run)
    return run


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def test_schedules_are_pure_functions_of_the_step():
    cos = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 100, cos) == pytest.approx(0.1) and lr_at(9, 100, cos) == pytest.approx(1.0)
    assert lr_at(10, 100, cos) == pytest.approx(1.0) and lr_at(100, 100, cos) == pytest.approx(0.1)
    assert lr_at(55, 100, cos) == pytest.approx(0.55)  # half-way down the cosine
    wsd = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_at(s, 100, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(89, 100, wsd) == pytest.approx(0.5) and lr_at(99, 100, wsd) == pytest.approx(0.0)
    assert lr_at(500, 1000, OptimConfig(lr=2.0, schedule="constant")) == 2.0


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from omnitrain.model.transformer import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, qk_norm=True, tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_embeddings.weight", "norm.weight", "layers.0.attention.q_norm.weight"}
    assert all(p.ndim == 2 and "embeddings" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied output counted once


def test_training_learns_logs_per_modality_and_exports_a_loadable_model(reference):
    rows = read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"], f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}"
    for mod in ("text", "image", "audio"):
        assert 0 <= rows[-1][f"acc/{mod}"] <= 1 and rows[-1][f"tokens_per_s/{mod}"] > 0
    assert rows[-1]["grad_norm"] > 0 and rows[-1]["flops_per_s"] > 0 and rows[-1]["packing_efficiency"] > 0.99
    info = json.loads((reference / "run.json").read_text())
    assert info["attempts"][0]["commit"] and (reference / "config.yaml").is_file() and (reference / "layout.json").is_file()
    assert [p.name for p in checkpoint.complete_checkpoints(reference)] == ["step_000000020", "step_000000030", "step_000000040"]
    model, layout = model_io.load_model(reference)
    ids = torch.tensor([[1, 20, 30, 40]])
    assert layout is not None and model.cfg.vocab_size == layout.vocab_size and torch.isfinite(model(ids)).all()


def test_wandb_offline_by_default_logs_the_run_and_a_resume_continues_the_same_wandb_run(shards, tmp_path):
    run = tmp_path / "run"
    short = [o for o in overrides(shards, run, "steps=4", "ckpt_every=2") if o != "wandb.mode=disabled"]  # the recipe's default: offline
    cfg, plain = compose(TRAIN, short, recipes_dir())
    assert cfg.wandb.mode == "offline"
    train(cfg, plain)
    run_id = (run / "wandb_id").read_text().strip()
    assert len(run_id) == 8 and list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    cfg, plain = compose(TRAIN, [*short, "steps=6"], recipes_dir())
    train(cfg, plain)  # resumes from step 4 into the same wandb run
    assert (run / "wandb_id").read_text().strip() == run_id
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 7))


def test_kill_9_mid_run_then_resume_gives_identical_losses(shards, reference, tmp_path):
    run = tmp_path / "run"
    proc = start(shards, run)
    wait_for_step(proc, run, 15)  # past the checkpoint at step 10, before the one at 20
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.resolve_resume(run, "auto").name == "step_000000010"
    summary = run_in_process(shards, run)  # resume=auto
    assert summary["step"] == STEPS
    assert losses(run) == losses(reference)  # exact: the same batches, weights, optimizer state
    attempts = json.loads((run / "run.json").read_text())["attempts"]
    assert [a["start_step"] for a in attempts] == [0, 10]


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_usable(shards, reference, tmp_path):
    run = tmp_path / "run"
    # die inside the step-20 save, after the state and rank files are written, before meta.json and the rename
    prelude = ("import os, signal\nfrom omnitrain.train import checkpoint\n_w = checkpoint._write_synced\n"
               "def dying(path, text):\n    if 'step_000000020' in str(path):\n        os.kill(os.getpid(), signal.SIGKILL)\n"
               "    _w(path, text)\ncheckpoint._write_synced = dying")  # fmt: skip
    proc = start(shards, run, prelude=prelude)
    proc.wait(timeout=180)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "step_000000020.tmp" / "state").exists()  # the half-written one is there...
    assert checkpoint.resolve_resume(run, "auto").name == "step_000000010"  # ...and ignored
    run_in_process(shards, run)
    assert losses(run) == losses(reference)
    assert not list((run / "checkpoints").glob("*.tmp"))  # cleaned up by the next save


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_preemption_signal_saves_at_the_end_of_the_step_and_exits_then_the_run_resumes(shards, reference, tmp_path, sig):
    run = tmp_path / "run"
    proc = start(shards, run)
    wait_for_step(proc, run, 12)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = checkpoint.resolve_resume(run, "auto")
    step = int(saved.name.split("_")[1])
    assert f"{signal.Signals(sig).name}: saved step {step} and stopped" in out
    assert 12 <= step < STEPS and read_metrics(run)[-1]["step"] == step  # stopped right after the step it was in
    assert not (run / "model").exists()  # no final export for a preempted run
    run_in_process(shards, run)
    assert losses(run) == losses(reference)


def test_a_non_finite_loss_is_never_trained_on(shards, tmp_path):
    from omnitrain.model.transformer import Transformer
    from omnitrain.tokenizer.layout import TokenLayout

    layout_dir = next(iter(shards.values()))  # a model whose weights give NaN logits: every step is non-finite
    cfg, _ = compose(TRAIN, overrides(shards, tmp_path), recipes_dir())
    cfg.model.vocab_size = TokenLayout.load(layout_dir).vocab_size
    bad = Transformer(cfg.model)
    with torch.no_grad():
        bad.layers[0].feed_forward.w2.weight[0, 0] = float("nan")
    model_io.save_model(bad, tmp_path / "nan_model", layout_dir)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 0"):
        run_in_process(shards, tmp_path / "stop", f"init_from={tmp_path / 'nan_model'}", "on_nonfinite=stop")
    assert not checkpoint.complete_checkpoints(tmp_path / "stop")
    with pytest.raises(FloatingPointError, match="at step 2"):
        run_in_process(shards, tmp_path / "skip", f"init_from={tmp_path / 'nan_model'}", "on_nonfinite=skip", "max_skipped=3")
    rows = read_metrics(tmp_path / "skip")
    assert [r["skipped"] for r in rows] == [1, 1]


def test_bad_train_configs_fail_before_any_work(shards, tmp_path, capsys):
    assert main(["train", "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["train", "strategy=zero"]) == 2
    err = capsys.readouterr().err
    assert "ddp" in err and "fsdp" in err and "deepspeed" in err
    assert main(["train", "strategy.precision=fp8"]) == 2
    assert "bf16-mixed" in capsys.readouterr().err
    assert main(["train", *overrides(shards, tmp_path / "r", "resume=/nowhere")]) == 1
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert main(["train", *overrides(shards, tmp_path / "r"), "~data.sources", "+data.sources={x:{path:/no/such/shards}}"]) == 1
    assert "/no/such/shards" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_vocabulary_and_the_layout_hash_come_from_the_data(shards, tmp_path):
    import shutil

    from omnitrain.tokenizer.layout import LayoutMismatchError, TokenLayout
    from tests.synthetic import SMALL_LAYOUT

    vocab = TokenLayout.load(shards["text"]).vocab_size
    with pytest.raises(ValueError, match=f"model.vocab_size=123, but the token layout .* has {vocab} ids"):
        run_in_process(shards, tmp_path / "r", "+model.vocab_size=123")
    # a shard set whose layout.json is not the layout its shards were built with: the training loader checks
    # every manifest and shard against layout.json's hash (before, it trusted the first manifest and trained)
    text = shutil.copytree(shards["text"], tmp_path / "text")
    other = TokenLayout.build(SMALL_LAYOUT["text_vocab_size"] + 8, "another tokenizer", {"bos": 1, "eos": 2, "pad": 3},
                              image_codebook_size=64, audio_codebook_size=32, audio_levels=2)  # fmt: skip
    other.save(text)
    with pytest.raises(LayoutMismatchError) as err:
        run_in_process({**shards, "text": text}, tmp_path / "r")
    assert other.hash in str(err.value) and TokenLayout.load(shards["text"]).hash in str(err.value)
    assert not (tmp_path / "r").exists()


def test_multirun_expands_a_sweep_into_one_run_directory_per_job(capsys):
    assert main(["train", "--cfg", "-m", "optim.lr=1e-3,2e-3", "seed=0,1", "run_dir=runs/sweep"]) == 0
    out = capsys.readouterr().out
    assert out.count("run_dir: runs/sweep/") == 4 and "lr: 0.002" in out and "seed: 1" in out


def test_the_demo_and_pretrain_experiments_compose():
    cfg, _ = compose(TRAIN, ["experiment=pretrain"], recipes_dir())
    assert (cfg.strategy.name, cfg.strategy.num_nodes, cfg.model.dim, cfg.optim.schedule) == ("fsdp", 4, 2048, "wsd")
    assert cfg.data.modality_shares == {"text": 0.5, "image": 0.3, "audio": 0.2}
    cfg, _ = compose(TRAIN, [], recipes_dir())
    assert cfg.strategy.name == "single" and str(cfg.run_dir) == "runs/demo/train"
    assert os.path.basename(cfg.data.sources["asr"].path) == "asr"
