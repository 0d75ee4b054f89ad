"""The streaming loader: shards -> weighted mixture -> packed rows with document masks; exactly resumable.

Legend: B rows per batch, T = seq_len tokens per row.

Streams. Every (rank, dataloader worker) pair is one *stream*; there are ``world_size * workers``
of them. For each source and epoch, the shard list is shuffled with ``(seed, source, epoch)`` and
stream ``i`` of ``N`` reads shards ``i, i+N, i+2N, ...``; within a shard, samples are read in an
order shuffled with ``(seed, source, epoch, shard)``. So every sample of an epoch is read exactly
once over all streams, and the order is a pure function of the seed.

Mixture. Weights are token shares per source, given directly or derived from a target share of
tokens per modality (solved from the manifests' per-modality counts). Each stream picks the next
document from the source that is furthest behind its share of the tokens drawn so far (a
deterministic deficit scheduler, so realised shares track the targets closely, not just on average).

Packing. Documents are concatenated into rows of ``T + 1`` tokens (inputs are the first T,
targets the last T); a document that does not fit is cut and continues at the start of the next
row (``split_documents=True``, pretraining), or (``False``, SFT) rows are filled with whole
documents, best fit from a lookahead buffer of ``pack_buffer`` documents, the rest padded. ``doc_ids`` number the documents in a row; a target is only learned when it
belongs to the same document as its input, so nothing is learned across a boundary.
``loss_weights`` = per-modality weight x the template's learn mask; 0 on padding.

Resume. A stream's whole position (per-source epoch, shard, sample, tokens drawn, the partly
packed row) is a small dict; ``OmniLoader.state_dict()`` holds one per stream plus which worker
comes next, and after ``load_state_dict`` the next batch is exactly the one an uninterrupted run
would have produced (same world size and worker count). With another number of readers, the
states of all old ranks are re-split by :func:`reshard`: no sample twice within an epoch, a
bounded number skipped.
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omnitrain.shards import read_manifest
from omnitrain.tokenizer.layout import MODALITIES, check_layout_hash

STATE_VERSION = 1


@dataclass
class SourceSpec:
    path: str  # a shard folder with manifest.json (and layout.json)
    weight: float = 1.0  # share of tokens (normalised over sources); ignored with modality_shares
    url: str | None = None  # where the tars are read from, "{name}" standing for a shard's file name, e.g.
    #   "https://host/shards/{name}", "pipe:aws s3 cp s3://bucket/shards/{name} -" (None: from path)


@dataclass
class LoaderConfig:
    sources: dict[str, SourceSpec] = field(default_factory=dict)
    modality_shares: dict[str, float] | None = None  # e.g. {text: 0.5, image: 0.3, audio: 0.2}
    modality_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODALITIES, 1.0))
    seq_len: int = 2048
    batch_size: int = 8  # rows per batch, per rank
    workers: int = 0  # dataloader worker processes per rank (0: read in the training process)
    seed: int = 0
    split_documents: bool = True  # False keeps every document whole in one row (SFT)
    pack_buffer: int = 64  # whole-document mode: documents looked ahead to fill rows (best fit)
    pad_id: int | None = None  # None: the layout's <pad> (layout.json beside the first source's shards)
    layout_hash: str | None = None  # every shard must carry it (None: take the first source's)

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1 or self.workers < 0:
            raise ValueError("seq_len must be >= 2, batch_size >= 1 and workers >= 0")
        if self.modality_shares is not None:
            bad = set(self.modality_shares) - set(MODALITIES)
            if bad:
                raise ValueError(f"modality_shares has unknown modalities {sorted(bad)}; use {MODALITIES}")


# ----------------------------------------------------------------------------- reading shards
def read_shard_samples(url: str, expect_hash: str | None) -> list[tuple[np.ndarray, dict]]:
    """All samples of one shard (a path, ``pipe:`` command or http url) through webdataset."""
    import webdataset as wds

    out = []
    try:
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
            meta = json.loads(sample["meta.json"])
            if expect_hash is not None:
                check_layout_hash(expect_hash, meta.get("layout_hash", "?"), f"shard {url}")
            out.append((_load_ids(sample["ids.npy"]), meta))
    except (ValueError, OSError, EOFError, KeyError, tarfile.TarError) as e:
        if e.__class__.__name__ == "LayoutMismatchError":
            raise
        raise ValueError(f"shard {url} is corrupt or truncated ({e}); rebuild it with `omnitrain data build`") from e
    if not out:
        raise ValueError(f"shard {url} holds no samples; rebuild it with `omnitrain data build`")
    return out


def _load_ids(data: bytes) -> np.ndarray:
    """ids.npy -> array. Our own 1-D uint32 files are read straight from the buffer: np.load parses
    every header with ast.literal_eval, a third of the loader's time per sample."""
    if data[:6] == b"\x93NUMPY" and data[6] == 1:
        header_len = int.from_bytes(data[8:10], "little")
        header = data[10 : 10 + header_len]
        if b"'descr': '<u4'" in header and b"'fortran_order': False" in header and b"'shape': (" in header:
            return np.frombuffer(data, dtype="<u4", offset=10 + header_len)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _rng(*keys: int | str) -> np.random.Generator:
    """A generator seeded by all of ``keys`` (strings hashed whole, so similar names differ)."""
    import hashlib

    seq = [k if isinstance(k, int) else int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little") for k in keys]
    return np.random.default_rng(seq)


class SourceStream:
    """One source as seen by one stream: its shards for each epoch, in a seeded order."""

    def __init__(self, name: str, urls: list[str], stream: int, n_streams: int, seed: int, expect_hash: str | None):
        if len(urls) < n_streams:
            raise ValueError(f"source '{name}' has {len(urls)} shards for {n_streams} readers (ranks x workers); "
                             "rebuild it with smaller shard_samples so every reader gets at least one shard")  # fmt: skip
        self.name, self.urls, self.stream, self.n_streams, self.seed, self.hash = name, urls, stream, n_streams, seed, expect_hash
        self.epoch, self.shard, self.sample = 0, 0, 0  # position: next sample to read
        self.exclude: dict[int, list[str]] = {}  # epoch -> shards read (or begun) before a change of readers
        self._cache: tuple[tuple[int, int], list] | None = None
        self._mine: tuple[int, list[str]] | None = None

    def my_shards(self, epoch: int) -> list[str]:
        if self._mine is None or self._mine[0] != epoch:  # computed once per epoch, not per sample
            order = [self.urls[i] for i in _rng(self.seed, self.name, epoch).permutation(len(self.urls))]
            skip = set(self.exclude.get(epoch, ()))
            self._mine = (epoch, [u for u in order if u not in skip][self.stream :: self.n_streams])
        return self._mine[1]

    def _samples(self) -> list:
        key = (self.epoch, self.shard)
        if self._cache is None or self._cache[0] != key:
            url = self.my_shards(self.epoch)[self.shard]
            samples = read_shard_samples(url, self.hash)
            shard_name = url.rstrip("/").rsplit("/", 1)[-1]  # the same order wherever the file lives
            shard_name = next((part for part in url.split() if part.endswith(".tar")), shard_name).rsplit("/", 1)[-1]
            order = _rng(self.seed, self.name, self.epoch, shard_name).permutation(len(samples))
            self._cache = (key, [samples[i] for i in order])
        return self._cache[1]

    def next(self) -> tuple[np.ndarray, dict]:
        while not self.my_shards(self.epoch):  # after a change of readers an epoch may have nothing left here
            self.epoch, self.shard, self.sample = self.epoch + 1, 0, 0
        samples = self._samples()
        item = samples[self.sample]
        self.sample += 1
        if self.sample == len(samples):
            self.sample, self.shard = 0, self.shard + 1
            if self.shard == len(self.my_shards(self.epoch)):
                self.shard, self.epoch = 0, self.epoch + 1
        return item

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample,
                "exclude": {str(e): u for e, u in self.exclude.items() if e >= self.epoch}}  # fmt: skip

    def load(self, s: dict) -> None:
        self.epoch, self.shard, self.sample = s["epoch"], s["shard"], s["sample"]
        self.exclude = {int(e): list(u) for e, u in s.get("exclude", {}).items()}
        self._mine = None

    def begun(self, epoch: int) -> list[str]:
        """The shards of ``epoch`` this stream has read or started."""
        if epoch > self.epoch:
            return []
        mine = self.my_shards(epoch)
        return mine if epoch < self.epoch else mine[: self.shard + (1 if self.sample else 0)]


def reshard(old: list[dict], n_new: int, urls: dict[str, list[str]], seed: int) -> list[dict]:
    """Stream states saved with one number of readers -> states for ``n_new`` readers.

    Defined behaviour on a change of world size or worker count: per source, every shard that an
    old reader had read or begun in the current epoch (and later ones) is left out of that epoch
    for the new readers, which split the remaining shards. So no sample is read twice within an
    epoch; what is skipped is bounded by the unread rest of the shards that were in progress (at
    most one per old reader) and the partly packed document of each old reader.
    """
    n_old = len(old)
    new_sources = {}
    for name, source_urls in urls.items():
        views = []
        for i, st in enumerate(old):
            view = SourceStream(name, source_urls, i, n_old, seed, None)
            view.load(st["sources"][name])
            views.append(view)
        e0 = min(v.epoch for v in views)
        last = max(v.epoch for v in views)
        exclude = {}
        for e in range(e0, last + 1):
            done = set().union(*(v.begun(e) for v in views), *(v.exclude.get(e, []) for v in views))
            if done:
                exclude[str(e)] = sorted(done)
        new_sources[name] = {"epoch": e0, "shard": 0, "sample": 0, "exclude": exclude}

    def spread(key: str) -> dict:
        total: dict[str, float] = {}
        for st in old:
            for k, v in st[key].items():
                total[k] = total.get(k, 0) + v
        return {k: v // n_new for k, v in total.items()}

    packing = [sum(st["packing"][i] for st in old) // n_new for i in range(4)]
    return [{"sources": new_sources, "drawn": spread("drawn"), "modality_tokens": spread("modality_tokens"),
             "pending": None, "packing": packing, "buffer": []} for _ in range(n_new)]  # fmt: skip


# ----------------------------------------------------------------------------- mixture
def source_shares(cfg: LoaderConfig, manifests: dict[str, dict]) -> dict[str, float]:
    """Token share per source: the given weights, or solved from target modality shares."""
    names = list(cfg.sources)
    if cfg.modality_shares is None:
        w = np.array([cfg.sources[n].weight for n in names], dtype=float)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("source weights must be >= 0 with a positive sum")
        return dict(zip(names, (w / w.sum()).tolist(), strict=True))
    from scipy.optimize import nnls

    comp = np.array([[manifests[n]["tokens"][m] for n in names] for m in MODALITIES], dtype=float)  # [M, S]
    comp /= np.maximum(comp.sum(axis=0, keepdims=True), 1)  # each source's modality composition
    target = np.array([cfg.modality_shares.get(m, 0.0) for m in MODALITIES], dtype=float)
    target /= target.sum()
    big = 1e3  # the shares must sum to one: a heavily weighted extra equation
    q, _ = nnls(np.vstack([comp, big * np.ones(len(names))]), np.append(target, big))
    if np.abs(comp @ q - target).max() > 0.01:
        raise ValueError(f"modality_shares {cfg.modality_shares} cannot be reached with these sources (closest: "
                         f"{dict(zip(MODALITIES, np.round(comp @ q, 3).tolist(), strict=True))}); add a source of the missing modality")  # fmt: skip
    return dict(zip(names, q.tolist(), strict=True))


# ----------------------------------------------------------------------------- one stream
class Stream:
    """Mixture + packing for one (rank, worker); yields batches and carries its own state."""

    def __init__(self, cfg: LoaderConfig, sources: dict[str, list[str]], shares: dict[str, float], stream: int,
                 n_streams: int, layout_hash: str | None, pad_id: int) -> None:  # fmt: skip
        self.cfg, self.shares, self.pad_id = cfg, shares, pad_id
        self.sources = {n: SourceStream(n, urls, stream, n_streams, cfg.seed, layout_hash) for n, urls in sources.items()}
        self.drawn = dict.fromkeys(sources, 0)  # tokens drawn per source
        self.modality_tokens = dict.fromkeys(MODALITIES, 0)  # learned-or-not tokens placed in rows, per modality
        self.pending: dict[str, list] | None = None  # the rest of a cut document: ids, weights, modality
        self.placed = self.capacity = self.truncated = self.docs = 0  # packing efficiency = placed / capacity
        self.buffer: list[dict[str, np.ndarray]] = []  # whole-document mode: documents waiting for a row
        self.mod_w = np.array([cfg.modality_weights.get(m, 1.0) for m in MODALITIES], dtype=np.float32)

    def _pick(self) -> str:
        total = sum(self.drawn.values()) + 1
        return max(self.shares, key=lambda n: (self.shares[n] * total - self.drawn[n], -list(self.shares).index(n)))

    def _next_doc(self) -> dict[str, np.ndarray]:
        if self.pending is not None:
            doc, self.pending = self.pending, None
            return {k: np.asarray(v) for k, v in doc.items()}
        name = self._pick()
        ids, meta = self.sources[name].next()
        self.docs += 1
        n = len(ids)
        self.drawn[name] += n
        mod = np.zeros(n, dtype=np.int8)
        for start, end, m in meta["segments"]:
            mod[start:end] = MODALITIES.index(m)
        learn = np.zeros(n, dtype=np.float32)
        for start, end in meta.get("learn", [[0, n]]):
            learn[start:end] = 1.0
        return {"ids": ids.astype(np.int64), "weights": learn * self.mod_w[mod], "mod": mod}

    def _whole_docs(self, room: int) -> list[dict[str, np.ndarray]]:
        """Documents for one row, never cut: repeatedly the longest buffered one that still fits."""
        chosen: list[dict[str, np.ndarray]] = []
        while room > 0:
            while len(self.buffer) < self.cfg.pack_buffer:
                self.buffer.append(self._next_doc())
            fits = [i for i, d in enumerate(self.buffer) if len(d["ids"]) <= room]
            if not fits:
                if not chosen:  # longer than a row on its own: truncated (counted)
                    chosen.append({k: v[:room] for k, v in self.buffer.pop(0).items()})
                    self.truncated += 1
                break
            best = max(fits, key=lambda i: (len(self.buffer[i]["ids"]), -i))
            chosen.append(self.buffer.pop(best))
            room -= len(chosen[-1]["ids"])
        return chosen

    def next_row(self) -> dict[str, np.ndarray]:
        """One packed row of T+1 tokens: ids, weights (of each token as a target), doc ids, modality."""
        T1 = self.cfg.seq_len + 1
        ids = np.full(T1, self.pad_id, dtype=np.int64)
        weights = np.zeros(T1, dtype=np.float32)
        docs = np.full(T1, -1, dtype=np.int64)  # -1: padding
        mods = np.zeros(T1, dtype=np.int8)
        pos, doc_no = 0, 0
        if not self.cfg.split_documents:  # whole documents, best fit from a lookahead buffer
            for doc in self._whole_docs(T1):
                n = len(doc["ids"])
                ids[pos : pos + n], weights[pos : pos + n], mods[pos : pos + n] = doc["ids"], doc["weights"], doc["mod"]
                docs[pos : pos + n] = doc_no
                pos, doc_no = pos + n, doc_no + 1
        while self.cfg.split_documents and pos < T1:
            doc = self._next_doc()
            n = len(doc["ids"])
            take = min(n, T1 - pos)
            ids[pos : pos + take] = doc["ids"][:take]
            weights[pos : pos + take] = doc["weights"][:take]
            mods[pos : pos + take] = doc["mod"][:take]
            docs[pos : pos + take] = doc_no
            if take < n:  # cut: the rest starts the next row, its first token repeated as an input
                self.pending = {k: v[take - 1 :].tolist() for k, v in doc.items()}
                self.pending["weights"][0] = 0.0  # already learned as this row's last target
            pos, doc_no = pos + take, doc_no + 1
        for m in range(len(MODALITIES)):
            self.modality_tokens[MODALITIES[m]] += int(((mods[1:] == m) & (docs[1:] >= 0)).sum())
        self.placed += int((docs[1:] >= 0).sum())
        self.capacity += T1 - 1
        return {"ids": ids, "weights": weights, "docs": docs}

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = [self.next_row() for _ in range(self.cfg.batch_size)]
        ids = np.stack([r["ids"] for r in rows])  # [B, T+1]
        docs = np.stack([r["docs"] for r in rows])  # [B, T+1]
        w = np.stack([r["weights"] for r in rows])[:, 1:]  # [B, T] weight of each target
        same_doc = (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] >= 0)  # a target must continue its input's document
        return {
            "input_ids": torch.from_numpy(ids[:, :-1].copy()),
            "targets": torch.from_numpy(ids[:, 1:].copy()),
            "loss_weights": torch.from_numpy(np.where(same_doc, w, 0.0).astype(np.float32)),
            "doc_ids": torch.from_numpy(docs[:, :-1].copy()),
        }

    def state(self) -> dict:
        return {"sources": {n: s.state() for n, s in self.sources.items()}, "drawn": dict(self.drawn),
                "modality_tokens": dict(self.modality_tokens), "pending": self.pending,
                "packing": [self.placed, self.capacity, self.truncated, self.docs],
                "buffer": [{k: v.tolist() for k, v in d.items()} for d in self.buffer]}  # fmt: skip

    def load(self, s: dict) -> None:
        for n, st in s["sources"].items():
            self.sources[n].load(st)
        self.drawn, self.modality_tokens, self.pending = dict(s["drawn"]), dict(s["modality_tokens"]), s["pending"]
        self.placed, self.capacity, self.truncated, self.docs = s["packing"]
        self.buffer = [{k: np.asarray(v, dtype=dt) for (k, v), dt in zip(d.items(), (np.int64, np.float32, np.int8), strict=True)}
                       for d in s.get("buffer", [])]  # fmt: skip


# ----------------------------------------------------------------------------- the loader
class _WorkerDataset(torch.utils.data.IterableDataset):
    """Each dataloader worker runs one Stream; every batch travels with the stream's state after it."""

    def __init__(self, loader: OmniLoader, order: list[int], start_states: list[dict | None]):
        self.loader, self.order, self.start_states = loader, order, start_states

    def __iter__(self) -> Iterator[tuple[dict, dict, int]]:
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        stream = self.loader.make_stream(self.order[w])  # worker w plays slot order[w]
        if self.start_states[w] is not None:
            stream.load(self.start_states[w])
        while True:
            batch = stream.next_batch()
            yield batch, stream.state(), w


class OmniLoader:
    """Batches ``{input_ids, targets, loss_weights, doc_ids}`` for one rank, with exact resume."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
        if not cfg.sources:
            raise ValueError("the loader has no sources: give data.sources")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.manifests = {n: _manifest(s, cfg.layout_hash) for n, s in cfg.sources.items()}
        self.layout_hash = cfg.layout_hash or next(iter(self.manifests.values()))["layout_hash"]
        for n, m in self.manifests.items():
            check_layout_hash(self.layout_hash, m["layout_hash"], f"source '{n}' ({cfg.sources[n].path})")
        self.urls = {n: [_url(cfg.sources[n], sh["name"]) for sh in m["shards"]] for n, m in self.manifests.items()}
        self.shares = source_shares(cfg, self.manifests)
        if cfg.pad_id is not None:
            self.pad_id = cfg.pad_id
        else:
            from omnitrain.tokenizer.layout import TokenLayout

            self.pad_id = TokenLayout.load(next(iter(cfg.sources.values())).path).specials["pad"]
        self.n_slots = max(cfg.workers, 1)
        self.states: list[dict | None] = [None] * self.n_slots  # after the last batch handed out, per slot
        self.next_slot = 0  # the slot (worker) whose batch comes next
        self._it: Iterator | None = None

    def make_stream(self, slot: int) -> Stream:
        stream_id = self.rank * self.n_slots + slot
        return Stream(self.cfg, self.urls, self.shares, stream_id, self.world_size * self.n_slots, self.layout_hash, self.pad_id)

    def _start(self) -> Iterator:
        # DataLoader serves workers round-robin from worker 0: rotate the slots so that the
        # worker that was next when the state was saved is worker 0 now.
        order = [(self.next_slot + k) % self.n_slots for k in range(self.n_slots)]
        rotated = [self.states[s] for s in order]
        if self.cfg.workers == 0:
            stream = self.make_stream(0)
            if rotated[0] is not None:
                stream.load(rotated[0])
            return ((stream.next_batch(), stream.state(), 0) for _ in iter(int, 1))
        reader = copy.copy(self)  # what the workers need, without a reference back to this loader
        reader._it = None
        ds = _WorkerDataset(reader, order, rotated)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.cfg.workers, persistent_workers=False)
        self._order = order
        return iter(dl)

    def close(self) -> None:
        """Stop the worker processes (also done when the loader is garbage-collected)."""
        it, self._it = getattr(self, "_it", None), None  # (also runs for a loader whose __init__ failed)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        self.close()

    def __iter__(self) -> OmniLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        batch, state, worker = next(self._it)
        slot = self._order[worker] if self.cfg.workers else 0
        self.states[slot] = state
        self.next_slot = (slot + 1) % self.n_slots
        return batch

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size, "slots": self.n_slots,
                "next_slot": self.next_slot, "states": self.states, "layout_hash": self.layout_hash}  # fmt: skip

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from this rank's ``state_dict()``; after a change of world size or workers, pass
        the list of *every* old rank's state (the checkpoint holds them all), see :func:`reshard`."""
        states = state if isinstance(state, list) else [state]
        for st in states:
            if st.get("version") != STATE_VERSION:
                raise ValueError(f"loader state version {st.get('version')} is not {STATE_VERSION}")
            check_layout_hash(self.layout_hash, st["layout_hash"], "the loader state in this checkpoint")
        self.close()
        old_readers = states[0]["world_size"] * states[0]["slots"]
        if old_readers == self.world_size * self.n_slots and len(states) == 1:
            self.states, self.next_slot = list(states[0]["states"]), states[0]["next_slot"]
            return
        if old_readers == self.world_size * self.n_slots:
            mine = next((st for st in states if st["rank"] == self.rank), None)
            if mine is None:
                raise ValueError(f"no loader state for rank {self.rank} among ranks {[st['rank'] for st in states]}")
            self.states, self.next_slot = list(mine["states"]), mine["next_slot"]
            return
        if len(states) != states[0]["world_size"] or sorted(st["rank"] for st in states) != list(range(len(states))):
            raise ValueError(
                f"the loader state was saved with {states[0]['world_size']} rank(s) x {states[0]['slots']} worker(s), "
                f"this run has {self.world_size} x {self.n_slots}: resuming needs the states of all "
                f"{states[0]['world_size']} old ranks (a list), not {len(states)}"
            )
        # every old stream in order (rank-major, like stream ids), each rank's slots as they were
        old = [st["states"][slot] or self.make_stream(0).state() for st in sorted(states, key=lambda x: x["rank"]) for slot in range(st["slots"])]
        new = reshard(old, self.world_size * self.n_slots, self.urls, self.cfg.seed)
        self.states = new[self.rank * self.n_slots : (self.rank + 1) * self.n_slots]
        self.next_slot = 0

    def packing_efficiency(self) -> float:
        """Share of row positions holding document tokens (not padding), over this rank's batches so far."""
        placed = sum(s["packing"][0] for s in self.states if s)
        capacity = sum(s["packing"][1] for s in self.states if s)
        return placed / capacity if capacity else 0.0

    def realised_shares(self) -> dict[str, float]:
        """Share of tokens per modality placed in rows so far (this rank, all its workers)."""
        tot = dict.fromkeys(MODALITIES, 0)
        for s in self.states:
            for m, n in (s or {}).get("modality_tokens", {}).items():
                tot[m] += n
        total = max(sum(tot.values()), 1)
        return {m: n / total for m, n in tot.items()}


def _url(spec: SourceSpec, name: str) -> str:
    if spec.url is None:
        return f"{spec.path.rstrip('/')}/{name}"
    if "{name}" not in spec.url:
        raise ValueError(f"source url {spec.url!r} must contain {{name}} where the shard file name goes")
    return spec.url.replace("{name}", name)


def _manifest(spec: SourceSpec, layout_hash: str | None) -> dict:
    if spec.url is None:  # local shards: check that every one listed is there
        return read_manifest(spec.path, expect_hash=layout_hash)
    manifest = json.loads((Path(spec.path) / "manifest.json").read_text()) if (Path(spec.path) / "manifest.json").is_file() else None
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {spec.path}: keep a local copy of the shard set's manifest and layout.json there")
    if layout_hash is not None:
        check_layout_hash(layout_hash, manifest.get("layout_hash", "?"), f"shard set {spec.url}")
    return manifest


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] doc ids -> [B, T, T] bool: causal and within one document (padding attends to nothing)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # [T, T]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
    return same & causal & (doc_ids[:, :, None] >= 0)
