"""The tokenizer bundle: one config for where a layout's tokenizers live, and one loader that checks them.

Every consumer of tokenizers (the layout command, the shard builder, ``data inspect``, ``omnitrain
generate``, the eval harness, the demo) names them with a :class:`TokenizerPaths` and loads them with
:func:`load`, which rebuilds the :class:`TokenLayout` from what it loaded and, given the layout the
shards or the model were made under, refuses tokenizers that would give other ids.

A path is either an omnitrain artefact (a SentencePiece run folder or ``.model`` file; an image
tokenizer / audio codec checkpoint file) or a pretrained Hugging Face one (a tokenizer folder, ``.gguf``
or hub id; an Emu3 / Chameleon VQ-VAE or EnCodec / Mimi folder or hub id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from omnitrain.tokenizer.hf_text import load_text_tokenizer
from omnitrain.tokenizer.layout import ChatTemplate, LayoutMismatchError, TokenLayout

PATHS_HINT = "pass tokenizers.text=... tokenizers.image=... tokenizers.audio=... (the ones the shards were built with)"


@dataclass
class TokenizerPaths:
    """Where the tokenizers of one token layout live (``text: null``: see each command's recipe)."""

    text: str | None = None  # SentencePiece run folder / .model file, or a Hugging Face folder / .gguf / hub id
    image: str | None = None  # omnitrain checkpoint file, or a Hugging Face folder / hub id (Emu3, Chameleon)
    audio: str | None = None  # omnitrain checkpoint file, or a Hugging Face folder / hub id (EnCodec, Mimi)
    max_grid: int = 64  # largest image code grid side the layout can express
    audio_levels: int | None = None  # a pretrained codec's residual levels to keep (Mimi: 8, as Moshi); None: all it has

    def __post_init__(self) -> None:
        # YAML and manifests give strings; callers may give Paths: one type inside
        for name in ("text", "image", "audio"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(value))
        if self.max_grid < 1:
            raise ValueError(f"tokenizers.max_grid must be >= 1, got {self.max_grid}")


@dataclass
class TokenizerBundle:
    """The loaded tokenizers (``image`` / ``audio`` None when the layout has none) and their layout."""

    paths: TokenizerPaths
    text: Any
    image: Any | None
    audio: Any | None
    layout: TokenLayout


def load_media_tokenizers(image: Path | str | None, audio: Path | str | None, device: str = "cpu",
                          audio_levels: int | None = None) -> tuple[Any, Any]:  # fmt: skip
    """Load the image tokenizer and audio codec named (either may be None).

    A file is an omnitrain checkpoint (``omnitrain tokenizer train-image`` / ``train-audio``); a
    folder, or a hub id, is a pretrained Hugging Face model (Emu3 / Chameleon VQ-VAE, EnCodec, Mimi).
    """
    # The four loaders are imported on use: each imports torch (~0.9 s), which `omnitrain tokenizer layout`
    # (tokenizer/build.py) and the users of TokenizerPaths do not need; the pretrained two also need transformers.
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

            if audio_levels is not None:
                raise ValueError(f"tokenizers.audio_levels={audio_levels} picks the levels of a pretrained codec (EnCodec, "
                                 f"Mimi); {audio} is an omnitrain codec with its own n_levels: drop audio_levels")  # fmt: skip

            aud = load_audio_codec(audio, device=device)
        else:
            from omnitrain.tokenizer.pretrained_audio import load_pretrained_audio_codec

            aud = load_pretrained_audio_codec(str(audio), n_levels=audio_levels, device=device)
    return img, aud


def load(
    paths: TokenizerPaths,
    expect_layout: TokenLayout | str | None = None,
    device: str = "cpu",
    what: str = "the caller",
    text: Any = None,
) -> TokenizerBundle:
    """Load the tokenizers of ``paths`` and the layout they make; check it against ``expect_layout``.

    Args:
        paths: where the tokenizers live; ``paths.text`` is required.
        expect_layout: the layout (or its hash) the caller's shards or model were made under. The
            chat template is the expected layout's (it is the model's, not the tokenizers'): only the
            ids must agree.
        device: where the image tokenizer and audio codec run.
        what: how the error message names the side that expects the layout (e.g. "the model", "shards X").
        text: the text tokenizer of ``paths.text`` when the caller has it loaded already (not read again).

    Raises:
        ValueError: when ``paths.text`` is missing.
        LayoutMismatchError: when the tokenizers give another layout than ``expect_layout`` (both hashes named).
    """
    if not paths.text:
        raise ValueError(f"no text tokenizer given: {PATHS_HINT}")
    text = text if text is not None else load_text_tokenizer(paths.text)
    image, audio = load_media_tokenizers(paths.image, paths.audio, device, paths.audio_levels)
    chat = expect_layout.chat_template if isinstance(expect_layout, TokenLayout) else ChatTemplate()
    layout = TokenLayout.from_tokenizers(text, image, audio, max_grid=paths.max_grid, chat_template=chat)
    expected = expect_layout.hash if isinstance(expect_layout, TokenLayout) else expect_layout
    if expected is not None and expected != layout.hash:
        raise LayoutMismatchError(f"the tokenizers {paths} make token layout {layout.hash}, but {what} uses layout "
                                  f"{expected}: {PATHS_HINT}")  # fmt: skip
    return TokenizerBundle(paths, text, image, audio, layout)


def recorded_paths(model_dir: Path, run_dir: Path | None = None) -> TokenizerPaths:
    """The tokenizers a training run's shards were built with: its ``config.yaml`` names the shard sets,
    whose ``manifest.json`` records the tokenizer paths.

    Raises:
        FileNotFoundError: when no training config or no readable manifest is found (says what to pass).
    """
    config_file = next((p / "config.yaml" for p in (run_dir, model_dir.parent) if p and (p / "config.yaml").is_file()), None)
    if config_file is None:
        raise FileNotFoundError(f"cannot tell which tokenizers {model_dir} uses (no training config.yaml beside it): {PATHS_HINT}")
    sources = yaml.safe_load(config_file.read_text())["data"]["sources"]
    for spec in sources.values():
        manifest = Path(spec["path"]) / "manifest.json"
        if manifest.is_file():
            return TokenizerPaths(**json.loads(manifest.read_text())["config"]["tokenizers"])
    raise FileNotFoundError(f"none of the training shard sets in {config_file} is readable here "
                            f"({[s['path'] for s in sources.values()]}): {PATHS_HINT}")  # fmt: skip
