"""The RVQ audio codec: shapes, determinism, checkpoints, configs, data sources, and real training on speech."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omnitrain.config import ConfigError, from_dict
from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec, load_audio_codec
from omnitrain.tokenizer.audio_train import (
    AudioDataConfig,
    AudioTrainConfig,
    load_clips,
    mel_filterbank,
    si_snr,
    train_audio_codec,
)
from omnitrain.tokenizer.base import AudioTokenizer

SENTENCES = [
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
]
VOICES = ["slt", "kal16", "rms", "awb"]
TINY = {"channels": 16, "strides": [4, 5, 8], "latent_dim": 32, "n_levels": 4, "codebook_size": 64}


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real synthesised utterances (10 sentences x 4 flite voices), ~2.5 min of 16 kHz speech."""
    if shutil.which("flite") is None:
        pytest.skip("Debian package flite is not installed (apt-get install flite)")
    out = tmp_path_factory.mktemp("flite")
    for v in VOICES:
        for i, text in enumerate(SENTENCES):
            subprocess.run(["flite", "-voice", v, "-t", text, "-o", str(out / f"{v}_{i:02d}.wav")], check=True)
    return out


def tiny_cfg(source: Path, run_dir: Path, **over: object) -> AudioTrainConfig:
    raw = {"model": TINY, "data": {"source": str(source), "segment_seconds": 0.5}, "steps": 150, "batch_size": 8,
           "run_dir": str(run_dir), "device": "cpu", "optim": {"lr": 0.002}}
    raw.update(over)
    return from_dict(AudioTrainConfig, raw)


@pytest.fixture(scope="module")
def trained(speech_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    run_dir = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared: 2 OpenMP threads next to a busy neighbour stall badly
    try:
        return train_audio_codec(tiny_cfg(speech_dir, run_dir)), run_dir
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_beats_initialisation_on_held_out_speech(trained: tuple[dict, Path]) -> None:
    m, _ = trained
    init, final = m["init"], m["trained"]
    assert m["n_eval_clips"] == 8 and m["eval_audio_seconds"] > 20
    assert final["si_snr_db"] > init["si_snr_db"] + 30, (init, final)
    assert final["si_snr_db"] > -3.0, final  # near 0 dB at ~2.4 kbit/s after 150 steps; init is ~ -60 dB
    assert final["mel_distance"] < 0.65 * init["mel_distance"], (init, final)
    assert min(final["usage"]) >= 0.6, final["usage"]  # most of every level's 64 codes in use
    assert min(final["perplexity"]) > 20, final["perplexity"]


@pytest.mark.slow
def test_run_dir_holds_checkpoint_config_metrics_and_examples(trained: tuple[dict, Path]) -> None:
    m, run_dir = trained
    assert json.loads((run_dir / "metrics.json").read_text())["trained"] == m["trained"]
    assert json.loads((run_dir / "config.json").read_text())["model"]["codebook_size"] == 64
    assert (run_dir / "errors.jsonl").read_text() == ""
    wavs = sorted((run_dir / "examples").glob("*.wav"))
    assert len(wavs) == 6 and all(sf.info(str(w)).samplerate == 16000 for w in wavs)


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_codes(trained: tuple[dict, Path], speech_dir: Path) -> None:
    m, run_dir = trained
    codec = load_audio_codec(run_dir / "audio_codec.pt", device="cpu")
    assert codec.fingerprint == m["fingerprint"]
    wav = torch.from_numpy(sf.read(str(speech_dir / "slt_00.wav"), dtype="float32")[0])[None, None]
    codes = codec.encode(wav)
    again = load_audio_codec(run_dir / "audio_codec.pt").encode(wav)
    assert torch.equal(codes, again)
    assert len(torch.unique(codes[0, :, 0])) > 10  # a trained codec does not emit one code
    with torch.no_grad():
        codec.decoder[0].bias.add_(1e-3)
    assert codec.fingerprint != m["fingerprint"]  # the fingerprint sees the weights


# ------------------------------------------------------------------------------- model basics


def test_encode_decode_shapes_protocol_and_determinism() -> None:
    torch.manual_seed(0)
    codec = RVQAudioCodec(AudioCodecConfig(**TINY)).eval()
    assert isinstance(codec, AudioTokenizer)
    assert (codec.frame_rate, codec.n_levels, codec.codebook_size, codec.sample_rate) == (100.0, 4, 64, 16000)
    wavs = 0.1 * torch.randn(3, 1, 4000)  # 4000 = 25 frames of 160
    codes = codec.encode(wavs)
    assert codes.shape == (3, 25, 4) and codes.dtype == torch.int64
    assert torch.equal(codes, codec.encode(wavs))
    assert torch.equal(codes[1:2], codec.encode(wavs[1:2]))  # batching does not change a row's codes
    assert codec.encode(wavs[..., :3900]).shape == (3, 25, 4)  # partial last frame is padded
    assert codec.decode(codes).shape == (3, 1, 4000)


def test_24khz_variant_trains_through_the_quantizer() -> None:
    cfg = AudioCodecConfig(sample_rate=24000, channels=8, strides=[2, 4, 5, 6], latent_dim=16, n_levels=3,
                           codebook_size=16, weight_norm=False, quantizer_dropout=1.0)
    codec = RVQAudioCodec(cfg).train()
    assert codec.frame_rate == 100.0 and codec.hop == 240
    before = codec.quantizer.levels[0].embed.clone()
    y, codes, commit = codec(0.1 * torch.randn(4, 1, 2400))
    assert y.shape == (4, 1, 2400) and codes.shape == (4, 10, 3) and torch.isfinite(commit)
    assert not torch.equal(before, codec.quantizer.levels[0].embed)  # EMA/initialisation happened in training
    (y.pow(2).mean() + commit).backward()
    first = codec.encoder[0].weight.grad
    assert first is not None and first.abs().sum() > 0  # straight-through: the decoder's gradient reaches the encoder


def test_user_errors_are_value_errors(tmp_path: Path) -> None:
    codec = RVQAudioCodec(AudioCodecConfig(**TINY))
    with pytest.raises(ValueError, match="codec.eval"):
        codec.encode(torch.zeros(1, 1, 1600))
    codec.eval()
    with pytest.raises(ValueError, match=r"\[B, 1, S\]"):
        codec.encode(torch.zeros(2, 1600))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        codec.decode(torch.full((1, 5, 4), 64))
    codec.save(tmp_path / "c.pt")
    blob = torch.load(tmp_path / "c.pt", weights_only=True)
    blob["schema_version"] = 99
    torch.save(blob, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="schema_version 99"):
        load_audio_codec(tmp_path / "future.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_audio_codec(tmp_path / "missing.pt")


def test_config_errors_via_from_dict() -> None:
    with pytest.raises(ConfigError, match=r"model\.sample_rate=22050.*16000, 24000"):
        from_dict(AudioTrainConfig, {"model": {"sample_rate": 22050}})
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.codebook_sz'.*codebook_size"):
        from_dict(AudioTrainConfig, {"model": {"codebook_sz": 8}})
    with pytest.raises(ConfigError, match=r"data\.channels='stereo'.*'downmix', 'error'"):
        from_dict(AudioTrainConfig, {"data": {"channels": "stereo"}})
    with pytest.raises(ConfigError, match=r"data\.on_error='ignore'"):
        from_dict(AudioTrainConfig, {"data": {"on_error": "ignore"}})
    with pytest.raises(ConfigError, match="not divisible by hop 3"):
        from_dict(AudioTrainConfig, {"model": {"strides": [3]}})
    with pytest.raises(ConfigError, match="held_out_fraction"):
        from_dict(AudioTrainConfig, {"data": {"held_out_fraction": 1.5}})
    with pytest.raises(ConfigError, match="segment_seconds=0.01"):
        from_dict(AudioTrainConfig, {"data": {"segment_seconds": 0.01}})
    assert from_dict(AudioTrainConfig, {"model": {"sample_rate": 24000, "strides": [3, 4, 5, 8]}}).model.frame_rate == 50


def test_metric_helpers() -> None:
    x = torch.randn(16000)
    assert si_snr(x, 3 * x) > 60  # scale-invariant
    assert abs(float(si_snr(x, x + 0.1 * torch.randn(16000))) - 20) < 1
    fb = mel_filterbank(16000, 1024, 64)
    assert fb.shape == (64, 513) and float(fb.sum(0)[1:-1].min()) > 0  # every inner bin is covered


# ---------------------------------------------------------------------------------- data sources


def test_corrupt_file_raises_with_its_name_or_is_skipped_and_logged(speech_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for f in sorted(speech_dir.glob("slt_0[0-3].wav")):
        shutil.copy(f, data / f.name)
    (data / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 8)
    with pytest.raises(ValueError, match=r"broken\.wav.*cannot be decoded"):
        train_audio_codec(tiny_cfg(data, tmp_path / "r1", steps=0))
    m = train_audio_codec(tiny_cfg(data, tmp_path / "r2", steps=0, data={"source": str(data), "on_error": "skip"}))
    assert m["skipped_files"] == 1 and m["n_train_clips"] + m["n_eval_clips"] == 4
    logged = [json.loads(line) for line in (tmp_path / "r2" / "errors.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["source"].endswith("broken.wav") and "cannot be decoded" in logged[0]["error"]


def test_stereo_policy_applies_during_training_data_load(speech_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "st"
    data.mkdir()
    for f in sorted(speech_dir.glob("rms_0[0-2].wav")):
        wav, rate = sf.read(str(f), dtype="float32")
        sf.write(str(data / f.name), np.stack([wav, 0.5 * wav], 1), 44100 if f.name.endswith("0.wav") else rate)
    train, held, _ = load_clips(AudioDataConfig(source=str(data)), 16000, seed=0)
    assert len(train) + len(held) == 3
    with pytest.raises(ValueError, match="2 channels"):
        load_clips(AudioDataConfig(source=str(data), channels="error"), 16000, seed=0)


def test_jsonl_and_hugging_face_sources(speech_dir: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    files = sorted(speech_dir.glob("awb_*.wav"))[:5]
    lines = [json.dumps({"path": str(f)}) for f in files[:3]] + [json.dumps(str(files[3]))]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    train, held, _ = load_clips(AudioDataConfig(source=str(tmp_path / "list.jsonl")), 16000, seed=0)
    assert len(train) + len(held) == 4 and len(held) == 1
    # an Audio() feature (stored as encoded bytes), read back without torchcodec
    ds = datasets.Dataset.from_dict({"audio": [str(f) for f in files]}).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "hf"))
    train, held, _ = load_clips(AudioDataConfig(source=str(tmp_path / "hf")), 24000, seed=0)
    assert len(train) + len(held) == 5
    n_frames = sorted(sf.info(str(f)).frames * 3 // 2 for f in files)  # 16 -> 24 kHz
    assert sorted(len(c) for c in train + held) == n_frames
    # plain {"array", "sampling_rate"} structs
    rows = {"audio": [{"array": sf.read(str(f), dtype="float32")[0], "sampling_rate": 16000} for f in files[:2]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf2"))
    train, held, _ = load_clips(AudioDataConfig(source=str(tmp_path / "hf2")), 16000, seed=0)
    assert len(train) == len(held) == 1
    with pytest.raises(ValueError, match="hf_audio_column='speech'"):
        load_clips(AudioDataConfig(source=str(tmp_path / "hf"), hf_audio_column="speech"), 16000, seed=0)
