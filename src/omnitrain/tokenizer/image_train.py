"""Train a :class:`~omnitrain.tokenizer.image.VQImageTokenizer` (``omnitrain tokenizer train-image``).

Legend: B batch, S = image_size (square training views), E held-out views, K codebook size.

    cfg = from_dict(ImageTrainConfig, composed_yaml)   # recipes/tokenizer_image.yaml
    metrics = train_image_tokenizer(cfg)

Reads an image folder, a jsonl of paths, or a Hugging Face image dataset (by name, local path or
``save_to_disk`` folder); every image is converted to RGB and cut to a square ``image_size`` view
by the configured policy. Held-out *images* (not crops of training images) are evaluated before
and after training: PSNR (mean over views, and pooled over all pixels), codebook usage (fraction
of the K codes used) and code perplexity.
The run directory receives ``image_tokenizer.pt``, ``config.json``, ``metrics.json``,
``errors.jsonl`` (unreadable inputs, when ``on_error: skip``) and ``recon/`` PNGs (original | recon).
One process; the data pipeline, not this trainer, is where tokenizers run at scale.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import skimage
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from omnitrain.config import to_dict
from omnitrain.tokenizer.image import (
    ImageTokenizerConfig,
    PatchDiscriminator,
    VQImageTokenizer,
    load_perceptual_net,
    perceptual_loss,
    pil_to_tensor,
    save_png,
    to_rgb,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class ImageDataConfig:
    """Where training images come from and how each becomes a square view."""

    source: str = "skimage"  # "skimage" (scikit-image's sample images), a folder, a .jsonl, or a HF dataset
    format: Literal["auto", "folder", "jsonl", "hf"] = "auto"
    image_column: str = "image"  # HF datasets: the column holding images (or paths)
    split: str = "train"  # HF datasets: the split to read
    image_size: int = 64  # S; a multiple of model.downsample
    policy: Literal["center_crop", "random_crop", "resize", "pad"] = "random_crop"
    held_out_fraction: float = 0.2  # of the images (whole images are held out, not crops)
    eval_crops: int = 8  # views per held-out image with policy=random_crop (fixed positions)
    on_error: Literal["raise", "skip"] = "raise"  # unreadable images: stop naming the file, or log and skip
    cache_images: bool = True  # keep decoded images in memory (turn off for datasets larger than RAM)

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction={self.held_out_fraction} must be in (0, 1), e.g. 0.2")
        if self.eval_crops < 1:
            raise ValueError(f"eval_crops={self.eval_crops} must be >= 1")


@dataclass
class ImageOptimConfig:
    lr: float = 2e-3  # peak learning rate (AdamW)
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # VQGAN's; beta1 0.5 steadies the GAN term
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: Literal["constant", "cosine"] = "cosine"  # cosine decays to 10% of lr at the last step
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class ImageTrainConfig:
    model: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    optim: ImageOptimConfig = field(default_factory=ImageOptimConfig)
    steps: int = 1000
    batch_size: int = 16
    eval_batch_size: int = 32
    seed: int = 0
    run_dir: Path = Path("runs/tokenizer/image")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPU threads for this run, 0 = torch's default. On a busy shared CPU, 1 thread was 6x faster than
    # 2 here (idle OpenMP threads spin while the other core is taken)
    num_threads: int = 0
    log_every: int = 25  # steps between progress-bar updates and history entries
    n_recon_images: int = 8  # held-out reconstructions written to run_dir/recon/
    progress: bool = True  # show the tqdm bar

    def __post_init__(self) -> None:
        ds = self.model.downsample
        if self.data.image_size % ds or self.data.image_size < ds:
            raise ValueError(
                f"data.image_size={self.data.image_size} must be a positive multiple of model.downsample={ds}, "
                f"e.g. {max(ds, self.data.image_size // ds * ds)}"
            )
        if min(self.steps, self.batch_size, self.eval_batch_size, self.log_every) < 1 or self.num_threads < 0:
            raise ValueError("steps, batch_size, eval_batch_size and log_every must be >= 1, num_threads >= 0")


# ----------------------------------------------------------------------------- data


class _Unreadable(Exception):
    """One input could not be decoded (the reason is the message)."""


class ImageSource:
    """An indexable list of images: ``names[i]`` for messages, ``read(i)`` -> PIL image."""

    def __init__(self, cfg: ImageDataConfig):
        self.cfg = cfg
        self._dataset: Any = None
        fmt, where = cfg.format, cfg.source
        if where == "skimage":  # the sample images that ship inside scikit-image: works offline
            where, fmt = str(Path(skimage.__file__).parent / "data"), "skimage"
        path = Path(where).expanduser()
        if fmt == "auto":
            if path.is_dir():
                hf_markers = ("dataset_info.json", "state.json", "dataset_dict.json")
                fmt = "hf" if any((path / m).exists() for m in hf_markers) else "folder"
            elif path.suffix == ".jsonl":
                fmt = "jsonl"
            elif where.startswith(("/", ".", "~")):  # a path that does not exist: say so below
                fmt = "folder"
            else:
                fmt = "hf"  # a hub name such as "user/dataset"
        if fmt in ("folder", "jsonl") and not path.exists():
            raise ValueError(f"data.source={where!r} does not exist; give an image folder, a .jsonl or a dataset")
        if fmt == "folder":
            self.refs: list[Any] = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif fmt == "skimage":  # its png/jpg photos; the tif/gif there are tiny test files or unreadable by
            # PIL, and motorcycle_right is a near copy of motorcycle_left (it would leak into held-out)
            self.refs = sorted(p for p in Path(where).glob("*.[pj][np]g") if p.stem != "motorcycle_right")
        elif fmt == "jsonl":
            self.refs = self._read_jsonl(path)
        if fmt != "hf":
            self.names = [str(p) for p in self.refs]
        else:
            self._dataset = self._open_hf(where, path)
            self.refs = list(range(len(self._dataset)))
            self.names = [f"{where}[{cfg.split}][{i}]" for i in self.refs]
        if len(self.refs) < 2:
            raise ValueError(f"data.source={where!r} holds {len(self.refs)} image(s); need at least 2 (train + held out)")

    @staticmethod
    def _read_jsonl(path: Path) -> list[Path]:
        refs = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ref = row.get("path", row.get("image"))
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{path}:{n} is not a JSON object ({e}); write one {{\"path\": ...}} per line") from e
            if not isinstance(ref, str):
                raise ValueError(f"{path}:{n} has no string 'path' or 'image' key; got keys {sorted(row)}")
            p = Path(ref).expanduser()
            refs.append(p if p.is_absolute() else path.parent / p)  # relative to the jsonl's folder
        return refs

    def _open_hf(self, where: str, path: Path) -> Any:
        import datasets  # datasets: ~0.5 s to import, only for Hugging Face datasets

        cfg = self.cfg
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            try:
                ds = datasets.load_dataset(where, split=cfg.split)
            except Exception as e:  # no such dataset / offline / no access: say what was tried
                raise ValueError(f"cannot load Hugging Face dataset {where!r} split {cfg.split!r}: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"dataset {where!r} has no split {cfg.split!r}; available: {sorted(ds)}")
            ds = ds[cfg.split]
        if cfg.image_column not in ds.column_names:
            raise ValueError(f"dataset {where!r} has no column {cfg.image_column!r}; set data.image_column to one of {ds.column_names}")
        if isinstance(ds.features[cfg.image_column], datasets.Image):  # decode here, one row at a time,
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))  # so errors name the row
        return ds

    def __len__(self) -> int:
        return len(self.refs)

    def read(self, i: int) -> Image.Image:
        ref = self.refs[i] if self._dataset is None else self._dataset[i][self.cfg.image_column]
        try:
            if isinstance(ref, Image.Image):
                img = ref
            elif isinstance(ref, dict) and ref.get("bytes"):
                img = Image.open(io.BytesIO(ref["bytes"]))
            elif isinstance(ref, dict) and ref.get("path"):
                img = Image.open(ref["path"])
            elif isinstance(ref, (str, Path)):
                img = Image.open(ref)
            else:
                raise _Unreadable(f"unsupported image value of type {type(ref).__name__}")
            img.load()  # decode now: truncated files fail here, not later
            if img.width < 1 or img.height < 1:
                raise _Unreadable("image has zero size")
            return to_rgb(img)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise _Unreadable(f"{type(e).__name__}: {e}") from e


class ImageLoader:
    """Decodes (and caches) images, applying ``on_error``; skipped ones go to ``errors.jsonl``."""

    def __init__(self, source: ImageSource, cfg: ImageDataConfig, errors_path: Path):
        self.source, self.cfg, self.errors_path = source, cfg, errors_path
        self.cache: dict[int, Image.Image] = {}
        self.bad: dict[int, str] = {}

    def get(self, i: int) -> Image.Image | None:
        if i in self.cache:
            return self.cache[i]
        if i in self.bad:
            return None
        try:
            img = self.source.read(i)
        except _Unreadable as e:
            name = self.source.names[i]
            if self.cfg.on_error == "raise":
                raise ValueError(
                    f"cannot read image {name}: {e}. Fix or remove it, or set data.on_error: skip to skip "
                    "unreadable images (they are then listed in run_dir/errors.jsonl)"
                ) from e
            self.bad[i] = str(e)
            with self.errors_path.open("a") as f:
                f.write(json.dumps({"item": name, "reason": str(e)}) + "\n")
            return None
        if self.cfg.cache_images:
            self.cache[i] = img
        return img


def make_view(img: Image.Image, size: int, policy: str, rng: random.Random) -> torch.Tensor:
    """An RGB PIL image -> one square view [3, S, S] in [-1, 1] by ``policy``."""
    w, h = img.size
    if policy == "resize":
        return pil_to_tensor(img.resize((size, size), Image.BICUBIC))
    if policy == "pad":  # fit the longer side, letterbox with black
        scale = size / max(w, h)
        small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
        return pil_to_tensor(canvas)
    if policy == "center_crop" or min(w, h) < size:  # fit the shorter side first
        scale = size / min(w, h)
        if policy == "center_crop" or scale > 1:
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            w, h = img.size
    if policy == "center_crop":
        left, top = (w - size) // 2, (h - size) // 2
    else:  # random_crop at native resolution
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    return pil_to_tensor(img.crop((left, top, left + size, top + size)))


def sample_batch(loader: ImageLoader, indices: list[int], cfg: ImageTrainConfig, rng: random.Random) -> torch.Tensor:
    """A training batch [B, 3, S, S] drawn uniformly from ``indices`` (skipped images excluded)."""
    views: list[torch.Tensor] = []
    alive = [i for i in indices if i not in loader.bad] if loader.bad else indices
    while len(views) < cfg.batch_size:
        if not alive:
            raise ValueError(f"every training image failed to load; see {loader.errors_path}")
        img = loader.get(rng.choice(alive))
        if img is None:  # just found unreadable (on_error=skip): drop it and draw again
            alive = [i for i in alive if i not in loader.bad]
            continue
        views.append(make_view(img, cfg.data.image_size, cfg.data.policy, rng))
    return torch.stack(views)  # B x [3, S, S] -> [B, 3, S, S]


def split_indices(n: int, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) image indices: a seeded shuffle, at least one image held out."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(held_out_fraction * n))
    return order[n_eval:], sorted(order[:n_eval])


def held_out_views(loader: ImageLoader, indices: list[int], cfg: ImageTrainConfig) -> torch.Tensor:
    """The fixed evaluation set [E, 3, S, S]: the same views every time for the same seed."""
    crops = cfg.data.eval_crops if cfg.data.policy == "random_crop" else 1
    views = []
    for i in indices:
        img = loader.get(i)
        for j in range(crops if img is not None else 0):
            rng = random.Random(cfg.seed * 1_000_003 + i * 1_009 + j)
            views.append(make_view(img, cfg.data.image_size, cfg.data.policy, rng))
    if not views:
        raise ValueError(f"no held-out image could be read; see {loader.errors_path}")
    return torch.stack(views)  # E x [3, S, S] -> [E, 3, S, S]


# ----------------------------------------------------------------------------- metrics


def psnr(recon: torch.Tensor, target: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """PSNR in dB of [B, 3, H, W] images in [-1, 1], after 8-bit quantisation of both.

    Per image -> [B]; or ``pooled`` over all pixels of the batch -> [] (not dominated by flat
    images, whose per-image PSNR can reach 50+ dB)."""
    a = recon.clamp(-1, 1).add(1).mul(127.5).round()
    b = target.clamp(-1, 1).add(1).mul(127.5).round()
    se = (a - b).pow(2).flatten(1)  # [B, 3*H*W]
    mse = (se.mean() if pooled else se.mean(1)).clamp_min(1e-10)
    return 10 * torch.log10(255.0**2 / mse)


def code_statistics(codes: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Fraction of the K codes used and the perplexity exp(H) of the code histogram."""
    counts = torch.bincount(codes.flatten().cpu(), minlength=codebook_size).double()  # [K]
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codebook_usage": float((counts > 0).double().mean()), "perplexity": float(entropy.exp())}


@torch.no_grad()
def evaluate(model: VQImageTokenizer, images: torch.Tensor, batch_size: int) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out metrics (through the public encode/decode path) and the reconstructions [E, 3, S, S]."""
    codes = model.encode(images, batch_size=batch_size)  # [E, h, w]
    recon = model.decode(codes, batch_size=batch_size)  # [E, 3, S, S]
    quality = {"psnr": float(psnr(recon, images).mean()), "psnr_pooled": float(psnr(recon, images, pooled=True))}
    return {**quality, **code_statistics(codes, model.codebook_size)}, recon


def lr_at(step: int, cfg: ImageOptimConfig, total: int) -> float:
    """Linear warmup, then constant or cosine decay to 10% of the peak; a pure function of the step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device: auto or cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------- training


def train_image_tokenizer(cfg: ImageTrainConfig) -> dict[str, Any]:
    """Train, evaluate (before and after) and save a VQ image tokenizer; returns the metrics."""
    threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: ImageTrainConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    errors_path = run_dir / "errors.jsonl"
    errors_path.write_text("")  # this run's errors only

    source = ImageSource(cfg.data)
    loader = ImageLoader(source, cfg.data, errors_path)
    if cfg.data.cache_images:  # decode everything now, so unreadable files surface before training starts
        for i in tqdm(range(len(source)), desc="decode images", disable=not cfg.progress, leave=False):
            loader.get(i)
    train_idx, eval_idx = split_indices(len(source), cfg.data.held_out_fraction, cfg.seed)
    eval_images = held_out_views(loader, eval_idx, cfg)  # [E, 3, S, S]

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed + 1)
    model = VQImageTokenizer(cfg.model).to(device)
    init_metrics, _ = evaluate(model, eval_images, cfg.eval_batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay)
    mc = cfg.model
    pnet = load_perceptual_net(mc.perceptual_net, device) if mc.perceptual_weight > 0 else None
    disc = PatchDiscriminator().to(device) if mc.adversarial_weight > 0 else None
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)) if disc else None

    history: list[dict[str, float]] = []
    bar = tqdm(range(cfg.steps), desc="train-image", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg.optim, cfg.steps)
        for group in opt.param_groups + (disc_opt.param_groups if disc_opt else []):
            group["lr"] = lr
        x = sample_batch(loader, train_idx, cfg, rng).to(device)  # [B, 3, S, S]
        model.train()
        recon, vq_loss, codes = model(x)
        rec_loss = F.mse_loss(recon, x) if mc.recon_loss == "mse" else F.l1_loss(recon, x)
        loss = rec_loss + vq_loss
        if pnet is not None:
            loss = loss + mc.perceptual_weight * perceptual_loss(pnet, recon, x)
        use_gan = disc is not None and step >= mc.adversarial_start_step
        if use_gan:
            loss = loss - mc.adversarial_weight * disc(recon).mean()  # generator side of the hinge GAN
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        if use_gan:
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            row = {"step": step, "loss": loss.item(), "recon_loss": rec_loss.item(), "vq_loss": vq_loss.item(),
                   "lr": lr, "batch_psnr": float(psnr(recon.detach(), x).mean()),
                   "batch_usage": code_statistics(codes, mc.codebook_size)["codebook_usage"]}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['batch_psnr']:.1f}", usage=f"{row['batch_usage']:.2f}")
    bar.close()
    train_seconds = time.perf_counter() - t_start

    model.eval()
    final_metrics, recon = evaluate(model, eval_images, cfg.eval_batch_size)
    ckpt = model.save(run_dir / "image_tokenizer.pt")
    n_show = min(cfg.n_recon_images, len(eval_images))
    side_by_side = torch.cat([eval_images[:n_show], recon[:n_show]], dim=3)  # [n, 3, S, 2S]: original | recon
    save_png(side_by_side, run_dir / "recon", prefix="recon")
    metrics = {
        "init": init_metrics, "final": final_metrics, "steps": cfg.steps, "train_seconds": train_seconds,
        "n_train_images": len(train_idx) - sum(i in loader.bad for i in train_idx),
        "n_eval_images": len(eval_idx) - sum(i in loader.bad for i in eval_idx), "n_eval_views": len(eval_images),
        "n_skipped": len(loader.bad), "skipped": [source.names[i] for i in sorted(loader.bad)],
        "checkpoint": str(ckpt), "fingerprint": model.fingerprint, "device": str(device), "history": history,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"image tokenizer: {cfg.steps} steps in {train_seconds:.0f} s | held-out PSNR {init_metrics['psnr']:.2f} -> "
        f"{final_metrics['psnr']:.2f} dB | codebook usage {init_metrics['codebook_usage']:.0%} -> "
        f"{final_metrics['codebook_usage']:.0%} of {mc.codebook_size} | perplexity {final_metrics['perplexity']:.1f} | "
        f"skipped {len(loader.bad)} | saved {ckpt}"
    )
    return metrics
