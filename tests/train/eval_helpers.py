"""Shared set-up of the in-training eval and guard tests: a tiny SentencePiece text tokenizer for the synthetic
layout's text range, a small MMLU file and held-out text, and the train overrides that turn the eval on."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the model reads text images and audio as tokens in one sequence over one shared vocabulary; "
         "a held out page is scored teacher forced in windows, and a question has four choices. ")  # fmt: skip


def make_eval_assets(root: Path) -> dict[str, Path]:
    """{tokenizer: a .model file (ids < 320, inside the synthetic layout's 1,000 text ids), mmlu: jsonl, text: txt}."""
    root.mkdir(parents=True, exist_ok=True)
    from omnitrain.tokenizer.text import TextTokenizerConfig, _train_sentencepiece

    lines = [WORDS[i:] + WORDS[:i] for i in range(0, len(WORDS), 7)]
    (root / "sp.model").write_bytes(_train_sentencepiece(lines, TextTokenizerConfig(vocab_size=320), 1))
    rows = []
    for i in range(8):
        subject = ("abstract_algebra", "anatomy", "astronomy", "virology")[i % 4]
        rows.append({"subject": subject, "question": f"which word comes after {WORDS.split()[i]}?",
                     "A": WORDS.split()[i + 1], "B": "images", "C": "audio", "D": "page", "answer": "ABCD"[i % 4]})  # fmt: skip
    (root / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "heldout.txt").write_text(WORDS * 6)
    return {"tokenizer": root / "sp.model", "mmlu": root / "mmlu.jsonl", "text": root / "heldout.txt"}


LIMIT = 6  # items per task


def eval_overrides(assets: dict[str, Path], every: int = 5) -> list[str]:
    tasks = (f"{{mmlu:{{limit:{LIMIT},source:'{assets['mmlu']}'}},"
             f"perplexity:{{limit:{LIMIT},chunk_chars:120,paths:['{assets['text']}']}}}}")  # fmt: skip
    return [f"eval_in_training.every={every}", "~eval_in_training.tasks", f"+eval_in_training.tasks={tasks}", "eval_in_training.batch_size=3",
            f"eval_in_training.tokenizers.text={assets['tokenizer']}"]  # fmt: skip


def slow_after(step: int) -> str:
    """A prelude for ``test_train.start``: the steps after ``step`` wait a minute, so that a kill lands there."""
    return ("import time\nimport omnitrain.train.loop as loop\n_step = loop.train_step\n"
            f"loop.train_step = lambda run, step, *a, **k: (time.sleep(60) if step >= {step} else None) or _step(run, step, *a, **k)\n")  # fmt: skip
