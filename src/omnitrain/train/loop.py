"""``omnitrain train``: one explicit training loop on Lightning Fabric.

Read :func:`train` top to bottom: resolve the config against the data's token layout, launch the
strategy, build the run (model, objective, optimizer, loaders), resume if a checkpoint exists; then,
for every optimizer step (:func:`train_step`), ``grad_accum`` micro-batches forward and backward,
clip, step; log, and maybe checkpoint. Periodic work is a visible ``every(step, n)``. What single
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
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from omnitrain.config import to_dict
from omnitrain.data.loader import LoaderConfig, OmniLoader
from omnitrain.model.io import save_model
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.model.weights import WeightSource, materialise, omnitrain_weights
from omnitrain.tokenizer.layout import MODALITIES, TokenLayout
from omnitrain.train import checkpoint, lock
from omnitrain.train.dpo import DPOConfig, DPOObjective, make_preference_loader, precompute_reference
from omnitrain.train.hardstop import watch_second_signal
from omnitrain.train.objectives import (
    HFInitConfig,
    LMObjective,
    ValConfig,
    Validation,
    freeze_old_weights,
    hf_start,
    make_lm_loader,
    pretrained_rows_kept,
)
from omnitrain.train.optim import OptimConfig, lr_at, warmup_warning
from omnitrain.train.preemption import Preemption
from omnitrain.train.runlog import (
    RunLog,
    StorageError,
    TensorBoardConfig,
    Throughput,
    WandbConfig,
    flops_per_token,
    truncate_metrics,
    writing,
)
from omnitrain.train.strategy import Strategy, StrategyConfig, peak_flops


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
        if (warning := warmup_warning(self.optim, self.steps)) is not None:
            warnings.warn(warning, stacklevel=2)


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


@dataclass
class Run:
    """What :func:`train` builds before its loop, on every rank."""

    cfg: TrainConfig  # resolved: the layout's vocabulary and hash; with hf_init, the imported architecture
    layout: TokenLayout
    strategy: Strategy
    model: Any  # as set up by the strategy (wrapped, maybe sharded)
    optimizer: Any
    objective: Any  # LMObjective | DPOObjective
    loader: OmniLoader
    validation: Validation
    resume_from: Path | None  # the checkpoint this attempt continues (None: a fresh start)
    new_rows_from: int  # hf_init: the first embedding row the layout added (the freeze warm-up trains rows >= it)
    n_params: int
    flops_per_token: float  # per processed token, of the whole model (counted before sharding; runlog.flops_per_token)
    peak_flops: float | None  # of one device, for MFU (None: unknown)
    notes: dict[str, Any] = field(default_factory=dict)  # set by resume(): more keys for this attempt in run.json

    @property
    def fabric(self) -> Any:
        return self.strategy.fabric


# per step, summed on the device by runlog.Throughput: processed = non-padding input positions (what the model
# computes on, what FLOPs and MFU count), learned = positions with loss weight > 0 (an ASR or captioning prompt,
# an SFT user turn: processed, not learned), then the objective's target tokens per modality
COUNTS = ["processed", "learned"] + [f"tokens/{m}" for m in MODALITIES]


@dataclass
class StepResult:
    """What one optimizer step reports. Tensors stay on the device until a log step reads them."""

    sums: torch.Tensor  # [len(objective.keys)] additive metrics of the step (all micro-batches, all ranks)
    count: torch.Tensor  # what the loss is normalised by (objective.count)
    counts: torch.Tensor  # [len(COUNTS)] token counts of the step (all ranks)
    lr: float
    grad_norm: float | torch.Tensor
    finite: bool  # False: the update was skipped (on_nonfinite=skip)
    frozen: bool  # a freeze warm-up step: only the new embedding rows learned
    signal: int = 0  # the preemption signal all ranks agreed on at this step (0: none)

    def summary(self, objective: Any) -> dict[str, float]:
        """The objective's row (loss, loss/<modality>, ...): a host read."""
        return objective.summary(self.sums, self.count)[0]


def train(cfg: TrainConfig, plain_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train; returns a summary (run_dir, final step, tokens, preempted, seconds, steps/s)."""
    preempt = Preemption.install()  # first: a USR1 / TERM during start-up (launch, build, resume) stops before step 1
    second = watch_second_signal()  # a second TERM / INT exits at once, even inside a long step (hardstop.py)
    try:
        return _train(cfg, plain_config, preempt)
    finally:
        if second is not None:
            second.stop()
        preempt.restore()


def _train(cfg: TrainConfig, plain_config: dict[str, Any] | None, preempt: Preemption) -> dict[str, Any]:
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
    if run.resume_from is not None:
        resume(run, state)
    start_step = state["step"]
    log = open_log(run, start_step, plain_config)
    stopped_by, skipped = preempt.requested(fabric), 0  # a signal during start-up: no step, nothing new to save

    # --- the loop
    if run.validation.due(start_step, False) and start_step == 0 and not stopped_by:
        log.log(0, run.validation.run(fabric, run.model, run.objective))  # the held-out losses before any training
    meter = Throughput(COUNTS, fabric.device)  # token counts since the last log step, on the device
    t_start = time.perf_counter()
    while state["step"] < cfg.steps and not stopped_by:
        out = train_step(run, state["step"], skipped, preempt)
        skipped = 0 if out.finite else skipped + 1
        state["step"] = step = state["step"] + 1
        meter.add(out.counts)

        t_val = time.perf_counter()
        val_row = run.validation.run(fabric, run.model, run.objective) if run.validation.due(step, step == cfg.steps) else {}
        meter.exclude(time.perf_counter() - t_val)  # throughput counts training time only
        stopped_by = out.signal  # agreed by all ranks inside the step's collective and read with its finiteness
        logged = every(step, cfg.log_every) or step == cfg.steps or bool(val_row) or not out.finite
        ckpt = every(step, cfg.ckpt_every) or step == cfg.steps or stopped_by
        if logged or ckpt:  # the host reads of a step's stats and token counts: log and checkpoint steps only
            counts, seconds, steps = meter.read()
            state["tokens"] += round(sum(counts[f"tokens/{m}"] for m in MODALITIES))
            if logged:
                log.log(step, metrics_row(run, out, state["tokens"], counts, seconds, steps, time.perf_counter() - t_start, val_row))
        log.advance()

        if ckpt:
            t_save = time.perf_counter()
            path = save_checkpoint(run, state, out.summary(run.objective)["loss"])
            meter.exclude(time.perf_counter() - t_save)
            log.print(f"checkpoint {path}")
        if stopped_by:
            break

    return finish(run, state, log, start_step, t_start, stopped_by)


# ----------------------------------------------------------------------------- building the run
def resolve(cfg: TrainConfig) -> tuple[TrainConfig, TokenLayout]:
    """A copy of ``cfg`` completed from the data, and the token layout (``layout.json`` beside the first
    source's shards): the layout decides the vocabulary size, and every shard must carry its hash."""
    if not cfg.data.sources:
        raise ValueError("no training data: set data.sources (see recipes/data/) to shard folders made by `omnitrain data build`")
    name, first = next((k, v.path) for k, v in cfg.data.sources.items())
    if not (Path(first) / "layout.json").is_file():  # (TokenLayout.load's advice is for tokenizer folders)
        raise FileNotFoundError(f"data.sources.{name}.path={first} is not a shard folder (no layout.json there): build the "
                                "shards with `omnitrain data build`, or fix the path")  # fmt: skip
    layout = TokenLayout.load(first, expect_hash=cfg.data.layout_hash)
    if cfg.model.vocab_size not in (0, layout.vocab_size):
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size}, but the token layout of the data ({first}/layout.json) has "
                         f"{layout.vocab_size} ids: drop model.vocab_size, training takes it from the layout")  # fmt: skip
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size, cfg.data.layout_hash = layout.vocab_size, layout.hash
    return cfg, layout


def build_run(cfg: TrainConfig, layout: TokenLayout, strategy: Strategy) -> Run:
    """The model (fresh, imported from Hugging Face, or loaded), its objective, the optimizer and the loaders."""
    fabric = strategy.fabric
    fabric.seed_everything(cfg.seed)  # the same initial weights on every rank
    resume_from = checkpoint.choose(fabric, Path(cfg.run_dir), cfg.resume)  # verified; auto falls back past damaged ones
    model, weights, new_rows_from = build_model(cfg, layout, resume_from)
    cfg = replace(cfg, model=model.cfg)  # hf_init: the run records the imported architecture
    modalities = layout.modality_of(torch.arange(layout.vocab_size).numpy())

    def give_weights(m: Transformer, device: torch.device) -> None:  # one full parameter at a time (model.weights)
        materialise(m, device, weights).set_modalities(modalities)

    later = sharded_init(cfg)
    if not later:  # the whole model on this process's CPU, as the strategy expects it
        give_weights(model, torch.device("cpu"))
    objective, make_loader = build_objective(cfg, model, layout, fabric)
    flops = flops_per_token(model, cfg.data.seq_len)  # before sharding: from the full parameter counts (meta too)
    n_params = sum(p.numel() for p in model.parameters())
    # compile: per block, before sharding; sharded init: after fully_shard, each rank its own shards
    model, optimizer = strategy.setup(model, cfg.optim, compile=cfg.compile, materialise=give_weights if later else None)
    rank, world = fabric.global_rank, fabric.world_size
    loader: OmniLoader = make_loader(cfg.data, rank, world)
    validation = Validation(cfg.val, cfg.data, make_loader, rank, world, layout.hash)
    return Run(cfg, layout, strategy, model, optimizer, objective, loader, validation, resume_from, new_rows_from, n_params,
               flops, peak_flops(fabric.device, cfg.strategy.precision))  # fmt: skip


def build_model(cfg: TrainConfig, layout: TokenLayout, resume_from: Path | None) -> tuple[Transformer, WeightSource | None, int]:
    """(the model training starts from, on the meta device: shapes, no memory yet; the source of its weights,
    None for a fresh one; the first embedding row new to it: 0 unless imported with hf_init). ``build_run``
    materialises it (``omnitrain.model.weights``). When resuming, the checkpoint's weights replace these later."""
    model_cfg, weights, new_rows_from = cfg.model, None, 0
    if cfg.hf_init.path:  # continued pretraining: the LLM with its vocabulary grown to the layout's
        model_cfg, weights, new_rows_from = hf_start(cfg.hf_init, cfg.model, layout)
    if cfg.init_from and resume_from is None:
        init_cfg, weights = omnitrain_weights(cfg.init_from)
        if init_cfg != model_cfg:
            raise ValueError(f"init_from={cfg.init_from} holds a model with {init_cfg}, this run builds {model_cfg}: "
                             "choose the matching model= recipe or override its fields")  # fmt: skip
    return Transformer(model_cfg, device="meta"), weights, new_rows_from


def sharded_init(cfg: TrainConfig) -> bool:
    """Whether each rank materialises only its own shards, after FSDP2 has sharded the meta model (``init_device``)."""
    if cfg.init_device == "auto":
        return cfg.strategy.name == "fsdp" and cfg.objective == "lm"
    return cfg.init_device == "meta"


def build_objective(cfg: TrainConfig, model: Transformer, layout: TokenLayout, fabric: Any) -> tuple[Any, Callable[..., OmniLoader]]:
    """(objective, its loader factory ``(data, rank, world_size) -> loader``). DPO's frozen reference is the
    model as it starts, also when resuming: a copy run on every batch, or its scores precomputed once."""
    if cfg.objective == "lm":
        return LMObjective(), make_lm_loader
    reference, table = None, None
    if cfg.dpo.reference == "on_the_fly":
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(fabric.device)
    else:
        ref_file = Path(cfg.dpo.reference_logps or Path(cfg.run_dir) / "reference_logps.json")
        pad = layout.specials["pad"]
        if fabric.global_rank == 0:
            precompute_reference(copy.deepcopy(model).to(fabric.device), cfg.data, pad, ref_file, fabric.device)
        fabric.barrier()
        table = precompute_reference(model, cfg.data, pad, ref_file, fabric.device)  # reads the file
    return DPOObjective(cfg.dpo, model.modality_table.to(fabric.device), reference), make_preference_loader(table)


def resume(run: Run, state: dict[str, Any]) -> None:
    """Restore ``state`` (model, optimizer, step, tokens), this rank's loader position and RNG from ``run.resume_from``."""
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


# ----------------------------------------------------------------------------- the step
def train_step(run: Run, step: int, skipped: int, preempt: Preemption | None = None) -> StepResult:
    """Optimizer step ``step`` (0-based): ``grad_accum`` micro-batches forward and backward, clip, then update
    unless the loss or gradient is non-finite (``skipped``: steps skipped in a row before this one). The ranks'
    preemption signals (``preempt.slots``, taken after the backward passes) travel in the step's one collective."""
    cfg, strategy, fabric, objective = run.cfg, run.strategy, run.fabric, run.objective
    lr = lr_at(step, cfg.steps, cfg.optim)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    micro = [fabric.to_device(next(run.loader)) for _ in range(cfg.grad_accum)]
    count = sum(objective.count(b) for b in micro)  # weighted target tokens (LM) or pairs (DPO) of the step
    count = (fabric.all_reduce(count, reduce_op="sum") if fabric.world_size > 1 else count).clamp(min=1.0)
    n_keys = len(objective.keys)
    sums = torch.zeros(n_keys + 4, device=fabric.device)  # additive metrics named by objective.keys, processed, learned, signals
    for i, batch in enumerate(micro):
        with strategy.accumulating(last=i == len(micro) - 1):
            loss, s = objective.loss(run.model, batch, denom=count / strategy.loss_scale)
            strategy.backward(loss)
        sums[:n_keys] += s
        sums[n_keys] += (batch["doc_ids"] >= 0).sum()  # processed: every non-padding input position
        sums[n_keys + 1] += (batch["loss_weights"] > 0).sum()  # learned: the positions that carry loss
    sums[n_keys + 2 :] = torch.tensor(preempt.slots() if preempt is not None else [0.0, 0.0])  # (a copy to the device, no read)
    if fabric.world_size > 1:
        sums = fabric.all_reduce(sums, reduce_op="sum")  # one collective: the metrics, the token counts, the signals
    sums, counts, signals = sums[:n_keys], sums[n_keys : n_keys + 2], sums[n_keys + 2 :]
    counts = torch.cat([counts, torch.stack([sums[objective.keys.index(f"tokens/{m}")] for m in MODALITIES])])  # COUNTS

    frozen = step < cfg.freeze_warmup_steps
    if frozen:  # warm-up of continued pretraining: only the new embedding rows learn
        freeze_old_weights(strategy.unwrap(), run.new_rows_from)
    grad_norm = strategy.clip_gradients()  # a tensor on the device (DeepSpeed: the engine's float)
    finite, signal = step_verdict(sums, grad_norm, signals)  # the one host read of a non-log step
    if not finite and (cfg.on_nonfinite == "stop" or not strategy.can_skip or skipped + 1 >= cfg.max_skipped):
        row, _ = objective.summary(sums, count)
        raise FloatingPointError(
            f"non-finite loss {row['loss']} / gradient norm {float(grad_norm)} at step {step}: stopped before the update, nothing "
            f"was trained on it. Resume from the last checkpoint ({checkpoint.resolve_resume(Path(cfg.run_dir), 'auto')}) with a "
            "lower optim.lr, longer optim.warmup_steps, model.qk_norm=true or model.z_loss=1e-5"
            + ("" if strategy.can_skip else f" (on_nonfinite=skip is not supported with strategy={cfg.strategy.name})")
        )
    with pretrained_rows_kept(strategy.unwrap(), run.new_rows_from) if frozen else nullcontext():
        strategy.optimizer_step(apply=finite)
    return StepResult(sums, count, counts, lr, grad_norm, finite, frozen, signal)


def step_verdict(sums: torch.Tensor, grad_norm: float | torch.Tensor, signals: torch.Tensor) -> tuple[bool, int]:
    """(whether the step's stats and gradient norm are finite, the preemption signal the ranks agree on), in one host read.

    Why a read at all: skipping (``on_nonfinite=skip``) or stopping before the update is a host decision,
    since ``Strategy.optimizer_step`` either calls ``optimizer.step()`` or not (doing it on the device would
    need the optimizer to take a found-inf flag, as fused AdamW does for GradScaler); and so is leaving the loop
    on a signal. Every stat is checked, not only the loss: a NaN in any per-modality sum is a NaN loss too."""
    norm = grad_norm if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm))
    finite = (torch.isfinite(sums).all() & torch.isfinite(norm.to(sums.device))).float()
    verdict = torch.cat([finite[None], signals]).tolist()
    return verdict[0] == 1.0, Preemption.agreed(verdict[1:])


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


def metrics_row(run: Run, out: StepResult, tokens: int, counts: dict[str, float], seconds: float, steps: int, elapsed: float,
                val_row: dict[str, float]) -> dict[str, float]:  # fmt: skip
    """The metrics.jsonl / W&B row of a log step (this is where the step's stats are read on the host).

    ``tokens``: trained so far; ``counts`` (``COUNTS``, summed over all ranks), ``seconds``, ``steps``: the
    interval since the previous read, which the rates are taken over. ``processed_tokens`` and
    ``learned_tokens`` are the log step's own; ``tokens_per_s`` is the objective's target tokens per second
    (as before); FLOP/s and MFU count processed tokens, since the model computes on every one of them."""
    dt = max(seconds, 1e-9)
    step_counts = dict(zip(COUNTS, out.counts.tolist(), strict=True))
    row = {**out.summary(run.objective), "lr": out.lr, "grad_norm": float(out.grad_norm), "skipped": int(not out.finite),
           "tokens": tokens, "processed_tokens": int(step_counts["processed"]), "learned_tokens": int(step_counts["learned"]),
           "tokens_per_s": sum(counts[f"tokens/{m}"] for m in MODALITIES) / dt,
           "processed_tokens_per_s": counts["processed"] / dt, "learned_tokens_per_s": counts["learned"] / dt,
           "flops_per_s": run.flops_per_token * counts["processed"] / dt, "step_time": dt / max(steps, 1),
           "elapsed": elapsed}  # fmt: skip
    if run.peak_flops:
        row["mfu"] = row["flops_per_s"] / (run.peak_flops * run.fabric.world_size)
    row.update({f"tokens_per_s/{mod}": counts[f"tokens/{mod}"] / dt for mod in MODALITIES})
    if run.cfg.freeze_warmup_steps:
        row["frozen"] = int(out.frozen)
    row.update(val_row)
    row["packing_efficiency"] = run.loader.packing_efficiency()
    row.update({f"share/{k}": v for k, v in run.loader.realised_shares().items()})
    return row


def save_checkpoint(run: Run, state: dict[str, Any], loss: float) -> Path:
    """Checkpoint ``state`` and every rank's loader position and RNG (a collective)."""
    rank_state = {"loader": run.loader.state_dict(), "rng": checkpoint.rng_state()}
    meta = {"tokens": state["tokens"], "layout_hash": run.layout.hash, "loss": loss,
            "batch": {"batch_size": run.cfg.data.batch_size, "grad_accum": run.cfg.grad_accum, "seq_len": run.cfg.data.seq_len}}
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
        if stopped_by == signal.SIGUSR1 and cfg.requeue and os.environ.get("SLURM_JOB_ID") and fabric.global_rank == 0:
            job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(f"scontrol requeue {job}: {'ok' if res.returncode == 0 else res.stderr.strip()}", flush=True)
    elif fabric.global_rank == 0:
        print(f"train done: step {state['step']}, {state['tokens']:,} tokens in {elapsed:.1f}s, run {run_dir}", flush=True)
    return summary
