"""The mel codec (``model.kind=mel``): log-mel RVQ fitted by k-means, Griffin-Lim decoder, the codec protocol."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.config import ConfigError, from_dict
from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec, load_audio_codec
from omnitrain.tokenizer.audio_train import AudioTrainConfig, train_audio_codec
from omnitrain.tokenizer.base import AudioTokenizer
from omnitrain.tokenizer.mel_codec import fit_codebooks

MEL = {"kind": "mel", "strides": [2, 4, 5, 8, 2], "n_levels": 2, "codebook_size": 32, "n_mels": 40, "griffin_lim_iters": 8}
DIGITS = ["one three six", "eight six seven", "nine nine eight", "four zero two", "five seven one", "two two three"]


def tone(seconds: float, hz: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_encode_decode_shapes_protocol_and_determinism() -> None:
    codec = RVQAudioCodec(from_dict(AudioCodecConfig, MEL)).eval()
    assert isinstance(codec, AudioTokenizer) and codec.frame_rate == 25 and not list(codec.parameters())  # buffers only
    wav = torch.from_numpy(np.stack([tone(1.0, 220), tone(1.0, 440)]))[:, None]  # [2, 1, 16000]
    codes = codec.encode(wav)
    assert codes.shape == (2, 25, 2) and codes.dtype == torch.int64 and int(codes.max()) < 32
    out = codec.decode(codes)
    assert out.shape == (2, 1, 25 * 640) and torch.isfinite(out).all()
    assert torch.equal(codec.decode(codes), out) and torch.equal(codec.encode(wav), codes)  # fixed-seed phase


def test_kmeans_codebooks_lower_each_levels_residual_and_separate_two_sounds() -> None:
    codec = RVQAudioCodec(from_dict(AudioCodecConfig, MEL)).eval()
    clips = [tone(0.8, hz) for hz in (200, 300, 450, 700, 1000, 1500, 2200, 3000)]
    frames = torch.cat([codec.encoder(torch.from_numpy(c)[None, None])[0].T for c in clips])  # [N, M]
    spread = float((frames - frames.mean(0)).pow(2).mean().sqrt())
    rms = fit_codebooks(codec.quantizer, frames, iters=10, seed=0)
    assert len(rms) == 2 and rms[1] <= rms[0] < spread  # each level leaves less than the one before
    low, high = (codec.encode(torch.from_numpy(tone(0.8, hz))[None, None])[0, 2:-2, 0] for hz in (200, 3000))
    assert set(low.tolist()).isdisjoint(high.tolist())  # a low and a high tone get different level-0 codes
    with pytest.raises(ValueError, match="training frames"):
        fit_codebooks(RVQAudioCodec(from_dict(AudioCodecConfig, {**MEL, "codebook_size": 4096})).quantizer, frames[:100], 2, 0)


def test_config_refuses_an_analysis_hop_that_does_not_divide_the_frame() -> None:
    with pytest.raises(ConfigError, match="mel_hop=100 must divide the hop 640"):
        from_dict(AudioCodecConfig, {**MEL, "mel_hop": 100})


@pytest.mark.skipif(shutil.which("flite") is None, reason="Debian package flite is not installed (apt-get install flite)")
def test_trained_by_the_codec_command_saved_loaded_and_heard(tmp_path: Path) -> None:
    """`omnitrain tokenizer train-audio model.kind=mel` on flite speech: k-means, the run dir, a checkpoint that
    loads to the same codes, and its round trip heard by the speech-output evals' ASR beside the recordings."""
    from omnitrain.eval.speech_output import TTSConfig, codec_ceiling, load_asr

    src = tmp_path / "speech"
    src.mkdir()
    for v in ("slt", "kal16", "rms", "awb"):
        for i, text in enumerate(DIGITS):
            subprocess.run(["flite", "-voice", v, "-t", text, "-o", str(src / f"{v}_{i}.wav")], check=True)
    cfg = from_dict(AudioTrainConfig, {"model": {**MEL, "codebook_size": 64, "n_mels": 64, "griffin_lim_iters": 32},
                                       "data": {"source": str(src), "segment_seconds": 0.64}, "steps": 10,
                                       "run_dir": str(tmp_path / "run"), "device": "cpu", "n_examples": 1})  # fmt: skip
    metrics = train_audio_codec(cfg)
    assert metrics["trained"]["mel_distance"] < metrics["init"]["mel_distance"]  # k-means codes beat random ones
    assert [h["level"] for h in metrics["history"]] == [0, 1] and metrics["history"][1]["residual_rms"] < metrics["history"][0]["residual_rms"]
    codec = load_audio_codec(tmp_path / "run" / "audio_codec.pt")
    assert codec.cfg.kind == "mel" and (tmp_path / "run" / "examples" / "0_reconstructed.wav").is_file()
    wav = torch.from_numpy(tone(0.5, 300))[None, None]
    fresh = RVQAudioCodec(cfg.model).eval()
    fresh.load_state_dict(codec.state_dict())
    assert torch.equal(codec.encode(wav), fresh.encode(wav)) and codec.fingerprint == fresh.fingerprint
    items = [{"audio": str(src / f"awb_{i}.wav"), "text": t} for i, t in enumerate(DIGITS)]
    heard = codec_ceiling(codec, items, load_asr(TTSConfig(source="x", asr="pocketsphinx_digits")), tmp_path / "trip", "basic")
    assert heard["recorded"]["n"] == heard["round_trip"]["n"] == len(DIGITS) and 0 <= heard["round_trip"]["value"]
    assert len(list((tmp_path / "trip").glob("*.wav"))) == len(DIGITS)
