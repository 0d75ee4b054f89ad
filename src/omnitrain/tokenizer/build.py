"""Build a run's ``layout.json`` from the tokenizers it uses (``omnitrain tokenizer layout``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omnitrain.tokenizer.layout import TokenLayout
from omnitrain.tokenizer.text import TextTokenizer


@dataclass
class LayoutConfig:
    text: Path = Path("runs/tokenizer/text")  # text tokenizer run folder or .model file
    image: Path | None = None  # image tokenizer checkpoint (omitted: no image range)
    audio: Path | None = None  # audio codec checkpoint (omitted: no audio range)
    max_grid: int = 64  # largest image code grid side the layout can express
    out: Path = Path("runs/tokenizer/layout.json")


def load_media_tokenizers(image: Path | None, audio: Path | None, device: str = "cpu") -> tuple[object, object]:
    """Load the image tokenizer and audio codec checkpoints named (either may be None)."""
    img = aud = None
    if image is not None:
        from omnitrain.tokenizer.image import load_image_tokenizer

        img = load_image_tokenizer(image, device=device)
    if audio is not None:
        from omnitrain.tokenizer.audio import load_audio_codec

        aud = load_audio_codec(audio, device=device)
    return img, aud


def build_layout(cfg: LayoutConfig) -> TokenLayout:
    text = TextTokenizer.load(cfg.text)
    image, audio = load_media_tokenizers(cfg.image, cfg.audio)
    layout = TokenLayout.from_tokenizers(text, image, audio, max_grid=cfg.max_grid)
    path = layout.save(cfg.out)
    print(f"{layout.describe()} -> {path}")
    return layout
