"""The interface every image and audio tokenizer offers to the data pipeline and to generation.

Legend: B batch, C channels, H/W pixels, h/w code grid, S audio samples, T codec frames,
K residual codebook levels.

Trained here (``omnitrain.tokenizer.image`` / ``.audio``) or adapted from a pretrained
checkpoint (``pretrained_image`` / ``pretrained_audio``), a tokenizer is used through these methods only,
so the pipeline never cares which one it has.
"""

from __future__ import annotations

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
