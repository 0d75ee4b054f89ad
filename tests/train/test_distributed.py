"""Two processes on CPU (gloo) for every strategy (DDP, FSDP2, DeepSpeed ZeRO 1/2/3), against one process: the
same loss curve, a ``model/`` export that loads and holds the same weights, and an exact resume.

The reference run. The loader gives every (rank, worker) pair its own stream of documents (stream
``rank * workers + slot`` of ``world_size * workers``, see ``omnitrain.data.loader``), so 2 ranks x b rows are
*not* the rows of 1 rank x 2b. One process with ``data.workers=2`` reads exactly the two streams the two
ranks read (its slots 0 and 1 are streams 0 and 1 of 2) and its loader alternates between them, so with
``grad_accum=4`` against the ranks' ``grad_accum=2`` its step holds the same four micro-batches of b rows:
rank 0's two and rank 1's two (``test_one_process_with_two_workers_reads_the_rows_of_two_ranks`` checks
this premise). The loss is normalised by the weighted tokens of the whole step, so the gradients agree up
to fp32 summation order: losses within 1e-5 relative. ``grad_accum=2`` on the ranks also exercises
``no_backward_sync`` (DDP, FSDP) and DeepSpeed's own accumulation, and the reference's gradient norms
exceed ``grad_clip``, so clipping (inside DeepSpeed's step for ZeRO) is exercised too.

Every run is a subprocess (``python -m omnitrain.cli train``): with ``devices=2`` Fabric re-runs the
command line for rank 1, which must not be pytest. The first DeepSpeed run on a fresh machine compiles
DeepSpeed's shared-memory communication extension (~40-75 s, cached in ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnitrain.model import io as model_io
from omnitrain.train import checkpoint
from omnitrain.train.runlog import read_metrics
from tests.synthetic import make_omni_sources

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS, CKPT_EVERY, BATCH = 4, 2, 2  # a few optimizer steps of 4 micro-batches x 2 rows x 128 tokens
GRAD_CLIP = 1.0
LOSS_RTOL = 1e-5  # fp32, another summation order (measured: <= 1.4e-7 relative, ZeRO-3)
WEIGHT_ATOL = 1e-4  # after 4 AdamW steps of lr 1e-2 (each moving a weight by up to ~1e-2); measured <= 2e-5 (ZeRO-3)
STRATEGIES = {
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "deepspeed-zero1": ["strategy=deepspeed", "strategy.zero_stage=1"],
    "deepspeed-zero2": ["strategy=deepspeed", "strategy.zero_stage=2"],
    "deepspeed-zero3": ["strategy=deepspeed", "strategy.zero_stage=3"],
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return make_omni_sources(tmp_path_factory.mktemp("shards"))


def overrides(shards: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    srcs = ",".join(f"{k}:{{path:'{v}'}}" for k, v in shards.items())
    return [f"run_dir={run_dir}", f"steps={STEPS}", f"ckpt_every={CKPT_EVERY}", "threads=1", "wandb.mode=disabled",
            "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=128",
            f"data.batch_size={BATCH}", "optim.lr=1e-2", "optim.warmup_steps=0", f"optim.grad_clip={GRAD_CLIP}",
            "~data.sources", f"+data.sources={{{srcs}}}", *extra]  # fmt: skip


def run_train(shards: dict[str, Path], run_dir: Path, *extra: str) -> str:
    """``omnitrain train`` as a subprocess that launches its own ranks; returns its output (it must succeed)."""
    # drop what would make Fabric believe a launcher (Slurm, torchrun) made the processes already
    launcher_vars = ("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    proc = subprocess.run([sys.executable, "-m", "omnitrain.cli", "train", *overrides(shards, run_dir, *extra)],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"omnitrain train {' '.join(extra)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """One process reading both ranks' streams (data.workers=2), the ranks' 2 x 2 micro-batches as 4."""
    run = tmp_path_factory.mktemp("single") / "run"
    run_train(shards, run, "strategy=single", "data.workers=2", "grad_accum=4")
    return run


_TWO_RANK_RUNS: dict[str, Path] = {}  # one run per strategy for the whole session: the parametrised tests and the offload one share it


def two_rank_run(name: str, shards: dict[str, Path], tmp_path_factory, *extra: str) -> Path:
    if name not in _TWO_RANK_RUNS:
        run = tmp_path_factory.mktemp(name) / "run"
        run_train(shards, run, *extra, "strategy.devices=2", "strategy.accelerator=cpu", "grad_accum=2")
        _TWO_RANK_RUNS[name] = run
    return _TWO_RANK_RUNS[name]


@pytest.fixture(scope="module", params=list(STRATEGIES))
def two_ranks(request, shards, tmp_path_factory) -> Path:
    return two_rank_run(request.param, shards, tmp_path_factory, *STRATEGIES[request.param])


def test_one_process_with_two_workers_reads_the_rows_of_two_ranks(shards):
    from omnitrain.data.loader import LoaderConfig, OmniLoader, SourceSpec

    def loader(workers: int, rank: int, world_size: int) -> OmniLoader:
        cfg = LoaderConfig(sources={k: SourceSpec(str(v)) for k, v in shards.items()}, seq_len=128, batch_size=BATCH, workers=workers)
        return OmniLoader(cfg, rank=rank, world_size=world_size)

    one, rank0, rank1 = loader(2, 0, 1), loader(0, 0, 2), loader(0, 1, 2)
    try:
        expected = [b for _ in range(STEPS) for b in (next(rank0), next(rank0), next(rank1), next(rank1))]
        got = [next(one) for _ in range(4 * STEPS)]
    finally:
        one.close()
    # the same rows per step (the order inside a step does not change the step's gradient)
    for step in range(STEPS):
        want = sorted(tuple(r.tolist()) for b in expected[4 * step : 4 * step + 4] for r in b["input_ids"])
        have = sorted(tuple(r.tolist()) for b in got[4 * step : 4 * step + 4] for r in b["input_ids"])
        assert want == have, f"step {step}: one process with 2 workers does not read the rows of 2 ranks"


def test_the_reference_learns_and_clips(reference):
    rows = read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # updates move the loss: a skipped or doubled step would show
    assert max(r["grad_norm"] for r in rows) > GRAD_CLIP  # so clipping takes part in what is compared


def test_two_processes_give_the_loss_curve_of_one(two_ranks, reference):
    info = json.loads((two_ranks / "run.json").read_text())
    assert info["attempts"][0]["world_size"] == 2
    ref, got = read_metrics(reference), read_metrics(two_ranks)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]  # the same rows, all of them
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), f"step {a['step']}"
        # DeepSpeed's norm comes from the engine (before clipping, like Fabric's clip_gradients)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {a['step']}"


def test_the_model_export_loads_and_holds_the_weights_of_one_process(two_ranks, reference):
    want, _ = model_io.load_model(reference)
    got, layout = model_io.load_model(two_ranks)
    assert layout is not None and got.cfg == want.cfg
    w, g = want.state_dict(), got.state_dict()
    assert {k: v.shape for k, v in g.items()} == {k: v.shape for k, v in w.items()}
    worst = max((w[k] - g[k]).abs().max().item() for k in w)
    assert worst <= WEIGHT_ATOL, f"weights differ by up to {worst:.2e} from the single-process run"


def test_a_run_killed_while_saving_resumes_from_the_last_checkpoint_identically(two_ranks, shards, tmp_path, request):
    """The on-disk state a kill of both ranks during the step-4 save leaves: metrics up to step 4, the step-4
    folder half-written (``.tmp``, no ``meta.json``), no export. ``resume=auto`` must continue from step 2."""
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run)
    last = checkpoint.step_dir(run, STEPS)
    (last / "meta.json").unlink()
    last.rename(last.with_name(last.name + ".tmp"))
    shutil.rmtree(run / "model")
    strategy = STRATEGIES[request.node.callspec.params["two_ranks"]]
    run_train(shards, run, *strategy, "strategy.devices=2", "strategy.accelerator=cpu", "grad_accum=2")

    attempts = json.loads((run / "run.json").read_text())["attempts"]
    assert [a["start_step"] for a in attempts] == [0, CKPT_EVERY]  # resumed, not started afresh
    assert attempts[-1]["resumed_from"].endswith(checkpoint.step_dir(run, CKPT_EVERY).name)
    before, after = read_metrics(two_ranks), read_metrics(run)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in after] == [(r["step"], r["loss"], r["grad_norm"]) for r in before]
    assert not list((run / "checkpoints").glob("*.tmp"))  # the half-written one is cleaned up by the next save
    a, b = model_io.load_model(two_ranks)[0].state_dict(), model_io.load_model(run)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact: same batches, weights, optimizer state, order of sums


# DeepSpeedCPUAdam's update is torch AdamW's (decoupled decay, the same bias corrections), computed by vectorised
# C++ in its own order of fp32 operations: a few ulp per weight per step at most. So the parity tests' tolerances hold
# (measured over the 4 steps: losses within 9e-12 relative, gradient norms within 1.9e-7), ~1e4x below what one
# wrong or skipped update of lr 1e-2 costs (0.2-0.4 of loss per step, test_the_reference_learns_and_clips).


def test_zero_offload_steps_with_cpu_adam_and_gives_the_loss_curve_of_zero2(shards, tmp_path_factory):
    """``offload_optimizer=true``: the optimizer state lives in CPU memory and DeepSpeedCPUAdam steps it (a torch
    AdamW makes ``deepspeed.initialize`` raise). Same rows, same losses as ZeRO-2 without offload."""
    zero2 = two_rank_run("deepspeed-zero2", shards, tmp_path_factory, *STRATEGIES["deepspeed-zero2"])
    offload = two_rank_run("deepspeed-zero2-offload", shards, tmp_path_factory, *STRATEGIES["deepspeed-zero2"],
                           "strategy.offload_optimizer=true")  # fmt: skip
    ref, got = read_metrics(zero2), read_metrics(offload)
    assert [(r["step"], r["tokens"]) for r in got] == [(r["step"], r["tokens"]) for r in ref]
    assert got[-1]["loss"] < got[0]["loss"] - 0.3  # it trains
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {a['step']}"
    w, g = model_io.load_model(zero2)[0].state_dict(), model_io.load_model(offload)[0].state_dict()
    worst = max((w[k] - g[k]).abs().max().item() for k in w)
    assert worst <= WEIGHT_ATOL, f"offloaded weights differ by up to {worst:.2e} from ZeRO-2's"
