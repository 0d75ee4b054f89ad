"""Image tokenizer: held-out reconstruction vs a same-bit-rate bicubic baseline, and encode speed.

    python benchmarks/run_all.py image [--quick]

Trains a VQ tokenizer on scikit-image's photos (random crops, whole images held out), then on the
held-out views compares PSNR against the honest baseline at the same bit rate: each view is
downscaled (bicubic, antialiased) to the largest 8-bit RGB image whose raw bits fit in the code
bits ``h * w * log2(K)``, and upscaled back (bicubic). Also reports codebook usage / perplexity on
held-out images and encode throughput (images/s at 256x256) on this machine.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _table import print_rows  # benchmarks/ is on sys.path when these run
from PIL import Image

from omnitrain.config import from_dict
from omnitrain.tokenizer.image import load_image_tokenizer, tensor_to_uint8, uint8_to_tensor
from omnitrain.tokenizer.image_train import (
    ImageLoader,
    ImageSource,
    ImageTrainConfig,
    held_out_views,
    psnr,
    split_indices,
    train_image_tokenizer,
)


def config(quick: bool, run_dir: Path) -> ImageTrainConfig:
    model = {"downsample": 8, "codebook_size": 256, "embed_dim": 8, "base_channels": 32, "max_channels": 128}
    if quick:
        model.update(codebook_size=64, base_channels=16, max_channels=32)
    return from_dict(ImageTrainConfig, {
        "model": model,
        "data": {"source": "skimage", "image_size": 32 if quick else 64, "policy": "random_crop", "eval_crops": 8},
        "optim": {"lr": 2e-3, "warmup_steps": 50},
        "steps": 100 if quick else 400, "batch_size": 16, "run_dir": str(run_dir), "device": "auto",
        "num_threads": 1, "log_every": 50, "progress": True,  # 1 thread: robust on a shared CPU
    })


def baseline_size(height: int, width: int, bits: float) -> tuple[int, int]:
    """The largest (h, w) with the image's aspect whose 24-bit RGB pixels fit in ``bits``."""
    pixels = bits / 24
    h = max(1, math.floor(math.sqrt(pixels * height / width)))
    return h, max(1, math.floor(pixels / h))


def bicubic_baseline(images: torch.Tensor, bits: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """images [B, 3, H, W] -> the same-bit-rate down-then-up reconstructions [B, 3, H, W]."""
    H, W = images.shape[-2:]
    small = baseline_size(H, W, bits)
    out = []
    for arr in tensor_to_uint8(images):  # [H, W, 3] uint8 each
        tiny = Image.fromarray(arr).resize((small[1], small[0]), Image.BICUBIC)  # 8-bit per channel
        out.append(np.asarray(tiny.resize((W, H), Image.BICUBIC)))
    return uint8_to_tensor(np.stack(out)), small


def encode_throughput(tok, quick: bool) -> tuple[float, str]:
    import skimage.data

    size, n = (128, 8) if quick else (256, 32)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    views = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in photos]
    x = uint8_to_tensor(np.stack([views[i % len(views)] for i in range(n)]))  # [n, 3, size, size]
    tok.encode(x[:2])  # warm-up
    t0 = time.perf_counter()
    tok.encode(x, batch_size=16)
    return n / (time.perf_counter() - t0), f"{size}x{size}, batch 16, {tok.device}, {torch.get_num_threads()} torch threads"


def run(quick: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(quick, Path(tmp) / "run")
        metrics = train_image_tokenizer(cfg)
        tok = load_image_tokenizer(metrics["checkpoint"], device=metrics["device"])

        source = ImageSource(cfg.data)  # the same held-out views the trainer evaluated on
        _, eval_idx = split_indices(len(source), cfg.data.held_out_fraction, cfg.seed)
        views = held_out_views(ImageLoader(source, cfg.data, Path(tmp) / "errors.jsonl"), eval_idx, cfg)
        codes = tok.encode(views)  # [E, h, w]
        bits = codes.shape[1] * codes.shape[2] * math.log2(tok.codebook_size)
        recon = tok.decode(codes)
        base, small = bicubic_baseline(views, bits)
        tok_psnr, base_psnr = float(psnr(recon, views).mean()), float(psnr(base, views).mean())
        tok_pooled, base_pooled = float(psnr(recon, views, pooled=True)), float(psnr(base, views, pooled=True))
        speed, speed_note = encode_throughput(tok, quick)

    S, K, final, init = cfg.data.image_size, tok.codebook_size, metrics["final"], metrics["init"]
    setup = f"{len(views)} held-out {S}x{S} views of {metrics['n_eval_images']} skimage photos, K={K}, ds={tok.downsample}"
    rows = [
        {"metric": "held-out PSNR, pooled (trained)", "value": tok_pooled, "unit": "dB", "baseline": base_pooled,
         "note": f"{setup}; {bits:.0f} bits/view; baseline bicubic via {small[0]}x{small[1]} 8-bit RGB "
                 f"({small[0] * small[1] * 24} bits); MSE pooled over all pixels"},
        {"metric": "held-out PSNR, mean per view (trained)", "value": tok_psnr, "unit": "dB", "baseline": base_psnr,
         "note": "mean of per-view PSNR: near-flat crops (sky, space) score 40-60 dB for the baseline"},
        {"metric": "held-out PSNR, pooled (init)", "value": init["psnr_pooled"], "unit": "dB", "baseline": base_pooled,
         "note": "the same tokenizer before training"},
        {"metric": "codebook usage", "value": final["codebook_usage"], "unit": "fraction", "baseline": init["codebook_usage"],
         "note": f"fraction of {K} codes used on held-out views (baseline column: at init)"},
        {"metric": "codebook perplexity", "value": final["perplexity"], "unit": "codes", "baseline": init["perplexity"],
         "note": f"exp(entropy) of held-out code histogram, max {K} (baseline column: at init)"},
        {"metric": "encode throughput", "value": speed, "unit": "images/s", "baseline": None, "note": speed_note},
        {"metric": "train time", "value": metrics["train_seconds"], "unit": "s", "baseline": None,
         "note": f"{cfg.steps} steps x batch {cfg.batch_size} on {metrics['device']}"},
    ]
    print_rows(rows, notes=True)
    return rows


if __name__ == "__main__":
    run(quick=True)
