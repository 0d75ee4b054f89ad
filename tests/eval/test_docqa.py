"""The synthetic document-QA generator and the DocVQA readers."""

import hashlib
import json

import pytest

from omnitrain.eval.docqa import MakeDocQAConfig, find_fonts, load_docqa, make_docqa


def _digest(folder):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.png")))).hexdigest()


def test_make_docqa_writes_records_and_is_deterministic(tmp_path):
    cfg = dict(n=6, seed=3, width=384, height=512, questions_per_doc=2)
    summary = make_docqa(MakeDocQAConfig(out_dir=tmp_path / "a", **cfg))
    make_docqa(MakeDocQAConfig(out_dir=tmp_path / "b", **cfg))
    assert summary["documents"] == 6 and summary["questions"] == 12
    assert summary["kinds"] == {"invoice": 2, "form": 2, "table": 2}
    a = (tmp_path / "a" / "docqa.jsonl").read_text()
    assert a == (tmp_path / "b" / "docqa.jsonl").read_text()
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    rows = [json.loads(line) for line in a.splitlines()]
    for r in rows:
        assert {"id", "image", "question", "answers", "kind", "field", "font"} <= set(r)
        assert (tmp_path / "a" / r["image"]).is_file() and r["answers"] and r["question"].endswith("?")
    other = make_docqa(MakeDocQAConfig(out_dir=tmp_path / "c", **{**cfg, "seed": 4}))
    assert other["questions"] == 12 and _digest(tmp_path / "c") != _digest(tmp_path / "a")


def test_money_answers_accept_several_spellings(tmp_path):
    make_docqa(MakeDocQAConfig(out_dir=tmp_path, n=12, kinds=["invoice"], questions_per_doc=9))
    totals = [r for r in load_docqa(tmp_path) if r["field"] == "total"]
    assert totals
    for r in totals:
        dollars, plain, commas = r["answers"]
        assert dollars.startswith("$") and float(plain) == float(commas.replace(",", ""))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="kinds"):
        MakeDocQAConfig(kinds=["receipt"])
    with pytest.raises(ValueError, match="noise"):
        MakeDocQAConfig(noise=2.0)
    with pytest.raises(ValueError, match="not found"):
        find_fonts(["NoSuchFont-Regular"])


def test_load_docqa_reads_our_set_with_absolute_images(tmp_path):
    make_docqa(MakeDocQAConfig(out_dir=tmp_path, n=2, width=320, height=400))
    rows = load_docqa(tmp_path / "docqa.jsonl")
    assert len(rows) == 2 and all(r["image"].startswith("/") for r in rows)


def test_load_docqa_reads_a_local_parquet_copy(tmp_path):
    """The lmms-lab/DocVQA layout: question, answers (list), image as {bytes, path}."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (32, 16), 255).save(buf, format="PNG")
    table = pa.table({
        "questionId": ["q1"], "question": ["What is the date?"], "answers": [["1 May 1999", "May 1, 1999"]],
        "question_types": [["form"]],
        "image": [{"bytes": buf.getvalue(), "path": None}],
    })  # fmt: skip
    (tmp_path / "DocVQA").mkdir()
    pq.write_table(table, tmp_path / "DocVQA" / "validation-00000-of-00001.parquet")
    rows = load_docqa(tmp_path, cache_dir=tmp_path / "cache")
    assert rows[0]["answers"] == ["1 May 1999", "May 1, 1999"] and rows[0]["id"] == "q1"
    assert Image.open(rows[0]["image"]).size == (32, 16)


def test_load_docqa_offline_hub_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no cached copy
    with pytest.raises(RuntimeError, match="make-docqa"):
        load_docqa("lmms-lab/DocVQA")
    with pytest.raises(FileNotFoundError, match="make-docqa"):
        load_docqa(tmp_path / "missing")
