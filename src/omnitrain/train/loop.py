"""``omnitrain train``: one explicit training loop on Lightning Fabric.

Read :func:`train` top to bottom: resolve the config against the data's token layout, launch the
strategy, build the run (model, objective, optimizer, loaders: ``omnitrain.train.build``), resume if a
checkpoint exists; then, for every optimizer step (``omnitrain.train.step.train_step``), ``grad_accum``
micro-batches forward and backward, clip, step; log, and maybe checkpoint. Periodic work is a visible ``every(step, n)``. What single
device, DDP, FSDP2 and DeepSpeed do differently is behind one adapter, ``omnitrain.train.strategy.Strategy``.

Loss normalisation. The loss of a step is ``sum(ce * loss_weights) / N`` where N is the number of
weighted target tokens in the *whole* step (all micro-batches, all ranks). Each micro-batch's
backward gets its share of that sum (times ``strategy.loss_scale``, the data-parallel size, which the
gradient averaging of DDP / FSDP / DeepSpeed divides out), so 2 ranks x batch b, 1 rank x batch 2b and
1 rank x 2 micro batches of b all compute the same gradient: loss curves match across strategies.

Objectives. What a step optimises is an objective (``omnitrain.train.objectives``): the weighted LM loss
(pretraining, continued pretraining from a Hugging Face LLM, SFT) or DPO (``omnitrain.train.dpo``, with
its frozen reference model); the loop is the same. ``count`` gives what the loss is normalised by.

Host syncs. On a GPU the host runs ahead of the device until it reads a tensor. A step's stats stay on the
device (``StepResult.sums``, token counts summed by ``runlog.Throughput``) and are read at log steps, checkpoint
steps and a skipped step only. A non-log step keeps one read: whether the loss and gradient norm are finite,
which decides on the host whether the optimizer steps (``on_nonfinite``; the optimizer step belongs to the
strategy); with several ranks, also the preemption flag they agree on (below). Throughput is timed over the
interval between log steps, not per step.

Preemption (``omnitrain.train.preemption``). SIGUSR1 or SIGTERM sets a flag, from the very start of
``train()`` (``omnitrain train`` even before its imports); at the end of the current step every rank learns
of it (a max all-reduce of a priority: USR1 on any rank wins over TERM), the loop saves a checkpoint and
exits; a signal received during start-up stops the run before its first step (nothing new to save).
Under Slurm, SIGUSR1 (``--signal=USR1@120``) also requeues the job (``scontrol requeue``) and the
requeued job resumes from that checkpoint (``resume=auto``); SIGTERM (``scancel``, the time limit) only saves.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from omnitrain.config import to_dict
from omnitrain.data.loader import LoaderConfig
from omnitrain.data.reading import ShardReadError
from omnitrain.model.io import save_model
from omnitrain.model.transformer import ModelConfig
from omnitrain.tokenizer.layout import MODALITIES
from omnitrain.train import checkpoint, lock
from omnitrain.train.build import Run, build_model, build_objective, build_run, resolve, sharded_init  # noqa: F401 (also loop.*)
from omnitrain.train.dpo import DPOConfig
from omnitrain.train.evaluation import EvalInTrainingConfig, Evaluator, InLoopChecks
from omnitrain.train.guard import GuardConfig
from omnitrain.train.hardstop import watch_second_signal
from omnitrain.train.objectives import HFInitConfig, ValConfig
from omnitrain.train.optim import OptimConfig, warmup_warning
from omnitrain.train.preemption import Preemption
from omnitrain.train.runlog import (
    RunLog,
    StorageError,
    TensorBoardConfig,
    Throughput,
    WandbConfig,
    truncate_metrics,
    writing,
)
from omnitrain.train.step import COUNTS, StepResult, metrics_row, step_verdict, train_step  # noqa: F401 (also loop.*)
from omnitrain.train.strategy import Strategy, StrategyConfig


@dataclass
class TrainConfig:
    run_dir: Path = Path("runs/train")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step (each data.batch_size rows per rank)
    seed: int = 0
    log_every: int = 1
    ckpt_every: int = 50  # also at the end and on preemption
    keep_last: int = 3  # the newest N complete checkpoints are kept; 0 keeps every one (negative values are refused)
    resume: str = "auto"  # auto (latest in run_dir, if any) | never | a checkpoint folder
    init_from: str | None = None  # start from a consolidated omnitrain model folder (ignored when resuming)
    # where the initial weights are first made: meta = each rank materialises only its FSDP2 shards (no rank holds
    # the full model); cpu = every rank builds the full model on CPU; auto = meta for strategy=fsdp with objective=lm
    init_device: Literal["auto", "cpu", "meta"] = "auto"
    hf_init: HFInitConfig = field(default_factory=HFInitConfig)  # start from a Hugging Face Llama (continued pretraining)
    freeze_warmup_steps: int = 0  # with hf_init: the first N steps train only the new embedding rows
    objective: Literal["lm", "dpo"] = "lm"  # lm: pretraining / continued pretraining / SFT; dpo: preference pairs
    dpo: DPOConfig = field(default_factory=DPOConfig)
    val: ValConfig = field(default_factory=ValConfig)  # held-out shard sets scored during training
    eval_in_training: EvalInTrainingConfig = field(default_factory=EvalInTrainingConfig)  # benchmarks every N steps (evaluation.py)
    guard: GuardConfig = field(default_factory=GuardConfig)  # watched metrics vs their step-0 baselines (guard.py)
    on_nonfinite: Literal["skip", "stop"] = "stop"  # a NaN/inf loss or gradient: skip the step, or stop
    max_skipped: int = 10  # on_nonfinite=skip: stop after this many skipped steps in a row
    compile: bool = False  # torch.compile each transformer block, fullgraph (Strategy.setup: before FSDP shards it)
    threads: int = 0  # torch intra-op threads per process (0: torch's default)
    requeue: bool = True  # under Slurm, SIGUSR1 requeues the job after the checkpoint
    export: bool = True  # write the consolidated model/ folder at the end

    def __post_init__(self) -> None:
        if self.steps < 1 or self.grad_accum < 1 or self.log_every < 1 or self.ckpt_every < 1:
            raise ValueError("steps, grad_accum, log_every and ckpt_every must be >= 1")
        if self.freeze_warmup_steps and not self.hf_init.path:
            raise ValueError("freeze_warmup_steps trains only the rows added to a pretrained model: set hf_init.path too")
        if self.freeze_warmup_steps and self.strategy.name not in ("single", "ddp"):
            raise ValueError("freeze_warmup_steps masks rows of unsharded gradients: use strategy=single or ddp, "
                             f"not {self.strategy.name}")
        if self.init_device == "meta" and (self.strategy.name != "fsdp" or self.objective != "lm"):
            raise ValueError("init_device=meta materialises each rank's FSDP2 shards: it needs strategy=fsdp and objective=lm "
                             f"(here strategy={self.strategy.name}, objective={self.objective}); use init_device=auto")  # fmt: skip
        if self.hf_init.path and self.init_from:
            raise ValueError("give one of init_from (an omnitrain model) and hf_init.path (a Hugging Face model), not both")
        if self.keep_last < 0:
            raise ValueError(f"keep_last={self.keep_last}: give the number of newest checkpoints to keep (>= 1), or 0 to keep all")
        if (watched := [k for k in self.guard.watch if k.startswith("eval/")]) and not self.eval_in_training.every:
            raise ValueError(f"guard.watch {watched} needs eval_in_training.every > 0 and the task in eval_in_training.tasks")
        if (warning := warmup_warning(self.optim, self.steps)) is not None:
            from lightning.fabric.utilities.rank_zero import (
                rank_zero_warn,  # once, not once per rank (its rank: from the env)
            )

            rank_zero_warn(warning, stacklevel=3)


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def train(cfg: TrainConfig, plain_config: dict[str, Any] | None = None, evaluator: Evaluator | None = None) -> dict[str, Any]:
    """Train; returns a summary (run_dir, final step, tokens, preempted, seconds, steps/s, guard_stopped).

    ``evaluator``: what scores the model every ``eval_in_training.every`` steps (``omnitrain.train.evaluation``;
    built by the eval stage, ``omnitrain.eval.in_training.build_evaluator``, as ``omnitrain train`` does)."""
    if cfg.eval_in_training.every and evaluator is None:
        raise ValueError("eval_in_training.every is set but train() got no evaluator: run `omnitrain train`, or pass "
                         "evaluator=omnitrain.eval.in_training.build_evaluator(cfg) to train()")  # fmt: skip
    preempt = Preemption.install()  # first: a USR1 / TERM during start-up (launch, build, resume) stops before step 1
    second = watch_second_signal()  # a second TERM / INT exits at once, even inside a long step (hardstop.py)
    try:
        return _train(cfg, plain_config, preempt, evaluator)
    finally:
        if second is not None:
            second.stop()
        preempt.restore()


def _train(cfg: TrainConfig, plain_config: dict[str, Any] | None, preempt: Preemption, evaluator: Evaluator | None = None) -> dict[str, Any]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, layout = resolve(cfg)
    strategy = Strategy(cfg.strategy, grad_clip=cfg.optim.grad_clip, grad_accum=cfg.grad_accum)
    strategy.launch()
    lock_file = lock.take(strategy.fabric, Path(cfg.run_dir))  # one live run per run_dir; every rank learns of a refusal
    try:
        run = build_run(cfg, layout, strategy)
    except BaseException:
        lock.release(lock_file, remove_empty_dir=True)  # a start that fails here leaves no empty run_dir behind
        raise
    cfg, fabric = run.cfg, run.fabric
    state: dict[str, Any] = {"model": run.model, "optimizer": run.optimizer, "step": 0, "tokens": 0}  # what checkpoints hold
    meta = resume(run, state) if run.resume_from is not None else {}
    if run.resume_from is None and fabric.global_rank == 0:  # a fresh start: no row of an earlier attempt stays
        truncate_metrics(Path(cfg.run_dir) / "metrics.jsonl", -1)
    start_step = state["step"]
    log = open_log(run, start_step, plain_config)
    checks = InLoopChecks(cfg, run, evaluator, log.print)  # eval_in_training and the guard (train/evaluation.py)
    checks.resumed(meta.get("guard"), start_step, fabric.global_rank)
    stopped_by, skipped = preempt.requested(fabric), 0  # a signal during start-up: no step, nothing new to save

    # --- the loop
    if start_step == 0 and not stopped_by:  # held-out losses and benchmarks before any training (the guard's baselines)
        row0 = run.validation.run(fabric, run.model, run.objective) if run.validation.due(0, False) else {}
        row0.update(checks.run(run, 0, False, row0)[0])
        if row0:
            log.log(0, row0)
    guard_stop = False
    meter = Throughput(COUNTS, fabric.device)  # token counts since the last log step, on the device
    t_start = time.perf_counter()
    while state["step"] < cfg.steps and not stopped_by:
        # where this step's batches begin: with one micro-batch the loader's own state stands there after a read error
        before = copy.deepcopy(run.loader.state_dict()) if cfg.grad_accum > 1 else None
        try:
            out = train_step(run, state["step"], skipped, preempt)
        except ShardReadError as e:  # retried already (data.read_retries): save where the data stopped, then stop
            return stop_on_unreadable_data(run, state, log, before, e)
        skipped = 0 if out.finite else skipped + 1
        state["step"] = step = state["step"] + 1
        meter.add(out.counts)

        t_val = time.perf_counter()
        val_row = run.validation.run(fabric, run.model, run.objective) if run.validation.due(step, step == cfg.steps) else {}
        eval_row, guard_stop = checks.run(run, step, step == cfg.steps, val_row)  # before this step's checkpoint
        val_row = {**val_row, **eval_row}
        meter.exclude(time.perf_counter() - t_val)  # throughput counts training time only
        stopped_by = out.signal  # agreed by all ranks inside the step's collective and read with its finiteness
        logged = every(step, cfg.log_every) or step == cfg.steps or bool(val_row) or not out.finite
        ckpt = every(step, cfg.ckpt_every) or step == cfg.steps or stopped_by or guard_stop
        if logged or ckpt:  # the host reads of a step's stats and token counts: log and checkpoint steps only
            counts, seconds, steps = meter.read()
            state["tokens"] += round(sum(counts[f"tokens/{m}"] for m in MODALITIES))
            if logged:
                log.log(step, metrics_row(run, out, state["tokens"], counts, seconds, steps, time.perf_counter() - t_start, val_row))
        log.advance()

        if ckpt:
            t_save = time.perf_counter()
            path = save_checkpoint(run, state, out.summary(run.objective)["loss"], checks.guard.state_dict())
            meter.exclude(time.perf_counter() - t_save)
            log.print(f"checkpoint {path}")
        if stopped_by or guard_stop:
            break

    return {**finish(run, state, log, start_step, t_start, stopped_by), "guard_stopped": guard_stop}


def stop_on_unreadable_data(run: Run, state: dict[str, Any], log: RunLog, before: dict | None, error: ShardReadError) -> dict[str, Any]:
    """A shard still unreadable after the loader's retries (a remote store down): checkpoint the last complete step with
    the loader where that step's batches began (no batch lost or repeated on resume), requeue under Slurm, and stop
    with one line. One process only: with several ranks the others would wait in the step's collective, so the error
    ends the job as before (the last periodic checkpoint stands)."""
    if run.fabric.world_size > 1:
        raise error
    if before is not None:  # micro-batches of this step were read before the error: give them back
        run.loader.load_state_dict(before)
    path = save_checkpoint(run, state, float("nan"))
    log.print(f"checkpoint {path}")
    log.close()
    requeued = requeue(run.cfg)
    raise ShardReadError(f"{error} -- saved step {state['step']} ({path}); resume with the same command once the data is back"
                         + (" (the job was requeued)" if requeued else ""))  # fmt: skip


def requeue(cfg: TrainConfig) -> bool:
    """Under Slurm (and ``requeue=true``), ``scontrol requeue`` this job: its next start resumes from the last checkpoint."""
    if not (cfg.requeue and os.environ.get("SLURM_JOB_ID")):
        return False
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
    res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    print(f"scontrol requeue {job}: {'ok' if res.returncode == 0 else res.stderr.strip()}", flush=True)
    return res.returncode == 0


def resume(run: Run, state: dict[str, Any]) -> dict[str, Any]:
    """Restore ``state`` (model, optimizer, step, tokens), this rank's loader position and RNG from ``run.resume_from``;
    returns the checkpoint's meta.json."""
    fabric, path = run.fabric, run.resume_from
    meta, ranks = checkpoint.load(fabric, path, state, layout_hash=run.layout.hash)  # the layout is checked first
    if meta["world_size"] == fabric.world_size:
        run.loader.load_state_dict(ranks[fabric.global_rank]["loader"])
        checkpoint.set_rng_state(ranks[fabric.global_rank]["rng"])
    else:  # another world size: the loader re-splits every old rank's position (data.reshard)
        run.loader.load_state_dict([r["loader"] for r in ranks])
        run.notes["world_size_changed"] = world_size_change(run, meta)
    if fabric.global_rank == 0:
        truncate_metrics(Path(run.cfg.run_dir) / "metrics.jsonl", state["step"])
    return meta


def world_size_change(run: Run, meta: dict[str, Any]) -> dict[str, Any]:
    """Resuming on another number of ranks changes the global batch: say so (rank 0) and return it for run.json."""
    cfg, world = run.cfg, run.fabric.world_size
    old = {"batch_size": cfg.data.batch_size, "grad_accum": cfg.grad_accum, "seq_len": cfg.data.seq_len, **meta.get("batch", {})}
    before = old["batch_size"] * old["grad_accum"] * meta["world_size"] * old["seq_len"]
    after = cfg.data.batch_size * cfg.grad_accum * world * cfg.data.seq_len
    note = {"from": meta["world_size"], "to": world, "step": meta["step"], "global_batch_tokens": after, "was": before}
    if run.fabric.global_rank == 0:
        print(f"world size changed on resume: step {meta['step']} was saved by {meta['world_size']} ranks, this run has {world}; "
              f"the global batch is now {cfg.data.batch_size} x {cfg.grad_accum} x {world} x {cfg.data.seq_len} = {after:,} tokens "
              f"per step (batch_size x grad_accum x world_size x seq_len; was {before:,}). The loader re-splits the data "
              "positions; keep the global batch with grad_accum or data.batch_size", flush=True)  # fmt: skip
    return note


# ----------------------------------------------------------------------------- logging, checkpoints, the end
def open_log(run: Run, start_step: int, plain_config: dict[str, Any] | None) -> RunLog:
    """The run's files (rank 0): config, run.json, layout.json, metrics; and the one-line header."""
    cfg, fabric, run_dir = run.cfg, run.fabric, Path(run.cfg.run_dir)
    log = RunLog(run_dir, fabric.global_rank == 0, plain_config or to_dict(cfg), cfg.wandb, cfg.steps, start_step, fabric.world_size,
                 run.resume_from, run.notes, cfg.tensorboard)  # fmt: skip
    if fabric.global_rank == 0:
        with writing("layout.json", run_dir / "layout.json"):
            run.layout.save(run_dir / "layout.json")
        log.print(f"omnitrain train: {run.n_params / 1e6:.1f}M params, strategy {cfg.strategy.name} x {fabric.world_size}, "
                  f"precision {cfg.strategy.precision}, {cfg.steps} steps of {cfg.grad_accum} x {cfg.data.batch_size} x "
                  f"{cfg.data.seq_len} tokens per rank" + (f", resumed from {run.resume_from}" if run.resume_from else ""))  # fmt: skip
    return log


def save_checkpoint(run: Run, state: dict[str, Any], loss: float, guard: dict[str, Any] | None = None) -> Path:
    """Checkpoint ``state`` and every rank's loader position and RNG (a collective); ``guard``: the guard's state."""
    rank_state = {"loader": run.loader.state_dict(), "rng": checkpoint.rng_state()}
    meta = {"tokens": state["tokens"], "layout_hash": run.layout.hash, "audio_layout": run.cfg.model.audio_layout, "loss": loss,
            "batch": {"batch_size": run.cfg.data.batch_size, "grad_accum": run.cfg.grad_accum, "seq_len": run.cfg.data.seq_len},
            **({"guard": guard} if guard else {})}
    return checkpoint.save(run.fabric, Path(run.cfg.run_dir), state["step"], state, rank_state, meta, run.cfg.keep_last)


def finish(run: Run, state: dict[str, Any], log: RunLog, start_step: int, t_start: float, stopped_by: int) -> dict[str, Any]:
    """The consolidated export (unless preempted), the summary (timed from ``t_start``); under Slurm, a requeue after SIGUSR1."""
    cfg, fabric, run_dir = run.cfg, run.fabric, Path(run.cfg.run_dir)
    run.loader.close()
    export_error = None
    if cfg.export and not stopped_by:
        sd = run.strategy.full_state_dict()  # a collective: every rank takes part
        if fabric.global_rank == 0:
            extra = {"step": state["step"], "tokens": state["tokens"]}
            try:
                with writing("the model export", run_dir / "model", cleanup=run_dir / "model.tmp"):
                    save_model(run.strategy.unwrap(), run_dir / "model", run_dir, extra, sd)
            except StorageError as e:  # disk full, read-only: every rank stops with this line (none waits for rank 0)
                export_error = str(e)
    export_error = fabric.broadcast(export_error, src=0)  # (also the barrier after the export)
    if export_error:
        raise StorageError(f"{export_error} (the checkpoints are complete: start again once fixed to export)")
    elapsed = time.perf_counter() - t_start
    done_steps = state["step"] - start_step
    summary = {"run_dir": str(run_dir), "step": state["step"], "tokens": state["tokens"], "preempted": bool(stopped_by),
               "seconds": round(elapsed, 1), "steps_per_s": done_steps / elapsed if elapsed else 0.0}  # fmt: skip
    log.close()
    if fabric.global_rank == 0:
        lock.release(run_dir / lock.LOCK_NAME)
    if stopped_by:
        name = signal.Signals(stopped_by).name
        if fabric.global_rank == 0:
            saved = state["step"] > start_step  # else: stopped during start-up, the last checkpoint holds everything
            done = f"saved step {state['step']}" if saved else f"during start-up, before step {start_step + 1} (nothing new to save)"
            print(f"{name}: {done} and stopped", flush=True)
        if stopped_by == signal.SIGUSR1 and fabric.global_rank == 0:
            requeue(cfg)
    elif fabric.global_rank == 0:
        print(f"train done: step {state['step']}, {state['tokens']:,} tokens in {elapsed:.1f}s, run {run_dir}", flush=True)
    return summary
