"""Shared fixtures. Everything runs on CPU with data made here or shipped in installed packages."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnitrain import corpora

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
