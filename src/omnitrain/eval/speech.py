"""Speech sets for WER: real read speech shipped by Debian, flite-synthesised sentences, jsonl
manifests and (online) LibriSpeech from the Hugging Face hub.

Every loader returns ``[{"id", "audio": path to a 16 kHz mono wav, "text": transcript}]``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = ["LIBRIVOX", "FLITE_VOICES", "SENTENCES", "load_librivox", "make_flite_set", "load_speech_set"]

# Debian pocketsphinx-testdata: 5 LibriVox clips of "Sense and Sensibility", 16 kHz, with a
# transcript file of lines "<s> words </s> (utterance-id)".
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
FLITE_VOICES = ("kal16", "slt", "rms", "awb")
SAMPLE_RATE = 16_000
HUB_LIBRISPEECH = "openslr/librispeech_asr"

# Plain, fully spelled-out sentences (no digits or abbreviations, so references need no normaliser).
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "please call me back when you get this message",
    "the weather will be cold and windy this afternoon",
    "she opened the window to let in some fresh air",
    "we need to buy bread milk and eggs on the way home",
    "the train to the city leaves every hour",
    "he forgot his umbrella at the office again",
    "turn left at the next corner and walk two blocks",
    "the children played in the garden until dinner",
    "my brother is learning to play the piano",
    "the meeting has been moved to next tuesday",
    "a cup of hot tea is good on a rainy day",
    "they painted the kitchen a bright shade of yellow",
    "the library closes early on sunday evenings",
    "our team finished the project ahead of schedule",
    "the old bridge was repaired last summer",
    "please speak slowly so that everyone can follow",
    "the doctor told him to get more sleep",
    "she wrote a long letter to her grandmother",
    "the price of fuel went up again this week",
    "there is a small bakery across the street",
    "the cat slept on the warm stone by the fire",
    "we watched the sun go down over the hills",
    "the museum has a new exhibition about ships",
    "he carried the heavy box up the stairs",
    "the river was too deep to cross on foot",
    "my phone battery is almost empty",
    "the students listened carefully to the teacher",
    "a strong wind blew the leaves across the road",
    "the farmer sold fresh apples at the market",
    "i will send you the report in the morning",
    "the plane landed safely despite the storm",
]


def load_librivox(root: Path = LIBRIVOX) -> list[dict]:
    """The five LibriVox clips of Debian's ``pocketsphinx-testdata`` with their transcripts.

    Raises:
        FileNotFoundError: when the package is not installed (with the apt command).
    """
    transcript = root / "transcription"
    if not transcript.is_file():
        raise FileNotFoundError(
            f"{transcript} not found: apt-get install --no-install-recommends pocketsphinx-testdata"
        )
    out = []
    for line in transcript.read_text().splitlines():
        m = re.fullmatch(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\(([^)]+)\)\s*", line)
        if not m:
            continue
        text, uid = m.group(1).strip(), m.group(2)
        out.append({"id": uid, "audio": str(root / f"{uid}.wav"), "text": text})
    return out


def _to_16k_mono(path: Path) -> None:
    """Rewrites a wav as 16 kHz mono PCM-16 in place when it is anything else."""
    audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr == SAMPLE_RATE and audio.shape[1] == 1:
        return
    mono = audio.mean(axis=1)
    if sr != SAMPLE_RATE:
        from scipy.signal import resample_poly  # scipy.signal: ~0.6 s to import, only for audio not at 16 kHz

        g = gcd(sr, SAMPLE_RATE)
        mono = resample_poly(mono, SAMPLE_RATE // g, sr // g).astype(np.float32)
    sf.write(str(path), mono, SAMPLE_RATE, subtype="PCM_16")


def make_flite_set(
    out_dir: Path,
    n: int,
    voices: tuple[str, ...] = FLITE_VOICES,
    seed: int = 0,
    sentences: list[str] | None = None,
) -> list[dict]:
    """Synthesises `n` sentences with flite, cycling over `voices`; writes wavs and ``speech.jsonl``.

    Args:
        out_dir: folder for ``<id>.wav`` files and the ``speech.jsonl`` manifest.
        n: number of utterances (sentences repeat, with other voices, when n exceeds the list).
        voices: flite voice names (``flite -lv`` lists them).
        seed: shuffles the sentence order.
        sentences: the texts; default `SENTENCES`.

    Raises:
        RuntimeError: when the flite binary is missing (with the apt command) or a voice fails.
    """
    flite = shutil.which("flite")
    if flite is None:
        raise RuntimeError("the flite binary is not installed: apt-get install --no-install-recommends flite")
    if n < 1 or not voices:
        raise ValueError(f"make_flite_set needs n >= 1 and at least one voice (got n={n}, voices={voices})")
    texts = list(sentences or SENTENCES)
    random.Random(seed).shuffle(texts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        voice, text = voices[i % len(voices)], texts[i % len(texts)]
        uid = f"flite_{i:04d}_{voice}"
        wav = out_dir / f"{uid}.wav"
        run = subprocess.run([flite, "-voice", voice, "-t", text, "-o", str(wav)], capture_output=True, text=True)
        if run.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"flite -voice {voice} failed: {run.stderr.strip()} (voices: `flite -lv`)")
        _to_16k_mono(wav)
        rows.append({"id": uid, "audio": str(wav), "text": text, "voice": voice})
    with open(out_dir / "speech.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "audio": Path(r["audio"]).name}) + "\n")
    return rows


def jsonl_rows(path: str | Path, needed: tuple[str, ...], what: str = "") -> list[tuple[int, dict]]:
    """``(line number, row)`` of an eval set's jsonl file, blank lines skipped; a missing file, a line that is not a
    JSON object or a row without a ``needed`` key is an error that names the line. ``what``: the config key that named
    the file, for the messages."""
    path = Path(path)
    named = f"{what}={path}" if what else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{named} does not exist: pass a jsonl of {{{', '.join(needed)}, ...}} rows")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not JSON ({e})") from e
            missing = [k for k in needed if not isinstance(r, dict) or k not in r]
            if missing:
                has = sorted(r) if isinstance(r, dict) else type(r).__name__
                raise ValueError(f"{path}:{i}: a row needs {list(needed)}; it lacks {missing} (has {has})")
            rows.append((i, r))
    return rows


def read_manifest(path: str | Path, needed: tuple[str, ...], media_key: str) -> list[dict]:
    """The rows of an eval set's jsonl manifest (:func:`jsonl_rows`), ``media_key`` paths made absolute against the
    file's folder."""
    rows = [r for _, r in jsonl_rows(path, needed)]
    for r in rows:
        media = Path(r[media_key])
        r[media_key] = str(media if media.is_absolute() else Path(path).parent / media)
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = read_manifest(path, ("audio", "text"), "audio")
    for r in rows:
        r.setdefault("id", Path(r["audio"]).stem)
    return rows


def load_speech_set(path_or_name: str, n: int = 20, cache_dir: str | Path | None = None) -> list[dict]:
    """Loads a speech set by name.

    Args:
        path_or_name: ``"librivox"`` (Debian clips); ``"flite:<dir>"`` (``<dir>/speech.jsonl``, made
            with `make_flite_set` and `n` sentences when absent); a jsonl of ``{"audio", "text"}`` rows
            (audio paths relative to the file); or ``"openslr/librispeech_asr"`` / ``".../<config>/<split>"``
            (needs network; default config ``clean``, split ``test``).
        n: utterances for a new flite set; also caps the hub set.
        cache_dir: where hub audio is written as wav (default ``~/.cache/omnitrain/librispeech``).

    Raises:
        FileNotFoundError: for a path that does not exist.
        RuntimeError: when the hub cannot be reached (says which offline sets to use).
    """
    if path_or_name == "librivox":
        return load_librivox()
    if path_or_name.startswith("flite:"):
        folder = Path(path_or_name.removeprefix("flite:"))
        manifest = folder / "speech.jsonl"
        return _read_jsonl(manifest) if manifest.is_file() else make_flite_set(folder, n)
    if path_or_name.startswith(HUB_LIBRISPEECH):
        parts = path_or_name.removeprefix(HUB_LIBRISPEECH).strip("/").split("/")
        config, split = (parts + ["", ""])[:2]
        return _load_librispeech(config or "clean", split or "test", n, cache_dir)
    path = Path(path_or_name)
    if path.is_file():
        return _read_jsonl(path)
    raise FileNotFoundError(
        f"speech set {path_or_name!r} not found: use 'librivox', 'flite:<dir>', a jsonl of "
        f"{{audio, text}} rows, or '{HUB_LIBRISPEECH}' with network access"
    )


def _load_librispeech(config: str, split: str, n: int, cache_dir) -> list[dict]:
    import datasets  # datasets: ~0.5 s to import, only for the hub set

    try:
        ds = datasets.load_dataset(HUB_LIBRISPEECH, config, split=split, streaming=True)
        rows = list(ds.take(n))
    except Exception as e:  # offline: connection and cache-miss errors all mean the same here
        raise RuntimeError(
            f"could not load {HUB_LIBRISPEECH} ({config}/{split}) from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Offline, use 'librivox' (Debian pocketsphinx-testdata), "
            "'flite:<dir>' (synthesised) or a local jsonl of {audio, text}"
        ) from e
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "omnitrain" / "librispeech" / f"{config}-{split}"
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for r in rows:
        wav = cache / f"{r['id']}.wav"
        if not wav.exists():
            sf.write(str(wav), r["audio"]["array"], r["audio"]["sampling_rate"], subtype="PCM_16")
            _to_16k_mono(wav)
        out.append({"id": r["id"], "audio": str(wav), "text": r["text"].lower()})
    return out
