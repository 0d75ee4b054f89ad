"""The streaming loader: exactly-once epochs over ranks x workers, mixture shares, packing masks, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.data.loader import LoaderConfig, OmniLoader, SourceSpec, attention_mask, read_shard_samples
from omnitrain.data.packing import best_fit
from omnitrain.data.shards import SCHEMA_VERSION, Sample, ShardInfo, shard_name, write_shard
from omnitrain.tokenizer.layout import LayoutMismatchError, TokenLayout
from tests.synthetic import same_batch, write_shard_set

LAYOUT = TokenLayout.build(1000, "t", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=64, audio_codebook_size=32, audio_levels=2)


def make_source(folder: Path, name: str, n_shards: int, per_shard: int, mix: dict[str, float], lengths=(20, 200), seed=0,
                sizes: list[int] | None = None, learn_from: int = 1) -> Path:  # fmt: skip
    """A shard set like `omnitrain data build` writes, with synthetic ids: each sample's tokens are
    split between modalities as ``mix`` says, and its ids encode (source, sample number). Lengths
    are drawn from ``lengths``, or cycle through ``sizes``; tokens from ``learn_from`` on are learned."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    LAYOUT.save(folder)
    k, shards = 0, []
    for _ in range(n_shards):
        samples = []
        for _ in range(per_shard):
            n = int(rng.integers(*lengths)) if sizes is None else sizes[k % len(sizes)]
            segs, pos = [], 0
            for m, share in mix.items():
                m_n = n - pos if m == list(mix)[-1] else int(round(n * share))
                if m_n > 0:
                    segs.append([pos, pos + m_n, m])
                    pos += m_n
            ids = np.full(n, 10 + k % 900, dtype=np.uint32)  # every token names its sample
            meta = {"schema_version": SCHEMA_VERSION, "layout_hash": LAYOUT.hash, "source": name, "template": "t",
                    "segments": segs, "learn": [[learn_from, n]], "origin": f"{name}:{k}"}  # fmt: skip
            samples.append(Sample(f"p000-{k:09d}", ids, meta))
            k += 1
        shards.append(samples)
    return write_shard_set(folder, name, LAYOUT, shards, "t")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sources")
    return {
        "text": make_source(d / "text", "text", 10, 7, {"text": 1.0}, seed=1),
        "caption": make_source(d / "caption", "caption", 8, 6, {"image": 0.9, "text": 0.1}, seed=2),
        "speech": make_source(d / "speech", "speech", 8, 6, {"audio": 0.8, "text": 0.2}, seed=3),
    }



def assert_resumes_exactly(cfg: LoaderConfig, state: dict, full: list[dict], cut: int, stop: int) -> None:
    """A rank-1 loader restored from ``state`` (taken after batch ``cut``) gives batches ``cut..stop-1`` of ``full``."""
    resumed = OmniLoader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for k in range(cut, stop):
        assert same_batch(next(resumed), full[k]), (cut, k)

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


def test_packing_masks_never_cross_documents(tmp_path):
    src = make_source(tmp_path / "t", "t", 10, 7, {"text": 1.0}, seed=1, learn_from=0)  # even a first token is learned
    cfg = LoaderConfig(sources={"text": SourceSpec(str(src))}, seq_len=128, batch_size=3)
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


def test_best_fit_decreasing_packs_a_known_set_of_lengths():
    # longest first, each into the open row with the least space left that holds it: 7+3, 6+4, 5+3+2
    assert best_fit([3, 6, 4, 5, 2, 7, 3], 10) == [[5, 0], [1, 2], [3, 6, 4]]
    assert best_fit([4, 7, 4, 2], 10) == [[1], [0, 2, 3]]  # the 2 fills the tighter row (first fit: beside the 7)
    assert best_fit([5, 5, 5], 10) == [[0, 1], [2]]  # equal lengths keep their order
    assert best_fit([4, 12, 6], 10) == [[1], [2, 0]]  # longer than a row: a row of its own
    lengths = np.random.default_rng(0).integers(1, 600, 300).tolist()
    rows = best_fit(lengths, 1000)
    assert sorted(i for r in rows for i in r) == list(range(300))  # every document once
    assert all(sum(lengths[i] for i in r) <= 1000 for r in rows)
    assert len(rows) <= np.ceil(sum(lengths) / 1000) * 1.03  # within 3% of the bound, 0 padding


def _row_documents(ids: torch.Tensor, targets: torch.Tensor, docs: torch.Tensor, pad: int) -> list[tuple[int, int]]:
    """(id value, length) of each document in one row of T+1 tokens (the last one is targets[-1])."""
    full, last_doc = torch.cat([ids, targets[-1:]]).tolist(), docs[-1].item()
    doc_of = docs.tolist() + [last_doc if full[-1] == full[-2] and last_doc >= 0 else (-1 if full[-1] == pad else -2)]
    out: dict[int, list[int]] = {}
    for tok, d in zip(full, doc_of, strict=True):
        if d != -1:
            out.setdefault(d, []).append(tok)
    assert all(len(set(toks)) == 1 for toks in out.values())  # one id value per document (a sample's ids are equal)
    return [(toks[0], len(toks)) for toks in out.values()]


def test_whole_documents_are_never_cut_and_longer_ones_are_truncated_alone_and_counted(tmp_path):
    T, src = 128, make_source(tmp_path / "t", "t", 10, 7, {"text": 1.0}, learn_from=0)
    length = {int(ids[0]): len(ids) for url in sorted(src.glob("*.tar")) for ids, _ in read_shard_samples(str(url), None)}
    assert max(length.values()) > T + 1  # some documents cannot fit a row
    cfg = LoaderConfig(sources={"text": SourceSpec(str(src))}, seq_len=T, batch_size=4, split_documents=False, pack_buffer=32)
    loader = OmniLoader(cfg)
    truncated = dropped = 0
    for _ in range(25):
        b = next(loader)
        learned, docs = b["loss_weights"] > 0, b["doc_ids"]
        assert not (learned[:, :-1] & (docs[:, 1:] != docs[:, :-1])).any()  # no target learned across documents
        for r in range(4):
            row = _row_documents(b["input_ids"][r], b["targets"][r], b["doc_ids"][r], pad=3)
            for value, n in row:
                if n != length[value]:  # only a document longer than a row is cut, to a row of its own
                    assert n == T + 1 and length[value] > T + 1 and len(row) == 1, (value, n, length[value])
                    truncated, dropped = truncated + 1, dropped + length[value] - (T + 1)
    st = loader.packing_stats()
    assert truncated > 0 and (st["truncated"], st["dropped"], st["truncated_tokens"]) == (truncated, dropped, truncated * T)
    assert st["capacity"] == 25 * 4 * T and st["placed"] + st["truncated_tokens"] < st["capacity"]  # the rest is padding
    assert loader.packing_efficiency() == st["placed"] / st["capacity"]  # whole documents only


def test_best_fit_fills_every_row_when_lengths_pair_up(tmp_path):
    src = make_source(tmp_path / "pairs", "pairs", 4, 8, {"text": 1.0}, sizes=[100, 29])  # 100 + 29 = T + 1
    cfg = LoaderConfig(sources={"p": SourceSpec(str(src))}, seq_len=128, batch_size=2, split_documents=False, pack_buffer=8)
    loader = OmniLoader(cfg)
    for _ in range(8):
        b = next(loader)
        assert (b["doc_ids"] >= 0).all() and (b["doc_ids"].amax(dim=1) == 1).all()  # two documents, no padding
    assert loader.packing_efficiency() == 1.0 and loader.packing_stats()["truncated"] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_packing_buffer_gives_identical_batches_from_a_small_plain_state(sources, workers):
    cfg = LoaderConfig(sources={n: SourceSpec(str(p)) for n, p in sources.items()}, seq_len=160, batch_size=2, workers=workers,
                       seed=3, split_documents=False, pack_buffer=24)  # fmt: skip
    full = [b for _, b in zip(range(16), OmniLoader(cfg, rank=1, world_size=2), strict=False)]
    for cut in (3, 7, 10):
        first = OmniLoader(cfg, rank=1, world_size=2)
        for _ in range(cut):
            next(first)
        state = json.loads(json.dumps(first.state_dict()))  # plain data: the buffer is re-derived, not stored
        assert len(json.dumps(state)) < 4000
        slot = (state["next_slot"] - 1) % first.n_slots  # the stream that made the last batch
        stream = first.make_stream(slot)
        stream.load(state["states"][slot])
        assert 0 < stream.buffer["rows_out"] < len(stream.rows)  # it stopped inside a packing buffer
        assert_resumes_exactly(cfg, state, full, cut, 16)


def test_a_version_1_state_resumes_exactly(sources):
    """States saved before version 2 held the rest of a cut document as lists and counters as a list."""
    cfg = LoaderConfig(sources={n: SourceSpec(str(p)) for n, p in sources.items()}, seq_len=64, batch_size=2, seed=5,
                       modality_weights={"text": 0.5, "image": 0.25, "audio": 2.0})  # fmt: skip
    full = [b for _, b in zip(range(10), OmniLoader(cfg), strict=False)]
    first = OmniLoader(cfg)
    for _ in range(4):
        next(first)
    stream = first.make_stream(0)
    stream.load(first.states[0])
    assert stream.pending is not None
    stream.pending.origin = None  # a document known by its content only: saved in the version-1 form
    old = stream.state()
    old.update(packing=[stream.placed, stream.capacity, stream.truncated, stream.docs], buffer=[])
    assert set(old["pending"]) == {"ids", "weights", "mod"}
    resumed = OmniLoader(cfg)
    resumed.load_state_dict({**first.state_dict(), "version": 1, "states": [old]})
    for k in range(4, 10):
        b = next(resumed)
        assert same_batch(b, full[k]), k
    whole = OmniLoader(LoaderConfig(sources=cfg.sources, seq_len=64, split_documents=False))
    v1 = {**whole.state_dict(), "version": 1, "states": [{**old, "pending": None, "buffer": [{"ids": [5], "weights": [1.0], "mod": [0]}]}]}
    whole.load_state_dict(v1)
    with pytest.warns(UserWarning, match="1 documents read ahead for packing are skipped"):
        next(whole)


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
        assert_resumes_exactly(cfg, state, full, cut, 14)


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
    loader = OmniLoader(LoaderConfig(sources={"s": SourceSpec(str(src))}, seq_len=512, batch_size=4))  # start-up reads the manifest only
    (src / shard_name(0, 2)).unlink()
    with pytest.raises(ValueError, match=r"shard-p000-00000[12].tar is listed in the manifest but missing"):
        for _ in range(5):
            next(loader)
    with pytest.raises(LayoutMismatchError):
        OmniLoader(LoaderConfig(sources={"t": SourceSpec(str(sources["text"]))}, layout_hash="0123456789abcdef"))
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
        assert same_batch(x, y)
    with pytest.raises(ValueError, match="must contain"):
        OmniLoader(LoaderConfig(sources={"t": SourceSpec(str(sources["text"]), url="pipe:cat x")}))
