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
WEIGHT_ATOL = 5e-4  # after 4 AdamW steps of lr 1e-2 (each moving a weight by up to ~1e-2); measured <= 2.1e-4 (ZeRO-3, from the
# init_weights-only initial weights of e94ea6f; 2e-5 from the earlier ones): AdamW divides by sqrt(v) + eps, which magnifies
# the summation-order differences of small gradients. The loss curves agree to LOSS_RTOL
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


# ----------------------------------------------------------------------------- FSDP2 units, mixed precision, compile
# These call the parallelize function Fabric's ModelParallelStrategy calls (strategy.fsdp_parallelize) on 2 gloo
# ranks spawned here (a Fabric run inside pytest would re-launch pytest), with the same batch on both ranks: the
# averaged gradient of the shards is then the single-process gradient of that batch.


def _fsdp_rank(rank: int, port: int, out: str, tie: bool, precision: str, compile: bool, hsdp: int) -> None:
    import torch._dynamo.utils
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from omnitrain.model.transformer import ModelConfig, Transformer
    from omnitrain.train.strategy import StrategyConfig, compile_blocks, fsdp_parallelize

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=tie, attention="sdpa",
                      activation_checkpointing=compile)  # fmt: skip
    model = Transformer(cfg)
    reference = Transformer(cfg)
    reference.load_state_dict(model.state_dict())
    if compile:
        compile_blocks(model)  # before fully_shard, as Strategy.setup does
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    fsdp_parallelize(StrategyConfig(name="fsdp", devices=2, precision=precision, hsdp_replicas=hsdp))(model, mesh)
    states = {id(m._get_fsdp_state()): m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 32), generator=g)  # [B, T], the same on both ranks
    doc_ids = torch.cat([torch.zeros(2, 20, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)], dim=1)  # two documents a row
    result: dict = {"units": len(states), "dtypes": sorted({str(s._mp_policy.param_dtype) for s in states.values()}),
                    "reduce": sorted({str(s._mp_policy.reduce_dtype) for s in states.values()}),
                    "mesh": list(model.layers[0].attention.wq.weight.device_mesh.mesh_dim_names or ())}  # fmt: skip
    if precision == "32-true":
        losses, worst = [], 0.0
        for m in (reference, model):
            loss, _ = m(ids, doc_ids, ids, torch.ones(2, 32))
            loss.backward()
            losses.append(loss.item())
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            worst = max(worst, (p.grad.full_tensor() - q.grad).abs().max().item() / q.grad.abs().max().item())
        result.update(eager_loss=losses[0], loss=losses[1], grad_rel=worst,
                      graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values()),
                      graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"])  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def spawn_fsdp(tmp_path: Path, tie: bool, precision: str = "32-true", compile: bool = False, hsdp: int = 1) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "result.json"
    mp.spawn(_fsdp_rank, args=(port, str(out), tie, precision, compile, hsdp), nprocs=2)
    return json.loads(out.read_text())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fsdp_shards_each_block_the_embedding_and_the_head_and_matches_one_process(tie, tmp_path):
    got = spawn_fsdp(tmp_path, tie)
    # untied: 2 blocks + embedding + head (norm and output, one unit) + root; tied: embedding and head in the root
    assert got["units"] == (3 if tie else 5)
    assert got["dtypes"] == ["None"] and got["reduce"] == ["None"]  # fp32: no mixed-precision casts
    assert got["loss"] == pytest.approx(got["eager_loss"], rel=LOSS_RTOL)
    assert got["grad_rel"] <= 1e-5, f"sharded gradients differ from one process's by {got['grad_rel']:.1e} (relative to the largest)"


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fsdp_gathers_bf16_parameters_and_reduces_gradients_in_fp32(precision, tmp_path):
    got = spawn_fsdp(tmp_path, tie=False, precision=precision)
    assert got["units"] == 5
    assert got["dtypes"] == ["torch.bfloat16"] and got["reduce"] == ["torch.float32"]  # every unit, the root included


def test_compiled_blocks_have_no_graph_break_under_fsdp_and_checkpointing_and_match_eager(tmp_path):
    """torchtitan's order: activation checkpointing (the model's) around each block, torch.compile per block
    (fullgraph), then fully_shard; the loss and gradients are the eager single-process ones."""
    got = spawn_fsdp(tmp_path, tie=True, compile=True)
    assert got["graph_breaks"] == 0 and got["graphs"] >= 1  # the blocks were captured, whole (fullgraph would raise otherwise)
    assert got["loss"] == pytest.approx(got["eager_loss"], rel=1e-4)
    assert got["grad_rel"] <= 1e-4


def test_fsdp_training_with_compiled_checkpointed_blocks_or_bf16_gives_the_loss_curve_of_one(shards, reference, tmp_path_factory):
    """The whole loop through Fabric: ``compile=true`` with activation checkpointing (per-block compile before
    fully_shard) within 1e-4 of the eager single process; bf16-mixed (bf16 all-gathers, fp32 reduce-scatter)
    within bf16 precision of it."""
    compiled = two_rank_run("fsdp-compile", shards, tmp_path_factory, "strategy=fsdp", "compile=true",
                            "model.activation_checkpointing=true")  # fmt: skip
    bf16 = two_rank_run("fsdp-bf16", shards, tmp_path_factory, "strategy=fsdp", "strategy.precision=bf16-mixed")
    ref = read_metrics(reference)
    for a, b, c in zip(ref, read_metrics(compiled), read_metrics(bf16), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), f"compiled, step {a['step']}"
        assert c["loss"] == pytest.approx(a["loss"], rel=2e-2), f"bf16-mixed, step {a['step']}"


def test_hsdp_shards_within_a_replica_and_matches_one_process(tmp_path):
    """``hsdp_replicas=2`` on 2 ranks: a (replicate, shard) mesh of 2 x 1, so gradients are all-reduced across the
    replicas; the same loss and gradients as one process."""
    got = spawn_fsdp(tmp_path, tie=False, hsdp=2)
    assert got["mesh"] == ["replicate", "shard"] and got["units"] == 5
    assert got["loss"] == pytest.approx(got["eager_loss"], rel=LOSS_RTOL)
    assert got["grad_rel"] <= 1e-5


@pytest.mark.parametrize(("name", "each", "skips_sync"), [("fsdp", True, False), ("fsdp", False, True), ("ddp", True, True)])
def test_fsdp_accumulation_reduce_scatters_every_micro_batch_by_default(name, each, skips_sync):
    """FSDP keeps gradient sync on for every micro-batch (sharded accumulation) unless fsdp_sync_each_microbatch is
    false; DDP still skips the all-reduce but at the last micro-batch."""
    from unittest import mock

    from omnitrain.train.strategy import Strategy, StrategyConfig

    strategy = object.__new__(Strategy)  # no Fabric: only accumulating() is under test
    strategy.cfg, strategy.engine_steps, strategy.model = StrategyConfig(name=name, devices=2, fsdp_sync_each_microbatch=each), False, None
    strategy.fabric = mock.MagicMock()
    for last in (False, True):
        with strategy.accumulating(last=last):
            pass
    calls = strategy.fabric.no_backward_sync.call_args_list
    assert [c.kwargs["enabled"] for c in calls] == ([True, False] if skips_sync else [])


@pytest.mark.parametrize("option", ["strategy.fsdp_sync_each_microbatch=false", "strategy.hsdp_replicas=2"])
def test_fsdp_options_give_the_loss_curve_of_one(option, shards, reference, tmp_path_factory):
    """The former accumulation (no reduce-scatter but at the last micro-batch) and HSDP (2 replicas of 1 shard, with
    distributed checkpoints and the export) through the whole loop; the default (reduce-scatter every micro-batch)
    is the ``fsdp`` case of test_two_processes_give_the_loss_curve_of_one."""
    run = two_rank_run("fsdp-" + option.split(".")[1].split("=")[0], shards, tmp_path_factory, "strategy=fsdp", option)
    want, _ = model_io.load_model(reference)
    got, _ = model_io.load_model(run)
    assert max((want.state_dict()[k] - v).abs().max().item() for k, v in got.state_dict().items()) <= WEIGHT_ATOL
    for a, b in zip(read_metrics(reference), read_metrics(run), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), f"step {a['step']}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {a['step']}"
