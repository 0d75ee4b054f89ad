"""The forgetting guard: watched metrics against their step-0 baselines, and what to do when one degrades.

Multimodal continued pretraining loses text ability silently (ichigo #59: MMLU falls after speech pretraining;
BAGEL #292). The guard watches any number of the run's logged metrics (``eval/<task>/<metric>`` from the
in-training eval, ``val/<source>/...`` held-out losses); each has a tolerance in its own units. The baseline is
the metric's first value, measured at step 0 on the weights training starts from. Whenever a watched metric is
worse than ``baseline - tolerance`` (``+`` for lower-is-better metrics), the run prints one line and:

* ``action=warn``: nothing more;
* ``action=rebalance``: already once the metric is ``rebalance_at`` x its tolerance worse (a share change takes
  steps to act: measured in ``benchmarks/continue_pretrain.py``, a guard acting only past the tolerance let held-out
  text loss overshoot it by 0.2 nats before the new mixture turned it around), raises the mixture share of the sources that train that ability (the watch's ``sources``,
  or the sources whose tokens are mostly of its ``modality``) by ``step``, up to ``max_share`` together, the other
  sources scaled down in proportion (``OmniLoader.set_shares``: part of the loader's exact-resume state), and logs
  every change (a line and ``share_target/<source>`` in metrics.jsonl). With ``relax`` (the default), once every
  watched metric is back within half of ``rebalance_at`` x its tolerance, the shares step back toward the recipe's
  mixture by ``step`` (never past it): a guard that only raises keeps starving the other modalities after the
  danger has passed (measured in ``benchmarks/continue_pretrain.py``: text at 0.9 from step 4 to the end);
* ``action=stop``: the loop saves a checkpoint and stops.

The baselines and the changes made so far travel in the checkpoint's ``meta.json`` (``Guard.state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from omnitrain.tokenizer.layout import MODALITIES

# metric name endings that are better when higher; every other watched metric is better when lower (loss, perplexity,
# nll_per_token, bits_per_byte, wer, cer)
HIGHER_IS_BETTER = ("acc", "acc_norm", "anls", "exact_match", "char_accuracy", "pass@1")


@dataclass
class WatchConfig:
    tolerance: float = 0.05  # how far the metric may fall behind its step-0 value, in its own units
    higher_is_better: bool | None = None  # None: from the name (acc, anls, exact_match, char_accuracy: higher)
    modality: str = "text"  # rebalance: the sources whose tokens are mostly of this modality train this ability
    sources: list[str] = field(default_factory=list)  # ... or exactly these data.sources (overrides modality)

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ValueError(f"guard.watch.*.tolerance={self.tolerance} must be >= 0 (in the metric's own units)")
        if self.modality not in MODALITIES:
            raise ValueError(f"guard.watch.*.modality={self.modality!r} is not one of {list(MODALITIES)}")


@dataclass
class GuardConfig:
    # metrics.jsonl key -> its watch, e.g. {eval/mmlu/acc: {tolerance: 0.03}, val/text_heldout/loss/text: {tolerance: 0.1}}
    watch: dict[str, WatchConfig] = field(default_factory=dict)
    action: Literal["warn", "rebalance", "stop"] = "warn"
    step: float = 0.1  # rebalance: share (0-1) added to the watched sources at each degraded evaluation
    max_share: float = 0.9  # rebalance: the most the watched sources may take together
    rebalance_at: float = 0.5  # rebalance: act once a metric is this fraction of its tolerance worse (1: at the tolerance)
    relax: bool = True  # rebalance: step back toward the recipe's shares once every watched metric is well within again

    def __post_init__(self) -> None:
        if not 0 < self.step <= 1 or not 0 < self.max_share <= 1:
            raise ValueError(f"guard.step={self.step} and guard.max_share={self.max_share} must be in (0, 1]")
        if not 0 <= self.rebalance_at <= 1:
            raise ValueError(f"guard.rebalance_at={self.rebalance_at} must be in [0, 1] (a fraction of each watch's tolerance)")
        bad = [k for k in self.watch if not k.startswith(("eval/", "val/"))]
        if bad:
            raise ValueError(f"guard.watch {bad}: watch eval/<task>/<metric> (eval_in_training) or val/<source>/<metric> (val) keys")


def higher_is_better(name: str, watch: WatchConfig) -> bool:
    return watch.higher_is_better if watch.higher_is_better is not None else name.rsplit("/", 1)[-1] in HIGHER_IS_BETTER


class Guard:
    """Compares each watched metric with its baseline; rebalances the loader's mixture or asks the loop to stop."""

    def __init__(self, cfg: GuardConfig, loader: Any, say: Callable[[str], None] = print) -> None:
        self.cfg, self.loader, self.say = cfg, loader, say
        self.baseline: dict[str, float] = {}
        self.changes: list[dict[str, Any]] = []  # every share change: step, metric, shares after
        self.origin: dict[str, float] = dict(loader.shares)  # the recipe's mixture (a resumed run: from the checkpoint)
        for name, w in cfg.watch.items():
            unknown = [s for s in w.sources if s not in loader.shares]
            if unknown:
                raise ValueError(f"guard.watch.{name}.sources {unknown} are not data.sources ({list(loader.shares)})")

    @property
    def active(self) -> bool:
        return bool(self.cfg.watch)

    def observe(self, step: int, row: dict[str, float]) -> tuple[dict[str, float], bool]:
        """Check the watched metrics present in ``row`` (logged at ``step``). Returns (more metrics for the row:
        ``guard/degraded``, and after a rebalance ``share_target/<source>``; whether to stop)."""
        seen = {k: float(row[k]) for k in self.cfg.watch if k in row}
        if not seen:
            return {}, False
        for k, v in seen.items():
            self.baseline.setdefault(k, v)  # the first value: step 0, on the weights training starts from
        degraded, drifting = [], []  # past the tolerance; past rebalance_at x tolerance (what rebalance acts on)
        for k, v in seen.items():
            w, base = self.cfg.watch[k], self.baseline[k]
            loss = base - v if higher_is_better(k, w) else v - base  # > 0: worse than the baseline
            if loss > w.tolerance:
                degraded.append(k)
                self.say(f"guard: {k} = {v:.4f} at step {step} is {loss:.4f} worse than its step-0 {base:.4f} "
                         f"(tolerance {w.tolerance}): {self.cfg.action}")  # fmt: skip
            elif self.cfg.action == "rebalance" and loss > self.cfg.rebalance_at * w.tolerance:
                self.say(f"guard: {k} = {v:.4f} at step {step} is {loss:.4f} worse than its step-0 {base:.4f}, past "
                         f"guard.rebalance_at={self.cfg.rebalance_at} of its tolerance {w.tolerance}: rebalance")  # fmt: skip
            if loss > self.cfg.rebalance_at * w.tolerance:  # rebalance_at <= 1: every degraded metric too
                drifting.append(k)
        out: dict[str, float] = {"guard/degraded": float(len(degraded))}
        if drifting and self.cfg.action == "rebalance":
            out.update(self.rebalance(step, drifting))
        elif self.cfg.action == "rebalance" and self.cfg.relax and self.raised() and all(
            self._worse(k, v) <= self.cfg.rebalance_at * self.cfg.watch[k].tolerance / 2 for k, v in seen.items()
        ):  # every metric seen is well within again: back toward the recipe's mixture (hysteresis: half the trigger)
            out.update(self.relax(step))
        return out, bool(degraded) and self.cfg.action == "stop"

    def _worse(self, name: str, value: float) -> float:
        base = self.baseline[name]
        return base - value if higher_is_better(name, self.cfg.watch[name]) else value - base

    def raised(self) -> list[str]:
        """The sources whose share is above the recipe's."""
        return [s for s, v in self.loader.shares.items() if v > self.origin.get(s, 0.0) + 1e-9]

    def targets(self, name: str) -> list[str]:
        """The sources that train the ability ``name`` measures."""
        w = self.cfg.watch[name]
        if w.sources:
            return list(w.sources)
        out = []
        for src, manifest in self.loader.manifests.items():
            tokens = manifest["tokens"]
            if tokens.get(w.modality, 0) * 2 > sum(tokens.values()):
                out.append(src)
        if not out:
            raise ValueError(f"guard.watch.{name}: no data source is mostly {w.modality}; name the sources to raise "
                             f"(guard.watch.{name}.sources=[...], of {list(self.loader.shares)})")  # fmt: skip
        return out

    def rebalance(self, step: int, degraded: list[str]) -> dict[str, float]:
        shares = dict(self.loader.shares)
        up = sorted({s for k in degraded for s in self.targets(k)})
        now = sum(shares[s] for s in up)
        new = min(now + self.cfg.step, self.cfg.max_share)
        if new <= now + 1e-9 or now >= 1 - 1e-9:
            self.say(f"guard: the share of {up} is at its bound ({now:.3f}, guard.max_share={self.cfg.max_share}): unchanged")
            return {}
        return self._set(step, degraded, up, now, new)

    def relax(self, step: int) -> dict[str, float]:
        """Step the raised sources' share back toward the recipe's (by ``step``, never below it)."""
        up = self.raised()
        now, orig = sum(self.loader.shares[s] for s in up), sum(self.origin[s] for s in up)
        return self._set(step, ["relax"], up, now, max(now - self.cfg.step, orig))

    def _set(self, step: int, why: list[str], up: list[str], now: float, new: float) -> dict[str, float]:
        """The sources ``up`` together from ``now`` to ``new``, each in proportion; the others share the rest alike."""
        shares = dict(self.loader.shares)
        for s in shares:
            if s in up:
                shares[s] = shares[s] * new / now if now > 0 else new / len(up)
            else:
                shares[s] = shares[s] * (1 - new) / (1 - now)
        self.loader.set_shares(shares)
        self.changes.append({"step": step, "metrics": why, "shares": dict(self.loader.shares)})
        self.say(f"guard: step {step}, {'back toward the recipe' if why == ['relax'] else 'raised'}: mixture shares now "
                 + ", ".join(f"{s} {v:.3f}" for s, v in self.loader.shares.items()))  # fmt: skip
        return {f"share_target/{s}": v for s, v in self.loader.shares.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": dict(self.baseline), "changes": list(self.changes), "origin": dict(self.origin)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """The baselines, changes and recipe mixture of a checkpoint (its loader state holds the shares themselves)."""
        state = state or {}
        self.baseline, self.changes = dict(state.get("baseline", {})), list(state.get("changes", []))
        if state.get("origin") and set(state["origin"]) == set(self.loader.shares):
            self.origin = dict(state["origin"])
