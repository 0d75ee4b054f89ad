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

Audio layouts (``audio_layout``, set to ``model.audio_layout`` by the recipes). ``delay`` / ``depth``: each
document is regrouped before packing to one position per audio frame (``omnitrain.data.audio_regroup``), so
rows pack positions; ``input_ids`` / ``targets`` / ``loss_weights`` are then [B, T, K] (channel 0 the
position's token, channels 1..K-1 higher audio levels or -1), ``doc_ids`` stays [B, T]. The shards are the same.

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

import torch

from omnitrain.data.audio_regroup import AudioGrouping, check_audio_layout
from omnitrain.data.reading import (  # noqa: F401  (read_shard_samples, ShardReadError: part of this module's API)
    ON_CORRUPT,
    ReadOptions,
    ShardReadError,
    read_shard_samples,
    reshard_sources,
)
from omnitrain.data.shards import read_manifest
from omnitrain.data.stream import PACKING_KEYS, Stream, _packing, source_shares  # noqa: F401  (Stream: for dpo)
from omnitrain.tokenizer.layout import MODALITIES, TokenLayout, check_layout_hash

STATE_VERSION = 2  # 2: packing counters by name, cut documents and the packing buffer re-derived on resume


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
    # how audio reaches the model: flat (K positions per frame, as in the shards) | delay | depth (one position per
    # frame, regrouped per document before packing: omnitrain.data.audio_regroup). The recipes set it to model.audio_layout
    audio_layout: str = "flat"

    def __post_init__(self) -> None:
        check_audio_layout(self.audio_layout, "data.audio_layout")
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
        self.shares_set = False  # True once set_shares changed them: then they are part of state_dict
        layout = TokenLayout.load(next(iter(cfg.sources.values())).path) if cfg.pad_id is None or cfg.audio_layout != "flat" else None
        self.pad_id = cfg.pad_id if cfg.pad_id is not None else layout.specials["pad"]
        self.grouping = AudioGrouping.of(layout, cfg.audio_layout) if layout is not None else None
        self.states: list[dict | None] = [None] * self.n_slots  # after the last batch handed out, per slot
        self.next_slot = 0  # the slot (worker) whose batch comes next
        self._it: Iterator | None = None

    def make_stream(self, slot: int) -> Stream:
        stream_id = self.rank * self.n_slots + slot
        return Stream(self.cfg, self.urls, self.shares, stream_id, self.world_size * self.n_slots, self.layout_hash,
                      self.pad_id, self.entries, self.grouping)  # fmt: skip

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

    def set_shares(self, shares: dict[str, float]) -> None:
        """Change the mixture's token share per source (normalised; e.g. the forgetting guard, ``omnitrain.train.guard``).
        The readers restart from the position after the last batch handed out, and each stream's mixture counts from
        here (not from the start: no burst of one source to catch up). With ``split_documents`` the rest of a document
        cut at the last row's end comes first (drawn before the change; at tiny batches it can fill the next one). Recorded in ``state_dict``: a resumed run reads
        the same batches."""
        if set(shares) != set(self.shares) or any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
            raise ValueError(f"shares {shares}: give a share >= 0 for each source {list(self.shares)}, with a positive sum")
        total = sum(shares.values())
        self.shares, self.shares_set = {n: shares[n] / total for n in self.shares}, True
        for st in self.states:
            if st is not None:
                st["since"] = dict(st["drawn"])
        self.close()  # the next batch restarts the readers (workers too) from self.states, with the new shares

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size, "slots": self.n_slots,
                "next_slot": self.next_slot, "states": self.states, "layout_hash": self.layout_hash,
                **({"shares": dict(self.shares)} if self.shares_set else {})}  # fmt: skip

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from this rank's ``state_dict()``; after a change of world size or workers, pass
        the list of *every* old rank's state (the checkpoint holds them all), see :func:`reshard`."""
        states = state if isinstance(state, list) else [state]
        for st in states:
            if st.get("version") not in (1, STATE_VERSION):
                raise ValueError(f"loader state version {st.get('version')} is not {STATE_VERSION} (or 1)")
            check_layout_hash(self.layout_hash, st["layout_hash"], "the loader state in this checkpoint")
        self.close()
        if states[0].get("shares") is not None and set(states[0]["shares"]) == set(self.shares):  # set_shares' mixture
            self.shares, self.shares_set = dict(states[0]["shares"]), True
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
