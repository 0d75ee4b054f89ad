"""Benchmarks inside training (``eval_in_training``) and the forgetting guard, as the loop sees them.

The training loop does not import the eval stage (imports flow config -> ... -> train -> eval): what scores
the model is handed in, an :class:`Evaluator`. ``omnitrain train`` (``omnitrain.eval.in_training.train``)
builds one from ``eval_in_training`` and passes it to ``omnitrain.train.loop.train(cfg, plain, evaluator=...)``;
a library caller does the same with ``omnitrain.eval.in_training.build_evaluator(cfg)``.

Every ``eval_in_training.every`` steps, at step 0 (the baseline) and at the last step, every rank calls
``evaluator.evaluate(run, step)`` on the training model itself (no second copy; sharded as it is), then the
guard (``omnitrain.train.guard``) looks at the row. The row goes to metrics.jsonl (W&B and TensorBoard follow
it); the evaluator writes ``<run_dir>/eval/step_N/`` in the results format of ``omnitrain eval``. An eval step
runs before the checkpoint of that step, so a resumed run redoes exactly the eval steps after its checkpoint
(``evaluator.forget_after`` removes their folders, as metrics.jsonl drops their rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.train.guard import Guard


@dataclass
class EvalInTrainingConfig:
    every: int = 0  # steps between evaluations (also step 0 and the last step); 0: off
    # task -> its `omnitrain eval` config and a limit, e.g. {mmlu: {limit: 40}, perplexity: {limit: 8, paths: [...]}}
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 8  # sequences per forward pass
    # the tokenizers the shards were built with (text: null -> the training shards' manifest, or hf_init's model)
    tokenizers: TokenizerPaths = field(default_factory=TokenizerPaths)

    def __post_init__(self) -> None:
        if self.every < 0 or self.batch_size < 1:
            raise ValueError(f"eval_in_training.every={self.every} must be >= 0 and batch_size={self.batch_size} >= 1")
        if self.every and not self.tasks:
            raise ValueError("eval_in_training.every is set but eval_in_training.tasks is empty: give e.g. {mmlu: {limit: 40}}")


class Evaluator(Protocol):
    """Scores the training model in place (``omnitrain.eval.in_training.InTrainingEvaluator``)."""

    def evaluate(self, run: Any, step: int) -> dict[str, float]:
        """A collective: every rank calls it. ``run``: ``omnitrain.train.build.Run``. Returns the same
        ``{eval/<task>/<metric>: value}`` on every rank; rank 0 has written ``eval/step_<step>/``."""
        ...

    def forget_after(self, step: int, rank: int) -> None:
        """On resume from checkpoint ``step``: drop the outputs of later eval steps (they are redone)."""
        ...


class InLoopChecks:
    """What the loop calls at step 0 and after each step: the evaluator when due, then the guard."""

    def __init__(self, cfg: Any, run: Any, evaluator: Evaluator | None, say: Any) -> None:
        self.every, self.evaluator = cfg.eval_in_training.every, evaluator  # (TrainConfig and train() checked the pairing)
        self.guard = Guard(cfg.guard, run.loader, say)

    def resumed(self, guard_state: dict[str, Any] | None, start_step: int, rank: int) -> None:
        """Before the first step: the guard's baselines from the checkpoint; eval outputs after it dropped (redone)."""
        self.guard.load_state_dict(guard_state)
        if self.evaluator is not None:
            self.evaluator.forget_after(start_step, rank)

    def due(self, step: int, last: bool) -> bool:
        return self.evaluator is not None and self.every > 0 and (step == 0 or last or step % self.every == 0)

    def run(self, run: Any, step: int, last: bool, val_row: dict[str, float]) -> tuple[dict[str, float], bool]:
        """(the eval and guard metrics of ``step``, whether the guard stops the run)."""
        row = self.evaluator.evaluate(run, step) if self.due(step, last) else {}
        if not self.guard.active:
            return row, False
        extra, stop = self.guard.observe(step, {**val_row, **row})
        return {**row, **extra}, stop
