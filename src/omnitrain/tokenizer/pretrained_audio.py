"""Published neural audio codecs (EnCodec, Mimi) behind omnitrain's ``AudioTokenizer`` protocol.

Legend: B batch, S samples, T codec frames, K residual levels used.

    codec = load_pretrained_audio_codec("facebook/encodec_24khz", n_levels=8)   # hub id when online
    codec = load_pretrained_audio_codec("/models/mimi", kind="mimi", n_levels=8) # local save_pretrained dir
    codes = codec.encode(wavs)    # [B, 1, S] at codec.sample_rate -> [B, T, K] int64
    wavs = codec.decode(codes)    # [B, T, K] -> [B, 1, S']

Both go through ``transformers`` (``EncodecModel``, ``MimiModel``), imported lazily. ``n_levels``
picks how many residual levels to keep (bit rate = frame_rate * K * log2(codebook_size)); None
keeps every level the checkpoint has. EnCodec chooses levels through a bandwidth, so only the level
counts of its ``target_bandwidths`` are accepted. Only mono, unchunked, unnormalised EnCodec
checkpoints (the 24 kHz family) fit the protocol: codes alone must be enough to decode.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Literal

import torch

Kind = Literal["auto", "encodec", "mimi"]


def _transformers() -> Any:
    try:
        import transformers  # optional (the hf extra)
    except ImportError as e:  # optional dependency
        raise ValueError("pretrained audio codecs need transformers: pip install 'omnitrain[hf]'") from e
    return transformers


class PretrainedAudioCodec:
    """A frozen EnCodec or Mimi model in eval mode, speaking omnitrain's AudioTokenizer protocol."""

    def __init__(self, model: Any, kind: Literal["encodec", "mimi"], n_levels: int | None):
        cfg = model.config
        self.model, self.kind = model.eval(), kind
        self.codebook_size = int(cfg.codebook_size)
        self.sample_rate = int(cfg.sampling_rate)
        if kind == "encodec":
            if cfg.audio_channels != 1 or cfg.chunk_length_s is not None or cfg.normalize:
                raise ValueError(
                    "only mono, unchunked, unnormalised EnCodec checkpoints (e.g. facebook/encodec_24khz) can be "
                    f"used as a tokenizer (got audio_channels={cfg.audio_channels}, chunk_length_s={cfg.chunk_length_s}, "
                    f"normalize={cfg.normalize}): their codes need per-chunk scales to decode"
                )
            self.frame_rate = self.sample_rate / math.prod(cfg.upsampling_ratios)
            per_level = math.log2(self.codebook_size) * cfg.frame_rate  # EnCodec's own bit accounting
            levels = lambda bw: min(cfg.num_quantizers, max(1, math.floor(bw * 1000 / per_level)))  # noqa: E731
            by_levels = {levels(bw): bw for bw in cfg.target_bandwidths if cfg.num_quantizers > 0}
            self.n_levels = max(by_levels) if n_levels is None else n_levels
            if self.n_levels not in by_levels:
                raise ValueError(
                    f"n_levels={n_levels} is not available in this EnCodec checkpoint; valid: {sorted(by_levels)} "
                    f"(its target_bandwidths {list(cfg.target_bandwidths)} kbps)"
                )
            self._bandwidth = by_levels[self.n_levels]
        else:
            self.frame_rate = float(cfg.frame_rate)
            low = cfg.num_semantic_quantizers + 1 if cfg.num_semantic_quantizers else 1
            self.n_levels = cfg.num_quantizers if n_levels is None else n_levels
            if not low <= self.n_levels <= cfg.num_quantizers:
                raise ValueError(f"n_levels={n_levels} must be in [{low}, {cfg.num_quantizers}] for this Mimi checkpoint")
        h = hashlib.sha256(f"{kind}|{self.n_levels}|{cfg.to_json_string(use_diff=False)}".encode())
        for name, t in model.state_dict().items():  # frozen weights: hash once
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.fingerprint = h.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, wavs: torch.Tensor) -> torch.Tensor:
        """wavs [B, 1, S] float at ``sample_rate`` -> codes [B, T, K] int64, on the input's device."""
        if wavs.dim() != 3 or wavs.shape[1] != 1:
            raise ValueError(f"expected mono waveforms shaped [B, 1, S], got {tuple(wavs.shape)}")
        x = wavs.to(self.device, torch.float32)
        if self.kind == "encodec":
            codes = self.model.encode(x, bandwidth=self._bandwidth, return_dict=True).audio_codes  # [1, B, K, T]
            codes = codes[0]  # unchunked: one chunk -> [B, K, T]
        else:
            codes = self.model.encode(x, num_quantizers=self.n_levels).audio_codes  # [B, K, T]
        return codes.transpose(1, 2).long().to(wavs.device)  # [B, K, T] -> [B, T, K]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, K] int64 -> wavs [B, 1, S'] float, on the codes' device."""
        if codes.dim() != 3 or codes.shape[-1] != self.n_levels:
            raise ValueError(f"expected codes shaped [B, T, K={self.n_levels}], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}); subtract the layout's level offsets first")
        c = codes.to(self.device, torch.long).transpose(1, 2)  # [B, T, K] -> [B, K, T]
        if self.kind == "encodec":
            wavs = self.model.decode(c[None], [None], return_dict=True).audio_values  # [1, B, K, T] -> [B, 1, S']
        else:
            wavs = self.model.decode(c).audio_values  # [B, K, T] -> [B, 1, S']
        return wavs.float().to(codes.device)


def load_pretrained_audio_codec(
    name_or_path: str | Path,
    kind: Kind = "auto",
    n_levels: int | None = None,
    device: str | torch.device = "cpu",
) -> PretrainedAudioCodec:
    """Load EnCodec or Mimi from a local ``save_pretrained`` directory, or a hub id when online.

    Args:
        name_or_path: a directory with ``config.json`` + weights, or a hub id (``facebook/encodec_24khz``,
            ``kyutai/mimi``); local directories never touch the network.
        kind: ``"auto"`` reads ``model_type`` from the config.
        n_levels: residual levels to keep (None: all).
        device: where the model runs; encode/decode return tensors on their input's device.
    """
    tf = _transformers()
    local = Path(name_or_path).is_dir()
    try:
        config = tf.AutoConfig.from_pretrained(str(name_or_path), local_files_only=local)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a codec config from {name_or_path!r} ({e}); give a local directory written by "
            "save_pretrained, or a hub id with network access (HF_HUB_OFFLINE=1 blocks downloads)"
        ) from e
    model_type = getattr(config, "model_type", None)
    if kind == "auto":
        if model_type not in ("encodec", "mimi"):
            raise ValueError(f"{name_or_path}: model_type {model_type!r} is not a supported codec; valid: encodec, mimi")
        kind = model_type
    elif kind != model_type:
        raise ValueError(f"{name_or_path}: kind={kind!r} but its config says model_type={model_type!r}; use kind=auto")
    cls = tf.EncodecModel if kind == "encodec" else tf.MimiModel
    model = cls.from_pretrained(str(name_or_path), local_files_only=local)
    return PretrainedAudioCodec(model.to(device), kind, n_levels)
