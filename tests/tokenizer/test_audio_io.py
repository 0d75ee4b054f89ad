"""Audio reading/writing: formats, channel policy, exact-ratio resampling, corrupt files, HF columns."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omnitrain.tokenizer.audio_io import list_audio_files, read_audio, read_hf_audio, resample, write_wav

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wav: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / rate)[spec.argmax()])


@pytest.mark.parametrize("ext", ["wav", "flac", "mp3"])
def test_formats_read_back(tmp_path: Path, ext: str) -> None:
    x = tone(440, 16000)
    sf.write(str(tmp_path / f"a.{ext}"), x, 16000)
    y = read_audio(tmp_path / f"a.{ext}", 16000)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - len(x)) < 0.1 * len(x)  # mp3 adds encoder padding
    assert abs(peak_hz(y, 16000) - 440) < 3


def test_resample_441_to_16k_keeps_frequency_and_duration(tmp_path: Path) -> None:
    sf.write(str(tmp_path / "cd.wav"), tone(1000, 44100, 2.0), 44100)
    y = read_audio(tmp_path / "cd.wav", 16000)
    assert len(y) == 32000  # 2 s at 16 kHz exactly: ratio 160/441
    assert abs(peak_hz(y, 16000) - 1000) < 2
    assert abs(np.sqrt(np.mean(y[1000:-1000] ** 2)) - 0.5 / np.sqrt(2)) < 0.01  # amplitude kept


def test_resample_removes_content_above_new_nyquist() -> None:
    y = resample(tone(12000, 44100) + tone(500, 44100), 44100, 16000)  # 12 kHz cannot exist at 16 kHz
    spec = np.abs(np.fft.rfft(y))
    freqs = np.fft.rfftfreq(len(y), 1 / 16000)
    assert spec[np.abs(freqs - 4000) < 50].max() < 0.01 * spec.max()  # no alias at 16000 - 12000 = 4 kHz


def test_stereo_downmix_or_error(tmp_path: Path) -> None:
    left, right = tone(300, 16000), tone(300, 16000, amp=0.1)
    sf.write(str(tmp_path / "st.wav"), np.stack([left, right], axis=1), 16000)
    mono = read_audio(tmp_path / "st.wav", 16000, channels="downmix")
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-3)
    with pytest.raises(ValueError, match=r"st\.wav.*2 channels.*data\.channels=downmix"):
        read_audio(tmp_path / "st.wav", 16000, channels="error")


def test_resample_policy_and_unusual_rates(tmp_path: Path) -> None:
    sf.write(str(tmp_path / "a.wav"), tone(200, 22050), 22050)
    with pytest.raises(ValueError, match=r"a\.wav.*22050 Hz.*data\.resample=true"):
        read_audio(tmp_path / "a.wav", 16000, resample_ok=False)
    sf.write(str(tmp_path / "low.wav"), tone(100, 2000), 2000)
    with pytest.raises(ValueError, match=r"low\.wav.*unusual sample rate 2000"):
        read_audio(tmp_path / "low.wav", 16000)
    sf.write(str(tmp_path / "tel.wav"), tone(100, 8000), 8000)
    assert len(read_audio(tmp_path / "tel.wav", 16000, min_rate=8000)) == 16000
    with pytest.raises(ValueError, match=r"tel\.wav.*min_sample_rate"):
        read_audio(tmp_path / "tel.wav", 16000, min_rate=16000)


def test_corrupt_empty_and_missing_files_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    with pytest.raises(ValueError, match=r"junk\.wav.*cannot be decoded.*on_error=skip"):
        read_audio(tmp_path / "junk.wav", 16000)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match=r"empty\.wav.*no audio samples"):
        read_audio(tmp_path / "empty.wav", 16000)
    with pytest.raises(ValueError, match=r"nope\.wav.*no such audio file"):
        read_audio(tmp_path / "nope.wav", 16000)


def test_hf_column_values() -> None:
    x = tone(440, 24000)
    y = read_hf_audio({"array": x, "sampling_rate": 24000, "path": None}, 16000)
    assert len(y) == 16000 and abs(peak_hz(y, 16000) - 440) < 3
    stereo = np.stack([x, x])  # HF decoders give channel-first [C, S]
    assert read_hf_audio({"array": stereo, "sampling_rate": 24000}, 24000).shape == (24000,)
    buf = io.BytesIO()
    sf.write(buf, x, 24000, format="WAV")
    assert len(read_hf_audio({"bytes": buf.getvalue(), "path": "x.wav"}, 24000)) == 24000
    with pytest.raises(ValueError, match=r"bad\.flac.*cannot be decoded"):
        read_hf_audio({"bytes": b"garbage" * 20, "path": "bad.flac"}, 16000)
    with pytest.raises(ValueError, match=r"row 7.*none of 'array', 'bytes' or 'path'"):
        read_hf_audio({"foo": 1}, 16000, where="row 7")


def test_write_wav_round_trip_and_listing(tmp_path: Path) -> None:
    x = tone(440, 16000)
    path = write_wav(tmp_path / "sub" / "o.wav", x[None, None], 16000)
    assert sf.info(str(path)).subtype == "PCM_16"
    np.testing.assert_allclose(read_audio(path, 16000), x, atol=1e-4)
    assert list_audio_files(tmp_path) == [path]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audio files"):
        list_audio_files(tmp_path / "empty")


@pytest.mark.skipif(not LIBRIVOX.is_dir(), reason="Debian package pocketsphinx-testdata is not installed")
def test_reads_real_librivox_speech() -> None:
    files = list_audio_files(LIBRIVOX)
    assert len(files) == 5
    wav = read_audio(files[0], 24000)  # 16 kHz source resampled up to a 24 kHz codec
    assert len(wav) == round(sf.info(str(files[0])).frames * 1.5)
    assert 0.01 < float(np.sqrt(np.mean(wav**2))) < 0.5
