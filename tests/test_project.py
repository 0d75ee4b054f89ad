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
