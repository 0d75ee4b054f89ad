"""Shards any tool can read (issue 21, item 4): a built shard loads with Hugging Face `datasets`'
webdataset builder and with plain `webdataset`, its ids go straight into `nn.Embedding`, and
version-1 shards (uint32 ids, mixed-type segments) still load through omnitrain's loader."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.data import shards
from omnitrain.data.loader import LoaderConfig, OmniLoader, SourceSpec
from omnitrain.data.pipeline.build import build_shards
from omnitrain.data.reading import read_shard_samples
from omnitrain.data.shards import iter_shard, read_manifest
from omnitrain.tokenizer.layout import TokenLayout
from tests.data.test_pipeline import SKIMAGE, make_cfg
from tests.synthetic import make_shard_set, same_batch, small_layout


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory, text_tokenizer_dir, media_ckpts) -> Path:
    """Image + caption shards built by `omnitrain data build`: text, image and special tokens in one sample."""
    tmp = tmp_path_factory.mktemp("caption")
    folder = tmp / "images"
    folder.mkdir()
    for name in ("astronaut", "camera", "coffee"):
        (folder / f"{name}.png").write_bytes((SKIMAGE / f"{name}.png").read_bytes())
        (folder / f"{name}.txt").write_text(f"a photo of {name}")
    cfg = make_cfg(tmp, text_tokenizer_dir, {"kind": "image_folder", "paths": [str(folder)]}, "caption", media_ckpts, shard_samples=2)
    build_shards(cfg)
    return cfg.out_dir


def members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t}


def test_a_built_shard_has_one_type_per_field(caption_shards):
    tar = sorted(caption_shards.glob("*.tar"))[0]
    raw = members(tar)
    ids = np.load(io.BytesIO(next(v for k, v in raw.items() if k.endswith(".ids.npy"))))
    meta = json.loads(next(v for k, v in raw.items() if k.endswith(".meta.json")))
    assert ids.dtype == np.int32 and meta["schema_version"] == 2
    assert all(isinstance(x, int) for span in meta["segments"] for x in span) and len(meta["segments"][0]) == 2
    assert set(meta["modalities"]) == {"text", "image"} and len(meta["modalities"]) == len(meta["segments"])
    assert read_manifest(caption_shards)["sample_fields"]["modalities"] == "list[str]"
    # in memory, readers still hand on [start, end, modality] triples
    sample = next(iter_shard(tar))
    assert [m for _, _, m in sample.meta["segments"]] == meta["modalities"]


def test_hugging_face_datasets_loads_a_shard_with_its_webdataset_builder(caption_shards, tmp_path):
    import datasets

    tars = sorted(str(p) for p in caption_shards.glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 3
    assert str(ds.features["ids.npy"].feature.dtype) == "int32"
    ours = [s for t in sorted(caption_shards.glob("*.tar")) for s in iter_shard(t)]
    for row, s in zip(ds, ours, strict=True):
        assert row["ids.npy"] == s.ids.tolist()
        assert [[a, b, m] for (a, b), m in zip(row["meta.json"]["segments"], row["meta.json"]["modalities"], strict=True)] == s.meta["segments"]
        assert row["meta.json"]["learn"] == s.meta["learn"]


def test_plain_webdataset_ids_go_into_nn_embedding(caption_shards):
    import webdataset as wds

    layout = TokenLayout.load(caption_shards)
    tars = sorted(str(p) for p in caption_shards.glob("*.tar"))
    embed = torch.nn.Embedding(layout.vocab_size, 8)
    n = 0
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode():
        ids = torch.from_numpy(sample["ids.npy"])
        assert ids.dtype == torch.int32
        assert embed(ids).shape == (len(ids), 8)  # uint32 (version 1) is refused by nn.Embedding
        n += 1
    assert n == 3


def _as_version_1(monkeypatch) -> None:
    """Make the shard writer write what omnitrain wrote before issue 21: uint32 ids, [start, end, modality] segments."""
    monkeypatch.setattr(shards, "SCHEMA_VERSION", 1)
    monkeypatch.setattr(shards, "IDS_DTYPE", np.dtype("<u4"))
    monkeypatch.setattr(shards, "meta_to_disk", lambda meta: {**meta, "schema_version": 1})


def test_version_1_shards_still_load_and_give_the_same_batches(tmp_path, monkeypatch):
    layout = small_layout()
    new = make_shard_set(tmp_path / "v2", "mix", layout, n_shards=2, per_shard=6, mix={"text": 0.4, "audio": 0.6})
    with monkeypatch.context() as m:
        _as_version_1(m)
        old = make_shard_set(tmp_path / "v1", "mix", layout, n_shards=2, per_shard=6, mix={"text": 0.4, "audio": 0.6})
    raw = members(sorted(old.glob("*.tar"))[0])
    meta = json.loads(next(v for k, v in raw.items() if k.endswith(".meta.json")))
    assert meta["schema_version"] == 1 and isinstance(meta["segments"][0][2], str)  # really the old format
    assert np.load(io.BytesIO(next(v for k, v in raw.items() if k.endswith(".ids.npy")))).dtype == np.uint32
    assert read_manifest(old)["schema_version"] == 1
    a = read_shard_samples(str(sorted(old.glob("*.tar"))[0]), layout.hash)
    b = read_shard_samples(str(sorted(new.glob("*.tar"))[0]), layout.hash)
    same = [(x.tolist(), {**mx, "schema_version": 2}) for x, mx in a]
    assert same == [(y.tolist(), my) for y, my in b]  # the same samples, in memory
    loaders = [OmniLoader(LoaderConfig(sources={"mix": SourceSpec(str(d))}, seq_len=64, batch_size=2), rank=0, world_size=1) for d in (old, new)]
    for _ in range(3):
        x, y = (next(ld) for ld in loaders)
        assert same_batch(x, y)


def test_unknown_versions_are_refused_naming_the_rebuild_command(tmp_path, monkeypatch):
    layout = small_layout()
    folder = make_shard_set(tmp_path / "v9", "x", layout, n_shards=1, per_shard=2)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 9}))
    with pytest.raises(ValueError, match=r"schema_version 9, this omnitrain reads \(1, 2\); rebuild it with `omnitrain data build`"):
        read_manifest(folder)
    with pytest.raises(ValueError, match="schema_version 9.*`omnitrain data build`"):
        shards.meta_from_disk({"schema_version": 9}, "x.tar: sample k")


def test_a_build_into_a_version_1_folder_is_refused(tmp_path, text_tokenizer_dir):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello there"}) + "\n")
    cfg = make_cfg(tmp_path, text_tokenizer_dir, {"kind": "text", "paths": [str(tmp_path / "d.jsonl")]}, "text_lm")
    build_shards(cfg)
    manifest = json.loads((cfg.out_dir / "manifest.json").read_text())
    (cfg.out_dir / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 1}))
    with pytest.raises(ValueError, match="holds shards of format version 1; this build writes version 2.*Remove"):
        build_shards(cfg)
