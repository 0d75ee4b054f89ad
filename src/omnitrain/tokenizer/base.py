"""The interface every image and audio tokenizer offers to the data pipeline and to generation.

Legend: B batch, C channels, H/W pixels, h/w code grid, S audio samples, T codec frames,
K residual codebook levels.

Trained here (``omnitrain.tokenizer.image`` / ``.audio``) or adapted from a pretrained
checkpoint (``pretrained_image`` / ``pretrained_audio``), a tokenizer is used through these methods only,
so the pipeline never cares which one it has.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ImageTokenizer(Protocol):
    """Images <-> a grid of codes from one codebook."""

    codebook_size: int  # number of distinct codes (the layout's image range)
    downsample: int  # pixels per code along each side (8 or 16)
    fingerprint: str  # short content hash of the weights + config; goes into the layout hash

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] float in [-1, 1] (H, W multiples of ``downsample``) -> codes [B, h, w] int64."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] int64 -> images [B, 3, h*downsample, w*downsample] float in [-1, 1]."""
        ...


@runtime_checkable
class AudioTokenizer(Protocol):
    """Mono waveforms <-> frames of K residual codes (frame-major, level order within a frame)."""

    codebook_size: int  # codes per level
    n_levels: int  # K residual levels
    sample_rate: int  # Hz of the waveforms it takes and returns
    frame_rate: float  # codec frames per second (sample_rate / hop)
    fingerprint: str

    def encode(self, wavs: torch.Tensor) -> torch.Tensor:
        """wavs [B, 1, S] float in [-1, 1] at ``sample_rate`` -> codes [B, T, K] int64."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, K] int64 -> wavs [B, 1, T*hop] float."""
        ...


def module_fingerprint(config: dict, module: torch.nn.Module) -> str:
    """First 16 hex chars of sha256(config JSON + state_dict bytes): changes whenever weights change."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: str | Path, kind: str, schema_version: int, config: dict, module: torch.nn.Module) -> Path:
    """One file holding kind, schema_version, config and weights, written atomically (a crash while
    saving leaves any previous checkpoint intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    blob = {"kind": kind, "schema_version": schema_version, "config": config, "state_dict": state}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, kind: str, schema_version: int, train_command: str) -> dict:
    """Read and check a checkpoint written by :func:`save_checkpoint`; errors say what to do."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist; train one with `{train_command}`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors: a truncated or foreign file
        raise ValueError(f"{path} is not a readable torch checkpoint ({e}); retrain with `{train_command}`") from e
    if not isinstance(blob, dict) or blob.get("kind") != kind:
        found = blob.get("kind") if isinstance(blob, dict) else None
        raise ValueError(f"{path} is not a {kind} checkpoint (kind={found!r}); point the config at one written by `{train_command}`")
    if blob.get("schema_version") != schema_version:
        raise ValueError(f"{path} has schema_version {blob.get('schema_version')}, this omnitrain reads {schema_version}; "
                         "use the omnitrain version that wrote it, or retrain")  # fmt: skip
    return blob
