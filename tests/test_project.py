"""The project's shape and set-up: what a newcomer relies on before any code runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO


def test_required_top_level_and_no_tokenizers_package():
    for name in ("pyproject.toml", "README.md", "src/omnitrain", "recipes", "data_pipelines", "tokenizers", "evals", "tests", "slurm", ".ci/run"):
        assert (REPO / name).exists(), name
    # a `tokenizers` package at the root would shadow Hugging Face's and break transformers
    assert not (REPO / "tokenizers" / "__init__.py").exists()


def test_pyproject_declares_the_stack():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = " ".join(meta["dependencies"])
    for pkg in ("torch", "lightning", "deepspeed", "datasets", "webdataset", "sentencepiece", "hydra-core", "wandb", "numpy", "pillow", "soundfile"):
        assert pkg in deps, pkg
    assert meta["requires-python"] == ">=3.10"
    assert {"dev", "hf"} <= set(meta["optional-dependencies"])
    assert meta["scripts"]["omnitrain"] == "omnitrain.cli:main"


def test_readme_commands_are_the_ones_ci_runs():
    readme = (REPO / "README.md").read_text()
    test_cmd = "bash setup.sh && .venv/bin/python -m pytest"
    assert "bash setup.sh && .venv/bin/omnitrain demo" in readme
    assert test_cmd in readme
    assert test_cmd in (REPO / ".ci" / "run").read_text()


def test_setup_is_idempotent_and_fast_when_nothing_changed():
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "OMNITRAIN_VENV": str(venv), "OMNITRAIN_SKIP_APT": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "setup.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "up to date" in proc.stdout:  # the usual case: set-up ran just before the tests
        assert time.perf_counter() - t0 < 20
    proc = subprocess.run(["bash", str(REPO / "setup.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert "up to date" in proc.stdout  # a second run never reinstalls


# Stages in the order the data flows; a module may import its own stage and the stages before it.
# demo and cli run everything (lm_eval: lm-evaluation-harness's CLI over the eval adapter); config is the
# typed-config helper every stage uses.
STAGES = ["config", "sources", "tokenizer", "data", "model", "train", "eval", "lm_eval", "demo", "sweep", "cli"]
NEVER = {("eval", "train")}  # eval reads models through model/io.py: evaluating never needs the trainer


def _omnitrain_imports(path: Path) -> set[str]:
    """Every ``omnitrain.*`` module that ``path`` imports, at the top or inside a function."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} if node.module != "omnitrain" else {f"omnitrain.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("omnitrain.")}


def test_imports_run_one_way_through_the_stages():
    """sources -> tokenizer -> data -> model -> train -> eval: no module imports a later stage, and eval
    reads models through model/io.py, never through the trainer (issue 18)."""
    src = REPO / "src" / "omnitrain"
    against = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        stage = rel.parts[0].removesuffix(".py") if rel.name != "__init__.py" or len(rel.parts) > 1 else None
        if stage is None:
            continue
        assert stage in STAGES, f"{rel}: a new top-level module or package; give it a place in STAGES (the data flow)"
        for mod in _omnitrain_imports(path):
            target = mod.split(".")[1]
            assert target in STAGES, f"{rel} imports {mod}, which is not in STAGES"
            if STAGES.index(target) > STAGES.index(stage) or (stage, target) in NEVER:
                against.append(f"{rel} -> {mod}")
    assert not against, "imports against the data flow:\n" + "\n".join(against)
