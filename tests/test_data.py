"""The streaming loader: exactly-once epochs over ranks x workers, mixture shares, packing masks, exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.data import LoaderConfig, OmniLoader, SourceSpec, attention_mask
from omnitrain.shards import SCHEMA_VERSION, Sample, ShardInfo, shard_name, write_manifest, write_shard
from omnitrain.tokenizer.layout import LayoutMismatchError, TokenLayout

LAYOUT = TokenLayout.build(1000, "t", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=64, audio_codebook_size=32, audio_levels=2)


def make_source(folder: Path, name: str, n_shards: int, per_shard: int, mix: dict[str, float], lengths=(20, 200), seed=0) -> Path:
    """A shard set like `omnitrain data build` writes, with synthetic ids: each sample's tokens are
    split between modalities as ``mix`` says, and its ids encode (source, sample number)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    LAYOUT.save(folder)
    k = 0
    for s in range(n_shards):
        samples, tokens = [], dict.fromkeys(("text", "image", "audio"), 0)
        for _ in range(per_shard):
            n = int(rng.integers(*lengths))
            segs, pos = [], 0
            for m, share in mix.items():
                m_n = n - pos if m == list(mix)[-1] else int(round(n * share))
                if m_n > 0:
                    segs.append([pos, pos + m_n, m])
                    tokens[m] += m_n
                    pos += m_n
            ids = np.full(n, 10 + k % 900, dtype=np.uint32)  # every token names its sample
            meta = {"schema_version": SCHEMA_VERSION, "layout_hash": LAYOUT.hash, "source": name, "template": "t",
                    "segments": segs, "learn": [[1, n]], "origin": f"{name}:{k}"}  # fmt: skip
            samples.append(Sample(f"p000-{k:09d}", ids, meta))
            k += 1
        write_shard(folder / shard_name(0, s), samples, ShardInfo(shard_name(0, s), per_shard, tokens, 0, 0))
    (folder / "done-p000.json").write_text("{}")
    write_manifest(folder, {"layout_hash": LAYOUT.hash, "source": name, "template": "t", "partitions": 1, "complete": True}, 1)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sources")
    return {
        "text": make_source(d / "text", "text", 10, 7, {"text": 1.0}, seed=1),
        "caption": make_source(d / "caption", "caption", 8, 6, {"image": 0.9, "text": 0.1}, seed=2),
        "speech": make_source(d / "speech", "speech", 8, 6, {"audio": 0.8, "text": 0.2}, seed=3),
    }


def test_every_sample_of_an_epoch_is_read_exactly_once_over_2_ranks_x_2_workers(sources):
    cfg = LoaderConfig(sources={"text": SourceSpec(str(sources["text"]))}, workers=2, seq_len=64, batch_size=2)
    seen = []
    for rank in range(2):
        loader = OmniLoader(cfg, rank=rank, world_size=2)
        for slot in range(2):
            stream = loader.make_stream(slot).sources["text"]
            while stream.epoch == 0:
                seen.append(stream.next()[1]["origin"])
    assert sorted(seen) == sorted(f"text:{k}" for k in range(70))  # all 70, none twice


def test_modality_shares_are_met_within_two_points(sources):
    cfg = LoaderConfig(sources={n: SourceSpec(str(p)) for n, p in sources.items()},
                       modality_shares={"text": 0.5, "image": 0.3, "audio": 0.2}, seq_len=256, batch_size=4)  # fmt: skip
    loader = OmniLoader(cfg)
    for _ in range(60):
        next(loader)
    got = loader.realised_shares()
    for m, target in cfg.modality_shares.items():
        assert abs(got[m] - target) < 0.02, (m, got)
    assert loader.packing_efficiency() == 1.0  # documents are cut across rows: no padding at all


def test_per_source_weights_and_impossible_targets(sources):
    cfg = LoaderConfig(sources={"text": SourceSpec(str(sources["text"]), 3.0), "speech": SourceSpec(str(sources["speech"]), 1.0)}, seq_len=128)
    loader = OmniLoader(cfg)
    for _ in range(40):
        next(loader)
    drawn = loader.states[0]["drawn"]
    assert abs(drawn["text"] / (drawn["text"] + drawn["speech"]) - 0.75) < 0.02
    bad = LoaderConfig(sources={"text": SourceSpec(str(sources["text"]))}, modality_shares={"text": 0.5, "image": 0.5})
    with pytest.raises(ValueError, match="cannot be reached"):
        OmniLoader(bad)


def test_packing_masks_never_cross_documents(sources):
    cfg = LoaderConfig(sources={"text": SourceSpec(str(sources["text"]))}, seq_len=128, batch_size=3)
    batch = next(OmniLoader(cfg))
    ids, tgt, w, docs = batch["input_ids"], batch["targets"], batch["loss_weights"], batch["doc_ids"]
    assert ids.shape == tgt.shape == w.shape == docs.shape == (3, 128)
    assert torch.equal(ids[:, 1:], tgt[:, :-1])  # targets are the next tokens
    mask = attention_mask(docs)
    cross = docs[:, :, None] != docs[:, None, :]
    assert not (mask & cross).any() and mask.any()
    # samples carry distinct ids per document: a learned target always belongs to its input's document
    learned = w > 0
    boundary = torch.cat([ids[:, 1:] != ids[:, :-1], torch.zeros(3, 1, dtype=torch.bool)], dim=1)
    assert not (learned[:, :-1] & boundary[:, :-1]).any()
    assert (docs.max(dim=1).values >= 1).all()  # several documents share each row


def test_keep_documents_whole_pads_instead_of_cutting(sources):
    cfg = LoaderConfig(sources={"text": SourceSpec(str(sources["text"]))}, seq_len=256, batch_size=4, split_documents=False)
    loader = OmniLoader(cfg)
    for _ in range(10):
        b = next(loader)
        for row_ids, row_docs in zip(b["input_ids"], b["doc_ids"], strict=True):
            for d in row_docs.unique():
                if d >= 0:  # each document of a row has a single id value: it was not cut
                    assert len(row_ids[row_docs == d].unique()) == 1
    assert 0.6 < loader.packing_efficiency() < 1.0


@pytest.mark.parametrize(("workers", "split"), [(0, True), (2, True), (2, False)])
def test_resume_at_random_points_gives_identical_batches(sources, workers, split):
    cfg = LoaderConfig(sources={n: SourceSpec(str(p)) for n, p in sources.items()}, seq_len=96, batch_size=2, workers=workers,
                       seed=7, split_documents=split, pack_buffer=8)  # fmt: skip
    full = [b for _, b in zip(range(14), OmniLoader(cfg, rank=1, world_size=2), strict=False)]
    for cut in np.random.default_rng(workers).choice(np.arange(1, 13), size=2, replace=False):
        first = OmniLoader(cfg, rank=1, world_size=2)
        for _ in range(cut):
            next(first)
        state = first.state_dict()
        resumed = OmniLoader(cfg, rank=1, world_size=2)
        resumed.load_state_dict(state)
        for k in range(cut, 14):
            b = next(resumed)
            for key in b:
                assert torch.equal(b[key], full[k][key]), (cut, k, key)


def test_bad_shards_and_states_fail_clearly(sources, tmp_path):
    src = make_source(tmp_path / "s", "s", 4, 3, {"text": 1.0})
    (src / shard_name(0, 2)).write_bytes((src / shard_name(0, 2)).read_bytes()[:600])
    loader = OmniLoader(LoaderConfig(sources={"s": SourceSpec(str(src))}, seq_len=512, batch_size=4))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        for _ in range(5):
            next(loader)
    write_shard(src / shard_name(0, 2), [], ShardInfo(shard_name(0, 2), 0, {}, 0, 0))  # an empty shard
    loader = OmniLoader(LoaderConfig(sources={"s": SourceSpec(str(src))}, seq_len=512, batch_size=4))
    with pytest.raises(ValueError, match="holds no samples"):
        for _ in range(5):
            next(loader)
    (src / shard_name(0, 1)).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        OmniLoader(LoaderConfig(sources={"s": SourceSpec(str(src))}))
    with pytest.raises(LayoutMismatchError):
        OmniLoader(LoaderConfig(sources={"t": SourceSpec(str(sources["text"]))}, layout_hash="0123456789abcdef"))
    with pytest.raises(ValueError, match="10 shards for 12 readers"):
        OmniLoader(LoaderConfig(sources={"t": SourceSpec(str(sources["text"]))}, workers=6), rank=0, world_size=2).make_stream(0)
    state = OmniLoader(LoaderConfig(sources={"t": SourceSpec(str(sources["text"]))})).state_dict()
    with pytest.raises(ValueError, match="version"):
        OmniLoader(LoaderConfig(sources={"t": SourceSpec(str(sources["text"]))})).load_state_dict({**state, "version": 99})


def test_changing_world_size_repeats_nothing_within_the_epoch_and_skips_a_bounded_amount(sources):
    """2 ranks x 2 workers stop mid-epoch; 1 rank x 3 workers resume from all old ranks' states."""
    cfg = LoaderConfig(sources={"text": SourceSpec(str(sources["text"]))}, workers=2, seq_len=64, batch_size=2)
    read, in_progress_rest, old_states = [], 0, []
    rng = np.random.default_rng(0)
    for rank in range(2):
        loader = OmniLoader(cfg, rank=rank, world_size=2)
        for slot in range(2):
            stream = loader.make_stream(slot)
            src = stream.sources["text"]
            for _ in range(int(rng.integers(3, 12))):
                read.append(src.next()[1]["origin"])
            if src.sample:  # a shard in progress: its unread rest may be skipped
                in_progress_rest += 7 - src.sample
            loader.states[slot] = stream.state()
        old_states.append(loader.state_dict())
    new_cfg = LoaderConfig(sources=cfg.sources, workers=3, seq_len=64, batch_size=2)
    resumed = OmniLoader(new_cfg, rank=0, world_size=1)
    resumed.load_state_dict(old_states)
    for slot in range(3):
        stream = resumed.make_stream(slot)
        stream.load(resumed.states[slot])
        src = stream.sources["text"]
        while src.epoch == 0:
            read.append(src.next()[1]["origin"])
    assert len(read) == len(set(read))  # nothing twice within the epoch
    skipped = 70 - len(read)
    assert 0 <= skipped <= in_progress_rest  # only the rest of shards that were in progress
    with pytest.raises(ValueError, match="needs the states of all 2 old ranks"):
        OmniLoader(new_cfg, rank=0, world_size=1).load_state_dict(old_states[:1])


def test_shards_stream_through_a_pipe_url_exactly_like_local_files(sources):
    local = LoaderConfig(sources={"t": SourceSpec(str(sources["text"]))}, seq_len=64, batch_size=2)
    piped = LoaderConfig(sources={"t": SourceSpec(str(sources["text"]), url=f"pipe:cat {sources['text']}/{{name}}")}, seq_len=64, batch_size=2)
    a, b = OmniLoader(local), OmniLoader(piped)
    assert b.urls["t"][0].startswith("pipe:cat ")
    for _ in range(5):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="must contain"):
        OmniLoader(LoaderConfig(sources={"t": SourceSpec(str(sources["text"]), url="pipe:cat x")}))
