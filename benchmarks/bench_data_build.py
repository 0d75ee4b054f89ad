"""Shard building throughput (samples/s, tokens/s per modality) with 1 and 2 workers, side by side.

The source mixes the real material shipped here: scikit-image photos (image captioning) and
LibriVox read speech (ASR), encoded by default-size image and audio tokenizers (randomly
initialised: encoding costs the same as with trained weights). Medians of several repeats.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _table import print_rows  # benchmarks/ is on sys.path when these run


def _make_sources(tmp: Path, n_images: int, n_audio: int) -> tuple[dict, dict]:
    import numpy as np
    from PIL import Image

    skdata = Path(__import__("skimage").__file__).parent / "data"
    photos = [Image.open(skdata / f"{n}.png").convert("RGB") for n in ("astronaut", "coffee", "chelsea", "horse", "camera")]
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):  # distinct crops, so de-duplication keeps them all
        img = photos[i % len(photos)]
        w, h = img.size
        x, y = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
        img.crop((x, y, x + 2 * w // 3, y + 2 * h // 3)).save(tmp / f"img{i:04d}.png")
        rows.append({"image": f"img{i:04d}.png", "caption": f"photo number {i}"})
    (tmp / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    librivox = Path("/usr/share/pocketsphinx/test/data/librivox")
    clips = sorted(librivox.glob("*.wav"))
    rows = []
    for i in range(n_audio):
        shutil.copy(clips[i % len(clips)], tmp / f"a{i:04d}.wav")
        with open(tmp / f"a{i:04d}.wav", "ab") as f:  # make each file distinct for de-duplication
            f.write(b"\0" * (2 * (i + 1)))
        rows.append({"audio": f"a{i:04d}.wav", "text": f"clip {i}"})
    (tmp / "audio.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ({"kind": "records", "paths": [str(tmp / "images.jsonl")]}, {"kind": "records", "paths": [str(tmp / "audio.jsonl")]})


def run(quick: bool = False) -> list[dict]:
    import torch

    from omnitrain.config import from_dict
    from omnitrain.data.pipeline.build import BuildConfig, PipelineConfig, build_shards
    from omnitrain.data.pipeline.media import MediaConfig
    from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec
    from omnitrain.tokenizer.bundle import TokenizerPaths
    from omnitrain.tokenizer.image import ImageTokenizerConfig, VQImageTokenizer
    from omnitrain.tokenizer.text import (
        TextCorpusConfig,
        TextTokenizerConfig,
        TrainTextTokenizerConfig,
        train_text_tokenizer,
    )

    repeats = 2 if quick else 3
    n_images, n_audio = (24, 6) if quick else (128, 32)
    repo = Path(__file__).resolve().parents[1]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train_text_tokenizer(TrainTextTokenizerConfig(run_dir=tmp / "text", tokenizer=TextTokenizerConfig(vocab_size=2000),
                                                      corpus=TextCorpusConfig(local=["debian_handbook"], max_chars=300_000)))  # fmt: skip
        torch.manual_seed(0)
        VQImageTokenizer(ImageTokenizerConfig()).save(tmp / "image.pt")
        RVQAudioCodec(AudioCodecConfig()).eval().save(tmp / "audio.pt")
        img_src, aud_src = _make_sources(tmp, n_images, n_audio)
        results: dict[int, list[dict]] = {1: [], 2: []}
        for rep in range(repeats):
            for workers in (1, 2):
                stats = {"samples": 0, "seconds": 0.0, "tokens": {"text": 0, "image": 0, "audio": 0}}
                for name, src, template in (("img", img_src, "caption"), ("aud", aud_src, "asr")):
                    cfg = BuildConfig(
                        pipeline=from_dict(PipelineConfig, {"name": name, "source": src, "template": template}),
                        tokenizers=TokenizerPaths(text=tmp / "text", image=tmp / "image.pt", audio=tmp / "audio.pt"),
                        media=MediaConfig(image_size=256), out_dir=tmp / f"out-{rep}-{workers}-{name}",
                        templates_dir=repo / "data_pipelines" / "template", workers=workers, chunk_items=4, shard_samples=32,
                    )  # fmt: skip
                    t0 = time.perf_counter()
                    s = build_shards(cfg)
                    stats["seconds"] += time.perf_counter() - t0
                    stats["samples"] += s["samples"]
                    for m, k in s["tokens"].items():
                        stats["tokens"][m] += k
                results[workers].append(stats)
    med = {w: statistics.median(r["seconds"] for r in results[w]) for w in (1, 2)}
    first = results[1][0]
    for w in (1, 2):
        rows.append({"metric": f"samples/s, {w} worker(s)", "value": first["samples"] / med[w], "unit": "samples/s", "baseline": None, "note": f"{first['samples']} samples (caption + asr)"})
        for m in ("text", "image", "audio"):
            rows.append({"metric": f"{m} tokens/s, {w} worker(s)", "value": first["tokens"][m] / med[w], "unit": "tokens/s", "baseline": None, "note": ""})
    rows.append({"metric": "scaling 2 workers vs 1", "value": med[1] / med[2], "unit": "x", "baseline": 1.6, "note": "target >= 1.6x on 2 cores"})
    print_rows(rows)
    return rows


if __name__ == "__main__":
    run()
