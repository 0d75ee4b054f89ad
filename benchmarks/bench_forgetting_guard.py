"""The forgetting guard on continued pretraining of SmolLM2-135M (issue 24): ``continue_pretrain.guard_comparison``.

    python benchmarks/run_all.py forgetting     # records the rows in RESULTS.md (~5 min on 2 quiet cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run(quick: bool) -> list[dict]:
    from continue_pretrain import guard_comparison

    return guard_comparison(steps=8 if quick else 24)
