"""Reading and writing audio for the codec: files (wav/flac/mp3/ogg via libsndfile) and Hugging Face columns.

Every reader returns a mono float32 numpy array at the requested rate, in [-1, 1] for integer
PCM sources. What to do with stereo input and with rates other than the codec's is the caller's
choice (``channels="downmix" | "error"``, ``resample=True | False``); every problem a user can
cause is a ``ValueError`` that names the file, the problem and what to do about it.

Resampling uses :func:`scipy.signal.resample_poly` with the exact rational ratio target/source
(44100 -> 16000 is up 160, down 441), whose polyphase FIR filter is also the anti-aliasing
low-pass.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif")
MIN_SAMPLE_RATE = 4000  # below this a "speech" file is almost certainly mislabelled or broken
MAX_SAMPLE_RATE = 384000

Channels = Literal["downmix", "error"]


def resample(wav: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample a 1-D (or [..., S]) float array by the exact ratio target/source."""
    if source_rate == target_rate:
        return wav
    ratio = Fraction(int(target_rate), int(source_rate))  # reduced, e.g. 16000/44100 -> 160/441
    out = resample_poly(wav, ratio.numerator, ratio.denominator, axis=-1)
    return out.astype(np.float32, copy=False)


def to_mono(wav: np.ndarray, channels: Channels, where: str) -> np.ndarray:
    """[S] or [S, C] (soundfile's frame-major layout) -> [S]; stereo is averaged or refused."""
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise ValueError(f"{where}: expected audio shaped [samples] or [samples, channels], got {wav.shape}")
    if wav.shape[1] == 1:
        return wav[:, 0]
    if channels == "error":
        raise ValueError(
            f"{where}: has {wav.shape[1]} channels but the codec is mono; set data.channels=downmix to average "
            "them, or convert the file first (e.g. `sox in.wav -c 1 out.wav`)"
        )
    return wav.mean(axis=1)


def _check_and_convert(
    wav: np.ndarray, rate: int, where: str, target_rate: int, channels: Channels, resample_ok: bool, min_rate: int
) -> np.ndarray:
    """Shared checks for decoded audio from any source; returns mono float32 at target_rate."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE or rate < min_rate:
        raise ValueError(
            f"{where}: unusual sample rate {rate} Hz (accepted: {max(min_rate, MIN_SAMPLE_RATE)}-{MAX_SAMPLE_RATE} Hz); "
            "check the file's header, or lower data.min_sample_rate if low-rate audio is intended "
            "(upsampling cannot restore the missing band)"
        )
    wav = to_mono(np.asarray(wav, dtype=np.float32), channels, where)
    if wav.size == 0:
        raise ValueError(f"{where}: contains no audio samples; remove it from the data source")
    if not np.isfinite(wav).all():
        raise ValueError(f"{where}: contains NaN or infinite samples; re-export the audio")
    if rate != target_rate:
        if not resample_ok:
            raise ValueError(
                f"{where}: sample rate {rate} Hz differs from the codec's {target_rate} Hz; set data.resample=true "
                f"to convert on the fly, or convert the file first (e.g. `sox in.wav -r {target_rate} out.wav`)"
            )
        wav = resample(wav, rate, target_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


def read_audio(
    path: str | Path,
    target_rate: int,
    channels: Channels = "downmix",
    resample_ok: bool = True,
    min_rate: int = MIN_SAMPLE_RATE,
) -> np.ndarray:
    """Read one audio file -> mono float32 [S] at ``target_rate``.

    Raises:
        ValueError: naming the file when it is missing, unreadable/corrupt, empty, has an unusual
            sample rate, or breaks the channel/resample policy.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such audio file; fix the path in the data source")
    try:
        wav, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(
            f"{path}: cannot be decoded as audio ({e}); the file is corrupt or not in a format libsndfile reads "
            f"({', '.join(AUDIO_EXTENSIONS)}); re-encode it or set data.on_error=skip"
        ) from e
    return _check_and_convert(wav, rate, str(path), target_rate, channels, resample_ok, min_rate)


def read_hf_audio(
    value: Any,
    target_rate: int,
    channels: Channels = "downmix",
    resample_ok: bool = True,
    min_rate: int = MIN_SAMPLE_RATE,
    where: str = "dataset row",
) -> np.ndarray:
    """Read one value of a Hugging Face ``Audio`` column -> mono float32 [S] at ``target_rate``.

    Accepts a decoded dict ``{"array", "sampling_rate"}`` (arrays are [S] or channel-first [C, S]),
    an undecoded dict ``{"bytes", "path"}`` (``Audio(decode=False)``), or a plain path string.
    """
    if isinstance(value, (str, Path)):
        return read_audio(value, target_rate, channels, resample_ok, min_rate)
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an audio dict or a path, got {type(value).__name__}; check data.hf_audio_column")
    if value.get("array") is not None:
        if "sampling_rate" not in value:
            raise ValueError(f"{where}: audio dict has 'array' but no 'sampling_rate'; add it to the dataset")
        arr = np.asarray(value["array"], dtype=np.float32)
        arr = arr.T if arr.ndim == 2 else arr  # HF decoders give channel-first [C, S]; to_mono wants [S, C]
        return _check_and_convert(arr, int(value["sampling_rate"]), where, target_rate, channels, resample_ok, min_rate)
    name = value.get("path") or where
    if value.get("bytes"):
        try:
            wav, rate = sf.read(io.BytesIO(value["bytes"]), dtype="float32", always_2d=False)
        except (sf.LibsndfileError, RuntimeError, TypeError) as e:
            raise ValueError(f"{name}: audio bytes cannot be decoded ({e}); re-encode it or set data.on_error=skip") from e
        return _check_and_convert(wav, rate, str(name), target_rate, channels, resample_ok, min_rate)
    if value.get("path"):
        return read_audio(value["path"], target_rate, channels, resample_ok, min_rate)
    raise ValueError(f"{where}: audio dict has none of 'array', 'bytes' or 'path'; check data.hf_audio_column")


def write_wav(path: str | Path, wav: torch.Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write mono audio ([S], [1, S] or [1, 1, S]) as 16-bit PCM WAV, clipping to [-1, 1]."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().float().cpu().numpy()
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)  # [1, 1, S] / [1, S] -> [S]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wav, -1.0, 1.0), int(sample_rate), subtype="PCM_16")
    return path


def list_audio_files(folder: str | Path) -> list[Path]:
    """All audio files under ``folder`` (recursive), sorted so runs are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory; set data.source to a folder of audio files")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found; check data.source")
    return files
