"""One optimizer step of the training loop (``train_step``) and the metrics row of a log step (``metrics_row``).

A step's stats stay on the device (``StepResult.sums``, token counts summed by ``runlog.Throughput``) and are read at
log steps, checkpoint steps and a skipped step only; a non-log step reads one small tensor back (``step_verdict``):
whether the loss and gradient norm are finite, and the preemption signal the ranks agree on. What a step needs to
know of its batches' shapes is found on the host before they go to the device (``host_side``)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omnitrain.model.audio_layouts import frame_rows
from omnitrain.tokenizer.layout import MODALITIES
from omnitrain.train import checkpoint
from omnitrain.train.build import Run
from omnitrain.train.objectives import freeze_old_weights, pretrained_rows_kept
from omnitrain.train.optim import lr_at
from omnitrain.train.preemption import Preemption

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


def train_step(run: Run, step: int, skipped: int, preempt: Preemption | None = None) -> StepResult:
    """Optimizer step ``step`` (0-based): ``grad_accum`` micro-batches forward and backward, clip, then update
    unless the loss or gradient is non-finite (``skipped``: steps skipped in a row before this one). The ranks'
    preemption signals (``preempt.slots``, taken after the backward passes) travel in the step's one collective."""
    cfg, strategy, fabric, objective = run.cfg, run.strategy, run.fabric, run.objective
    lr = lr_at(step, cfg.steps, cfg.optim)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    micro = [fabric.to_device(host_side(next(run.loader), cfg.model.audio_layout)) for _ in range(cfg.grad_accum)]
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


def host_side(batch: dict[str, torch.Tensor], audio_layout: str) -> dict[str, torch.Tensor]:
    """What the host can say of a loader batch before it goes to the device. ``audio_layout=depth``: the rows whose
    target is a frame (``frames`` [Na], what the depth transformer runs on): found on the device, ``nonzero`` would
    wait for the step's queued work to learn Na (a second host read per step); here it costs the host a scan of
    the [B, T] targets it already holds, and the loss is the same to the bit (the same indices)."""
    if audio_layout == "depth":
        return {**batch, "frames": frame_rows(batch["targets"])}
    return batch


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
    skipped = torch.tensor([run.loader.skipped_shards(), run.loader.skipped_samples()], dtype=torch.float64, device=run.fabric.device)
    if run.fabric.world_size > 1:  # every rank writes this row's numbers (log steps only): one small collective
        skipped = run.fabric.all_reduce(skipped, reduce_op="sum")
    row["skipped_shards"], row["skipped_samples"] = (int(x) for x in skipped.tolist())  # data.on_corrupt=skip, all ranks
    row.update({f"share/{k}": v for k, v in run.loader.realised_shares().items()})
    return row
