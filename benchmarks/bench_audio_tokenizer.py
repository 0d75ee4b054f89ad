"""Audio codec benchmark: train a codec on real speech, then compare it with a same-bit-rate baseline.

    python benchmarks/run_all.py audio            # ~5 min on one CPU thread
    python benchmarks/run_all.py audio --quick    # ~1 min smoke run

Data: 80 flite utterances (20 Harvard sentences x 4 voices) plus the 5 LibriVox clips of
pocketsphinx-testdata (real read speech); whole files are held out (25 %).

Baseline at the codec's bit rate R = frame_rate * K * log2(N): the waveform low-passed and
decimated to R / b samples per second (scipy resample_poly, its FIR is the low-pass), each sample
mu-law quantised to b bits with the clip's peak as free side information, then upsampled back. The
baseline gets its best b in 2..8 on the held-out set (an oracle choice in its favour).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _table import print_rows, torch_threads  # benchmarks/ is on sys.path when these run

from omnitrain.config import from_dict
from omnitrain.tokenizer.audio import load_audio_codec
from omnitrain.tokenizer.audio_io import resample
from omnitrain.tokenizer.audio_train import (
    AudioTrainConfig,
    load_clips,
    reconstruction_metrics,
    train_audio_codec,
)

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
HARVARD = [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.", "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.", "The girl at the booth sold fifty bonds.",
]


def build_corpus(out: Path, n_sentences: int) -> Path:
    if shutil.which("flite") is None:
        raise ValueError("the audio benchmark needs Debian flite: apt-get install flite")
    out.mkdir(parents=True, exist_ok=True)
    for v in ("slt", "kal16", "rms", "awb"):
        for i, text in enumerate(HARVARD[:n_sentences]):
            subprocess.run(["flite", "-voice", v, "-t", text, "-o", str(out / f"{v}_{i:02d}.wav")], check=True)
    for f in sorted(LIBRIVOX.glob("*.wav")):
        shutil.copy(f, out / f.name)
    return out


def mu_law_baseline(clip: np.ndarray, rate: int, bits_per_second: float, bits: int) -> np.ndarray:
    """Low-pass + decimate to bits_per_second / bits Hz, mu-law quantise to `bits` bits, upsample back."""
    low_rate = int(bits_per_second // bits)
    peak = float(np.abs(clip).max()) + 1e-8
    low = np.clip(resample(clip, rate, low_rate) / peak, -1, 1)
    mu = 255.0
    comp = np.sign(low) * np.log1p(mu * np.abs(low)) / np.log1p(mu)  # [-1, 1] -> [-1, 1] companded
    levels = 2**bits - 1
    q = np.round((comp + 1) / 2 * levels) / levels * 2 - 1  # uniform quantisation with 2**bits levels
    expanded = np.sign(q) * ((1 + mu) ** np.abs(q) - 1) / mu * peak
    return resample(expanded.astype(np.float32), low_rate, rate)[: len(clip)]


def encode_throughput(codec: torch.nn.Module, clips: list[np.ndarray], rate: int, batch: int = 16) -> float:
    """Seconds of audio encoded per second, on 2-second crops in batches of `batch`."""
    audio = np.concatenate(clips)
    n = 2 * rate
    crops = torch.from_numpy(audio[: len(audio) // n * n].reshape(-1, 1, n))  # [S] -> [B, 1, 2 s]
    codec.encode(crops[:2])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(crops), batch):
        codec.encode(crops[i : i + batch])
    return crops.numel() / rate / (time.perf_counter() - t0)


def run(quick: bool) -> list[dict]:
    with torch_threads(1):  # shared 2-core machines: a 2nd OpenMP thread next to a busy neighbour stalls 3-5x
        return _run(quick)


def _run(quick: bool) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="bench_audio_"))
    data = build_corpus(work / "speech", 5 if quick else 20)
    model = {"channels": 16 if quick else 32, "strides": [4, 5, 8], "latent_dim": 64, "n_levels": 4, "codebook_size": 128}
    cfg = from_dict(AudioTrainConfig, {
        "model": model,
        "data": {"source": str(data), "segment_seconds": 0.5, "held_out_fraction": 0.25},
        "optim": {"lr": 0.002},
        "steps": 80 if quick else 500,
        "batch_size": 8,
        "run_dir": str(work / "run"),
        "device": "cpu",
    })
    m = train_audio_codec(cfg)
    rate, bps = cfg.model.sample_rate, cfg.model.bits_per_second
    _, eval_clips, _ = load_clips(cfg.data, rate, cfg.seed)  # the same held-out split as training used
    refs = [torch.from_numpy(c) for c in eval_clips]
    base = {}
    for bits in range(2, 9):
        outs = [torch.from_numpy(mu_law_baseline(c, rate, bps, bits)) for c in eval_clips]
        base[bits] = reconstruction_metrics(refs, outs, rate)
    best = max(base, key=lambda b: base[b]["si_snr_db"])
    codec = load_audio_codec(work / "run" / "audio_codec.pt")
    speed = encode_throughput(codec, eval_clips, rate)
    tr, init = m["trained"], m["init"]
    note = (f"{bps:.0f} bit/s; {m['steps']} steps, {m['train_audio_seconds']:.0f} s train / "
            f"{m['eval_audio_seconds']:.0f} s held-out speech; baseline {int(bps // best)} Hz x {best}-bit mu-law")
    rows = [
        {"metric": "held-out SI-SNR (dB)", "value": tr["si_snr_db"], "unit": "dB", "baseline": base[best]["si_snr_db"], "note": note},
        {"metric": "held-out SI-SNR at init (dB)", "value": init["si_snr_db"], "unit": "dB", "baseline": None, "note": "untrained codec"},
        {"metric": "held-out mel distance", "value": tr["mel_distance"], "unit": "L1 log-mel", "baseline": base[best]["mel_distance"], "note": note},
        {"metric": "held-out mel distance at init", "value": init["mel_distance"], "unit": "L1 log-mel", "baseline": None, "note": "untrained codec"},
        {"metric": "codebook usage (mean of levels)", "value": float(np.mean(tr["usage"])), "unit": "fraction", "baseline": None,
         "note": "per level " + ", ".join(f"{u:.2f}" for u in tr["usage"])},
        {"metric": "codebook perplexity (mean of levels)", "value": float(np.mean(tr["perplexity"])), "unit": "codes", "baseline": None,
         "note": f"of {cfg.model.codebook_size}"},
        {"metric": "encode throughput", "value": speed, "unit": "s audio / s", "baseline": None, "note": "1 CPU thread, batch 16 x 2 s"},
        {"metric": "train time", "value": m["train_seconds"], "unit": "s", "baseline": None, "note": f"{m['steps']} steps"},
    ]
    print_rows(rows, "codec")
    print("baseline by bits/sample: " + ", ".join(f"{b}: {v['si_snr_db']:.1f} dB / mel {v['mel_distance']:.2f}" for b, v in base.items()))
    shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    run(quick=True)
