"""AdamW with the usual exclusions from weight decay, and learning-rate schedules as pure functions of the step.

Schedules (``lr_at(step)``, ``step`` counted from 0, the multiplier of ``lr``):

* ``cosine``: linear warmup over ``warmup_steps``, then a half cosine down to ``min_lr_ratio``
  at ``total_steps``.
* ``wsd`` (warmup-stable-decay, MiniCPM / DeepSeek-LLM): warmup, a flat stretch at the peak, then a
  linear decay to ``min_lr_ratio`` over the last ``decay_fraction`` of the steps. A run can be
  extended from any checkpoint of the stable phase.
* ``constant``: warmup, then flat.

Being pure functions of the step, they need no state in the checkpoint: a resumed run computes the
same rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only: never on norms, biases or embeddings
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final rate as a fraction of lr (cosine, wsd)
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying, at the end
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    fused: bool | None = None  # torch's fused AdamW (None: when the parameters live on CUDA)

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim: need lr > 0, 0 <= min_lr_ratio <= 1, 0 < decay_fraction <= 1 (got {self})")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {self.betas}")


def warmup_warning(cfg: OptimConfig, total_steps: int) -> str | None:
    """The start-up warning for a warmup longer than the run (None when it fits): the rate never reaches ``lr``."""
    if cfg.warmup_steps <= total_steps:
        return None
    return (f"optim.warmup_steps={cfg.warmup_steps} > steps={total_steps}: the learning rate only reaches "
            f"{lr_at(total_steps - 1, total_steps, cfg):.3g} of optim.lr={cfg.lr:g}; set optim.warmup_steps <= steps")  # fmt: skip


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning rate at optimizer step ``step`` (0-based) of a run of ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total_steps - int(round(cfg.decay_fraction * total_steps))
    if step < max(decay_start, cfg.warmup_steps):
        return cfg.lr
    span = max(total_steps - decay_start, 1)
    return cfg.lr - (cfg.lr - floor) * min((step - decay_start + 1) / span, 1.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; norms, biases and embeddings do not (a tied output matrix is the
    embedding, so it does not decay either)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or "norm" in name or "tok_embeddings" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device | str | None = None,
                    cpu_offload: bool = False) -> torch.optim.Optimizer:  # fmt: skip
    """AdamW over ``param_groups(model)``.

    ``device``: where the parameters will be when the optimizer steps (default: where they are now). Torch's
    fused AdamW (one kernel for every tensor; ``cfg.fused=None`` picks it on CUDA) is chosen from it, so a
    strategy that builds the optimizer before moving the model (DeepSpeed takes both at once) still gets it.
    ``cpu_offload``: DeepSpeed ZeRO-Offload keeps the optimizer state in CPU memory and steps it there; DeepSpeed
    refuses a torch optimizer for that (``zero_force_ds_cpu_optimizer``), so it is ``DeepSpeedCPUAdam`` (AdamW
    mode, the same update; its C++ op is compiled on first use and cached in ``TORCH_EXTENSIONS_DIR``)."""
    groups = param_groups(model, cfg.weight_decay)
    if cpu_offload:
        # deepspeed logs on import: offloaded DeepSpeed runs only
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                adamw_mode=True)  # fmt: skip
    fused = cfg.fused
    if fused is None:
        fused = torch.device(device).type == "cuda" if device is not None else all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)
