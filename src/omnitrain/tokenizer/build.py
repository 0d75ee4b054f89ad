"""Build a run's ``layout.json`` from the tokenizers it uses (``omnitrain tokenizer layout``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omnitrain.tokenizer.hf_text import load_text_tokenizer
from omnitrain.tokenizer.layout import TokenLayout


@dataclass
class LayoutConfig:
    text: Path = Path("runs/tokenizer/text")  # SentencePiece run folder / .model file, or a Hugging Face folder / .gguf / hub id
    image: str | None = None  # image tokenizer: omnitrain checkpoint file, or HF folder / hub id (Emu3, Chameleon)
    audio: str | None = None  # audio codec: omnitrain checkpoint file, or HF folder / hub id (EnCodec, Mimi)
    max_grid: int = 64  # largest image code grid side the layout can express
    out: Path = Path("runs/tokenizer/layout.json")


def load_media_tokenizers(image: Path | str | None, audio: Path | str | None, device: str = "cpu") -> tuple[object, object]:
    """Load the image tokenizer and audio codec named (either may be None).

    A file is an omnitrain checkpoint (``omnitrain tokenizer train-image`` / ``train-audio``); a
    folder, or a hub id, is a pretrained Hugging Face model (Emu3 / Chameleon VQ-VAE, EnCodec, Mimi).
    """
    img = aud = None
    if image is not None:
        if Path(image).is_file():
            from omnitrain.tokenizer.image import load_image_tokenizer

            img = load_image_tokenizer(image, device=device)
        else:
            from omnitrain.tokenizer.pretrained_image import load_pretrained_image_tokenizer

            img = load_pretrained_image_tokenizer(str(image), device=device)
    if audio is not None:
        if Path(audio).is_file():
            from omnitrain.tokenizer.audio import load_audio_codec

            aud = load_audio_codec(audio, device=device)
        else:
            from omnitrain.tokenizer.pretrained_audio import load_pretrained_audio_codec

            aud = load_pretrained_audio_codec(str(audio), device=device)
    return img, aud


def build_layout(cfg: LayoutConfig) -> TokenLayout:
    text = load_text_tokenizer(cfg.text)
    image, audio = load_media_tokenizers(cfg.image, cfg.audio)
    layout = TokenLayout.from_tokenizers(text, image, audio, max_grid=cfg.max_grid)
    path = layout.save(cfg.out)
    print(f"{layout.describe()} -> {path}")
    return layout
