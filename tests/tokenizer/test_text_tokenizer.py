"""The text tokenizer: trained on real text, exact round trip (code, 20 languages, any Unicode)."""

from __future__ import annotations

import inspect
import json
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnitrain.sources import corpora
from omnitrain.tokenizer.text import (
    TextCorpusConfig,
    TextTokenizer,
    TextTokenizerConfig,
    TrainTextTokenizerConfig,
    train_text_tokenizer,
)
from tests.conftest import needs_gettext


def test_trained_tokenizer_files_and_stats(text_tokenizer_dir, text_tokenizer):
    assert (text_tokenizer_dir / "text_tokenizer.model").is_file()
    cfg = json.loads((text_tokenizer_dir / "config.json").read_text())
    assert cfg["tokenizer"]["vocab_size"] == 4000
    stats = json.loads((text_tokenizer_dir / "stats.json").read_text())
    assert stats["vocab_size"] == text_tokenizer.vocab_size == 4000
    assert stats["fingerprint"] == text_tokenizer.fingerprint
    assert 0.1 < stats["tokens_per_char_sample"] < 0.8  # it learned merges: far below 1 token per char
    assert text_tokenizer.special_ids == {"bos": 1, "eos": 2, "pad": 3}


def test_python_source_round_trips_exactly(text_tokenizer):
    # real code with indentation, tabs, blank lines and trailing spaces (HumanEval depends on it)
    for module in (textwrap, inspect, json):
        src = inspect.getsource(module)
        assert text_tokenizer.decode(text_tokenizer.encode(src)) == src
    tricky = "def f(x):\n\tif x:  \n\t\treturn  x\n\n\n    # done   \n  "
    ids = text_tokenizer.encode(tricky)
    assert text_tokenizer.decode(ids) == tricky
    assert "\n" in [text_tokenizer.id_to_piece(i) for i in ids]  # newline is a piece of its own


@needs_gettext
def test_twenty_languages_round_trip_and_compress(text_tokenizer):
    texts = corpora.heldout_texts(corpora.GPT4O_LANGUAGES)
    for lang, strings in texts.items():
        sample = strings[:200]
        assert text_tokenizer.decode(text_tokenizer.encode(sample)) == sample, lang
        n_tok = sum(map(len, text_tokenizer.encode(sample)))
        assert n_tok < sum(map(len, sample)), f"{lang}: no better than one token per character"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_any_unicode_round_trips(text_tokenizer, s):
    assert text_tokenizer.decode(text_tokenizer.encode(s)) == s


def test_batched_encode_equals_single(text_tokenizer):
    texts = ["hello world", "", "  indented\n", "数据 données", "\u2581 is SentencePiece's space symbol"]
    batch = text_tokenizer.encode(texts)
    assert batch == [text_tokenizer.encode(t) for t in texts]
    assert text_tokenizer.decode(batch) == texts


def test_training_is_deterministic_and_reads_txt_jsonl_parquet_gz(tmp_path):
    src = inspect.getsource(json) + inspect.getsource(textwrap)
    docs = [src[i : i + 3000] for i in range(0, len(src), 3000)]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs[1:4]))
    pq.write_table(pa.table({"content": docs[4:]}), tmp_path / "c.parquet")
    import gzip

    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "gzip works too"}) + "\n")
    fps = []
    for run in ("r1", "r2"):
        cfg = TrainTextTokenizerConfig(
            run_dir=tmp_path / run,
            tokenizer=TextTokenizerConfig(vocab_size=400),
            corpus=TextCorpusConfig(files=[str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl*"), str(tmp_path / "c.parquet")], text_field="content"),
        )
        tok = train_text_tokenizer(cfg)
        fps.append(tok.fingerprint)
        assert tok.decode(tok.encode(src)) == src
    assert fps[0] == fps[1]
    assert json.loads((tmp_path / "r1" / "stats.json").read_text())["chars"] == sum(map(len, docs)) + len("gzip works too")


def test_hugging_face_dataset_from_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"body": [inspect.getsource(textwrap)] * 3})
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = TrainTextTokenizerConfig(
        run_dir=tmp_path / "run", tokenizer=TextTokenizerConfig(vocab_size=600),
        corpus=TextCorpusConfig(hf_dataset=str(tmp_path / "ds"), text_field="body"),
    )  # fmt: skip
    tok = train_text_tokenizer(cfg)
    assert tok.vocab_size > 256
    small = TrainTextTokenizerConfig(run_dir=tmp_path / "run1", tokenizer=TextTokenizerConfig(vocab_size=300), corpus=cfg.corpus)
    with pytest.raises(ValueError, match="Vocabulary size is smaller than required_chars.*set tokenizer.vocab_size"):
        train_text_tokenizer(small)  # SentencePiece's RuntimeError, turned into a fix-it message
    bad = TrainTextTokenizerConfig(run_dir=tmp_path / "run2", corpus=TextCorpusConfig(hf_dataset=str(tmp_path / "ds")))
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body'\]\)"):
        train_text_tokenizer(bad)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"text": "ok"}\n{broken\n', r"b.jsonl:2: not valid JSON"),
        ('{"txt": "wrong key"}\n', r"b.jsonl:1: no 'text' field \(has \['txt'\]\)"),
        ('{"text": 5}\n', r"b.jsonl:1: 'text' is not a string"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, content, fragment):
    (tmp_path / "b.jsonl").write_text(content)
    cfg = TrainTextTokenizerConfig(run_dir=tmp_path / "run", corpus=TextCorpusConfig(files=[str(tmp_path / "b.jsonl")]))
    with pytest.raises(ValueError, match=fragment):
        train_text_tokenizer(cfg)


def test_missing_empty_and_non_utf8_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        train_text_tokenizer(TrainTextTokenizerConfig(run_dir=tmp_path / "r", corpus=TextCorpusConfig(files=[str(tmp_path / "nope*.txt")])))
    with pytest.raises(ValueError, match="corpus is empty"):
        train_text_tokenizer(TrainTextTokenizerConfig(run_dir=tmp_path / "r", corpus=TextCorpusConfig()))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        train_text_tokenizer(TrainTextTokenizerConfig(run_dir=tmp_path / "r", corpus=TextCorpusConfig(files=[str(tmp_path / "latin1.txt")])))


def test_loading_wrong_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-text"):
        TextTokenizer.load(tmp_path)
    (tmp_path / "text_tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        TextTokenizer.load(tmp_path)


def test_a_normalising_sentencepiece_model_is_refused(tmp_path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    lines = inspect.getsource(textwrap).splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=200, minloglevel=2)
    (tmp_path / "m.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="normalises text"):
        TextTokenizer.load(tmp_path / "m.model")


def test_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match="too small"):
        TextTokenizerConfig(vocab_size=100)
