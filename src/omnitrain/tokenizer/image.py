"""A VQ image tokenizer: convolutional encoder -> vector quantizer -> convolutional decoder.

Legend: B batch, C channels, H/W pixels, h/w code grid (H/downsample, W/downsample),
D code dimension (``embed_dim``), K codebook size, N = B*h*w code positions.

The architecture is a small VQGAN (Esser et al. 2021): residual conv stages that halve the
resolution ``log2(downsample)`` times, a nearest-code lookup with a straight-through gradient,
and a mirrored decoder. Two choices keep the codebook alive (van den Oord et al. 2017 loses most
codes without them): codes live on the unit sphere of a low-dimensional space (``l2_normalize``,
Yu et al. 2022, ViT-VQGAN) and codes unused for a while are restarted on random encoder outputs
(Dhariwal et al. 2020, Jukebox). The codebook learns by gradient (codebook + commitment loss) or
by exponential moving averages (``codebook_update="ema"``).

Used through the :class:`~omnitrain.tokenizer.base.ImageTokenizer` protocol: ``encode`` /
``decode`` are batched, device-aware, deterministic and never update any statistics.
Trained by :mod:`omnitrain.tokenizer.image_train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from omnitrain.config import ConfigError, from_dict, to_dict
from omnitrain.tokenizer.base import load_checkpoint, module_fingerprint, save_checkpoint

SCHEMA_VERSION = 1
CHECKPOINT_KIND = "omnitrain.vq_image_tokenizer"


@dataclass
class ImageTokenizerConfig:
    """Hyper-parameters of the VQ autoencoder (and the loss terms it is trained with)."""

    downsample: Literal[8, 16] = 8  # pixels per code along each side
    codebook_size: int = 256  # K, the number of image ids in the token layout
    embed_dim: int = 8  # D; low-dimensional codes are used far more evenly (ViT-VQGAN)
    base_channels: int = 32  # channels at full resolution; doubled per stage up to max_channels
    max_channels: int = 128
    num_res_blocks: int = 1  # residual blocks per resolution stage
    l2_normalize: bool = True  # compare codes by cosine (codes and encoder outputs on the unit sphere)
    codebook_update: Literal["gradient", "ema"] = "gradient"
    ema_decay: float = 0.99  # for codebook_update="ema" and for the usage statistics
    commitment_weight: float = 0.25  # beta of the VQ-VAE commitment term
    restart_dead_codes: bool = True  # re-seed codes whose usage EMA fell below dead_code_threshold
    dead_code_threshold: float = 1.0  # in code assignments per training step (EMA)
    recon_loss: Literal["mse", "l1"] = "mse"
    perceptual_weight: float = 0.0  # > 0 needs perceptual_net
    perceptual_net: str = ""  # torch.export .pt2 file: images [B,3,H,W] in [-1,1] -> feature tensor(s)
    adversarial_weight: float = 0.0  # > 0 trains a PatchGAN discriminator (hinge loss) from scratch
    adversarial_start_step: int = 0  # let reconstruction settle before the GAN term starts

    def __post_init__(self) -> None:
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size={self.codebook_size} must be at least 2 (typical: 256 to 16384)")
        if self.embed_dim < 1 or self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ValueError("embed_dim and base_channels must be >= 1 and max_channels >= base_channels")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1), e.g. 0.99")
        if self.perceptual_weight > 0 and not self.perceptual_net:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_net: the path of a torch.export program (.pt2) mapping "
                "images [B,3,H,W] in [-1,1] to features (e.g. VGG16 features exported with dynamic shapes, "
                "then torch.export.save). "
                "No perceptual weights ship with omnitrain (they need a download); set perceptual_weight: 0 "
                "to train without this term."
            )

    @property
    def channels(self) -> list[int]:
        """Channels per resolution stage, full resolution first (log2(downsample) + 1 stages)."""
        n_down = int(math.log2(self.downsample))
        return [min(self.base_channels * 2**i, self.max_channels) for i in range(n_down + 1)]


# ----------------------------------------------------------------------------- conversions


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image (grayscale, 16-bit, RGBA, palette, CMYK) as 8-bit RGB; alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float grayscale: rescale, not clip
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> [3, H, W] float in [-1, 1]."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)  # [H, W, 3]
    return uint8_to_tensor(arr)


def uint8_to_tensor(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] or [B, H, W, 3] -> float [3, H, W] or [B, 3, H, W] in [-1, 1]."""
    t = torch.from_numpy(np.array(arr))  # a writable copy
    if t.dtype != torch.uint8 or t.shape[-1] != 3 or t.ndim not in (3, 4):
        raise ValueError(f"expected uint8 [H, W, 3] or [B, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    t = t.movedim(-1, -3)  # [..., H, W, 3] -> [..., 3, H, W]
    return t.float().div(127.5).sub(1.0)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (values outside [-1, 1] are clipped)."""
    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.movedim(1, -1).numpy()  # [B, 3, H, W] -> [B, H, W, 3]


def save_png(images: torch.Tensor, out_dir: str | Path, prefix: str = "image") -> list[Path]:
    """Write images [B, 3, H, W] in [-1, 1] as ``out_dir/{prefix}_{i:03d}.png``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(tensor_to_uint8(images)):
        paths.append(out / f"{prefix}_{i:03d}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


# ----------------------------------------------------------------------------- modules


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=8 if c % 8 == 0 else 1, num_channels=c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """[B, 3, H, W] -> [B, D, h, w]."""

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.stages = nn.ModuleList()
        for i in range(len(ch) - 1):
            blocks = [ResBlock(ch[i], ch[i]) for _ in range(cfg.num_res_blocks)]
            blocks.append(nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1))  # halves H and W
            self.stages.append(nn.Sequential(*blocks))
        self.mid = ResBlock(ch[-1], ch[-1])
        self.norm_out = _norm(ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.stages:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """[B, D, h, w] -> [B, 3, H, W] (unbounded; clamp to [-1, 1] for display)."""

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.embed_dim, ch[-1], 3, padding=1)
        self.mid = ResBlock(ch[-1], ch[-1])
        self.stages = nn.ModuleList()
        for i in reversed(range(len(ch) - 1)):
            blocks: list[nn.Module] = [nn.Upsample(scale_factor=2.0, mode="nearest")]  # doubles H and W
            blocks.append(nn.Conv2d(ch[i + 1], ch[i], 3, padding=1))
            blocks += [ResBlock(ch[i], ch[i]) for _ in range(cfg.num_res_blocks)]
            self.stages.append(nn.Sequential(*blocks))
        self.norm_out = _norm(ch[0])
        self.conv_out = nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.stages:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with straight-through gradients, commitment loss, EMA/gradient codebook
    updates and dead-code restart. Statistics change only in ``forward`` while ``self.training``."""

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        K, D = cfg.codebook_size, cfg.embed_dim
        self.codebook = nn.Parameter(torch.empty(K, D), requires_grad=cfg.codebook_update == "gradient")  # [K, D]
        self.register_buffer("usage", torch.zeros(K))  # [K] EMA of assignments per step
        # the first training step puts every code on a random encoder output (data-dependent init)
        self.register_buffer("initialized", torch.tensor(False))
        if cfg.codebook_update == "ema":
            self.register_buffer("ema_count", torch.ones(K))  # [K]
            self.register_buffer("ema_sum", torch.empty(K, D))  # [K, D]

    def init_weights(self) -> None:
        nn.init.normal_(self.codebook)
        self.usage.zero_()
        self.initialized.fill_(False)
        if self.cfg.codebook_update == "ema":
            self.ema_count.fill_(1.0)
            self.ema_sum.copy_(self.codebook.data)

    def table(self) -> torch.Tensor:
        """The code vectors as compared and emitted, [K, D]."""
        return F.normalize(self.codebook, dim=-1) if self.cfg.l2_normalize else self.codebook

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """z_flat [N, D] (already normalised if l2_normalize) -> codes [N] int64."""
        e = self.table()  # [K, D]
        dist2 = z_flat.pow(2).sum(1, keepdim=True) - 2 * z_flat @ e.t() + e.pow(2).sum(1)  # [N, K]
        return dist2.argmin(dim=1)

    def flatten(self, z: torch.Tensor) -> torch.Tensor:
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # [B, D, h, w] -> [N, D]
        return F.normalize(z_flat, dim=-1) if self.cfg.l2_normalize else z_flat

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, h, w] -> (quantised [B, D, h, w] with straight-through grad, vq loss, codes [B, h, w])."""
        B, D, h, w = z.shape
        z_flat = self.flatten(z)  # [N, D]
        codes = self.nearest(z_flat.detach())  # [N]
        q = self.table()[codes]  # [N, D]
        loss = self.cfg.commitment_weight * F.mse_loss(z_flat, q.detach())
        if self.cfg.codebook_update == "gradient":
            loss = loss + F.mse_loss(q, z_flat.detach())
        if self.training:
            self._update_statistics(z_flat.detach(), codes)
        q = z_flat + (q - z_flat).detach()  # straight-through estimator
        q = q.reshape(B, h, w, D).permute(0, 3, 1, 2)  # [N, D] -> [B, D, h, w]
        return q, loss, codes.reshape(B, h, w)  # [N] -> [B, h, w]

    @torch.no_grad()
    def _update_statistics(self, z_flat: torch.Tensor, codes: torch.Tensor) -> None:
        K, decay = self.cfg.codebook_size, self.cfg.ema_decay
        counts = torch.bincount(codes, minlength=K).to(z_flat.dtype)  # [K]
        sums = torch.zeros(K, z_flat.shape[1], device=z_flat.device).index_add_(0, codes, z_flat)  # [K, D]
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:  # every rank sees the global statistics and keeps an identical codebook
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.usage.mul_(decay).add_(counts, alpha=1 - decay)
        if self.cfg.codebook_update == "ema":
            self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + 1e-5) / (n + K * 1e-5) * n  # Laplace smoothing, no division by 0
            self.codebook.data.copy_(self.ema_sum / smoothed[:, None])
        if self.initialized and not self.cfg.restart_dead_codes:
            return
        dead = (self.usage < self.cfg.dead_code_threshold).nonzero().squeeze(1)  # [n_dead]
        if not self.initialized:
            dead = torch.arange(K, device=z_flat.device)  # [K]
            self.initialized.fill_(True)
        if dead.numel() == 0:
            return
        pick = torch.randint(0, z_flat.shape[0], (dead.numel(),), device=z_flat.device)  # [n_dead]
        fresh = z_flat[pick] + 1e-3 * torch.randn_like(z_flat[pick])  # [n_dead, D]
        if distributed:
            dist.broadcast(fresh, src=0)
        self.codebook.data[dead] = fresh
        self.usage[dead] = 2 * self.cfg.dead_code_threshold  # a grace period before it can die again
        if self.cfg.codebook_update == "ema":
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = fresh


# ----------------------------------------------------------------------------- the tokenizer


class VQImageTokenizer(nn.Module):
    """Images [B, 3, H, W] in [-1, 1] <-> codes [B, h, w]; implements ``ImageTokenizer``."""

    def __init__(self, cfg: ImageTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.codebook_size = cfg.codebook_size
        self.downsample = cfg.downsample
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg)
        self.decoder = Decoder(cfg)
        self.init_weights()

    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer; seeded by the caller's torch RNG."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # residual branches start near identity: zero their last conv
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
        self.quantizer.init_weights()

    @property
    def device(self) -> torch.device:
        return self.quantizer.codebook.device

    @property
    def fingerprint(self) -> str:
        """First 16 hex chars of sha256(config JSON + state_dict bytes); changes whenever weights change."""
        return module_fingerprint(to_dict(self.cfg), self)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: images [B, 3, H, W] -> (reconstruction [B, 3, H, W], vq loss, codes [B, h, w])."""
        self._check_images(images)
        q, vq_loss, codes = self.quantizer(self.encoder(images))
        return self.decoder(q), vq_loss, codes

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}; convert with "
                "omnitrain.tokenizer.image.pil_to_tensor / uint8_to_tensor and stack a batch"
            )
        H, W = images.shape[-2:]
        if H % self.downsample or W % self.downsample:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of downsample={self.downsample}; crop or resize "
                f"to e.g. {H // self.downsample * self.downsample}x{W // self.downsample * self.downsample}"
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> codes [B, h, w] int64 on the images' device.

        Deterministic and side-effect free (no statistics update, whatever the module's mode);
        runs on the tokenizer's device in chunks of ``batch_size``."""
        self._check_images(images)
        out = []
        for chunk in images.split(batch_size):
            z = self.encoder(chunk.to(self.device, torch.float32))  # [b, D, h, w]
            b, _, h, w = z.shape
            out.append(self.quantizer.nearest(self.quantizer.flatten(z)).reshape(b, h, w))  # [N] -> [b, h, w]
        return torch.cat(out).to(images.device)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """codes [B, h, w] int64 -> images [B, 3, h*downsample, w*downsample] in [-1, 1] on the codes' device."""
        if codes.ndim != 3 or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected integer codes [B, h, w], got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]; "
                "subtract the layout's image-id offset before decoding"
            )
        out = []
        table = self.quantizer.table()  # [K, D]
        for chunk in codes.split(batch_size):
            q = table[chunk.to(self.device).long()].permute(0, 3, 1, 2)  # [b, h, w, D] -> [b, D, h, w]
            out.append(self.decoder(q).clamp(-1, 1))
        return torch.cat(out).to(codes.device)

    def save(self, path: str | Path) -> Path:
        """Write one checkpoint file (config + weights + schema_version) atomically."""
        return save_checkpoint(path, CHECKPOINT_KIND, SCHEMA_VERSION, to_dict(self.cfg), self)


def load_image_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> VQImageTokenizer:
    """Load a checkpoint written by :meth:`VQImageTokenizer.save`, in eval mode on ``device``."""
    blob = load_checkpoint(path, CHECKPOINT_KIND, SCHEMA_VERSION, "omnitrain tokenizer train-image")
    try:
        cfg = from_dict(ImageTokenizerConfig, blob["config"])
    except ConfigError as e:
        raise ValueError(f"{path}: its stored config no longer validates: {e}") from e
    model = VQImageTokenizer(cfg)
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------- optional loss terms


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): images [B, 3, H, W] -> real/fake logits [B, 1, H/8, W/8]."""

    def __init__(self, ch: int = 64):
        super().__init__()
        down = [(3, ch), (ch, 2 * ch), (2 * ch, 4 * ch)]  # three stride-2 convs: H -> H/8
        layers = [m for i, (a, b) in enumerate(down)
                  for m in (nn.Conv2d(a, b, 4, stride=2, padding=1), _norm(b) if i else nn.Identity(), nn.LeakyReLU(0.2))]
        self.net = nn.Sequential(*layers, nn.Conv2d(4 * ch, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_perceptual_net(path: str, device: torch.device) -> nn.Module:
    """The frozen feature network of ``ImageTokenizerConfig.perceptual_net``: a torch.export program
    exported in eval mode with dynamic batch/height/width (``Dim.AUTO``), saved by torch.export.save."""
    if not Path(path).is_file():
        raise ValueError(
            f"perceptual_net={path!r} does not exist; save a torch.export feature network there "
            "(torch.export.save(torch.export.export(net.eval(), (example,)), path)) or set perceptual_weight: 0"
        )
    try:
        net = torch.export.load(path).module().to(device)
    except Exception as e:  # a foreign or truncated file
        raise ValueError(f"perceptual_net={path!r} is not a torch.export program (.pt2): {e}") from e
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def perceptual_loss(net: nn.Module, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the feature maps (one tensor or a list) of recon and target."""
    fr, ft = net(recon), net(target)
    fr, ft = (fr, ft) if isinstance(fr, (list, tuple)) else ([fr], [ft])
    return sum(F.mse_loss(a, b) for a, b in zip(fr, ft, strict=True)) / len(fr)
