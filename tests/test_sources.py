"""Hugging Face sources are streamed (issue 21, item 3): `corpus=hf` and `data build` with
`source.kind=hf` read rows as they need them, through a seeded shuffle buffer, and stop at
`max_chars` / `limit` without reading the rest. Tested on a local data folder through the same
`datasets.load_dataset(..., streaming=True)` call a hub name takes; the offline error stays one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from omnitrain.sources import text as sources


@pytest.fixture
def hf_folder(tmp_path, monkeypatch) -> Path:
    """20 jsonl files of 50 rows, one of them not JSON at all: a reader that loads the whole dataset
    (as `load_dataset` without streaming did) fails on it; a streamed one that stops early never opens it."""
    monkeypatch.setattr(sources, "SHUFFLE_BUFFER", 40)  # the buffer is filled before the first row comes out
    folder = tmp_path / "hub_like"
    folder.mkdir()
    for f in range(20):
        rows = [{"text": f"file {f} row {r}: " + "streamed text " * 5, "id": f * 100 + r} for r in range(50)]
        (folder / f"part-{f:02d}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    # not JSON: the last of the 20 files in the seeded order (datasets 5.2 shuffles the file list with seed 0)
    (folder / "part-12.jsonl").write_text("this file is not JSON\n" * 50)
    return folder


def test_rows_are_streamed_shuffled_the_same_way_each_time_and_stop_early(hf_folder):
    first = [r["id"] for _, r in zip(range(30), sources.iter_hf_rows(str(hf_folder)), strict=False)]
    again = [r["id"] for _, r in zip(range(30), sources.iter_hf_rows(str(hf_folder)), strict=False)]
    assert first == again  # seeded: a restarted build reads the same order
    assert first != sorted(first)  # shuffled in the buffer
    assert len(set(first)) == 30


def test_corpus_hf_trains_a_tokenizer_on_max_chars_without_reading_the_rest(hf_folder, tmp_path):
    from omnitrain.tokenizer.text import (
        TextCorpusConfig,
        TextTokenizerConfig,
        TrainTextTokenizerConfig,
        train_text_tokenizer,
    )

    cfg = TrainTextTokenizerConfig(run_dir=tmp_path / "tok", tokenizer=TextTokenizerConfig(vocab_size=300),
                                   corpus=TextCorpusConfig(hf_dataset=str(hf_folder), max_chars=20_000))  # fmt: skip
    train_text_tokenizer(cfg)  # before: load_dataset without streaming read every file, and failed on part-07
    stats = json.loads((tmp_path / "tok" / "stats.json").read_text())
    assert 20_000 <= stats["chars"] < 20_000 + 200, stats


def test_data_build_of_an_hf_source_stops_at_limit(hf_folder, tmp_path, text_tokenizer_dir):
    from omnitrain.data.pipeline.build import build_shards
    from tests.data.test_pipeline import make_cfg, read_back

    src = {"kind": "hf", "hf_dataset": str(hf_folder), "limit": 25}
    cfg = make_cfg(tmp_path, text_tokenizer_dir, src, "text_lm")
    stats = build_shards(cfg)
    assert stats["samples"] == 25 and stats["errors"] == 0
    origins = [s.meta["origin"] for s in read_back(cfg.out_dir)]
    assert len(set(origins)) == 25 and all(o.startswith(f"{hf_folder}[train][") for o in origins)


def test_the_offline_error_stays_one_clear_line(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not load Hugging Face dataset 'HuggingFaceFW/fineweb-edu'.*Offline, pass a local folder"):
        next(sources.iter_hf_documents("HuggingFaceFW/fineweb-edu", "train", "text", "sample-10BT"))
