"""An RVQ neural audio codec: SEANet-like conv encoder/decoder around a residual vector quantizer.

Legend: B batch, S audio samples, T codec frames (S = T * hop), C conv channels, D latent dim,
K residual codebook levels, N codebook entries per level.

    wav [B, 1, S] -> encoder (strided convs + dilated residual units, ELU) -> z [B, D, T]
      -> RVQ: level k quantizes what levels < k left over -> codes [B, T, K] (frame-major)
      -> sum of the K code vectors [B, D, T] -> decoder (transposed convs mirroring the encoder)
      -> wav [B, 1, S]

The design follows SEANet as used by EnCodec (Defossez et al. 2022) and SoundStream (Zeghidour
et al. 2021): codebooks updated by exponential moving averages (no gradient), codes that fall out
of use restarted from the current batch, and optional quantizer dropout (train on a random number
of levels) so that fewer levels still decode to something sensible. It has no LSTM, no
discriminator and non-causal convolutions: a tokenizer for data building, not a streaming codec.

Training lives in ``audio_train.py``; this file is the model, its config and its checkpoint format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from omnitrain.config import from_dict, to_dict
from omnitrain.tokenizer.base import load_checkpoint, module_fingerprint, save_checkpoint

SCHEMA_VERSION = 1
CHECKPOINT_KIND = "omnitrain.audio_codec"


@dataclass
class AudioCodecConfig:
    """Architecture of :class:`RVQAudioCodec`. ``frame_rate = sample_rate / prod(strides)``."""

    # conv: the SEANet-like network, trained end to end | mel: RVQ of log-mel frames, Griffin-Lim decoder, k-means
    # codebooks (omnitrain.tokenizer.mel_codec: intelligible after seconds of fitting, where the conv codec needs far
    # more training than a CPU gives it)
    kind: Literal["conv", "mel"] = "conv"
    sample_rate: Literal[16000, 24000] = 16000
    channels: int = 16  # C of the first conv; doubles after every stride
    strides: list[int] = field(default_factory=lambda: [4, 5, 8])  # encoder order; hop = product (160: 100 Hz)
    latent_dim: int = 64  # D, also the codebook vector size
    kernel_size: int = 7  # first and last conv
    residual_dilations: list[int] = field(default_factory=lambda: [1, 3])  # one residual unit each, per block
    weight_norm: bool = True
    n_levels: int = 4  # K
    codebook_size: int = 128  # N per level
    ema_decay: float = 0.95  # codebook EMA; 0.99 (EnCodec) is slow for short runs
    dead_code_threshold: float = 0.5  # restart a code whose EMA count per batch falls below this
    quantizer_dropout: float = 0.0  # fraction of training rows that use only a random prefix of levels
    n_mels: int = 64  # kind=mel: mel bands, the code vector size (latent_dim is unused)
    mel_hop: int = 128  # kind=mel: analysis hop in samples (n_fft 4x); must divide the codec's hop
    griffin_lim_iters: int = 48  # kind=mel: phase reconstruction rounds of the decoder

    def __post_init__(self) -> None:
        if not self.strides or any(s < 1 for s in self.strides):
            raise ValueError(f"strides={self.strides} must be a non-empty list of positive integers, e.g. [2, 4, 5, 8]")
        if self.sample_rate % self.hop:
            raise ValueError(
                f"sample_rate {self.sample_rate} is not divisible by hop {self.hop} (product of strides "
                f"{self.strides}); pick strides whose product divides it, e.g. [2, 4, 5, 8] (50 Hz at 16 kHz)"
            )
        for name in ("channels", "latent_dim", "n_levels", "codebook_size", "kernel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size={self.codebook_size} must be >= 2 (e.g. 256 or 1024)")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={self.kernel_size} must be odd so that 'same' padding is symmetric")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1), e.g. 0.95")
        if not 0.0 <= self.quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout={self.quantizer_dropout} must be in [0, 1]")
        if self.kind == "mel" and (self.mel_hop < 1 or self.hop % self.mel_hop or self.n_mels < 1 or self.griffin_lim_iters < 0):
            raise ValueError(f"kind=mel: mel_hop={self.mel_hop} must divide the hop {self.hop} (product of strides), "
                             f"n_mels={self.n_mels} >= 1 and griffin_lim_iters={self.griffin_lim_iters} >= 0, e.g. mel_hop=128 "
                             "for hop 640 (25 Hz at 16 kHz)")  # fmt: skip

    @property
    def code_dim(self) -> int:
        """The size of a code vector: the latent (conv) or the mel frame (mel)."""
        return self.n_mels if self.kind == "mel" else self.latent_dim

    @property
    def hop(self) -> int:
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def bits_per_second(self) -> float:
        return self.frame_rate * self.n_levels * math.log2(self.codebook_size)


# ---------------------------------------------------------------------------------------- convs


def _conv(cin: int, cout: int, kernel: int, wn: bool, stride: int = 1, dilation: int = 1) -> nn.Module:
    """A Conv1d with 'same' padding when stride is 1 and exactly S/stride outputs when S % stride == 0."""
    pad = (kernel - 1) * dilation // 2 if stride == 1 else math.ceil(stride / 2)
    conv = nn.Conv1d(cin, cout, kernel, stride=stride, dilation=dilation, padding=pad)
    return nn.utils.parametrizations.weight_norm(conv) if wn else conv


def _conv_t(cin: int, cout: int, stride: int, wn: bool) -> nn.Module:
    """A ConvTranspose1d (kernel 2*stride) giving exactly T*stride outputs, the inverse of _conv's length."""
    pad = math.ceil(stride / 2)
    conv = nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride, padding=pad, output_padding=2 * pad - stride)
    return nn.utils.parametrizations.weight_norm(conv) if wn else conv


class ResidualUnit(nn.Module):
    """x + conv1x1(ELU(dilated conv(ELU(x)))), with a C/2 bottleneck as in SEANet."""

    def __init__(self, ch: int, dilation: int, wn: bool):
        super().__init__()
        self.block = nn.Sequential(
            nn.ELU(), _conv(ch, ch // 2 or 1, 3, wn, dilation=dilation), nn.ELU(), _conv(ch // 2 or 1, ch, 1, wn)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, S'] -> [B, C, S']
        return x + self.block(x)


def _encoder(cfg: AudioCodecConfig) -> nn.Sequential:
    wn, ch = cfg.weight_norm, cfg.channels
    layers: list[nn.Module] = [_conv(1, ch, cfg.kernel_size, wn)]
    for s in cfg.strides:
        layers += [ResidualUnit(ch, d, wn) for d in cfg.residual_dilations]
        layers += [nn.ELU(), _conv(ch, 2 * ch, 2 * s, wn, stride=s)]  # [B, C, S'] -> [B, 2C, S'/s]
        ch *= 2
    layers += [nn.ELU(), _conv(ch, cfg.latent_dim, 3, wn)]
    return nn.Sequential(*layers)


def _decoder(cfg: AudioCodecConfig) -> nn.Sequential:
    wn, ch = cfg.weight_norm, cfg.channels * 2 ** len(cfg.strides)
    layers: list[nn.Module] = [_conv(cfg.latent_dim, ch, cfg.kernel_size, wn)]
    for s in reversed(cfg.strides):
        layers += [nn.ELU(), _conv_t(ch, ch // 2, s, wn)]  # [B, C, T'] -> [B, C/2, T'*s]
        ch //= 2
        layers += [ResidualUnit(ch, d, wn) for d in cfg.residual_dilations]
    layers += [nn.ELU(), _conv(ch, 1, cfg.kernel_size, wn)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------ quantizer


class EMACodebook(nn.Module):
    """One level of N code vectors, learned by EMA of the vectors assigned to them (no gradient)."""

    def __init__(self, size: int, dim: int, decay: float, dead_threshold: float):
        super().__init__()
        self.decay, self.dead_threshold = decay, dead_threshold
        self.register_buffer("embed", torch.randn(size, dim))  # [N, D]
        self.register_buffer("ema_count", torch.ones(size))  # [N] assignments per batch, smoothed
        self.register_buffer("ema_sum", self.embed.clone())  # [N, D]
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, D] -> index [M] of the closest code (squared Euclidean distance)."""
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ self.embed.t() + self.embed.pow(2).sum(1)[None]  # [M, N]
        return dist.argmin(dim=1)

    @torch.no_grad()
    def update(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        """EMA step on the vectors x [M, D] assigned to idx [M]; restart dead codes from x."""
        n = self.embed.shape[0]
        if not bool(self.initialized):  # first batch: codes are random batch vectors (like k-means++ seeding)
            pick = torch.randint(0, x.shape[0], (n,), device=x.device)
            self.embed.copy_(x[pick])
            self.ema_sum.copy_(x[pick])
            self.ema_count.fill_(1.0)
            self.initialized.fill_(True)
            return
        counts = torch.bincount(idx, minlength=n).to(x.dtype)  # [N]
        sums = torch.zeros_like(self.embed).index_add_(0, idx, x)  # [N, D]
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (total + n * 1e-5) * total  # Laplace smoothing, no division by 0
        self.embed.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.dead_threshold
        if dead.any():
            pick = torch.randint(0, x.shape[0], (int(dead.sum()),), device=x.device)
            self.embed[dead] = x[pick]
            self.ema_sum[dead] = x[pick]
            self.ema_count[dead] = 1.0


class ResidualVQ(nn.Module):
    """K EMA codebooks applied to successive residuals."""

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.cfg = cfg
        self.levels = nn.ModuleList(
            EMACodebook(cfg.codebook_size, cfg.code_dim, cfg.ema_decay, cfg.dead_code_threshold)
            for _ in range(cfg.n_levels)
        )

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, D, T] -> (quantized [B, D, T] with straight-through gradient, codes [B, T, K], commitment loss)."""
        B, D, T = z.shape
        x = z.transpose(1, 2).reshape(B * T, D)  # [B, D, T] -> [B*T, D]
        keep = torch.ones(B, len(self.levels), device=z.device)  # [B, K] levels used per row
        if self.training and self.cfg.quantizer_dropout > 0:
            n_used = torch.randint(1, len(self.levels) + 1, (B,), device=z.device)
            drop = torch.rand(B, device=z.device) < self.cfg.quantizer_dropout
            n_used = torch.where(drop, n_used, len(self.levels))
            keep = (torch.arange(len(self.levels), device=z.device)[None] < n_used[:, None]).float()
        keep_rows = keep.repeat_interleave(T, dim=0)  # [B, K] -> [B*T, K]
        residual, quantized, codes, commit = x, torch.zeros_like(x), [], x.new_zeros(())
        for k, level in enumerate(self.levels):
            idx = level.nearest(residual.detach())  # [B*T]
            if self.training:
                level.update(residual.detach(), idx)
            q = level.embed[idx]  # [B*T, D]
            m = keep_rows[:, k : k + 1]  # [B*T, 1]
            commit = commit + ((residual - q.detach()).pow(2).mean(1, keepdim=True) * m).sum() / m.sum().clamp(min=1)
            quantized = quantized + q * m
            residual = residual - q.detach()
            codes.append(idx)
        quantized = x + (quantized - x).detach()  # straight-through: decoder gradient flows into the encoder
        quantized = quantized.reshape(B, T, D).transpose(1, 2)  # [B*T, D] -> [B, D, T]
        codes_t = torch.stack(codes, dim=1).reshape(B, T, -1)  # K x [B*T] -> [B, T, K]
        return quantized, codes_t, commit / len(self.levels)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, K] -> summed code vectors [B, D, T]."""
        out = sum(level.embed[codes[..., k]] for k, level in enumerate(self.levels))  # [B, T, D]
        return out.transpose(1, 2)  # [B, T, D] -> [B, D, T]


# ---------------------------------------------------------------------------------------- codec


class RVQAudioCodec(nn.Module):
    """The trainable codec; implements :class:`omnitrain.tokenizer.base.AudioTokenizer`."""

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "mel":
            from omnitrain.tokenizer.mel_codec import GriffinLimDecoder, MelEncoder

            self.encoder: nn.Module = MelEncoder(cfg.sample_rate, cfg.hop, cfg.mel_hop, cfg.n_mels)
            self.decoder: nn.Module = GriffinLimDecoder(cfg.sample_rate, cfg.hop, cfg.mel_hop, cfg.n_mels, cfg.griffin_lim_iters)
        else:
            self.encoder, self.decoder = _encoder(cfg), _decoder(cfg)
        self.quantizer = ResidualVQ(cfg)
        self.codebook_size, self.n_levels = cfg.codebook_size, cfg.n_levels
        self.sample_rate, self.frame_rate, self.hop = cfg.sample_rate, cfg.frame_rate, cfg.hop

    @property
    def device(self) -> torch.device:
        return self.quantizer.levels[0].embed.device  # (a mel codec has buffers only)

    @property
    def fingerprint(self) -> str:
        """First 16 hex chars of sha256(config JSON + state_dict bytes); changes whenever weights change."""
        return module_fingerprint(to_dict(self.cfg), self)

    def _pad(self, wavs: torch.Tensor) -> torch.Tensor:
        if wavs.dim() != 3 or wavs.shape[1] != 1:
            raise ValueError(
                f"expected mono waveforms shaped [B, 1, S], got {tuple(wavs.shape)}; "
                "add the channel axis with wav[:, None] or downmix with omnitrain.tokenizer.audio_io"
            )
        extra = (-wavs.shape[-1]) % self.hop
        return F.pad(wavs, (0, extra))  # [B, 1, S] -> [B, 1, T*hop]

    def forward(self, wavs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: wavs [B, 1, S] -> (reconstruction [B, 1, T*hop], codes [B, T, K], commitment loss)."""
        z = self.encoder(self._pad(wavs))  # [B, D, T]
        q, codes, commit = self.quantizer(z)
        return self.decoder(q), codes, commit

    @torch.no_grad()
    def encode(self, wavs: torch.Tensor) -> torch.Tensor:
        """wavs [B, 1, S] float at ``sample_rate`` -> codes [B, ceil(S/hop), K] int64, on the input's device.

        The tail is zero-padded to whole frames. Deterministic: call ``.eval()`` first (training
        mode would update the codebooks), which :func:`load_audio_codec` does for you.
        """
        if self.training:
            raise ValueError("encode() in training mode would update the codebooks; call codec.eval() first")
        z = self.encoder(self._pad(wavs.to(self.device, torch.float32)))  # [B, D, T]
        _, codes, _ = self.quantizer(z)
        return codes.to(wavs.device)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, K] int64 -> wavs [B, 1, T*hop] float, on the codes' device."""
        if codes.dim() != 3 or codes.shape[-1] != self.n_levels:
            raise ValueError(f"expected codes shaped [B, T, K={self.n_levels}], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(
                f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]; "
                "subtract the layout's audio range offset of each level before decoding"
            )
        wavs = self.decoder(self.quantizer.lookup(codes.to(self.device, torch.long)))
        return wavs.to(codes.device)

    def save(self, path: str | Path) -> Path:
        """Write one checkpoint file (config + weights + schema_version), atomically."""
        return save_checkpoint(path, CHECKPOINT_KIND, SCHEMA_VERSION, to_dict(self.cfg), self)


def load_audio_codec(path: str | Path, device: str | torch.device = "cpu") -> RVQAudioCodec:
    """Load a checkpoint written by :meth:`RVQAudioCodec.save`, in eval mode on ``device``."""
    blob = load_checkpoint(path, CHECKPOINT_KIND, SCHEMA_VERSION, "omnitrain tokenizer train-audio")
    codec = RVQAudioCodec(from_dict(AudioCodecConfig, blob["config"]))
    codec.load_state_dict(blob["state_dict"])
    return codec.to(device).eval()
