"""Reading one source for one reader: which shards, or parts of shards, it reads in which order,
each checked against the manifest as it is opened, remote ones retried.

Readers. Every (rank, dataloader worker) pair is one *reader* (the loader's stream); there are
``N = world_size x workers`` of them. A source of ``S`` shards is cut into ``P = ceil(N / S)``
parts per shard: part ``p`` of a shard is the samples at positions ``p, p+P, p+2P, ...`` of the
shard's shuffled order (sample striding). So ``P = 1`` whenever ``S >= N``, and the split is the
shard split it always was: the same batches, the same saved states. Only a source with fewer shards
than readers (a small TTS set at 4 x 8 GPUs, the demo at 2 ranks) has its shards shared, each read
by ``P`` readers that keep one part each: ``P`` times the I/O of that source, never more than
``ceil(N / S)``. For each epoch the ``S x P`` parts are listed shard by shard in an order shuffled
with ``(seed, source, epoch)`` and reader ``i`` reads parts ``i, i+N, i+2N, ...``; the samples of a
shard are shuffled with ``(seed, source, epoch, shard file name)``. Every sample of an epoch is thus
read exactly once over all readers, in an order that is a pure function of the seed.

A reader's position is (epoch, part, sample): the next sample to read. After a change of readers
(:func:`reshard_sources`) the parts begun by the old readers are left out of their epoch and the
rest is split over the new readers, in the old number of parts, which the excluded entries record
(``url#p/P``); later epochs use the new number.

Checks and retries. A shard is read whole and checked against its manifest entry
(``omnitrain.data.shards.check_shard``: sample count, size, CRC-32). A shard that fails is an error
naming it (``CorruptShardError``), or with ``data.on_corrupt=skip`` is skipped, warned about and
counted in the reader's state (``skipped``: parts, samples), so the count survives a resume and a
resumed run skips exactly what the uninterrupted one skipped. An ``OSError`` while reading (and, for
a remote shard, a failed check: a download cut short) is retried ``retries`` times, waiting
``retry_wait`` seconds then twice as long each time; then ``ShardReadError`` says so. The loader's
state then still stands after the last batch it handed out, so a checkpoint of it loses nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import time
import warnings
from dataclasses import dataclass

import numpy as np
from webdataset.gopen import gopen

from omnitrain.data.shards import REBUILD, CorruptShardError, check_shard, meta_from_disk
from omnitrain.tokenizer.layout import check_layout_hash

ON_CORRUPT = ("error", "skip")
_PART = re.compile(r"^(.*)#(\d+)/(\d+)$")  # "url#p/P": part p of P of a shard shared by P readers
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class ShardReadError(OSError):
    """A shard that could not be read in any attempt (a remote store down, say). The loader's state
    still stands after the last batch handed out: save a checkpoint and resume once it is back."""


@dataclass(frozen=True)
class ReadOptions:
    on_corrupt: str = "error"  # "error" | "skip": a shard that does not match its manifest entry
    retries: int = 3  # attempts after a failed read (an OSError, or a remote shard that does not check)
    retry_wait: float = 2.0  # seconds before the first retry, doubled before each next one


def _rng(*keys: int | str) -> np.random.Generator:
    """A generator seeded by all of ``keys`` (strings hashed whole, so similar names differ)."""
    seq = [k if isinstance(k, int) else int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little") for k in keys]
    return np.random.default_rng(seq)


def decode_ids(data: bytes) -> np.ndarray:
    """ids.npy -> array. Our own 1-D int32 (version 1: uint32) files are read straight from the
    buffer: np.load parses every header with ast.literal_eval, a third of the loader's time per sample."""
    if data[:6] == b"\x93NUMPY" and data[6] == 1:
        header_len = int.from_bytes(data[8:10], "little")
        header = data[10 : 10 + header_len]
        if b"'fortran_order': False" in header and b"'shape': (" in header:
            for dtype in ("<i4", "<u4"):
                if f"'descr': '{dtype}'".encode() in header:
                    return np.frombuffer(data, dtype=dtype, offset=10 + header_len)
    return np.load(io.BytesIO(data), allow_pickle=False)


def is_remote(url: str) -> bool:
    """A ``pipe:``, ``http(s)://``, ``s3://`` ... url rather than a local path."""
    return bool(_SCHEME.match(url)) and not url.startswith("file:")


def read_bytes(url: str) -> bytes:
    """A whole shard. A ``pipe:`` command's failure is an ``OSError`` with its exit status and last
    line of stderr; other urls go through webdataset's ``gopen`` (files, http, ...)."""
    if url.startswith("pipe:"):
        proc = subprocess.run(url[5:], shell=True, capture_output=True)  # a pipe: url is a shell command by design
        if proc.returncode != 0:
            said = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise OSError(f"the command exited with status {proc.returncode}" + (f": {said[0][:200]}" if said else ""))
        return proc.stdout
    with gopen(url, "rb") as f:
        return f.read()


def _read_checked(url: str, entry: dict | None, options: ReadOptions) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's samples as tar members, checked against ``entry``, with retries (see the module doc)."""
    remote, attempts = is_remote(url), options.retries + 1
    for attempt in range(attempts):
        try:
            return check_shard(read_bytes(url), entry, url)
        except FileNotFoundError as e:
            if not remote:
                raise CorruptShardError(f"shard {url} is listed in the manifest but missing; {REBUILD}") from e
            error: Exception = e
        except CorruptShardError as e:
            if not remote:  # the same bytes again: no use retrying
                raise
            error = e
        except OSError as e:
            error = e
        if attempt + 1 < attempts:
            wait = options.retry_wait * 2**attempt
            warnings.warn(f"shard {url}: {error}; retry {attempt + 1}/{options.retries} in {wait:g} s", stacklevel=3)
            time.sleep(wait)
    if isinstance(error, CorruptShardError):
        raise error
    raise ShardReadError(f"shard {url} could not be read in {attempts} attempt(s) ({error}); the loader state stands "
                         "before it: resume from the checkpoint once the store is back "
                         "(data.read_retries and data.retry_wait set the retries)") from error  # fmt: skip


def read_shard_samples(url: str, expect_hash: str | None, entry: dict | None = None,
                       options: ReadOptions | None = None) -> list[tuple[np.ndarray, dict]]:  # fmt: skip
    """All samples of one shard (a path, ``pipe:`` command or http url), in tar order, checked
    against its manifest ``entry`` (None: only that it parses and holds samples)."""
    out = []
    for key, members in _read_checked(url, entry, options or ReadOptions()):
        if "ids.npy" not in members or "meta.json" not in members:
            raise CorruptShardError(f"shard {url}: sample {key} lacks ids.npy or meta.json; {REBUILD}")
        try:
            meta, ids = json.loads(members["meta.json"]), decode_ids(members["ids.npy"])
            meta = meta_from_disk(meta, f"shard {url}: sample {key}")
        except ValueError as e:
            raise CorruptShardError(f"shard {url}: sample {key} does not decode ({e}); {REBUILD}") from e
        if expect_hash is not None and meta.get("layout_hash") != expect_hash:
            check_layout_hash(expect_hash, meta.get("layout_hash", "?"), f"shard {url}")
        out.append((ids, meta))
    return out


def _split(unit: str) -> tuple[str, int, int]:
    """A part's name -> (shard url, part, parts)."""
    m = _PART.match(unit)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else (unit, 0, 1)


def _file_name(url: str) -> str:
    """A shard's file name wherever it lives (a path, a url, or the .tar argument of a pipe: command)."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return next((part for part in url.split() if part.endswith(".tar")), name).rsplit("/", 1)[-1]


class SourceStream:
    """One source as seen by one reader: its parts of shards for each epoch, in a seeded order."""

    def __init__(self, name: str, urls: list[str], stream: int, n_streams: int, seed: int, expect_hash: str | None,
                 entries: list[dict] | None = None, options: ReadOptions | None = None):  # fmt: skip
        if not urls:
            raise ValueError(f"source '{name}' lists no shards in its manifest; {REBUILD}")
        self.name, self.urls, self.stream, self.n_streams, self.seed, self.hash = name, urls, stream, n_streams, seed, expect_hash
        self.entries = dict(zip(urls, entries, strict=True)) if entries is not None else {}
        self.options = options or ReadOptions()
        self.parts = -(-n_streams // len(urls))  # readers sharing each shard: 1 unless fewer shards than readers
        self.epoch, self.shard, self.sample = 0, 0, 0  # position: next sample to read (shard: index in my_shards)
        self.last = (0, 0, 0)  # the position of the sample read last
        self.skipped = [0, 0]  # corrupt parts skipped (on_corrupt=skip) and the samples they held
        self.exclude: dict[int, list[str]] = {}  # epoch -> parts read (or begun) before a change of readers
        self._corrupt: set[str] = set()
        self._cache: tuple[tuple[int, int], list] | None = None
        self._mine: tuple[int, list[str]] | None = None

    def my_shards(self, epoch: int) -> list[str]:
        """This reader's parts of ``epoch``: shard urls, or ``url#p/P`` when P readers share a shard."""
        if self._mine is None or self._mine[0] != epoch:  # computed once per epoch, not per sample
            order = [self.urls[i] for i in _rng(self.seed, self.name, epoch).permutation(len(self.urls))]
            skip = self.exclude.get(epoch, [])
            parts = _split(skip[0])[2] if skip else self.parts  # an epoch begun by other readers keeps their parts
            units = order if parts == 1 else [f"{u}#{p}/{parts}" for u in order for p in range(parts)]
            done = set(skip)
            self._mine = (epoch, [u for u in units if u not in done][self.stream :: self.n_streams])
        return self._mine[1]

    def _samples(self) -> list:
        key = (self.epoch, self.shard)
        if self._cache is None or self._cache[0] != key:
            url, part, parts = _split(self.my_shards(self.epoch)[self.shard])
            try:
                samples = read_shard_samples(url, self.hash, self.entries.get(url), self.options)
            except CorruptShardError as e:
                if self.options.on_corrupt != "skip":
                    raise
                self._corrupt.add(url)
                if len(self._corrupt) == len(self.urls):
                    raise ValueError(f"every shard of source '{self.name}' is corrupt (e.g. {e}); {REBUILD}") from e
                n = self.entries[url]["samples"] if url in self.entries else 0
                self.skipped[0] += 1
                self.skipped[1] += len(range(part, n, parts))
                warnings.warn(f"{e}: skipped (data.on_corrupt=skip)", stacklevel=3)
                samples = []
            else:
                order = _rng(self.seed, self.name, self.epoch, _file_name(url)).permutation(len(samples))
                samples = [samples[i] for i in order[part::parts]]
            self._cache = (key, samples)
        return self._cache[1]

    def _advance(self, n_mine: int) -> None:
        self.sample, self.shard = 0, self.shard + 1
        if self.shard >= n_mine:
            self.shard, self.epoch = 0, self.epoch + 1

    def next(self) -> tuple[np.ndarray, dict]:
        for _ in range(4 * len(self.urls) * self.parts + 4):  # (parts with nothing: bounded, see the error)
            mine = self.my_shards(self.epoch)  # none in an epoch that other readers finished before a change of readers
            samples = self._samples() if mine else []  # none in a skipped part, or a shard of fewer samples than parts
            if self.sample < len(samples):
                break
            self._advance(len(mine))
        else:
            raise ValueError(f"source '{self.name}': reader {self.stream} of {self.n_streams} found no sample in "
                             f"{4 * len(self.urls) * self.parts + 4} parts in a row ({len(self.urls)} shards); "
                             "use fewer readers (ranks x workers) or rebuild with more samples")  # fmt: skip
        item = samples[self.sample]
        self.last = (self.epoch, self.shard, self.sample)
        self.sample += 1
        if self.sample == len(samples):
            self._advance(len(mine))
        return item

    def state(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample, "skipped": list(self.skipped),
                "exclude": {str(e): u for e, u in self.exclude.items() if e >= self.epoch}}  # fmt: skip

    def load(self, s: dict) -> None:
        self.epoch, self.shard, self.sample = s["epoch"], s["shard"], s["sample"]
        self.skipped = list(s.get("skipped", (0, 0)))
        self.exclude = {int(e): list(u) for e, u in s.get("exclude", {}).items()}
        self._mine = self._cache = None

    def begun(self, epoch: int) -> list[str]:
        """The parts of ``epoch`` this reader has read or started."""
        if epoch > self.epoch:
            return []
        mine = self.my_shards(epoch)
        return mine if epoch < self.epoch else mine[: self.shard + (1 if self.sample else 0)]


def reshard_sources(old: list[dict], n_new: int, urls: dict[str, list[str]], seed: int) -> list[dict[str, dict]]:
    """Per-source positions of old readers (their states' ``sources``) -> those of ``n_new`` readers.

    Per source, every part that an old reader had read or begun in the current epoch (and later
    ones) is left out of that epoch for the new readers, which split the remaining parts. So no
    sample is read twice within an epoch; what is skipped is bounded by the unread rest of the
    parts that were in progress (at most one per old reader). The counts of skipped corrupt parts
    are summed into the first new reader."""
    new: list[dict[str, dict]] = [{} for _ in range(n_new)]
    for name, source_urls in urls.items():
        views = []
        for i, st in enumerate(old):
            view = SourceStream(name, source_urls, i, len(old), seed, None)
            view.load(st["sources"][name])
            views.append(view)
        e0, last = min(v.epoch for v in views), max(v.epoch for v in views)
        exclude = {}
        for e in range(e0, last + 1):
            done = set().union(*(v.begun(e) for v in views), *(v.exclude.get(e, []) for v in views))
            if done:
                exclude[str(e)] = sorted(done)
        skipped = [sum(v.skipped[k] for v in views) for k in range(2)]
        for i in range(n_new):
            new[i][name] = {"epoch": e0, "shard": 0, "sample": 0, "exclude": exclude, "skipped": skipped if i == 0 else [0, 0]}
    return new
