"""Data pipelines: real shipped material -> shards with each template -> read back and compared."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.config import from_dict
from omnitrain.data.pipeline import build as build_mod
from omnitrain.data.pipeline.build import (
    BuildConfig,
    PipelineConfig,
    build_shards,
    load_template,
)
from omnitrain.data.pipeline.media import MediaConfig, MediaTokenizers
from omnitrain.data.pipeline.readers import SourceConfig
from omnitrain.data.pipeline.templates import Part
from omnitrain.data.shards import iter_shard, read_manifest
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.layout import (
    AudioSegment,
    ImageSegment,
    LayoutMismatchError,
    SpecialSegment,
    TextSegment,
    TokenLayout,
)
from tests.conftest import REPO

SKIMAGE = Path(__import__("skimage").__file__).parent / "data"
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
needs_librivox = pytest.mark.skipif(not LIBRIVOX.is_dir(), reason="Debian pocketsphinx-testdata missing: run setup.sh as root")
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="Debian flite missing: run setup.sh as root")


def make_cfg(tmp_path: Path, text_dir: Path, source: dict, template: str, media_ckpts=None, **kw) -> BuildConfig:
    image, audio = media_ckpts or (None, None)
    return BuildConfig(
        pipeline=from_dict(PipelineConfig, {"name": "t", "source": source, "template": template}),
        tokenizers=TokenizerPaths(text=text_dir, image=image, audio=audio),
        media=MediaConfig(image_size=64),
        out_dir=tmp_path / kw.pop("out", "shards"),
        templates_dir=REPO / "data_pipelines" / "template",
        **kw,
    )


def read_back(out: Path) -> list:
    manifest = read_manifest(out)
    return [s for sh in manifest["shards"] for s in iter_shard(out / sh["name"], expect_hash=manifest["layout_hash"])]


def tar_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def test_text_lm_from_debian_docs_decodes_exactly(tmp_path, text_tokenizer_dir, text_tokenizer):
    docs = sorted(Path("/usr/share/doc/debian-handbook/html/en-US").glob("*.html"))[:6]
    if not docs:
        pytest.skip("debian-handbook missing")
    (tmp_path / "code.jsonl").write_text(json.dumps({"text": "def f(x):\n\treturn  x\n"}) + "\n")
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "text", "paths": [*map(str, docs), str(tmp_path / "code.jsonl")]}, "text_lm", shard_samples=4)
    stats = build_shards(cfg)
    samples = read_back(cfg.out_dir)
    assert stats["samples"] == len(samples) == 7
    from omnitrain.sources.text import iter_file_documents

    expected = [next(iter_file_documents(d)) for d in docs] + ["def f(x):\n\treturn  x\n"]
    layout = TokenLayout.load(cfg.out_dir)
    for s, text in zip(samples, expected, strict=True):
        segs = layout.parse(s.ids)
        assert segs[0] == SpecialSegment("bos") and segs[-1] == SpecialSegment("eos")
        assert text_tokenizer.decode(segs[1].ids.tolist()) == text  # exact, whitespace included
        assert s.meta["learn"] == [[1, len(s.ids)]] and s.meta["segments"] == [[0, len(s.ids), "text"]]
    m = read_manifest(cfg.out_dir)
    assert m["samples"] == 7 and len(m["shards"]) == 2 and m["complete"] and m["template"] == "text_lm"
    assert m["tokens"]["text"] == sum(len(s.ids) for s in samples)


def _images(tmp_path: Path, names=("astronaut", "camera", "coffee", "chelsea", "horse")) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for n in names:
        shutil.copy(SKIMAGE / f"{n}.png", folder / f"{n}.png")
        (folder / f"{n}.txt").write_text(f"a photo: {n}")
    return folder


@pytest.mark.parametrize("template", ["caption", "text_to_image"])
def test_image_templates_round_trip_through_the_tokenizer(tmp_path, text_tokenizer_dir, text_tokenizer, media_ckpts, template):
    folder = _images(tmp_path)
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "image_folder", "paths": [str(folder)]}, template, media_ckpts)
    build_shards(cfg)
    samples = read_back(cfg.out_dir)
    assert len(samples) == 5
    from omnitrain.tokenizer.bundle import load_media_tokenizers

    image, audio = load_media_tokenizers(*media_ckpts)
    media = MediaTokenizers(image, audio, cfg.media, 64)
    layout = TokenLayout.load(cfg.out_dir)
    for s in samples:
        name = Path(s.meta["origin"]).stem
        segs = layout.parse(s.ids)
        img = next(x for x in segs if isinstance(x, ImageSegment))
        np.testing.assert_array_equal(img.codes, media.image_codes(str(folder / f"{name}.png")))
        txt = next(x for x in segs if isinstance(x, TextSegment))
        prompt = "Caption:" if template == "caption" else ""  # the template's literal, encoded on its own
        assert text_tokenizer.decode(txt.ids.tolist()) == f"{prompt}a photo: {name}"
        learned_mods = {mod for b, e, mod in s.meta["segments"] for lb, le in s.meta["learn"] if lb < e and b < le}
        assert ("image" in learned_mods) == (template == "text_to_image")


@needs_librivox
@pytest.mark.parametrize("template", ["asr", "speech_continuation"])
def test_librivox_speech_templates(tmp_path, text_tokenizer_dir, text_tokenizer, media_ckpts, template):
    src = {"kind": "audio_folder", "paths": [str(LIBRIVOX)], "transcripts": str(LIBRIVOX / "transcription")}
    cfg = make_cfg(tmp_path, text_tokenizer_dir, src, template, media_ckpts)
    build_shards(cfg)
    samples = read_back(cfg.out_dir)
    assert len(samples) == 5
    from omnitrain.tokenizer.bundle import load_media_tokenizers

    media = MediaTokenizers(*load_media_tokenizers(*media_ckpts), cfg.media, 64)
    layout = TokenLayout.load(cfg.out_dir)
    s = samples[0]
    segs = layout.parse(s.ids)
    audio = next(x for x in segs if isinstance(x, AudioSegment))
    np.testing.assert_array_equal(audio.codes, media.audio_codes(s.meta["origin"]))
    assert audio.codes.shape[0] > 300  # seconds of speech at 50 frames/s
    if template == "asr":
        text = text_tokenizer.decode(next(x for x in segs if isinstance(x, TextSegment)).ids.tolist())
        assert text == "Transcript: and mister john dashwood had then leisure to consider how much there might be prudently in his power to do for them"
        # lead_space: the transcript's first word is cut as mid-sentence, and it is the first learned token
        first = s.ids[s.meta["learn"][0][0]]
        assert text_tokenizer.decode([int(first)]).startswith(" ") and int(first) == text_tokenizer.encode(" and")[0]


@needs_flite
def test_tts_interleaved_and_chat_from_records(tmp_path, text_tokenizer_dir, text_tokenizer, media_ckpts):
    sentences = ["the quick brown fox", "seven two nine"]
    for i, s in enumerate(sentences):
        subprocess.run(["flite", "-voice", "slt", "-t", s, "-o", str(tmp_path / f"s{i}.wav")], check=True)
    shutil.copy(SKIMAGE / "coffee.png", tmp_path / "coffee.png")
    rows = [
        {"text": sentences[0], "audio": "s0.wav",
         "content": [{"text": "Look:"}, {"image": "coffee.png"}, {"text": "and listen"}, {"audio": "s1.wav"}],
         "messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": [{"text": "what is this?"}, {"image": "coffee.png"}]},
                      {"role": "assistant", "content": "coffee"},
                      {"role": "user", "content": [{"audio": "s1.wav"}]},
                      {"role": "assistant", "content": [{"text": "you said:"}, {"audio": "s0.wav"}]}]},
    ]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = {"kind": "records", "paths": [str(tmp_path / "rows.jsonl")]}
    layout = None
    for template in ("tts", "interleaved", "chat"):
        cfg = make_cfg(tmp_path, text_tokenizer_dir, src, template, media_ckpts, out=template)
        build_shards(cfg)
        (s,) = read_back(cfg.out_dir)
        layout = layout or TokenLayout.load(cfg.out_dir)
        segs = layout.parse(s.ids)
        kinds = [type(x).__name__ for x in segs]
        if template == "tts":
            assert kinds == ["SpecialSegment", "TextSegment", "AudioSegment", "SpecialSegment"]
        elif template == "interleaved":
            assert kinds == ["SpecialSegment", "TextSegment", "ImageSegment", "TextSegment", "AudioSegment", "SpecialSegment"]
        else:  # chat: loss weight exactly 1 on assistant content + its end_of_turn, 0 elsewhere
            learn = np.zeros(len(s.ids), dtype=bool)
            for b, e in s.meta["learn"]:
                learn[b:e] = True
            sp = layout.specials
            ids = s.ids.astype(np.int64)
            turns = np.split(np.arange(len(ids)), np.flatnonzero(np.isin(ids, [sp["system"], sp["user"], sp["assistant"]])))
            for turn in turns[1:]:
                role = {sp["system"]: "system", sp["user"]: "user", sp["assistant"]: "assistant"}[int(ids[turn[0]])]
                assert not learn[turn[0]]  # the role marker is prompt
                end = turn[ids[turn] == sp["end_of_turn"]][0]
                assert learn[turn[1] : end + 1].all() == (role == "assistant")
                assert not learn[turn[1] : end + 1].any() or role == "assistant"
            assert not learn[0] and not learn[-1]  # bos / eos of a chat are not learned here
            assert {"image", "audio", "text"} <= {m for _, _, m in s.meta["segments"]}


def test_corrupt_and_missing_files_are_logged_and_the_rest_is_built(tmp_path, text_tokenizer_dir, media_ckpts):
    folder = _images(tmp_path, names=("astronaut", "camera", "coffee"))
    (folder / "broken.png").write_bytes((SKIMAGE / "chelsea.png").read_bytes()[:2000])  # truncated PNG
    (folder / "broken.txt").write_text("never built")
    (folder / "empty.png").write_bytes(b"")
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "image_folder", "paths": [str(folder)]}, "caption", media_ckpts, min_items_for_error_rate=1000)
    stats = build_shards(cfg)
    assert stats["samples"] == 3 and stats["errors"] == 2
    errors = [json.loads(x) for x in (cfg.out_dir / "errors-p000.jsonl").read_text().splitlines()]
    assert {Path(e["origin"]).name for e in errors} == {"broken.png", "empty.png"}
    assert all("cannot be decoded" in e["error"] for e in errors)
    # past the error budget the build stops with a message that says what to do
    cfg2 = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "image_folder", "paths": [str(folder)]}, "caption", media_ckpts,
                    out="strict", max_error_rate=0.1, min_items_for_error_rate=2)  # fmt: skip
    with pytest.raises(RuntimeError, match="max_error_rate=0.1.*rerunning resumes"):
        build_shards(cfg2)


def test_interrupted_build_resumes_to_byte_identical_shards(tmp_path, text_tokenizer_dir, monkeypatch):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * (i % 7 + 1)}) + "\n" for i in range(60)))
    src = {"kind": "text", "paths": [str(tmp_path / "docs.jsonl")]}
    full = make_cfg(tmp_path, text_tokenizer_dir, src, "text_lm", out="full", shard_samples=8)
    build_shards(full)
    cut = make_cfg(tmp_path, text_tokenizer_dir, src, "text_lm", out="cut", shard_samples=8)
    real_write, calls = build_mod.write_shard, {"n": 0}

    def crash_on_fourth(path, samples, info):
        calls["n"] += 1
        if calls["n"] == 4:
            path.with_suffix(".tar.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
            raise KeyboardInterrupt("killed")
        real_write(path, samples, info)

    monkeypatch.setattr(build_mod, "write_shard", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        build_shards(cut)
    assert len(list(cut.out_dir.glob("*.tar"))) == 3
    monkeypatch.setattr(build_mod, "write_shard", real_write)
    build_shards(cut)
    assert tar_digests(cut.out_dir) == tar_digests(full.out_dir)
    assert len(tar_digests(full.out_dir)) == 8  # 60 samples / 8 per shard


def test_partitions_are_disjoint_and_cover_the_source_and_workers_do_not_change_bytes(tmp_path, text_tokenizer_dir):
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(40)))
    src = {"kind": "text", "paths": [str(tmp_path / "docs.jsonl")]}
    keys = []
    for p in range(3):
        cfg = make_cfg(tmp_path, text_tokenizer_dir, src, "text_lm", out="parts", partition=f"{p}/3", shard_samples=5)
        build_shards(cfg)
        keys.append({s.meta["origin"] for s in read_back(cfg.out_dir) if s.key.startswith(f"p{p:03d}")})
    assert set.union(*keys) == {f"{tmp_path / 'docs.jsonl'}:{i + 1}" for i in range(40)}
    assert sum(map(len, keys)) == 40
    assert read_manifest(cfg.out_dir)["complete"] and read_manifest(cfg.out_dir)["samples"] == 40
    one = make_cfg(tmp_path, text_tokenizer_dir, src, "text_lm", out="w1", shard_samples=5)
    two = make_cfg(tmp_path, text_tokenizer_dir, src, "text_lm", out="w2", shard_samples=5, workers=2, chunk_items=3)
    build_shards(one)
    build_shards(two)
    assert tar_digests(one.out_dir) == tar_digests(two.out_dir)


def test_filters_dedup_length_and_hook(tmp_path, text_tokenizer_dir):
    rows = ["same text", "same text", "x", "a longer line of text that passes", "drop me please"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows) + "{oops\n")
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "text", "paths": [str(tmp_path / "d.jsonl")]}, "text_lm", min_items_for_error_rate=1000)
    cfg.pipeline.filters.min_tokens = 4
    cfg.pipeline.filters.hook = "tests.data.test_pipeline:drop_please"
    stats = build_shards(cfg)
    errors = [json.loads(x)["error"] for x in (cfg.out_dir / "errors-p000.jsonl").read_text().splitlines()]
    assert stats["samples"] == 2 and stats["duplicates"] == 1
    assert any("outside [4," in e for e in errors) and any("filtered by" in e for e in errors) and any("not valid JSON" in e for e in errors)


def drop_please(record):
    return "contains 'please'" if "please" in record.get("text", "") else None


def test_shards_refuse_another_layout_and_corruption(tmp_path, text_tokenizer_dir):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "text", "paths": [str(tmp_path / "d.jsonl")]}, "text_lm")
    build_shards(cfg)
    tar = next(cfg.out_dir.glob("*.tar"))
    with pytest.raises(LayoutMismatchError, match="0000000000000000"):
        list(iter_shard(tar, expect_hash="0000000000000000"))
    with pytest.raises(LayoutMismatchError):
        read_manifest(cfg.out_dir, expect_hash="0000000000000000")
    # building into the same folder with other tokenizers: refused, never mixed
    other = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "text", "paths": [str(tmp_path / "d.jsonl")]}, "text_lm")
    other.tokenizers.max_grid = 32  # another layout
    with pytest.raises(LayoutMismatchError, match="Remove .* to rebuild"):
        build_shards(other)
    tar.write_bytes(tar.read_bytes()[:700])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        list(iter_shard(tar))
    tar.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        read_manifest(cfg.out_dir)


def test_templates_and_source_configs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown template 'nope'.*asr"):
        load_template(REPO / "data_pipelines" / "template", "nope")
    for name in ("text_lm", "caption", "text_to_image", "asr", "tts", "interleaved", "speech_continuation", "chat", "doc_qa"):
        assert load_template(REPO / "data_pipelines" / "template", name).parts
    with pytest.raises(ValueError, match="lead_space applies to text parts"):
        Part(audio="audio", lead_space=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(__import__("omnitrain.data.pipeline.readers", fromlist=["x"]).iter_records(SourceConfig(kind="image_folder", paths=[str(tmp_path / "no")])))


def test_slurm_array_script_builds_disjoint_partitions(tmp_path, text_tokenizer_dir):
    """slurm/build_shards.sbatch as two array tasks would run it (bash with Slurm's variables)."""
    import os
    import sys

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(10)))
    env_base = {**os.environ, "OMNITRAIN": str(Path(sys.executable).with_name("omnitrain")), "SLURM_SUBMIT_DIR": str(REPO),
                "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_CPUS_PER_TASK": "1"}  # fmt: skip
    args = ["pipeline=records", f"pipeline.source.paths=[{tmp_path / 'd.jsonl'}]", "pipeline.template=text_lm",
            f"tokenizers.text={text_tokenizer_dir}", f"out_dir={tmp_path / 'out'}"]  # fmt: skip
    for task in ("0", "1"):
        proc = subprocess.run(["bash", str(REPO / "slurm" / "build_shards.sbatch"), *args], env={**env_base, "SLURM_ARRAY_TASK_ID": task},
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"partition {task}/2" in proc.stdout
    m = read_manifest(tmp_path / "out")
    assert m["complete"] and m["samples"] == 10 and m["partitions"] == 2


def test_inspect_decodes_back_to_text_png_and_wav(tmp_path, text_tokenizer_dir, media_ckpts, capsys):
    from omnitrain.data.pipeline.inspect import InspectConfig, inspect_shards

    folder = _images(tmp_path, names=("astronaut", "coffee"))
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "image_folder", "paths": [str(folder)]}, "caption", media_ckpts)
    build_shards(cfg)
    result = inspect_shards(InspectConfig(shards=cfg.out_dir, samples=2))
    out = capsys.readouterr().out
    assert "2 samples in 1 shard(s)" in out and "image tokens" in out and "'Caption:a photo: astronaut'" in out
    pngs = sorted((cfg.out_dir / "inspect").glob("*.png"))
    assert len(pngs) == 2 and pngs[0].read_bytes()[:4] == b"\x89PNG"
    assert len(result["samples"]) == 2
    # the wrong tokenizers for these shards: a clear error naming both layouts
    other = TokenizerPaths(text=text_tokenizer_dir)  # no image tokenizer -> another layout
    with pytest.raises(LayoutMismatchError, match="make token layout [0-9a-f]+, but shards .* uses layout [0-9a-f]+"):
        inspect_shards(InspectConfig(shards=cfg.out_dir, tokenizers=other))


def _write_clip(path: Path, seconds: int = 3, fps: int = 10, rate: int = 16000) -> np.ndarray:
    """A real video file: a bar sweeping across the frame, and a rising tone on the audio track."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as box:
        v = box.add_stream("mpeg4", rate=fps)
        v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
        a = box.add_stream("pcm_s16le", rate=rate)
        a.layout = "mono"
        for i in range(seconds * fps):
            img = np.full((64, 96, 3), 40, np.uint8)
            img[:, (i * 3) % 88 : (i * 3) % 88 + 8] = (250, 200, 30)
            for pkt in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                box.mux(pkt)
        for pkt in v.encode():
            box.mux(pkt)
        t = np.arange(seconds * rate) / rate
        wav = (0.3 * np.sin(2 * np.pi * (300 + 100 * t) * t) * 32767).astype(np.int16)
        for k in range(0, len(wav), 1600):
            frame = av.AudioFrame.from_ndarray(wav[None, k : k + 1600], format="s16", layout="mono")
            frame.sample_rate = rate
            for pkt in a.encode(frame):
                box.mux(pkt)
        for pkt in a.encode():
            box.mux(pkt)
    return wav


def test_video_frames_interleave_with_their_audio_windows(tmp_path, text_tokenizer_dir, text_tokenizer, media_ckpts):
    folder = tmp_path / "clips"
    folder.mkdir()
    _write_clip(folder / "sweep.mkv")
    (folder / "sweep.txt").write_text("a yellow bar sweeps right")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    for template in ("video_lm", "video_caption"):
        cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "video_folder", "paths": [str(folder)]}, template, media_ckpts,
                       out=template, min_items_for_error_rate=100)  # fmt: skip
        stats = build_shards(cfg)
        assert stats["samples"] == 1 and stats["errors"] == 1  # the broken clip is logged, not fatal
        (s,) = read_back(cfg.out_dir)
        segs = TokenLayout.load(cfg.out_dir).parse(s.ids)
        media = [x for x in segs if isinstance(x, (ImageSegment, AudioSegment))]
        assert [type(x).__name__ for x in media] == ["ImageSegment", "AudioSegment"] * 3  # 3 s at 1 frame/s
        frames = [x.codes.shape[0] for x in media if isinstance(x, AudioSegment)]
        assert frames == [100, 100, 100]  # the test codec runs at 100 frames/s: one second of audio per window
        if template == "video_caption":
            assert text_tokenizer.decode(segs[-2].ids.tolist()) == "a yellow bar sweeps right"
    from omnitrain.tokenizer.bundle import load_media_tokenizers

    mt = MediaTokenizers(*load_media_tokenizers(*media_ckpts), cfg.media, 64)
    mt.base_dir = folder
    again = mt.video_segments("sweep.mkv")
    assert all(a == b for a, b in zip(again, media, strict=True))  # deterministic, through the tokenizers' own path
    assert not np.array_equal(media[0].codes, media[2].codes)  # the bar moved between sampled frames


def test_hugging_face_source_with_column_mapping_and_doc_qa(tmp_path, text_tokenizer_dir, text_tokenizer, media_ckpts):
    import datasets

    page = (SKIMAGE / "page.png").read_bytes()  # a real scanned page of text
    ds = datasets.Dataset.from_dict({
        "img": [{"bytes": page, "path": None}] * 2, "q": ["what is this?", "how many lines?"], "a": ["a page", "many"],
    }).cast_column("img", datasets.Image(decode=False))  # fmt: skip
    ds.save_to_disk(str(tmp_path / "ds"))
    src = {"kind": "hf", "hf_dataset": str(tmp_path / "ds"), "columns": {"image": "img", "question": "q", "answer": "a"}}
    cfg = make_cfg(tmp_path, text_tokenizer_dir, src, "doc_qa", media_ckpts)
    stats = build_shards(cfg)
    assert stats["samples"] == 2 and stats["duplicates"] == 0
    samples = read_back(cfg.out_dir)
    layout = TokenLayout.load(cfg.out_dir)
    segs = layout.parse(samples[1].ids)
    texts = [text_tokenizer.decode(x.ids.tolist()) for x in segs if isinstance(x, TextSegment)]
    assert texts == ["how many lines?many"] and isinstance(segs[1], ImageSegment)  # adjacent text parses as one run
    (start, end), = samples[1].meta["learn"]  # only the answer and <eos> are learned
    assert text_tokenizer.decode(samples[1].ids[start : end - 1].tolist()) == "many" and end == len(samples[1].ids)
    bad = make_cfg(tmp_path, text_tokenizer_dir, {**src, "columns": {"image": "picture"}}, "doc_qa", media_ckpts, out="bad", min_items_for_error_rate=1000)
    assert build_shards(bad)["errors"] == 2
    assert "no column 'picture'" in (bad.out_dir / "errors-p000.jsonl").read_text()


def test_a_build_gives_the_caller_its_torch_threads_back(text_tokenizer_dir, tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(4)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_shards(make_cfg(tmp_path, text_tokenizer_dir, {"kind": "text", "paths": [str(src)]}, "text_lm"))
        assert torch.get_num_threads() == 2  # the parent encoded on 1 thread, then got its 2 back
    finally:
        torch.set_num_threads(before)
