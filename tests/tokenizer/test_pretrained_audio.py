"""EnCodec and Mimi through transformers, from tiny random checkpoints saved locally (never the hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnitrain.tokenizer.base import AudioTokenizer
from omnitrain.tokenizer.pretrained_audio import load_pretrained_audio_codec

tf = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def encodec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hop 8*5*4 = 160 -> 100 frames/s at 16 kHz; 5 bits/level -> 500 bit/s per level: 1 kbps = 2 levels, 2 kbps = 4
    cfg = tf.EncodecConfig(
        sampling_rate=16000, hidden_size=16, num_filters=4, upsampling_ratios=[8, 5, 4], codebook_size=32,
        num_lstm_layers=1, target_bandwidths=[1.0, 2.0],
    )
    torch.manual_seed(0)
    model = tf.EncodecModel(cfg)
    with torch.no_grad():  # HF initialises codebooks to zeros (they come from checkpoints); make them distinct
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_(std=0.003)  # about the random encoder's latent scale
    out = tmp_path_factory.mktemp("encodec")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def mimi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hop 4*4*2 = 32 -> 500 Hz SEANet rate, downsampled x2 -> 250 frames/s at 16 kHz
    cfg = tf.MimiConfig(
        sampling_rate=16000, hidden_size=16, num_filters=4, upsampling_ratios=[4, 4, 2], codebook_size=32,
        codebook_dim=8, vector_quantization_hidden_dimension=8, num_quantizers=4, num_semantic_quantizers=1,
        upsample_groups=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
        sliding_window=16, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = tf.MimiModel(cfg)
    with torch.no_grad():
        for rvq in (model.quantizer.semantic_residual_vector_quantizer, model.quantizer.acoustic_residual_vector_quantizer):
            for layer in rvq.layers:
                layer.codebook.embed_sum.normal_()
    out = tmp_path_factory.mktemp("mimi")
    model.save_pretrained(out)
    return out


def test_encodec_adapter(encodec_dir: Path) -> None:
    codec = load_pretrained_audio_codec(encodec_dir)  # kind auto-detected, all levels
    assert isinstance(codec, AudioTokenizer)
    assert (codec.kind, codec.n_levels, codec.frame_rate, codec.sample_rate, codec.codebook_size) == ("encodec", 4, 100.0, 16000, 32)
    wavs = 0.1 * torch.randn(2, 1, 8000)
    codes = codec.encode(wavs)
    assert codes.shape == (2, 50, 4) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    assert torch.equal(codes, codec.encode(wavs))  # deterministic
    assert codec.decode(codes).shape == (2, 1, 8000)
    two = load_pretrained_audio_codec(encodec_dir, kind="encodec", n_levels=2)
    assert two.n_levels == 2 and torch.equal(two.encode(wavs), codes[..., :2])  # residual levels are a prefix
    assert two.fingerprint != codec.fingerprint


def test_mimi_adapter(mimi_dir: Path) -> None:
    codec = load_pretrained_audio_codec(mimi_dir, kind="mimi", n_levels=3)
    assert isinstance(codec, AudioTokenizer)
    assert (codec.n_levels, codec.frame_rate, codec.codebook_size) == (3, 250.0, 32)
    wavs = 0.1 * torch.randn(2, 1, 8000)
    codes = codec.encode(wavs)
    assert codes.shape == (2, 125, 3) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 32
    assert codec.decode(codes).shape == (2, 1, 8000)
    assert load_pretrained_audio_codec(mimi_dir).n_levels == 4


def test_adapter_errors(encodec_dir: Path, mimi_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"n_levels=3 is not available.*valid: \[2, 4\]"):
        load_pretrained_audio_codec(encodec_dir, n_levels=3)
    with pytest.raises(ValueError, match=r"n_levels=9 must be in \[2, 4\]"):
        load_pretrained_audio_codec(mimi_dir, n_levels=9)
    with pytest.raises(ValueError, match="kind='mimi'.*model_type='encodec'"):
        load_pretrained_audio_codec(encodec_dir, kind="mimi")
    with pytest.raises(ValueError, match="cannot load a codec config"):
        load_pretrained_audio_codec(tmp_path)  # an empty local directory: no network call
    codec = load_pretrained_audio_codec(encodec_dir)
    with pytest.raises(ValueError, match=r"\[B, 1, S\]"):
        codec.encode(torch.zeros(1, 2, 800))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        codec.decode(torch.full((1, 3, 4), 40))


def test_layout_and_shard_codes_from_pretrained_codecs(mimi_dir: Path, tmp_path: Path) -> None:
    """A pretrained HF folder plugs in wherever a checkpoint does: the layout gets its K x C range."""
    import numpy as np

    from omnitrain.tokenizer.bundle import load_media_tokenizers
    from omnitrain.tokenizer.layout import AudioSegment, TokenLayout

    _, codec = load_media_tokenizers(None, mimi_dir)
    layout = TokenLayout.build(300, "t", {"bos": 1, "eos": 2, "pad": 3}, audio_codebook_size=codec.codebook_size,
                               audio_levels=codec.n_levels, audio_fingerprint=codec.fingerprint)  # fmt: skip
    assert layout.audio_levels == 4 and layout.vocab_size == layout.audio_base + 4 * 32
    codes = codec.encode(torch.randn(1, 1, 1600) * 0.1)[0].numpy()
    ids = layout.serialize([AudioSegment(codes)])
    np.testing.assert_array_equal(layout.parse(ids)[0].codes, codes)
