"""The shard format (its one owner): webdataset ``.tar`` files of token-id samples + ``manifest.json``.

A shard ``shard-p000-000042.tar`` holds samples, each two members, every field with one type
(:data:`SAMPLE_FIELDS`), so that any tool reads them (issue 21):

* ``<key>.ids.npy``: the token ids, ``int32`` [n] (``torch.nn.Embedding`` takes int32 and int64
  indices, not uint32; the vocabulary stays far below 2**31);
* ``<key>.meta.json``: ``{"schema_version": 2, "layout_hash", "source", "template", "origin":
  "<file or row>", "segments": [[start, end], ...], "modalities": ["text" | "image" | "audio", ...],
  "learn": [[start, end], ...]}`` (+ ``"branches": {"chosen": [[start, end], ...], "rejected": ...}``
  in preference sources), where ``segments[i]`` holds tokens of ``modalities[i]`` and ``learn``
  lists the spans whose tokens are trained on (SFT prompts are left out).

So ``datasets.load_dataset("webdataset", data_files=...)`` types a shard as ``ids.npy:
list<int32>`` and ``meta.json: struct<...>``, plain ``webdataset`` decodes the ids to an int32 array.
In memory (:func:`meta_from_disk`, what readers hand on) ``meta["segments"]`` is the list of
``[start, end, modality]`` triples the loader and the templates use.

Version 1 (until issue 21) stored ``uint32`` ids and ``segments`` as ``[start, end, modality]``
triples, which mixes ints and strings in one list (``ArrowInvalid`` in ``datasets``). Version-1
shards still load here; rebuild them with ``omnitrain data build`` for other tools.

Beside each finished shard a sidecar ``shard-000042.json`` records what it holds (samples, tokens
per modality, the next input position, the content hashes used for de-duplication, the tar's size
in bytes and CRC-32); builds resume from the sidecars, so a shard only exists once complete
(written to ``.tmp``, then renamed). ``manifest.json`` sums the sidecars once a build (or a
partition of it) is done, and lists per shard ``name``, ``samples``, ``tokens``, ``bytes``, ``crc32``.

Integrity (issue 22). Readers check a shard against its manifest entry when they open it
(:func:`check_shard`): it parses, holds samples, as many as listed, and has the listed size and
CRC-32 (zlib's, several GB/s: cheap beside the reading itself). A tar cut at a member boundary
parses cleanly, so only the count or the size catches it. Manifests written before sizes and
checksums were recorded still load; their shards are checked by sample count only.

Tar members carry a fixed mtime so that the same input gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from omnitrain.tokenizer.layout import MODALITIES, check_layout_hash

SCHEMA_VERSION = 2  # 2: int32 ids, segments and modalities as parallel typed lists (issue 21)
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
REBUILD = "rebuild it with `omnitrain data build`"
IDS_DTYPE = np.dtype("<i4")
# meta.json of a version-2 sample: one type per field (written into every manifest as "sample_fields")
SAMPLE_FIELDS = {
    "schema_version": "int", "layout_hash": "str", "source": "str", "template": "str", "origin": "str",
    "segments": "list[list[int]]", "modalities": "list[str]", "learn": "list[list[int]]",
    "branches": "dict[str, list[list[int]]] (preference sources only)",
}  # fmt: skip


class CorruptShardError(ValueError):
    """A shard that does not match its manifest entry (or does not parse): one line naming it."""


@dataclass
class Sample:
    key: str  # unique within the source, e.g. "p000-000000123"
    ids: np.ndarray  # [n] token ids
    meta: dict[str, Any]  # see the module docstring

    @property
    def segments(self) -> list[tuple[int, int, str]]:
        return [tuple(s) for s in self.meta["segments"]]


@dataclass
class ShardInfo:
    """The sidecar of one finished shard."""

    name: str
    samples: int
    tokens: dict[str, int]  # per modality
    first_item: int  # input positions covered: [first_item, next_item)
    next_item: int
    hashes: list[str] = field(default_factory=list)  # content hashes of its samples (de-duplication)
    bytes: int | None = None  # the tar's size and CRC-32 (None: a sidecar written before they were recorded)
    crc32: str | None = None


def meta_to_disk(meta: dict[str, Any]) -> dict[str, Any]:
    """In-memory meta (``segments`` as ``[start, end, modality]``) -> the version-2 meta.json."""
    out = {**meta, "schema_version": SCHEMA_VERSION}
    out["segments"] = [[int(a), int(b)] for a, b, _ in meta["segments"]]
    out["modalities"] = [str(m) for _, _, m in meta["segments"]]
    return out


def meta_from_disk(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """A sample's meta.json, any readable version -> the in-memory form (``segments`` as triples).

    Raises ValueError naming ``where`` for a version this omnitrain does not read."""
    version = meta.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{where}: shard schema_version {version}, this omnitrain reads {READABLE_VERSIONS}; "
                         f"{REBUILD} (or update omnitrain)")  # fmt: skip
    if version == 1:  # segments are [start, end, modality] already
        return meta
    out = dict(meta)
    out["segments"] = [[a, b, m] for (a, b), m in zip(meta["segments"], out.pop("modalities"), strict=True)]
    return out


def shard_name(partition: int, index: int) -> str:
    return f"shard-p{partition:03d}-{index:06d}.tar"


def write_shard(path: Path, samples: list[Sample], info: ShardInfo) -> None:
    """Write one shard and its sidecar atomically (a crash leaves no partial shard behind)."""
    tmp = path.with_suffix(".tar.tmp")
    # mtime fixed: the same samples give a byte-identical tar (deterministic, restartable builds)
    with wds.TarWriter(str(tmp), encoder=False, mtime=0.0) as sink:
        for s in samples:
            buf = io.BytesIO()
            np.save(buf, np.asarray(s.ids, dtype=IDS_DTYPE), allow_pickle=False)
            meta = json.dumps(meta_to_disk(s.meta), sort_keys=True).encode()
            sink.write({"__key__": s.key, "ids.npy": buf.getvalue(), "meta.json": meta})
    data = tmp.read_bytes()
    info.bytes, info.crc32 = len(data), shard_checksum(data)
    sidecar = path.with_suffix(".json")
    sidecar_tmp = sidecar.with_suffix(".json.tmp")
    sidecar_tmp.write_text(json.dumps(info.__dict__, sort_keys=True) + "\n")
    tmp.replace(path)  # the shard first: a sidecar never describes a missing shard
    sidecar_tmp.replace(sidecar)


def read_sidecars(out_dir: Path, partition: int) -> list[ShardInfo]:
    """Finished shards of one partition, in order; a shard without its sidecar is unfinished."""
    infos = []
    for side in sorted(out_dir.glob(f"shard-p{partition:03d}-*.json")):
        if (out_dir / side.with_suffix(".tar").name).is_file():
            infos.append(ShardInfo(**json.loads(side.read_text())))
    return infos


def decode_sample(name: str, members: dict[str, bytes], expect_hash: str | None, where: str) -> Sample:
    if "ids.npy" not in members or "meta.json" not in members:
        raise ValueError(f"{where}: sample {name} lacks ids.npy or meta.json; the shard is not an omnitrain shard")
    meta = meta_from_disk(json.loads(members["meta.json"]), f"{where}: sample {name}")
    if expect_hash is not None:
        check_layout_hash(expect_hash, meta.get("layout_hash", "?"), where)
    ids = np.load(io.BytesIO(members["ids.npy"]), allow_pickle=False)
    return Sample(name, ids, meta)


def iter_shard(path: Path, expect_hash: str | None = None) -> Iterator[Sample]:
    """Samples of one shard, validated. A truncated or corrupt tar is a clear error naming it."""
    try:
        with tarfile.open(path, "r") as tar:
            current, members = None, {}
            for m in tar:
                key, _, ext = m.name.partition(".")
                if current is not None and key != current:
                    yield decode_sample(current, members, expect_hash, str(path))
                    members = {}
                current = key
                members[ext] = tar.extractfile(m).read()
            if current is not None:
                yield decode_sample(current, members, expect_hash, str(path))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{path} is corrupt or truncated ({e}); rebuild it with `omnitrain data build`") from e


def write_manifest(out_dir: Path, extra: dict[str, Any], partitions: int) -> dict[str, Any]:
    """Sum the sidecars of every partition into ``manifest.json``."""
    shards, tokens, samples = [], dict.fromkeys(MODALITIES, 0), 0
    for p in range(partitions):
        for info in read_sidecars(out_dir, p):
            entry = {"name": info.name, "samples": info.samples, "tokens": info.tokens}
            if info.bytes is not None:
                entry.update(bytes=info.bytes, crc32=info.crc32)
            shards.append(entry)
            samples += info.samples
            for m, n in info.tokens.items():
                tokens[m] += n
    manifest = {"schema_version": SCHEMA_VERSION, "sample_fields": SAMPLE_FIELDS, **extra, "shards": shards,
                "samples": samples, "tokens": tokens}  # fmt: skip
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(out_dir / MANIFEST)
    return manifest


def read_manifest(out_dir: Path, expect_hash: str | None = None, check_files: bool = True) -> dict[str, Any]:
    """Load and check a shard folder's manifest: schema, layout hash, per-shard sample counts, and
    (``check_files``) every listed shard present. The loader passes ``check_files=False``: each of
    its ranks would otherwise stat every shard at start-up; a missing shard is named when opened."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {out_dir}: build the shards with `omnitrain data build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild the shard set with `omnitrain data build`") from e
    if manifest.get("schema_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: shard schema_version {manifest.get('schema_version')}, this omnitrain reads "
                         f"{READABLE_VERSIONS}; {REBUILD} (or update omnitrain)")  # fmt: skip
    if expect_hash is not None:
        check_layout_hash(expect_hash, manifest.get("layout_hash", "?"), f"shard set {out_dir}")
    if not all(isinstance(s, dict) and "name" in s and "samples" in s for s in manifest.get("shards", [None])):
        raise ValueError(f"{path} lists no shards, or shards without a name and sample count; "
                         "rebuild the shard set with `omnitrain data build`")  # fmt: skip
    if not check_files:
        return manifest
    missing = [s["name"] for s in manifest["shards"] if not (Path(out_dir) / s["name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: {len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
    return manifest


def shard_checksum(data: bytes) -> str:
    """CRC-32 of a shard's bytes, as 8 hex digits."""
    return f"{zlib.crc32(data):08x}"


def tar_samples(data: bytes, where: str) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's bytes -> its samples as (key, {extension: member bytes}), in tar order."""
    out: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")  # as iter_shard and webdataset group members
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                if m.offset_data + m.size > len(data):
                    raise tarfile.ReadError(f"member {m.name} runs past the end of the file")
                out[-1][1][ext] = data[m.offset_data : m.offset_data + m.size]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptShardError(f"shard {where} is corrupt or truncated ({e}); {REBUILD}") from e
    return out


def check_shard(data: bytes, entry: dict[str, Any] | None, where: str) -> list[tuple[str, dict[str, bytes]]]:
    """Parse a shard's bytes and check them against its manifest ``entry`` (None: parse only).

    Raises :class:`CorruptShardError` naming the shard and what differs."""
    samples = tar_samples(data, where)
    if not samples:
        raise CorruptShardError(f"shard {where} holds no samples; {REBUILD}")
    if entry is None:
        return samples
    problem = None
    if len(samples) != entry["samples"]:
        problem = f"{len(samples)} samples, the manifest lists {entry['samples']}"
    elif entry.get("bytes") is not None and len(data) != entry["bytes"]:
        problem = f"{len(data):,} bytes, the manifest lists {entry['bytes']:,}"
    elif entry.get("crc32") is not None and shard_checksum(data) != entry["crc32"]:
        problem = f"CRC-32 {shard_checksum(data)}, the manifest lists {entry['crc32']}"
    if problem:
        raise CorruptShardError(f"shard {where} is corrupt or truncated ({problem}); {REBUILD}")
    return samples


def verify_shard_file(path: Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with one local shard file against its manifest entry, or None."""
    try:
        check_shard(Path(path).read_bytes(), entry, str(path))
    except FileNotFoundError:
        return f"shard {path} is listed in the manifest but missing; {REBUILD}"
    except CorruptShardError as e:
        return str(e)
    return None
