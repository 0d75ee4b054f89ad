"""Media fields of a record -> codes, through the image tokenizer and the audio codec (and back).

An image field may be a path (absolute, or relative to the record's file), raw bytes, a PIL image
or a Hugging Face image dict; an audio field a path, or a Hugging Face audio dict. Images are
brought to a size the tokenizer takes by the configured policy; every problem with one file is a
:class:`~omnitrain.pipeline.templates.SkipSample` naming it, which the build logs and counts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from omnitrain.pipeline.templates import SkipSample


@dataclass
class MediaConfig:
    image_size: int = 128  # pixels: the side for center_crop/resize, the longest side for fit
    image_policy: Literal["fit", "center_crop", "resize"] = "fit"  # fit keeps the aspect ratio
    audio_channels: Literal["downmix", "error"] = "downmix"
    max_audio_seconds: float = 60.0  # longer clips are skipped (logged), not truncated
    device: str = "cpu"  # where the tokenizers run (cuda on GPU nodes)


class MediaTokenizers:
    """Holds the loaded image tokenizer and audio codec; turns record fields into codes."""

    def __init__(self, image: Any, audio: Any, cfg: MediaConfig, max_grid: int) -> None:
        self.image, self.audio, self.cfg, self.max_grid = image, audio, cfg, max_grid
        self.base_dir = Path(".")

    # ------------------------------------------------------------------ images
    def _open_image(self, value: Any) -> Image.Image:
        try:
            if isinstance(value, Image.Image):
                return value
            if isinstance(value, dict):  # a Hugging Face Image() value
                value = value.get("bytes") or value.get("path")
            if isinstance(value, (bytes, bytearray)):
                return Image.open(io.BytesIO(value))
            path = Path(value)
            path = path if path.is_absolute() else self.base_dir / path
            if not path.is_file():
                raise SkipSample(f"image file {path} does not exist")
            img = Image.open(path)
            img.load()  # decode now: a truncated file fails here, with its name
            return img
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise SkipSample(f"image {str(value)[:200]} cannot be decoded ({e})") from e

    def prepare_image(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> [3, H, W] in [-1, 1], H and W multiples of the downsample factor."""
        from omnitrain.tokenizer.image import pil_to_tensor, to_rgb

        img, d, s = to_rgb(img), self.image.downsample, self.cfg.image_size
        w, h = img.size
        if self.cfg.image_policy == "center_crop":
            side = min(w, h)
            img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            size = (s, s)
        elif self.cfg.image_policy == "resize":
            size = (s, s)
        else:  # fit: longest side -> s, both sides rounded to whole codes
            scale = s / max(w, h)
            size = (max(d, round(w * scale / d) * d), max(d, round(h * scale / d) * d))
        size = (size[0] // d * d, size[1] // d * d)
        if max(size) // d > self.max_grid:
            raise ValueError(f"image_size {s} gives a {max(size) // d}-code side; the layout allows {self.max_grid}")
        return pil_to_tensor(img.resize(size, Image.Resampling.BICUBIC))

    def image_codes(self, value: Any) -> np.ndarray:
        if self.image is None:
            raise ValueError("the template has image parts but no image tokenizer is configured (tokenizers.image)")
        x = self.prepare_image(self._open_image(value)).unsqueeze(0).to(self.cfg.device)  # [1, 3, H, W]
        return self.image.encode(x)[0].cpu().numpy().astype(np.int64)  # [h, w]

    def decode_image(self, codes: np.ndarray) -> torch.Tensor:
        return self.image.decode(torch.as_tensor(codes, dtype=torch.long)[None].to(self.cfg.device))[0]  # [3, H, W]

    # ------------------------------------------------------------------ audio
    def read_audio(self, value: Any) -> np.ndarray:
        from omnitrain.tokenizer import audio_io

        rate = self.audio.sample_rate
        try:
            if isinstance(value, (str, Path)):
                path = Path(value)
                path = path if path.is_absolute() else self.base_dir / path
                wav = audio_io.read_audio(path, rate, channels=self.cfg.audio_channels)
            else:
                wav = audio_io.read_hf_audio(value, rate, channels=self.cfg.audio_channels)
        except ValueError as e:
            raise SkipSample(str(e)) from e
        if len(wav) == 0:
            raise SkipSample(f"audio {str(value)[:200]} is empty")
        if len(wav) > self.cfg.max_audio_seconds * rate:
            raise SkipSample(f"audio {str(value)[:200]} is {len(wav) / rate:.1f}s, over max_audio_seconds={self.cfg.max_audio_seconds}")
        return wav

    def audio_codes(self, value: Any) -> np.ndarray:
        if self.audio is None:
            raise ValueError("the template has audio parts but no audio codec is configured (tokenizers.audio)")
        wav = torch.from_numpy(self.read_audio(value))[None, None].to(self.cfg.device)  # [S] -> [1, 1, S]
        return self.audio.encode(wav)[0].cpu().numpy().astype(np.int64)  # [T, K]

    def decode_audio(self, codes: np.ndarray) -> torch.Tensor:
        return self.audio.decode(torch.as_tensor(codes, dtype=torch.long)[None].to(self.cfg.device))[0]  # [1, S]
