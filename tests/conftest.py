"""Shared fixtures. Everything runs on CPU with data made here or shipped in installed packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnitrain.sources import corpora

REPO = Path(__file__).resolve().parents[1]

needs_gettext = pytest.mark.skipif(
    not (corpora.LOCALE_DIR / "gu" / "LC_MESSAGES" / "gtk20.mo").is_file(),
    reason="Debian gettext catalogs missing: run `bash setup.sh` as root (iso-codes libgtk2.0-common libglib2.0-data)",
)
needs_handbook = pytest.mark.skipif(
    not corpora.HANDBOOK_DIR.is_dir(), reason="Debian package debian-handbook missing: run `bash setup.sh` as root"
)


@pytest.fixture(scope="session")
def text_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4k BPE trained once per session on Debian's multilingual text (~2 s)."""
    from omnitrain.tokenizer.text import (
        TextCorpusConfig,
        TextTokenizerConfig,
        TrainTextTokenizerConfig,
        train_text_tokenizer,
    )

    if not (corpora.LOCALE_DIR / "gu" / "LC_MESSAGES" / "gtk20.mo").is_file() or not corpora.HANDBOOK_DIR.is_dir():
        pytest.skip("Debian text packages missing: run `bash setup.sh` as root")
    run = tmp_path_factory.mktemp("text_tok")
    cfg = TrainTextTokenizerConfig(
        run_dir=run,
        tokenizer=TextTokenizerConfig(vocab_size=4000),
        corpus=TextCorpusConfig(local=["gettext_debian", "debian_handbook"]),
    )
    train_text_tokenizer(cfg)
    return run


@pytest.fixture(scope="session")
def text_tokenizer(text_tokenizer_dir: Path):
    from omnitrain.tokenizer.text import TextTokenizer

    return TextTokenizer.load(text_tokenizer_dir)


@pytest.fixture(scope="session")
def omni_model_dir(tmp_path_factory: pytest.TempPathFactory, text_tokenizer_dir: Path) -> Path:
    """An untrained model over a real layout: a trained text BPE + small (untrained) image and audio
    tokenizers. Holds ``image.pt``, ``audio.pt``, ``layout/`` and ``model/`` (checkpoint step 7)."""
    import torch

    from omnitrain.model.io import save_model
    from omnitrain.model.transformer import ModelConfig, Transformer
    from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec
    from omnitrain.tokenizer.image import ImageTokenizerConfig, VQImageTokenizer
    from omnitrain.tokenizer.layout import TokenLayout
    from omnitrain.tokenizer.text import TextTokenizer

    d = tmp_path_factory.mktemp("omni")
    torch.manual_seed(0)
    image = VQImageTokenizer(ImageTokenizerConfig(codebook_size=32, base_channels=8, max_channels=16))
    audio = RVQAudioCodec(AudioCodecConfig(channels=4, latent_dim=16, n_levels=2, codebook_size=16))
    image.save(d / "image.pt")
    audio.save(d / "audio.pt")
    layout = TokenLayout.from_tokenizers(TextTokenizer.load(text_tokenizer_dir), image, audio, max_grid=16)
    layout.save(d / "layout")
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    save_model(model, d / "model", d / "layout", {"step": 7})
    return d
