"""``omnitrain data build``: one source -> webdataset shards + manifest.json, restartable and parallel.

Order and determinism: records are numbered in the source's order (item i); partition p of N
takes the items with ``i % N == p``; workers encode chunks of items in parallel but results are
written strictly in item order, ``shard_samples`` per shard. So the same input and config always
give the same shards, byte for byte, whatever the number of workers.

Restart: a shard and its sidecar appear only when complete (written to .tmp, then renamed), and
the sidecar records the next item. A new run skips to the last complete shard's next item,
reloads its de-duplication hashes, cuts ``errors-pNNN.jsonl`` back to that point, and goes on: no
sample is lost or written twice.

Bad records (unreadable or truncated media, audio too short for its transcript, text that is not
UTF-8, empty or over-long samples, missing files, malformed rows) go to ``errors-pNNN.jsonl`` with
the reason, the file and the line (or row); once every partition is done they are gathered in
``errors.jsonl``. The build stops with a clear message only when the share of bad records passes
``max_error_rate`` (after ``min_items_for_error_rate`` items). Outputs that cannot be written are
one-line errors naming the path. A second build of an unchanged source into a finished folder
says so and does nothing.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from omnitrain.config import from_dict, to_dict
from omnitrain.data.pipeline.media import MediaConfig, MediaTokenizers
from omnitrain.data.pipeline.readers import SourceConfig, iter_records
from omnitrain.data.pipeline.templates import SampleEncoder, SkipSample, Template
from omnitrain.data.shards import (
    MANIFEST,
    SCHEMA_VERSION,
    Sample,
    ShardInfo,
    read_sidecars,
    shard_name,
    write_manifest,
    write_shard,
)
from omnitrain.sources.text import expand_paths
from omnitrain.tokenizer import bundle
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.layout import MODALITIES, LayoutMismatchError, TokenLayout

ERRORS = "errors.jsonl"  # every bad record of a finished build, with its file and line (or row)


@dataclass
class FilterConfig:
    dedup: bool = True  # drop exact duplicates (same template fields) within a partition
    min_tokens: int = 2
    max_tokens: int = 65536  # longer samples are logged and skipped, never truncated
    hook: str | None = None  # "module:function"; called with the record, returns None (keep) or a reason


@dataclass
class PipelineConfig:
    """One source and how its records become sequences (a file of ``data_pipelines/pipeline/``)."""

    name: str
    source: SourceConfig = field(default_factory=SourceConfig)
    template: str = "text_lm"  # a file of data_pipelines/template/
    filters: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class BuildConfig:
    pipeline: PipelineConfig
    tokenizers: TokenizerPaths = field(default_factory=lambda: TokenizerPaths(text="runs/tokenizer/text"))
    media: MediaConfig = field(default_factory=MediaConfig)
    out_dir: Path = Path("runs/shards/default")
    templates_dir: Path = Path("data_pipelines/template")
    shard_samples: int = 256
    workers: int = 1
    chunk_items: int = 16  # items per task handed to a worker
    partition: str = "0/1"  # "i/N": build the i-th of N disjoint parts (Slurm array tasks)
    max_error_rate: float = 0.05
    min_items_for_error_rate: int = 100
    # speech: a clip whose text runs faster than this (characters per second of audio) is cut short or
    # paired with the wrong text, and is logged, not built; read speech is ~15/s (LibriVox ~14). 0: off
    max_chars_per_second: float = 35.0

    def __post_init__(self) -> None:
        try:
            i, n = (int(x) for x in self.partition.split("/"))
        except ValueError:
            raise ValueError(f"partition={self.partition!r} must look like i/N, e.g. 0/4") from None
        if not 0 <= i < n:
            raise ValueError(f"partition={self.partition!r}: i must be in [0, N)")
        if self.shard_samples < 1 or self.workers < 1:
            raise ValueError("shard_samples and workers must be >= 1")


def load_template(templates_dir: Path, name: str) -> Template:
    """A template by name from ``templates_dir`` (relative: from the cwd, else from the checkout)."""
    templates_dir = Path(templates_dir)
    if not templates_dir.is_absolute() and not templates_dir.is_dir():
        templates_dir = Path(__file__).resolve().parents[4] / templates_dir
    path = templates_dir / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in Path(templates_dir).glob("*.yaml"))
        raise ValueError(f"unknown template '{name}'; templates in {templates_dir}: {', '.join(names) or 'none'}")
    return from_dict(Template, {"name": name, **(yaml.safe_load(path.read_text()) or {})})


# ----------------------------------------------------------------------------- worker side
_STATE: dict[str, Any] = {}


def _init_worker(cfg: BuildConfig, template: Template) -> None:
    torch.set_num_threads(1)  # one core per worker: parallelism comes from the workers
    tok = bundle.load(cfg.tokenizers, device=cfg.media.device)
    text, image, audio, layout = tok.text, tok.image, tok.audio, tok.layout
    media = MediaTokenizers(image, audio, cfg.media, layout.max_grid) if (image or audio) else None
    hook = None
    if cfg.pipeline.filters.hook:
        module, _, fn = cfg.pipeline.filters.hook.partition(":")
        hook = getattr(importlib.import_module(module), fn)
    _STATE.update(cfg=cfg, template=template, layout=layout, encoder=SampleEncoder(layout, text, media), media=media, hook=hook)


def _init_forked() -> None:
    torch.set_num_threads(1)


def _content_hash(record: dict[str, Any], template: Template) -> str:
    """Hash of what the template reads from a record; media given as paths are hashed by content."""
    media = {getattr(p, p.kind) for p in template.parts if p.kind in ("image", "audio", "video")}
    h = hashlib.sha256()
    for name in sorted(template.fields()):
        value = record.get(name)
        if name in media and isinstance(value, str):
            path = Path(value) if Path(value).is_absolute() else Path(record.get("__dir__", "."), value)
            value = path.read_bytes() if path.is_file() else value  # same bytes, other name: a duplicate
        data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True, default=str).encode()
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:24]


def _encode_item(item: int, record: dict[str, Any]) -> dict[str, Any]:
    cfg, template, enc = _STATE["cfg"], _STATE["template"], _STATE["encoder"]
    origin = record.get("__origin__", f"item {item}")
    try:
        if "__error__" in record:
            raise SkipSample(record["__error__"])
        if _STATE["hook"] is not None and (reason := _STATE["hook"](record)):
            raise SkipSample(f"filtered by {cfg.pipeline.filters.hook}: {reason}")
        if _STATE["media"] is not None:
            _STATE["media"].base_dir = Path(record.get("__dir__", "."))
            _STATE["media"].audio_seconds = []
        e = enc.encode(template, record)
        if _STATE["media"] is not None and (problem := _speech_rate_problem(template, record, _STATE["media"], cfg.max_chars_per_second)):
            raise SkipSample(problem)
        n = len(e.ids)
        if not cfg.pipeline.filters.min_tokens <= n <= cfg.pipeline.filters.max_tokens:
            raise SkipSample(f"{n} tokens, outside [{cfg.pipeline.filters.min_tokens}, {cfg.pipeline.filters.max_tokens}]")
    except SkipSample as err:
        return {"item": item, **_where(origin), "error": str(err), "origin": origin}
    meta = {
        "schema_version": SCHEMA_VERSION, "layout_hash": _STATE["layout"].hash, "source": cfg.pipeline.name,
        "template": template.name, "segments": e.segments, "learn": e.learn, "origin": origin,
    }  # fmt: skip
    if e.branches:
        meta["branches"] = e.branches
    tokens = dict.fromkeys(MODALITIES, 0)
    for start, end, mod in e.segments:
        tokens[mod] += end - start
    return {"item": item, "ids": e.ids, "meta": meta, "tokens": tokens, "hash": _content_hash(record, template)}


def _speech_rate_problem(template: Template, record: dict[str, Any], media: MediaTokenizers, limit: float) -> str | None:
    """Why a clip is too short for its text, or None: for templates with one audio part and text
    parts (asr, tts), more than ``limit`` characters per second of audio means the audio was cut
    short, or the text belongs to another clip (issue 22)."""
    audio = [p.audio for p in template.parts if p.kind == "audio"]
    texts = [record.get(p.text) for p in template.parts if p.kind == "text"]
    seconds = sum(media.audio_seconds)
    chars = sum(len(t.strip()) for t in texts if isinstance(t, str))
    if limit <= 0 or len(audio) != 1 or len(media.audio_seconds) != 1 or chars < 16 or chars <= limit * seconds:
        return None  # 16: a word or two in a short clip says little about its length
    return (f"audio {str(record.get(audio[0]))[:200]} lasts {seconds:.2f}s for {chars} characters of text "
            f"({chars / seconds:.0f}/s > max_chars_per_second={limit:g}): the audio is cut short or the text "
            "belongs to another clip")  # fmt: skip


def _where(origin: str) -> dict[str, Any]:
    """``{"file", "line"}`` (or ``"row"``) of a record's origin, as the readers write it."""
    if m := re.fullmatch(r"(.+):(\d+)", origin):
        return {"file": m.group(1), "line": int(m.group(2))}
    if m := re.fullmatch(r"(.+)#row(\d+)", origin) or re.fullmatch(r"(.+\])\[(\d+)\]", origin):  # parquet, hf
        return {"file": m.group(1), "row": int(m.group(2))}
    return {"file": origin}


def _encode_chunk(chunk: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [_encode_item(i, r) for i, r in chunk]


# ----------------------------------------------------------------------------- driver
def _chunks(records: Iterator[tuple[int, dict]], size: int) -> Iterator[list[tuple[int, dict]]]:
    buf: list[tuple[int, dict]] = []
    for pair in records:
        buf.append(pair)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def build_shards(cfg: BuildConfig) -> dict[str, Any]:
    """Build (or resume) one partition of a source's shards; returns the build's statistics.

    The calling process encodes too (``_init_worker`` puts it on one torch thread, as the workers);
    its thread count is restored at the end, so that training in the same process after a build
    (the demo) keeps every core."""
    threads = torch.get_num_threads()
    try:
        return _build_shards(cfg)
    finally:
        torch.set_num_threads(threads)


def _build_shards(cfg: BuildConfig) -> dict[str, Any]:
    part, n_parts = (int(x) for x in cfg.partition.split("/"))
    out = Path(cfg.out_dir)
    _check_writable(out)
    template = load_template(cfg.templates_dir, cfg.pipeline.template)
    _init_worker(cfg, template)  # the parent encodes too when workers == 1, and owns the layout
    layout = _STATE["layout"]
    if (out / "layout.json").is_file():  # resuming (or extending) a build: it must be the same id space
        old = TokenLayout.load(out / "layout.json")
        if old.hash != layout.hash:
            raise LayoutMismatchError(
                f"{out} holds shards built with token layout {old.hash}, but the tokenizers configured now give "
                f"{layout.hash} (retrained or different tokenizers). Remove {out} to rebuild, or set out_dir elsewhere."
            )
    layout.save(out / "layout.json")

    if (out / MANIFEST).is_file() and (old_version := json.loads((out / MANIFEST).read_text()).get("schema_version")) != SCHEMA_VERSION:
        raise ValueError(f"{out} holds shards of format version {old_version}; this build writes version {SCHEMA_VERSION}, "
                         f"and one folder holds one version. Remove {out} to rebuild, or set out_dir elsewhere.")  # fmt: skip
    if (out / f"done-p{part:03d}.json").is_file() and (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("source_fingerprint") == _fingerprint(cfg):  # same source, same files: nothing to do
            print(f"{out} is already built (partition {cfg.partition}): {manifest['samples']:,} samples in "
                  f"{len(manifest['shards'])} shard(s), see {out / MANIFEST}. To rebuild, remove the folder or set out_dir elsewhere.")  # fmt: skip
            return {"samples": 0, "duplicates": 0, "tokens": dict.fromkeys(MODALITIES, 0), "errors": 0, "seconds": 0.0,
                    "manifest": manifest, "already_built": True}  # fmt: skip
    done = read_sidecars(out, part)
    start_item = done[-1].next_item if done else 0
    seen = {h for info in done for h in info.hashes}
    errors_path = out / f"errors-p{part:03d}.jsonl"
    old_errors = [json.loads(x) for x in errors_path.read_text().splitlines()] if errors_path.exists() else []
    kept_errors = [e for e in old_errors if e["item"] < start_item]  # later ones are redone
    errors_path.write_text("".join(json.dumps(e) + "\n" for e in kept_errors))
    n_errors, n_seen_items = len(kept_errors), start_item // n_parts
    if done:
        print(f"resuming partition {cfg.partition} at item {start_item} after {len(done)} complete shard(s)")

    def mine() -> Iterator[tuple[int, dict]]:
        for i, rec in enumerate(iter_records(cfg.pipeline.source)):
            if i % n_parts == part and i >= start_item:
                yield i, rec

    t0 = time.perf_counter()
    pool = None
    if cfg.workers > 1:
        # fork (Linux): workers inherit the loaded tokenizers at no cost, as DataLoader workers do;
        # elsewhere spawn, and each worker loads them again.
        if sys.platform == "linux":
            pool = mp.get_context("fork").Pool(cfg.workers, _init_forked)
        else:
            pool = mp.get_context("spawn").Pool(cfg.workers, _init_worker, (cfg, template))
    results = pool.imap(_encode_chunk, _chunks(mine(), cfg.chunk_items)) if pool else map(_encode_chunk, _chunks(mine(), cfg.chunk_items))
    buffer: list[dict] = []
    shard_index, first_item = len(done), start_item
    stats = {"samples": 0, "duplicates": 0, "tokens": dict.fromkeys(MODALITIES, 0)}
    bar = tqdm(desc=f"building {cfg.pipeline.name} [{cfg.partition}]", unit=" samples")

    def flush(next_item: int) -> None:
        nonlocal shard_index, buffer, first_item
        name = shard_name(part, shard_index)
        tokens = dict.fromkeys(MODALITIES, 0)
        for r in buffer:
            for m, k in r["tokens"].items():
                tokens[m] += k
        samples = [Sample(f"p{part:03d}-{r['item']:09d}", r["ids"], r["meta"]) for r in buffer]
        info = ShardInfo(name, len(samples), tokens, first_item, next_item, [r["hash"] for r in buffer])
        try:
            write_shard(out / name, samples, info)
        except OSError as e:  # disk full, read-only, folder removed: one line; finished shards stay, a rerun resumes
            for tmp in out.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            raise ValueError(f"cannot write shard {out / name}: {e.strerror or e}; free space or fix the permissions, "
                             "then rerun the same command: it resumes after the last finished shard") from None  # fmt: skip
        shard_index, buffer, first_item = shard_index + 1, [], next_item

    try:
        with errors_path.open("a") as errf:
            last_item = start_item - 1
            for chunk in results:
                for r in chunk:
                    last_item = r["item"]
                    n_seen_items += 1
                    if "error" in r:
                        n_errors += 1
                        errf.write(json.dumps(r) + "\n")
                        errf.flush()
                        if n_seen_items >= cfg.min_items_for_error_rate and n_errors / n_seen_items > cfg.max_error_rate:
                            raise RuntimeError(
                                f"{n_errors} of {n_seen_items} records failed ({n_errors / n_seen_items:.1%} > "
                                f"max_error_rate={cfg.max_error_rate}); see {errors_path} (last: {r['error']} at "
                                f"{r['origin']}). Fix the source or raise max_error_rate; rerunning resumes."
                            )  # fmt: skip
                        continue
                    if cfg.pipeline.filters.dedup and r["hash"] in seen:
                        stats["duplicates"] += 1
                        continue
                    seen.add(r["hash"])
                    buffer.append(r)
                    stats["samples"] += 1
                    for m, k in r["tokens"].items():
                        stats["tokens"][m] += k
                    bar.update(1)
                    if len(buffer) == cfg.shard_samples:
                        flush(r["item"] + 1)
            if buffer:
                flush(last_item + 1)
    finally:
        bar.close()
        if pool:
            pool.terminate()
    (out / f"done-p{part:03d}.json").write_text(json.dumps({"partition": cfg.partition, "errors": n_errors}) + "\n")
    complete = all((out / f"done-p{p:03d}.json").exists() for p in range(n_parts))
    if complete:  # one errors.jsonl for the whole source, in partition order
        merged = "".join((out / f"errors-p{p:03d}.jsonl").read_text() for p in range(n_parts) if (out / f"errors-p{p:03d}.jsonl").exists())
        (out / "errors.jsonl.tmp").write_text(merged)
        (out / "errors.jsonl.tmp").replace(out / ERRORS)
    manifest = write_manifest(out, {
        "layout_hash": layout.hash, "source": cfg.pipeline.name, "template": template.name,
        "source_fingerprint": _fingerprint(cfg), "partitions": n_parts, "complete": complete,
        "config": to_dict(cfg),
    }, n_parts)  # fmt: skip
    secs = time.perf_counter() - t0
    tok = ", ".join(f"{m} {n:,}" for m, n in stats["tokens"].items() if n) or "no"
    log = out / (ERRORS if complete else errors_path.name)
    print(f"built {stats['samples']:,} samples ({tok} tokens) into {shard_index} shard(s) in {secs:.1f}s; "
          f"{n_errors} bad record(s) went to {log}, {stats['duplicates']} duplicate(s) dropped; {out}")  # fmt: skip
    return {**stats, "errors": n_errors, "seconds": secs, "manifest": manifest}


def _check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file in it; any OS error is one line naming the path."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        where = e.filename or out
        raise ValueError(f"cannot write the shards to out_dir={out}: {e.strerror or e} ({where}); "
                         "choose a writable folder (out_dir=...)") from None  # fmt: skip


def _fingerprint(cfg: BuildConfig) -> str:
    """Hash of the source definition plus the names, sizes and mtimes of its files."""
    h = hashlib.sha256(json.dumps(to_dict(cfg.pipeline), sort_keys=True).encode())
    try:
        files = expand_paths(cfg.pipeline.source.paths) if cfg.pipeline.source.paths else []
    except FileNotFoundError:
        files = []
    for f in files:
        for sub in sorted(f.rglob("*")) if f.is_dir() else [f]:
            if sub.is_file():
                st = sub.stat()
                h.update(f"{sub}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
