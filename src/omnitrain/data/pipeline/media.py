"""Media fields of a record -> codes, through the image tokenizer and the audio codec (and back).

An image field may be a path (absolute, or relative to the record's file), raw bytes, a PIL image
or a Hugging Face image dict; an audio field a path, or a Hugging Face audio dict; a video field a path to any file FFmpeg
reads (through PyAV). A video becomes frames sampled at ``video_fps``, each followed by the codec
frames of the audio heard until the next one (time-interleaved, as GPT-4o takes video). Images are
brought to a size the tokenizer takes by the configured policy; every problem with one file is a
:class:`~omnitrain.data.pipeline.templates.SkipSample` naming it, which the build logs and counts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from omnitrain.data.pipeline.templates import SkipSample
from omnitrain.tokenizer.image import pil_to_tensor, to_rgb
from omnitrain.tokenizer.layout import AudioSegment, ImageSegment, Segment


@dataclass
class MediaConfig:
    image_size: int = 128  # pixels: the side for center_crop/resize, the longest side for fit
    image_policy: Literal["fit", "center_crop", "resize"] = "fit"  # fit keeps the aspect ratio
    audio_channels: Literal["downmix", "error"] = "downmix"
    max_audio_seconds: float = 60.0  # longer clips are skipped (logged), not truncated
    video_fps: float = 1.0  # video frames sampled per second; each is followed by its audio window
    max_video_seconds: float = 120.0
    device: str = "cpu"  # where the tokenizers run (cuda on GPU nodes)


class MediaTokenizers:
    """Holds the loaded image tokenizer and audio codec; turns record fields into codes."""

    def __init__(self, image: Any, audio: Any, cfg: MediaConfig, max_grid: int) -> None:
        self.image, self.audio, self.cfg, self.max_grid = image, audio, cfg, max_grid
        self.base_dir = Path(".")
        self.audio_seconds: list[float] = []  # durations of the clips read for the current record

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
        # imports scipy.signal (~0.6 s): audio only (eval imports this module)
        from omnitrain.tokenizer import audio_io

        rate = self.audio.sample_rate
        try:
            if isinstance(value, (str, Path)):
                path = Path(value)
                path = path if path.is_absolute() else self.base_dir / path
                if problem := wav_truncation(path):
                    raise SkipSample(problem)
                wav = audio_io.read_audio(path, rate, channels=self.cfg.audio_channels)
            else:
                wav = audio_io.read_hf_audio(value, rate, channels=self.cfg.audio_channels)
        except ValueError as e:
            raise SkipSample(str(e)) from e
        if len(wav) == 0:
            raise SkipSample(f"audio {str(value)[:200]} is empty")
        if len(wav) > self.cfg.max_audio_seconds * rate:
            raise SkipSample(f"audio {str(value)[:200]} is {len(wav) / rate:.1f}s, over max_audio_seconds={self.cfg.max_audio_seconds}")
        self.audio_seconds.append(len(wav) / rate)
        return wav

    def audio_codes(self, value: Any) -> np.ndarray:
        if self.audio is None:
            raise ValueError("the template has audio parts but no audio codec is configured (tokenizers.audio)")
        wav = torch.from_numpy(self.read_audio(value))[None, None].to(self.cfg.device)  # [S] -> [1, 1, S]
        return self.audio.encode(wav)[0].cpu().numpy().astype(np.int64)  # [T, K]

    def decode_audio(self, codes: np.ndarray) -> torch.Tensor:
        return self.audio.decode(torch.as_tensor(codes, dtype=torch.long)[None].to(self.cfg.device))[0]  # [1, S]

    # ------------------------------------------------------------------ video
    def video_segments(self, value: Any) -> list[Segment]:
        """A clip -> [frame 0, audio of [0, 1/fps), frame 1, audio of [1/fps, 2/fps), ...]."""
        try:
            import av  # PyAV: optional (the video extra)
        except ImportError as e:
            raise ImportError("video sources need PyAV: pip install 'omnitrain[video]' (bash setup.sh does)") from e
        if self.image is None:
            raise ValueError("video templates need an image tokenizer (tokenizers.image)")
        path = Path(value) if Path(value).is_absolute() else self.base_dir / value
        if not path.is_file():
            raise SkipSample(f"video file {path} does not exist")
        fps = self.cfg.video_fps
        try:
            with av.open(str(path)) as box:
                if not box.streams.video:
                    raise SkipSample(f"{path} has no video stream")
                frames, next_t = [], 0.0
                for frame in box.decode(video=0):
                    t = float(frame.time or 0.0)
                    if t > self.cfg.max_video_seconds:
                        raise SkipSample(f"{path} is longer than max_video_seconds={self.cfg.max_video_seconds}")
                    if t + 1e-6 >= next_t:  # the first frame at or after each sampling time
                        frames.append(self.prepare_image(frame.to_image()))
                        next_t = len(frames) / fps
            wav = self._video_audio(path) if self.audio is not None else None
        except (av.error.FFmpegError, OSError) as e:
            raise SkipSample(f"{path} cannot be decoded as video ({e})") from e
        if not frames:
            raise SkipSample(f"{path} holds no video frames")
        if len({tuple(f.shape) for f in frames}) != 1:
            raise SkipSample(f"{path} changes frame size mid-stream; re-encode it")
        grid = self.image.encode(torch.stack(frames).to(self.cfg.device)).cpu().numpy().astype(np.int64)  # [F, h, w]
        out: list[Segment] = []
        codes = None
        if wav is not None and len(wav):
            codes = self.audio.encode(torch.from_numpy(wav)[None, None].to(self.cfg.device))[0].cpu().numpy().astype(np.int64)
        for i, g in enumerate(grid):
            out.append(ImageSegment(g))
            if codes is not None:
                lo = round(i / fps * self.audio.frame_rate)
                hi = len(codes) if i == len(grid) - 1 else round((i + 1) / fps * self.audio.frame_rate)
                out.append(AudioSegment(codes[lo:hi]))  # [T_i, K]
        return out

    def _video_audio(self, path: Path) -> np.ndarray | None:
        """The clip's first audio track as mono float32 at the codec's rate (None: no audio)."""
        import av  # PyAV: optional (the video extra)

        with av.open(str(path)) as box:
            if not box.streams.audio:
                return None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=self.audio.sample_rate)
            chunks = []
            for frame in box.decode(audio=0):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        return np.concatenate(chunks).astype(np.float32) if chunks else None


def wav_truncation(path: Path) -> str | None:
    """Why a WAV file is shorter than its header says, or None (not a RIFF WAV, or complete).

    libsndfile reads a cut WAV without complaint, up to where the bytes stop, so a file truncated
    to 30 KB of 170 KB decodes as 1 s of a 5 s clip (issue 22). The header's ``data`` chunk size
    says how many bytes the clip should have; fewer bytes on disk means the file was cut."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos, byte_rate = 12, 0
        while pos + 8 <= size:
            f.seek(pos)
            chunk, n = f.read(4), int.from_bytes(f.read(4), "little")
            if chunk == b"fmt ":
                fmt = f.read(16)
                byte_rate = int.from_bytes(fmt[8:12], "little") if len(fmt) == 16 else 0
            elif chunk == b"data":
                have = size - pos - 8
                if n in (0, 0xFFFFFFFF) or have >= n:  # 0 / -1: written by a stream that never knew its length
                    return None
                secs = (f" ({have / byte_rate:.2f}s of {n / byte_rate:.2f}s)" if byte_rate else "")
                return (f"{path}: truncated WAV: the header declares {n:,} bytes of audio, the file holds {have:,}{secs}; "
                        "re-export or re-download it")  # fmt: skip
            pos += 8 + n + (n & 1)  # chunks are padded to an even size
    return None
