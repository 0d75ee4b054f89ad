"""Is the audio codec's speech still intelligible? The conv and the mel codec at the demo's rate, side by side.

    python benchmarks/run_all.py codec_intelligibility      # ~2 min on one CPU thread
    python benchmarks/bench_codec_intelligibility.py        # the quick size, printed only

What the speech-output evals (``tts``, ``s2s``) can score is bounded by what the ASR hears in the codec's round trip
of real speech (``omnitrain.eval.speech_output.codec_ceiling``). Both codecs get the demo's configuration
(``recipes/demo.yaml`` over ``recipes/tokenizer_audio.yaml``: 25 frames/s, K = 2 levels of 128 codes, 350 bit/s) and
the same training audio: flite digit strings and Harvard sentences in 4 voices. ``conv`` trains its network for the
demo's 400 steps (``kind=conv``), ``mel`` fits its codebooks by k-means in 25 Lloyd rounds (``kind=mel``).

Held out: digit strings none of the training audio says, in the same 4 voices. Figures per codec: pocketsphinx
(restricted to the ten digit words, as the demo's speech rows are scored) WER on the round trips, beside its WER on the
recordings themselves; held-out mel distance and SI-SNR (``audio_train.evaluate_codec``); fit time; decode throughput.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_audio_tokenizer import HARVARD  # noqa: E402 (benchmarks/ imports as scripts do)

VOICES = ("slt", "kal16", "rms", "awb")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DEMO_CODEC = {"strides": [2, 4, 5, 8, 2], "n_levels": 2, "codebook_size": 128}  # recipes/demo.yaml's audio.model
KINDS = {"conv": ({}, 400), "mel": ({"kind": "mel"}, 25)}  # model changes, steps (the demo's)


def say(text: str, voice: str, path: Path) -> Path:
    subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(path)], check=True)
    return path


def corpus(work: Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, list[dict]]:
    """Training audio (digit strings + sentences, 4 voices) in ``work/train``; held-out digit strings, items."""
    if shutil.which("flite") is None:
        raise ValueError("the codec benchmark needs Debian flite: apt-get install flite")
    rng = np.random.default_rng(seed)
    strings = list(dict.fromkeys("".join(map(str, rng.integers(0, 10, 3))) for _ in range(4 * (n_train + n_test))))
    train, test = strings[:n_train], strings[n_train : n_train + n_test]
    (work / "train").mkdir(parents=True)
    (work / "test").mkdir()
    for i, s in enumerate(train):
        say(" ".join(DIGITS[int(c)] for c in s), VOICES[i % 4], work / "train" / f"d{i:03d}.wav")
    for i, text in enumerate(HARVARD):
        say(text, VOICES[i % 4], work / "train" / f"s{i:03d}.wav")
    items = []
    for i, s in enumerate(test):
        text = " ".join(DIGITS[int(c)] for c in s)
        items.append({"audio": str(say(text, VOICES[i % 4], work / "test" / f"{i:03d}.wav")), "text": text})
    return work / "train", items


def decode_throughput(codec: torch.nn.Module, seconds: float = 10.0) -> float:
    """Seconds of audio decoded per second (random codes, one batch of ``seconds``)."""
    codes = torch.randint(0, codec.codebook_size, (1, int(seconds * codec.frame_rate), codec.n_levels))
    codec.decode(codes[:, :5])  # warm-up
    t0 = time.perf_counter()
    codec.decode(codes)
    return seconds / (time.perf_counter() - t0)


def run(quick: bool = False) -> list[dict]:
    from _table import torch_threads

    with torch_threads(1):  # as the demo's codec stage (tokenizer_threads=1)
        return _run(quick)


def _run(quick: bool) -> list[dict]:
    from _table import print_rows

    from omnitrain.config import from_dict
    from omnitrain.eval.speech_output import TTSConfig, codec_ceiling, load_asr
    from omnitrain.tokenizer.audio import load_audio_codec
    from omnitrain.tokenizer.audio_train import AudioTrainConfig, load_clips, train_audio_codec

    work = Path(tempfile.mkdtemp(prefix="bench_codec_"))
    try:
        train_dir, items = corpus(work, 40 if quick else 120, 12 if quick else 40)
        asr = load_asr(TTSConfig(source="x", asr="pocketsphinx_digits"))
        out, heard_recorded = {}, None
        for kind, (changes, steps) in KINDS.items():
            cfg = from_dict(AudioTrainConfig, {"model": {**DEMO_CODEC, **changes}, "steps": steps // 4 if quick else steps,
                                               "data": {"source": str(train_dir), "segment_seconds": 0.64, "held_out_fraction": 0.1},
                                               "run_dir": str(work / kind), "device": "cpu", "n_examples": 0})  # fmt: skip
            m = train_audio_codec(cfg)
            codec = load_audio_codec(work / kind / "audio_codec.pt")
            heard = codec_ceiling(codec, items, asr, work / kind / "trips", normalizer="basic")
            heard_recorded = heard["recorded"]
            out[kind] = {"wer": heard["round_trip"], "metrics": m["trained"], "seconds": m["train_seconds"], "steps": cfg.steps,
                         "decode": decode_throughput(codec), "bps": cfg.model.bits_per_second}  # fmt: skip
        _, clips, _ = load_clips(cfg.data, cfg.model.sample_rate, cfg.seed)
        held = sum(len(c) for c in clips) / cfg.model.sample_rate
    finally:
        shutil.rmtree(work, ignore_errors=True)
    note = (f"demo codec config: 25 frames/s, K=2 x 128 codes ({out['mel']['bps']:.0f} bit/s); {len(items)} held-out digit "
            f"strings in 4 flite voices; pocketsphinx on the digit words; 1 torch thread")  # fmt: skip
    rows = [{"metric": "recordings: WER heard", "value": heard_recorded["value"], "unit": "WER", "baseline": None,
             "note": note + f"; stderr {heard_recorded['stderr']:.3f}"}]  # fmt: skip
    for kind, r in out.items():
        fit = f"{r['steps']} {'Lloyd rounds' if kind == 'mel' else 'training steps'}"
        rows += [
            {"metric": f"{kind}: round trip WER heard", "value": r["wer"]["value"], "unit": "WER", "baseline": heard_recorded["value"],
             "note": f"stderr {r['wer']['stderr']:.3f}; baseline: the recordings"},
            {"metric": f"{kind}: held-out mel distance", "value": r["metrics"]["mel_distance"], "unit": "L1 log-mel", "baseline": None,
             "note": f"{held:.0f} s of held-out training-kind audio"},
            {"metric": f"{kind}: held-out SI-SNR", "value": r["metrics"]["si_snr_db"], "unit": "dB", "baseline": None, "note": ""},
            {"metric": f"{kind}: fit time", "value": r["seconds"], "unit": "s", "baseline": None, "note": fit},
            {"metric": f"{kind}: decode throughput", "value": r["decode"], "unit": "audio-s/s", "baseline": None,
             "note": "10 s of random codes, one call" + ("; 48 Griffin-Lim rounds" if kind == "mel" else "")},
        ]  # fmt: skip
    print_rows(rows, notes=True)
    return rows


if __name__ == "__main__":
    run(quick=True)
