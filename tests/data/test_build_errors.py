"""`omnitrain data build` with hostile inputs (issue 22, item 3): every bad record goes to
errors.jsonl with its file and line (or row), the rest of the source is built, and outputs that
cannot be written are one-line errors naming the path."""

from __future__ import annotations

import errno
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from omnitrain.cli import main
from omnitrain.data.pipeline import build as build_mod
from omnitrain.data.pipeline.build import build_shards
from tests.data.test_pipeline import LIBRIVOX, SKIMAGE, make_cfg, needs_librivox, read_back

CLIP = "sense_and_sensibility_01_austen_64kb-0890"  # 5.3 s, 169,644 bytes: the 170 KB WAV


def errors_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]


def write_wav(path: Path, seconds: float, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


# ----------------------------------------------------------------------------- encoding errors
def test_one_non_utf8_row_in_a_jsonl_is_logged_with_file_and_line_and_the_rest_is_built(tmp_path, text_tokenizer_dir, capsys):
    rows = [json.dumps({"text": f"row number {i}"}).encode() for i in range(5)]
    rows[2] = '{"text": "caf\u00e9 au lait"}'.encode("latin-1")  # one latin-1 row (before: the whole build stopped)
    rows.insert(4, b"[1, 2]")  # valid JSON, but not an object
    src = tmp_path / "docs.jsonl"
    src.write_bytes(b"\n".join(rows) + b"\n")
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "records", "paths": [str(src)]}, "text_lm", min_items_for_error_rate=1000)
    stats = build_shards(cfg)
    assert stats["samples"] == 4 and stats["errors"] == 2
    errors = errors_of(cfg.out_dir)
    assert [(e["file"], e["line"]) for e in errors] == [(str(src), 3), (str(src), 5)]
    assert "not UTF-8 (byte 0xe9 at column 14)" in errors[0]["error"] and "re-encode" in errors[0]["error"]
    assert "not an object" in errors[1]["error"]
    assert "2 bad record(s) went to " + str(cfg.out_dir / "errors.jsonl") in capsys.readouterr().out


def test_latin1_text_document_and_csv_row_are_bad_records_not_a_stopped_build(tmp_path, text_tokenizer_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("a plain document in utf-8")
    (docs / "bad.txt").write_bytes("premi\u00e8re ligne\nna\u00efve".encode("latin-1"))
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "text", "paths": [str(docs)]}, "text_lm", min_items_for_error_rate=1000)
    assert build_shards(cfg)["samples"] == 1
    (bad,) = errors_of(cfg.out_dir)
    assert bad["file"] == str(docs / "bad.txt") and "not UTF-8" in bad["error"]
    table = tmp_path / "rows.csv"
    table.write_bytes(b"text\nfirst row\n" + "s\u00e9cond".encode("latin-1") + b"\nthird row\n")
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "records", "paths": [str(table)]}, "text_lm", out="csv", min_items_for_error_rate=1000)
    assert build_shards(cfg)["samples"] == 2
    (bad,) = errors_of(cfg.out_dir)
    assert (bad["file"], bad["line"]) == (str(table), 3) and "not UTF-8" in bad["error"]


def test_latin1_caption_and_corrupt_png_are_logged_and_the_other_images_built(tmp_path, text_tokenizer_dir, media_ckpts):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("astronaut", "camera", "coffee"):
        shutil.copy(SKIMAGE / f"{name}.png", folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a photo: {name}")
    (folder / "camera.txt").write_bytes("une cam\u00e9ra\nsur deux lignes".encode("latin-1"))
    (folder / "broken.png").write_bytes((SKIMAGE / "chelsea.png").read_bytes()[:3000])  # corrupt PNG
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "image_folder", "paths": [str(folder)]}, "caption", media_ckpts, min_items_for_error_rate=1000)
    stats = build_shards(cfg)
    assert stats["samples"] == 2 and stats["errors"] == 2
    by_file = {Path(e["file"]).name: e["error"] for e in errors_of(cfg.out_dir)}
    assert set(by_file) == {"broken.png", "camera.png"}
    assert "cannot be decoded" in by_file["broken.png"]
    assert f"{folder / 'camera.txt'}:1: not UTF-8" in by_file["camera.png"]  # the caption file and its line


# ----------------------------------------------------------------------------- audio
def test_wav_truncation_compares_the_header_with_the_bytes_present(tmp_path):
    from omnitrain.data.pipeline.media import wav_truncation

    write_wav(tmp_path / "full.wav", 1.0)
    assert wav_truncation(tmp_path / "full.wav") is None
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 4])
    problem = wav_truncation(tmp_path / "cut.wav")
    assert "truncated WAV" in problem and "32,000 bytes" in problem and "(0.25s of 1.00s)" in problem
    (tmp_path / "x.wav").write_bytes(b"not a wav at all")
    assert wav_truncation(tmp_path / "x.wav") is None  # not RIFF: left to the decoder, which names it


@needs_librivox
def test_truncated_wav_and_too_short_clip_go_to_errors_not_into_shards(tmp_path, text_tokenizer_dir, media_ckpts):
    folder = tmp_path / "clips"
    folder.mkdir()
    data = (LIBRIVOX / f"{CLIP}.wav").read_bytes()
    (folder / "cut.wav").write_bytes(data[:30_000])  # 30 KB of 170 KB: before, a sample with the full transcript
    shutil.copy(LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0880.wav", folder / "ok.wav")
    write_wav(folder / "short.wav", 0.5)  # a complete file, but half a second for a long sentence
    (folder / "latin.wav").write_bytes(data)
    table = tmp_path / "transcripts.tsv"
    sentence = "unless to be rather cold hearted and rather selfish is to be ill disposed"
    table.write_bytes(f"cut\t{sentence}\nok\the was not an ill disposed young man\nshort\t{sentence}\n".encode()
                      + "latin\tr\u00e9sum\u00e9 of a clip\n".encode("latin-1") + b"no id on this line\n")  # fmt: skip
    src = {"kind": "audio_folder", "paths": [str(folder)], "transcripts": str(table)}
    cfg = make_cfg(tmp_path, text_tokenizer_dir, src, "asr", media_ckpts, min_items_for_error_rate=1000)
    stats = build_shards(cfg)
    assert stats["samples"] == 1 and [Path(s.meta["origin"]).name for s in read_back(cfg.out_dir)] == ["ok.wav"]
    by_file = {Path(e["file"]).name: e for e in errors_of(cfg.out_dir)}
    assert set(by_file) == {"cut.wav", "short.wav", "latin.wav", "transcripts.tsv"}
    assert "truncated WAV" in by_file["cut.wav"]["error"] and "169,600 bytes" in by_file["cut.wav"]["error"]
    assert "lasts 0.50s for 73 characters" in by_file["short.wav"]["error"]
    assert f"{table}:4: not UTF-8" in by_file["latin.wav"]["error"]
    assert by_file["transcripts.tsv"]["line"] == 5 and "id<TAB>text" in by_file["transcripts.tsv"]["error"]


# ----------------------------------------------------------------------------- outputs
def _text_source(tmp_path: Path) -> dict:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(6)))
    return {"kind": "text", "paths": [str(tmp_path / "d.jsonl")]}


def test_out_dir_under_a_file_is_one_line_naming_it(tmp_path, text_tokenizer_dir, capsys):
    (tmp_path / "afile").write_text("x")
    code = main(["data", "build", "pipeline=records", "pipeline.template=text_lm", f"pipeline.source.paths=[{tmp_path / 'nothing.jsonl'}]",
                 f"tokenizers.text={text_tokenizer_dir}", f"out_dir={tmp_path / 'afile' / 'shards'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"out_dir={tmp_path / 'afile' / 'shards'}" in err and "Not a directory" in err


def test_read_only_out_dir_is_one_line_naming_it(tmp_path, text_tokenizer_dir, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real = Path.write_bytes

    def read_only(self, data):  # as root chmod does not stop writes: the file system's answer, simulated
        if self.parent == out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    cfg = make_cfg(tmp_path, text_tokenizer_dir, _text_source(tmp_path), "text_lm", out="ro")
    with pytest.raises(ValueError, match=r"cannot write the shards to out_dir=.*/ro: Read-only file system \(.*/ro/\.write-test"):
        build_shards(cfg)


def test_disk_full_mid_build_is_one_line_leaves_no_tmp_and_a_rerun_resumes(tmp_path, text_tokenizer_dir, monkeypatch):
    cfg = make_cfg(tmp_path, text_tokenizer_dir, _text_source(tmp_path), "text_lm", shard_samples=2)
    real, calls = build_mod.write_shard, {"n": 0}

    def full_on_second(path, samples, info):
        calls["n"] += 1
        if calls["n"] == 2:
            path.with_suffix(".tar.tmp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path.with_suffix(".tar.tmp")))
        real(path, samples, info)

    monkeypatch.setattr(build_mod, "write_shard", full_on_second)
    with pytest.raises(ValueError, match="No space left on device; free space .* resumes after the last finished shard"):
        build_shards(cfg)
    assert not list(cfg.out_dir.glob("*.tmp")) and len(list(cfg.out_dir.glob("*.tar"))) == 1
    monkeypatch.setattr(build_mod, "write_shard", real)
    assert build_shards(cfg)["samples"] == 4  # the two shards still to write
    assert len(read_back(cfg.out_dir)) == 6


def test_second_build_into_a_finished_folder_says_it_is_already_built(tmp_path, text_tokenizer_dir, capsys):
    cfg = make_cfg(tmp_path, text_tokenizer_dir, _text_source(tmp_path), "text_lm")
    build_shards(cfg)
    capsys.readouterr()
    stats = build_shards(cfg)
    out = capsys.readouterr().out
    assert stats["already_built"] and "is already built" in out and "6 samples in 1 shard(s)" in out
    assert "built 0 samples" not in out and "( tokens)" not in out
