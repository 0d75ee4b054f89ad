"""The streaming loader: shards -> weighted mixture -> packed rows with document masks; exactly resumable.

Legend: B rows per batch, T = seq_len tokens per row.

Streams. Every (rank, dataloader worker) pair is one *stream*; there are ``world_size * workers``
of them. What each reads of a source is ``omnitrain.data.reading``'s: for each epoch, shards in an
order shuffled with ``(seed, source, epoch)`` split over the streams, and a shard's samples shared by
striding when a source has fewer shards than streams. So every sample of an epoch is read exactly
once over all streams, and the order is a pure function of the seed. Start-up reads the manifests
only (no shard is opened or stat'ed); each shard is checked against its manifest entry when read.

Mixture. Weights are token shares per source, given directly or derived from a target share of
tokens per modality (solved from the manifests' per-modality counts). Each stream picks the next
document from the source that is furthest behind its share of the tokens drawn so far (a
deterministic deficit scheduler, so realised shares track the targets closely, not just on average).

Packing (``omnitrain.data.packing``). Documents are concatenated into rows of ``T + 1`` tokens (inputs
are the first T, targets the last T). With ``split_documents=True`` (pretraining) a document that
does not fit is cut and continues at the start of the next row. With ``False`` (SFT) documents stay
whole: ``pack_buffer`` documents at a time are packed by best-fit decreasing, the rows handed out in
a seeded order, the rest of each row padded; a document longer than a row is truncated to a row of
its own and counted (``packing_stats``): truncated rather than skipped, since every kept target still
has its true left context and its source's tokens stay in the mix (OLMo-core's default as well;
filter long documents at build time to drop them instead). ``doc_ids`` number the documents in a row; a target is only
learned when it belongs to the same document as its input, so nothing is learned across a boundary.
``loss_weights`` = per-modality weight x the template's learn mask; 0 on padding.

Resume. A stream's whole position is a small dict of integers: per source the epoch, shard and
sample to read next; the tokens drawn; the packing counters; where the rest of a cut document was
read (split mode) or where the current packing buffer began and how many of its rows were handed
out (whole-document mode). Both are re-derived on resume by reading those documents again.
``OmniLoader.state_dict()`` holds one per stream plus which worker comes next, and after
``load_state_dict`` the next batch is exactly the one an uninterrupted run would have produced
(same world size and worker count). With another number of readers, the states of all old ranks
are re-split by :func:`reshard`: no sample twice within an epoch, a bounded number skipped.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omnitrain.data.packing import Doc, best_fit, doc_runs, write_doc
from omnitrain.data.reading import (  # noqa: F401  (read_shard_samples, ShardReadError: part of this module's API)
    ON_CORRUPT,
    ReadOptions,
    ShardReadError,
    SourceStream,
    _rng,
    read_shard_samples,
    reshard_sources,
)
from omnitrain.data.shards import read_manifest
from omnitrain.tokenizer.layout import MODALITIES, TokenLayout, check_layout_hash

STATE_VERSION = 2  # 2: packing counters by name, cut documents and the packing buffer re-derived on resume
PACKING_KEYS = ("placed", "capacity", "docs", "truncated", "truncated_tokens", "dropped")


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
    # whole-document mode: documents packed together by best-fit decreasing. On the loader benchmark's omni
    # mix at T=1024, rows of whole documents are 0.916 full with 64, 0.942 with 512 (all at once: 0.946)
    pack_buffer: int = 512
    pad_id: int | None = None  # None: the layout's <pad> (layout.json beside the first source's shards)
    layout_hash: str | None = None  # every shard must carry it (None: take the first source's)
    on_corrupt: str = "error"  # a shard that does not match its manifest: "error" stops, "skip" skips and counts it
    read_retries: int = 3  # attempts after a failed shard read (remote stores), before ShardReadError
    retry_wait: float = 2.0  # seconds before the first retry, doubled before each next one

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.batch_size < 1 or self.workers < 0 or self.pack_buffer < 1:
            raise ValueError("seq_len must be >= 2, batch_size >= 1, workers >= 0 and pack_buffer >= 1")
        if self.on_corrupt not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt={self.on_corrupt!r} is not one of {list(ON_CORRUPT)}")
        if self.read_retries < 0 or self.retry_wait < 0:
            raise ValueError(f"data.read_retries ({self.read_retries}) and data.retry_wait ({self.retry_wait}) must be >= 0")

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.on_corrupt, self.read_retries, self.retry_wait)
        if self.modality_shares is not None:
            bad = set(self.modality_shares) - set(MODALITIES)
            if bad:
                raise ValueError(f"modality_shares has unknown modalities {sorted(bad)}; use {MODALITIES}")


# ----------------------------------------------------------------------------- readers
def reshard(old: list[dict], n_new: int, urls: dict[str, list[str]], seed: int) -> list[dict]:
    """Stream states saved with one number of readers -> states for ``n_new`` readers.

    Defined behaviour on a change of world size or worker count: per source, every shard (or part of
    one) that an old reader had read or begun in the current epoch (and later ones) is left out of
    that epoch for the new readers, which split the rest (:func:`reshard_sources`). So no sample is
    read twice within an epoch; what is skipped is bounded by the unread rest of the parts that were
    in progress (at most one per old reader), the partly packed document and the packing buffer of
    each old reader.
    """
    sources = reshard_sources(old, n_new, urls, seed)

    def spread(key: str) -> dict:
        total: dict[str, float] = {}
        for st in old:
            for k, v in st[key].items():
                total[k] = total.get(k, 0) + v
        return {k: v // n_new for k, v in total.items()}

    packing = {k: sum(_packing(st)[k] for st in old) // n_new for k in PACKING_KEYS}
    return [{"sources": sources[i], "drawn": spread("drawn"), "modality_tokens": spread("modality_tokens"),
             "pending": None, "packing": packing, "buffer": None} for i in range(n_new)]  # fmt: skip


# ----------------------------------------------------------------------------- mixture
def source_shares(cfg: LoaderConfig, manifests: dict[str, dict]) -> dict[str, float]:
    """Token share per source: the given weights, or solved from target modality shares."""
    names = list(cfg.sources)
    if cfg.modality_shares is None:
        w = np.array([cfg.sources[n].weight for n in names], dtype=float)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("source weights must be >= 0 with a positive sum")
        return dict(zip(names, (w / w.sum()).tolist(), strict=True))
    from scipy.optimize import nnls  # scipy.optimize: ~0.3 s to import, only for modality_shares

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
                 n_streams: int, layout_hash: str | None, pad_id: int, entries: dict[str, list[dict]] | None = None) -> None:  # fmt: skip
        self.cfg, self.shares, self.pad_id, self.stream = cfg, shares, pad_id, stream
        entries, opts = entries or {}, cfg.read_options()
        self.sources = {n: SourceStream(n, urls, stream, n_streams, cfg.seed, layout_hash, entries.get(n), opts)
                        for n, urls in sources.items()}  # fmt: skip
        self.drawn = dict.fromkeys(sources, 0)  # tokens drawn per source
        self.counts = [0] * len(MODALITIES)  # target tokens placed in rows, per modality
        self.pending: Doc | None = None  # split mode: the rest of the last document read, cut at a row's end
        # counters in target positions (T per row), see PACKING_KEYS and OmniLoader.packing_stats
        self.placed = self.capacity = self.docs = self.truncated = self.truncated_tokens = self.dropped = 0
        self.rows: list[list[Doc]] = []  # whole-document mode: the packing buffer's rows, in the order handed out
        self.buffer: dict | None = None  # where that buffer began (sources, drawn, docs, number) + rows handed out
        self.mod_w = np.array([cfg.modality_weights.get(m, 1.0) for m in MODALITIES], dtype=np.float32)
        self._weights = self.mod_w.tolist()

    def _pick(self) -> str:
        """The source furthest behind its share of the tokens drawn (the first of equals)."""
        total = sum(self.drawn.values()) + 1
        best, best_deficit = "", -float("inf")
        for name, share in self.shares.items():
            deficit = share * total - self.drawn[name]
            if deficit > best_deficit:
                best, best_deficit = name, deficit
        return best

    def _next_doc(self) -> Doc:
        name = self._pick()
        src = self.sources[name]
        ids, meta = src.next()
        origin = (name, *src.last)  # where it was read (after any part with nothing to read)
        self.docs += 1
        self.drawn[name] += len(ids)
        return Doc(ids, doc_runs(len(ids), meta, self._weights), 0, origin)

    def _split_row(self, ids: np.ndarray, weights: np.ndarray, docs: np.ndarray) -> None:
        """Fill one row with documents, cutting the last one: its rest starts the next row, its first
        token repeated as an input (that token was learned as this row's last target)."""
        T1, pos, doc_no = len(ids), 0, 0
        while pos < T1:
            doc = self.pending if self.pending is not None else self._next_doc()
            self.pending = None
            n = len(doc.ids) - doc.start
            take = n if n < T1 - pos else T1 - pos
            write_doc(doc, take, pos, doc_no, ids, weights, docs, self.counts)
            if take < n:
                self.pending = Doc(doc.ids, doc.runs, doc.start + take - 1, doc.origin)
            pos, doc_no = pos + take, doc_no + 1
        self.placed += T1 - 1

    def _pack_buffer(self, number: int) -> None:
        """Read ``pack_buffer`` documents and pack them whole by best-fit decreasing into ``self.rows``."""
        self.buffer = {"number": number, "sources": {n: s.state() for n, s in self.sources.items()},
                       "drawn": dict(self.drawn), "docs": self.docs, "rows_out": 0}  # fmt: skip
        docs = [self._next_doc() for _ in range(self.cfg.pack_buffer)]
        rows = best_fit([len(d) for d in docs], self.cfg.seq_len + 1)
        # best fit opens rows longest document first: hand them out shuffled, so that a batch's
        # lengths and sources do not depend on where it falls in the buffer
        order = _rng(self.cfg.seed, "rows", self.stream, number).permutation(len(rows))
        self.rows = [[docs[i] for i in rows[r]] for r in order]

    def _whole_row(self, ids: np.ndarray, weights: np.ndarray, docs: np.ndarray) -> None:
        """Fill one row with whole documents: the next row of the packing buffer."""
        if self.buffer is None or self.buffer["rows_out"] == len(self.rows):
            self._pack_buffer(0 if self.buffer is None else self.buffer["number"] + 1)
        row = self.rows[self.buffer["rows_out"]]
        self.buffer["rows_out"] += 1
        T1, pos = len(ids), 0
        for doc_no, doc in enumerate(row):
            take = min(len(doc), T1)  # only a document alone in its row can be longer than the row
            write_doc(doc, take, pos, doc_no, ids, weights, docs, self.counts)
            pos += take
        if len(row[0]) > T1:  # truncated: its first T+1 tokens fill the row, the rest is dropped
            self.truncated += 1
            self.truncated_tokens += T1 - 1
            self.dropped += len(row[0]) - T1
        else:
            self.placed += pos - 1

    def next_batch(self) -> dict[str, torch.Tensor]:
        B, T1 = self.cfg.batch_size, self.cfg.seq_len + 1
        ids = np.full((B, T1), self.pad_id, dtype=np.int64)  # [B, T+1]
        weights = np.zeros((B, T1), dtype=np.float32)  # [B, T+1] weight of each token as a target
        docs = np.full((B, T1), -1, dtype=np.int64)  # [B, T+1] document number in its row, -1: padding
        fill = self._split_row if self.cfg.split_documents else self._whole_row
        for r in range(B):
            fill(ids[r], weights[r], docs[r])
        self.capacity += B * (T1 - 1)
        return {  # (write_doc gave 0 weight to a target whose input is in another document, and to padding)
            "input_ids": torch.from_numpy(ids[:, :-1].copy()),
            "targets": torch.from_numpy(ids[:, 1:].copy()),
            "loss_weights": torch.from_numpy(weights[:, 1:].copy()),
            "doc_ids": torch.from_numpy(docs[:, :-1].copy()),
        }

    def state(self) -> dict:
        pending, d = None, self.pending
        if d is not None and d.origin is not None:  # where its document was read, to read it again on resume
            name, epoch, shard, sample = d.origin
            pending = {"source": name, "epoch": epoch, "shard": shard, "sample": sample, "start": d.start}
        elif d is not None:  # the rest of a document resumed from a version-1 state: kept in that form
            mod, w = np.zeros(len(d.ids), dtype=np.int8), np.zeros(len(d.ids), dtype=np.float32)
            for a, b, m, wt in d.runs:
                mod[a:b], w[a:b] = m, wt
            pending = {"ids": d.ids[d.start :].tolist(), "weights": w[d.start :].tolist(), "mod": mod[d.start :].tolist()}
        return {"sources": {n: s.state() for n, s in self.sources.items()}, "drawn": dict(self.drawn),
                "modality_tokens": dict(zip(MODALITIES, self.counts, strict=True)), "pending": pending,
                "packing": {k: getattr(self, k) for k in PACKING_KEYS},
                "buffer": None if self.buffer is None else dict(self.buffer)}  # fmt: skip

    def load(self, s: dict) -> None:
        for n, st in s["sources"].items():
            self.sources[n].load(st)
        self.drawn = dict(s["drawn"])
        self.counts = [s["modality_tokens"].get(m, 0) for m in MODALITIES]
        for k, v in _packing(s).items():
            setattr(self, k, v)
        self.pending, self.buffer, self.rows = None, None, []
        pending, buffer = s.get("pending"), s.get("buffer")
        if pending is not None and "source" in pending:  # re-read the cut document: its source stands just after it
            src = self.sources[pending["source"]]
            after = (src.epoch, src.shard, src.sample)
            src.epoch, src.shard, src.sample = pending["epoch"], pending["shard"], pending["sample"]
            ids, meta = src.next()
            assert (src.epoch, src.shard, src.sample) == after, "the cut document's position does not lead to the saved one"
            origin = (pending["source"], pending["epoch"], pending["shard"], pending["sample"])
            self.pending = Doc(ids, doc_runs(len(ids), meta, self._weights), pending["start"], origin)
        elif pending is not None:  # version 1: the rest itself, as lists
            ids, w, mod = (np.asarray(pending[k]) for k in ("ids", "weights", "mod"))
            cuts = [0, *(np.flatnonzero((mod[1:] != mod[:-1]) | (w[1:] != w[:-1])) + 1).tolist(), len(ids)]
            runs = [(a, b, int(mod[a]), float(w[a])) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
            self.pending = Doc(ids.astype(np.uint32), runs, 0, None)
        if isinstance(buffer, dict):  # re-read and re-pack the buffer from where it began
            saved = ({n: src.state() for n, src in self.sources.items()}, dict(self.drawn), self.docs)
            for n, st in buffer["sources"].items():
                self.sources[n].load(st)
            self.drawn, self.docs = dict(buffer["drawn"]), buffer["docs"]
            self._pack_buffer(buffer["number"])
            self.buffer["rows_out"] = buffer["rows_out"]
            assert ({n: src.state() for n, src in self.sources.items()}, self.drawn, self.docs) == saved, "re-packing the buffer did not reach the saved position"
        elif buffer:  # version 1: documents looked ahead, not placed yet
            warnings.warn(f"loader state version 1: {len(buffer)} documents read ahead for packing are skipped "
                          "(whole-document packing is best-fit decreasing since version 2)", stacklevel=2)  # fmt: skip


def _packing(state: dict) -> dict[str, int]:
    """A stream state's packing counters by name (version 1 saved [placed, capacity, truncated, docs])."""
    p = state["packing"]
    p = dict(zip(("placed", "capacity", "truncated", "docs"), p, strict=True)) if isinstance(p, list) else p
    return {k: p.get(k, 0) for k in PACKING_KEYS}


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
            try:
                batch = stream.next_batch()
            except (ValueError, OSError) as e:  # to the training process as itself, one line (not torch's wrapped traceback)
                yield None, e, w
                return
            yield batch, stream.state(), w


class OmniLoader:
    """Batches ``{input_ids, targets, loss_weights, doc_ids}`` for one rank, with exact resume."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
        if not cfg.sources:
            raise ValueError("the loader has no sources: give data.sources")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.n_slots = max(cfg.workers, 1)
        self.manifests = {n: _manifest(s, cfg.layout_hash) for n, s in cfg.sources.items()}  # no shard stat'ed
        self.layout_hash = cfg.layout_hash or next(iter(self.manifests.values()))["layout_hash"]
        readers = world_size * self.n_slots
        for n, m in self.manifests.items():
            check_layout_hash(self.layout_hash, m["layout_hash"], f"source '{n}' ({cfg.sources[n].path})")
            if sum(sh["samples"] for sh in m["shards"]) < readers:
                raise ValueError(f"source '{n}' ({cfg.sources[n].path}) has {sum(sh['samples'] for sh in m['shards'])} "
                                 f"samples for {readers} readers (ranks x workers): use fewer data.workers")  # fmt: skip
            if rank == 0 and any("crc32" not in sh for sh in m["shards"]):
                warnings.warn(f"{cfg.sources[n].path}/manifest.json records no shard sizes and checksums (built before "
                              "they were): its shards are checked by sample count only; rebuild with `omnitrain data build` "
                              "to check them fully", stacklevel=2)  # fmt: skip
        self.urls = {n: [_url(cfg.sources[n], sh["name"]) for sh in m["shards"]] for n, m in self.manifests.items()}
        self.entries = {n: m["shards"] for n, m in self.manifests.items()}
        self.shares = source_shares(cfg, self.manifests)
        if cfg.pad_id is not None:
            self.pad_id = cfg.pad_id
        else:
            self.pad_id = TokenLayout.load(next(iter(cfg.sources.values())).path).specials["pad"]
        self.states: list[dict | None] = [None] * self.n_slots  # after the last batch handed out, per slot
        self.next_slot = 0  # the slot (worker) whose batch comes next
        self._it: Iterator | None = None

    def make_stream(self, slot: int) -> Stream:
        stream_id = self.rank * self.n_slots + slot
        return Stream(self.cfg, self.urls, self.shares, stream_id, self.world_size * self.n_slots, self.layout_hash,
                      self.pad_id, self.entries)  # fmt: skip

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
        """The next batch. On an error (a corrupt shard, ``ShardReadError`` after the retries) the
        readers stop and the state stays after the last batch handed out: ``state_dict()`` then
        resumes exactly there, and calling ``next`` again starts the readers from there."""
        if self._it is None:
            self._it = self._start()
        try:
            batch, state, worker = next(self._it)
        except BaseException:
            self.close()
            raise
        if isinstance(state, BaseException):  # a worker's error, sent as a value
            self.close()
            raise state
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
            if st.get("version") not in (1, STATE_VERSION):
                raise ValueError(f"loader state version {st.get('version')} is not {STATE_VERSION} (or 1)")
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

    def packing_stats(self) -> dict[str, int]:
        """This rank's packing counters so far (all its workers), in target positions (T per row):
        ``placed`` (tokens of documents placed whole, or cut and continued in the next row),
        ``capacity``, ``docs`` drawn, ``truncated`` documents (longer than a row with documents kept
        whole), ``truncated_tokens`` (their part in rows) and ``dropped`` (their part in none).
        Padding is ``capacity - placed - truncated_tokens``."""
        total = dict.fromkeys(PACKING_KEYS, 0)
        for s in self.states:
            for k, v in (_packing(s) if s else {}).items():
                total[k] += v
        return total

    def packing_efficiency(self) -> float:
        """Share of row positions holding tokens of documents placed whole (not padding, not truncated
        documents), over this rank's batches so far."""
        st = self.packing_stats()
        return st["placed"] / st["capacity"] if st["capacity"] else 0.0

    def skipped_shards(self) -> int:
        """Corrupt shard parts skipped so far by this rank's readers (``data.on_corrupt=skip``), over
        all epochs: a shard is counted each epoch it is met, by each reader sharing it."""
        return sum(st["skipped"][0] for s in self.states if s for st in s["sources"].values() if "skipped" in st)

    def skipped_samples(self) -> int:
        """Samples (as the manifests count them) in the corrupt shard parts skipped by this rank's readers."""
        return sum(st["skipped"][1] for s in self.states if s for st in s["sources"].values() if "skipped" in st)

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
    """A source's manifest, read and checked without touching its shards (a missing one is named when read)."""
    if spec.url is not None and not (Path(spec.path) / "manifest.json").is_file():
        raise FileNotFoundError(f"no manifest.json in {spec.path}: keep a local copy of the shard set's manifest and layout.json there")
    return read_manifest(spec.path, expect_hash=layout_hash, check_files=False)


def readers_report(cfg: LoaderConfig, world_size: int) -> list[dict]:
    """Per source, from its manifest only (no shard is opened): how its shards split over the
    ``world_size x max(workers, 1)`` readers, for ``omnitrain plan``.

    Each row: ``source``, ``path``, ``ok`` and ``problem`` (None, or why the loader would refuse
    it: no or a bad manifest, fewer samples than readers), and when the manifest reads: ``shards``,
    ``samples``, ``bytes`` (None if the manifest predates sizes), ``checksums`` (every shard has
    one), ``readers``, ``readers_per_shard`` (P > 1: readers share shards by sample striding),
    ``parts_per_reader`` ([min, max] per epoch) and ``samples_per_reader`` (mean per epoch)."""
    readers, rows = world_size * max(cfg.workers, 1), []
    for name, spec in cfg.sources.items():
        row: dict = {"source": name, "path": spec.path, "readers": readers, "ok": True, "problem": None}
        rows.append(row)
        try:
            shards = _manifest(spec, cfg.layout_hash)["shards"]
        except (FileNotFoundError, ValueError) as e:
            row.update(ok=False, problem=str(e))
            continue
        n_samples, parts = sum(sh["samples"] for sh in shards), -(-readers // max(len(shards), 1))
        row.update(shards=len(shards), samples=n_samples, readers_per_shard=parts,
                   bytes=sum(sh["bytes"] for sh in shards) if all("bytes" in sh for sh in shards) else None,
                   checksums=all("crc32" in sh for sh in shards), samples_per_reader=n_samples / readers,
                   parts_per_reader=[len(shards) * parts // readers, -(-len(shards) * parts // readers)])  # fmt: skip
        if not shards or n_samples < readers:
            row.update(ok=False, problem=f"{n_samples} samples in {len(shards)} shards for {readers} readers: use fewer data.workers")
    return rows


def attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] doc ids -> [B, T, T] bool: causal and within one document (padding attends to nothing)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # [T, T]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
    return same & causal & (doc_ids[:, :, None] >= 0)
