"""Fixtures shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def media_ckpts(tmp_path_factory) -> tuple[Path, Path]:
    """Small randomly initialised tokenizers: encoding is deterministic, which is all shards need."""
    from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec
    from omnitrain.tokenizer.image import ImageTokenizerConfig, VQImageTokenizer

    d = tmp_path_factory.mktemp("media")
    torch.manual_seed(0)
    VQImageTokenizer(ImageTokenizerConfig(codebook_size=64, base_channels=8, max_channels=16)).save(d / "image.pt")
    RVQAudioCodec(AudioCodecConfig(channels=8, latent_dim=16, n_levels=2, codebook_size=32)).eval().save(d / "audio.pt")
    return d / "image.pt", d / "audio.pt"
