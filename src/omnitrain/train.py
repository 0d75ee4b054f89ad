"""``omnitrain train``: one explicit training loop on Lightning Fabric.

Read it top to bottom: build Fabric, the model, the optimizer and the loader; resume if a
checkpoint exists; then, for every optimizer step, ``grad_accum`` micro-batches forward and
backward, clip, step, log, and maybe checkpoint. Periodic work is a visible ``every(step, n)``.

Loss normalisation. The loss of a step is ``sum(ce * loss_weights) / N`` where N is the number of
weighted target tokens in the *whole* step (all micro-batches, all ranks). Each micro-batch's
backward gets its share of that sum (times the data-parallel size, which the gradient averaging of
DDP / FSDP / DeepSpeed divides out), so 2 ranks x batch b, 1 rank x batch 2b and 1 rank x 2 micro
batches of b all compute the same gradient: loss curves match across strategies.

Objectives. What a step optimises is an objective (``omnitrain.posttrain``): the weighted LM loss
(pretraining, continued pretraining from a Hugging Face LLM, SFT) or DPO (``omnitrain.dpo``, with
its frozen reference model); the loop is the same. ``count`` gives what the loss is normalised by.

Preemption. SIGUSR1 or SIGTERM sets a flag; at the end of the current step every rank learns of it
(a max all-reduce), the loop saves a checkpoint and exits. Under Slurm, SIGUSR1 (``--signal=USR1@120``)
also requeues the job (``scontrol requeue``) and the requeued job resumes from that checkpoint
(``resume=auto``); SIGTERM (``scancel``, the time limit) only saves.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from omnitrain import checkpoint
from omnitrain.data import LoaderConfig, OmniLoader
from omnitrain.distributed import StrategyConfig, full_state_dict, make_fabric, peak_flops
from omnitrain.dpo import DPOConfig, DPOObjective, make_preference_loader, precompute_reference
from omnitrain.model import ModelConfig, Transformer
from omnitrain.optim import OptimConfig, build_optimizer, lr_at
from omnitrain.posttrain import (
    HFInitConfig,
    LMObjective,
    ValConfig,
    Validation,
    embedding_rows,
    freeze_old_weights,
    init_from_hf,
    make_lm_loader,
)
from omnitrain.runlog import RunLog, WandbConfig, truncate_metrics
from omnitrain.tokenizer.layout import MODALITIES, TokenLayout


@dataclass
class TrainConfig:
    run_dir: Path = Path("runs/train")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step (each data.batch_size rows per rank)
    seed: int = 0
    log_every: int = 1
    ckpt_every: int = 50  # also at the end and on preemption
    keep_last: int = 3  # complete checkpoints kept
    resume: str = "auto"  # auto (latest in run_dir, if any) | never | a checkpoint folder
    init_from: str | None = None  # start from a consolidated omnitrain model folder (ignored when resuming)
    hf_init: HFInitConfig = field(default_factory=HFInitConfig)  # start from a Hugging Face Llama (continued pretraining)
    freeze_warmup_steps: int = 0  # with hf_init: the first N steps train only the new embedding rows
    objective: Literal["lm", "dpo"] = "lm"  # lm: pretraining / continued pretraining / SFT; dpo: preference pairs
    dpo: DPOConfig = field(default_factory=DPOConfig)
    val: ValConfig = field(default_factory=ValConfig)  # held-out shard sets scored during training
    on_nonfinite: Literal["skip", "stop"] = "stop"  # a NaN/inf loss or gradient: skip the step, or stop
    max_skipped: int = 10  # on_nonfinite=skip: stop after this many skipped steps in a row
    compile: bool = False  # torch.compile the model
    threads: int = 0  # torch intra-op threads per process (0: torch's default)
    requeue: bool = True  # under Slurm, SIGUSR1 requeues the job after the checkpoint
    export: bool = True  # write the consolidated model/ folder at the end

    def __post_init__(self) -> None:
        if self.steps < 1 or self.grad_accum < 1 or self.log_every < 1 or self.ckpt_every < 1:
            raise ValueError("steps, grad_accum, log_every and ckpt_every must be >= 1")
        if self.freeze_warmup_steps and not self.hf_init.path:
            raise ValueError("freeze_warmup_steps trains only the rows added to a pretrained model: set hf_init.path too")
        if self.hf_init.path and self.init_from:
            raise ValueError("give one of init_from (an omnitrain model) and hf_init.path (a Hugging Face model), not both")


def every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


class Preemption:
    """SIGUSR1 / SIGTERM -> a flag the loop checks at the end of each step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGUSR1, signal.SIGTERM)}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def requested(self, fabric: Any) -> int:
        """The signal any rank received (0: none), agreed on by all ranks."""
        flag = torch.tensor([self.signal or 0], device=fabric.device)
        return int(fabric.all_reduce(flag, reduce_op="max").item()) if fabric.world_size > 1 else int(flag.item())


def train(cfg: TrainConfig, plain_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train; returns a summary (final step, loss, tokens/s, run_dir)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.data.sources:
        raise ValueError("no training data: set data.sources (see recipes/data/) to shard folders made by `omnitrain data build`")
    fabric = make_fabric(cfg.strategy, grad_clip=cfg.optim.grad_clip, grad_accum=cfg.grad_accum)
    fabric.launch()
    deepspeed = cfg.strategy.name == "deepspeed"
    run_dir = Path(cfg.run_dir)
    layout = TokenLayout.load(next(iter(cfg.data.sources.values())).path)
    if cfg.model.vocab_size != layout.vocab_size:
        cfg.model.vocab_size = layout.vocab_size  # the layout decides the vocabulary

    # --- model, optimizer, data
    fabric.seed_everything(cfg.seed)  # the same initial weights on every rank
    new_rows_from = 0  # hf_init: the first row the layout added to the pretrained vocabulary
    if cfg.hf_init.path:  # continued pretraining: the LLM with its vocabulary grown to the layout's
        model, new_rows_from = init_from_hf(cfg.hf_init, cfg.model, layout)
        cfg.model = model.cfg
    else:
        model = Transformer(cfg.model)
    model.set_modalities(layout.modality_of(torch.arange(layout.vocab_size).numpy()))
    resume_from = checkpoint.resolve_resume(run_dir, cfg.resume)
    if cfg.freeze_warmup_steps and cfg.strategy.name not in ("single", "ddp"):
        raise ValueError(f"freeze_warmup_steps masks rows of unsharded gradients: use strategy=single or ddp, not {cfg.strategy.name}")
    if cfg.init_from and resume_from is None:
        init, _ = checkpoint.load_model(cfg.init_from)
        if init.cfg != model.cfg:
            raise ValueError(f"init_from={cfg.init_from} holds a model with {init.cfg}, this run builds {model.cfg}: "
                             "choose the matching model= recipe or override its fields")  # fmt: skip
        model.load_state_dict(init.state_dict())
    modality_table = model.modality_table
    reference, ref_table, make_loader = None, None, make_lm_loader
    if cfg.objective == "dpo":  # the frozen reference: the model as it starts (also when resuming)
        if cfg.dpo.reference == "on_the_fly":
            reference = copy.deepcopy(model).eval().requires_grad_(False).to(fabric.device)
        else:
            ref_file = Path(cfg.dpo.reference_logps or run_dir / "reference_logps.json")
            if fabric.global_rank == 0:
                precompute_reference(copy.deepcopy(model).to(fabric.device), cfg.data, layout.specials["pad"], ref_file, fabric.device)
            fabric.barrier()
            ref_table = precompute_reference(model, cfg.data, layout.specials["pad"], ref_file, fabric.device)  # reads the file
        make_loader = make_preference_loader(ref_table)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)  # before sharding: from the full parameter counts
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.compile:
        model = torch.compile(model)
    if cfg.strategy.name == "fsdp":  # FSDP2 shards the parameters: the optimizer must see the sharded ones
        model = fabric.setup_module(model)
        optimizer = fabric.setup_optimizers(build_optimizer(model.module, cfg.optim))
    else:
        model, optimizer = fabric.setup(model, build_optimizer(model, cfg.optim))
    modality_table = modality_table.to(fabric.device)
    if cfg.objective == "dpo":
        objective = DPOObjective(cfg.dpo, modality_table, reference)
    else:
        objective = LMObjective()
    loader: OmniLoader = make_loader(cfg.data, fabric.global_rank, fabric.world_size)
    validation = Validation(cfg.val, cfg.data, make_loader, fabric.global_rank, fabric.world_size, layout.hash)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0, "tokens": 0}
    skipped_in_a_row = 0

    # --- resume: model, optimizer, step, this rank's loader position and RNG
    if resume_from is not None:
        meta, ranks = checkpoint.load(fabric, resume_from, state)
        if meta["layout_hash"] != layout.hash:
            raise ValueError(f"checkpoint {resume_from} was trained with layout {meta['layout_hash']}, the data has {layout.hash}: "
                             "resume with the shards it was trained on, or start a new run_dir")  # fmt: skip
        if meta["world_size"] == fabric.world_size:
            loader.load_state_dict(ranks[fabric.global_rank]["loader"])
            checkpoint.set_rng_state(ranks[fabric.global_rank]["rng"])
        else:  # another world size: the loader re-splits every old rank's position (data.reshard)
            loader.load_state_dict([r["loader"] for r in ranks])
        if fabric.global_rank == 0:
            truncate_metrics(run_dir / "metrics.jsonl", state["step"])
    start_step = state["step"]
    log = RunLog(run_dir, fabric.global_rank == 0, plain_config or _plain(cfg), cfg.wandb, cfg.steps, start_step, fabric.world_size, resume_from)
    if fabric.global_rank == 0:
        layout.save(run_dir / "layout.json")
        log.print(f"omnitrain train: {n_params / 1e6:.1f}M params, strategy {cfg.strategy.name} x {fabric.world_size}, "
                  f"precision {cfg.strategy.precision}, {cfg.steps} steps of {cfg.grad_accum} x {cfg.data.batch_size} x "
                  f"{cfg.data.seq_len} tokens per rank" + (f", resumed from {resume_from}" if resume_from else ""))  # fmt: skip
    peak = peak_flops(fabric.device, cfg.strategy.precision)
    preempt = Preemption()
    stopped_by = 0
    dp_scale = fabric.world_size * (cfg.grad_accum if deepspeed else 1)  # undone by gradient averaging (and DeepSpeed's 1/accum)

    # --- the loop
    if validation.due(start_step, False) and start_step == 0:
        log.log(0, validation.run(fabric, model, objective))  # the held-out losses before any training
    t_start = time.perf_counter()
    while state["step"] < cfg.steps:
        step = state["step"]
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [fabric.to_device(next(loader)) for _ in range(cfg.grad_accum)]
        count = sum(objective.count(b) for b in micro)  # weighted target tokens (LM) or pairs (DPO) of the step
        count = (fabric.all_reduce(count, reduce_op="sum") if fabric.world_size > 1 else count).clamp(min=1.0)
        sums = torch.zeros(len(objective.keys), device=fabric.device)  # additive metrics, named by objective.keys
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            # DeepSpeed accumulates by itself (and Fabric warns on every no_backward_sync call for it, even a disabled one)
            with fabric.no_backward_sync(model, enabled=not last) if not deepspeed else nullcontext():
                loss, s = objective.loss(model, batch, denom=count / dp_scale)
                fabric.backward(loss)
            sums += s
            if deepspeed:
                optimizer.step()  # DeepSpeed counts micro-steps and really steps (and clips) at the last one
        if fabric.world_size > 1:
            sums = fabric.all_reduce(sums, reduce_op="sum")
        summary_row, mod_tokens = objective.summary(sums, count)
        step_loss = summary_row["loss"]
        frozen = step < cfg.freeze_warmup_steps
        if frozen:  # warm-up of continued pretraining: only the new embedding rows learn
            freeze_old_weights(_unwrap(model), new_rows_from)
        if deepspeed:
            grad_norm = float(_unwrap_engine(model).get_global_grad_norm() or 0.0)
        else:
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
        if not finite and (cfg.on_nonfinite == "stop" or deepspeed or skipped_in_a_row + 1 >= cfg.max_skipped):
            raise FloatingPointError(
                f"non-finite loss {step_loss} / gradient norm {grad_norm} at step {step}: stopped before the update, nothing "
                f"was trained on it. Resume from the last checkpoint ({checkpoint.resolve_resume(run_dir, 'auto')}) with a "
                "lower optim.lr, longer optim.warmup_steps, model.qk_norm=true or model.z_loss=1e-5"
                + (" (on_nonfinite=skip is not supported with DeepSpeed)" if deepspeed else "")
            )
        if not deepspeed:
            if finite:
                kept = embedding_rows(_unwrap(model), new_rows_from) if frozen else []
                optimizer.step()
                for weight, rows in kept:
                    weight.data[:new_rows_from] = rows
            optimizer.zero_grad(set_to_none=True)
        skipped_in_a_row = 0 if finite else skipped_in_a_row + 1
        state["step"] = step = step + 1
        step_tokens = sum(mod_tokens.values())
        state["tokens"] += step_tokens
        dt = time.perf_counter() - t0

        val_row = validation.run(fabric, model, objective) if validation.due(step, step == cfg.steps) else {}
        if every(step, cfg.log_every) or step == cfg.steps or val_row:
            row = {**summary_row, "lr": lr, "grad_norm": grad_norm, "skipped": int(not finite), "tokens": state["tokens"],
                   "tokens_per_s": step_tokens / dt, "flops_per_s": flops_per_token * step_tokens / dt, "step_time": dt,
                   "elapsed": time.perf_counter() - t_start}  # fmt: skip
            if peak:
                row["mfu"] = row["flops_per_s"] / (peak * fabric.world_size)
            row.update({f"tokens_per_s/{mod}": mod_tokens[mod] / dt for mod in MODALITIES})
            if cfg.freeze_warmup_steps:
                row["frozen"] = int(frozen)
            row.update(val_row)
            row["packing_efficiency"] = loader.packing_efficiency()
            row.update({f"share/{k}": v for k, v in loader.realised_shares().items()})
            log.log(step, row)
        log.advance()

        stopped_by = preempt.requested(fabric)
        if every(step, cfg.ckpt_every) or step == cfg.steps or stopped_by:
            rank_state = {"loader": loader.state_dict(), "rng": checkpoint.rng_state()}
            path = checkpoint.save(fabric, run_dir, step, state, rank_state, {"tokens": state["tokens"], "layout_hash": layout.hash,
                                   "loss": step_loss}, cfg.keep_last)  # fmt: skip
            log.print(f"checkpoint {path}")
        if stopped_by:
            break

    # --- the end: consolidated export, summary, requeue when preempted under Slurm
    preempt.restore()
    loader.close()
    if cfg.export and not stopped_by:
        sd = full_state_dict(fabric, model, cfg.strategy.name)
        if fabric.global_rank == 0:
            checkpoint.save_model(_unwrap(model), run_dir / "model", run_dir, {"step": state["step"], "tokens": state["tokens"]}, sd)
    fabric.barrier()
    elapsed = time.perf_counter() - t_start
    done_steps = state["step"] - start_step
    summary = {"run_dir": str(run_dir), "step": state["step"], "tokens": state["tokens"], "preempted": bool(stopped_by),
               "seconds": round(elapsed, 1), "steps_per_s": done_steps / elapsed if elapsed else 0.0}  # fmt: skip
    log.close()
    if stopped_by:
        name = signal.Signals(stopped_by).name
        if fabric.global_rank == 0:
            print(f"{name}: saved step {state['step']} and stopped", flush=True)
        if stopped_by == signal.SIGUSR1 and cfg.requeue and os.environ.get("SLURM_JOB_ID") and fabric.global_rank == 0:
            job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ["SLURM_JOB_ID"])
            res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            print(f"scontrol requeue {job}: {'ok' if res.returncode == 0 else res.stderr.strip()}", flush=True)
    elif fabric.global_rank == 0:
        print(f"train done: step {state['step']}, {state['tokens']:,} tokens in {elapsed:.1f}s, run {run_dir}", flush=True)
    return summary


def _unwrap(model: Any) -> Transformer:
    """The Transformer inside Fabric / DeepSpeed / torch.compile wrappers."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "module", inner)  # DeepSpeedEngine.module
    return getattr(inner, "_orig_mod", inner)


def _unwrap_engine(model: Any) -> Any:
    return getattr(model, "_forward_module", model)


def _plain(cfg: TrainConfig) -> dict[str, Any]:
    from omnitrain.config import to_dict

    return to_dict(cfg)
