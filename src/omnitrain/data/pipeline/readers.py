"""Source readers: raw data -> records (plain dicts) in a deterministic order.

Every record carries ``__origin__`` (file, line or row: where to look when it fails) and
``__dir__`` (the folder relative media paths are resolved against). Field names are mapped to
what the template reads with ``columns: {template_field: source_column}``.

Kinds:

* ``text``: .txt (one document per file) / .jsonl / .parquet (+ .gz) -> ``{"text": ...}`` (jsonl
  and parquet keep all their columns);
* ``records``: .jsonl / .csv / .parquet rows as they are (image-caption pairs, audio-transcript
  pairs, interleaved documents, chat ``messages``), paths relative to the file;
* ``image_folder``: images, each with an optional same-name ``.txt`` caption -> ``{"image", "caption"}``;
* ``audio_folder``: audio files with a same-name ``.txt`` transcript, or a ``transcripts`` file
  (``id<TAB>text``, or Sphinx's ``<s> text </s> (id)``) -> ``{"audio", "text"}``;
* ``video_folder``: clips (.mp4 .mkv .webm .mov .avi) with optional same-name ``.txt`` captions
  -> ``{"video", "caption"}``;
* ``hf``: any Hugging Face dataset (hub name online; local folder or ``save_to_disk`` offline),
  streamed through a seeded shuffle buffer (``omnitrain.sources.text.iter_hf_rows``).
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import pyarrow.parquet as pq

from omnitrain.sources import text as sources

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
_SURROGATE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a non-UTF-8 byte


@dataclass
class SourceConfig:
    kind: Literal["text", "records", "image_folder", "audio_folder", "video_folder", "hf"] = "text"
    paths: list[str] = field(default_factory=list)  # files, globs or folders
    text_field: str = "text"  # kind=text: where the text is in jsonl/parquet
    columns: dict[str, str] = field(default_factory=dict)  # template field -> source column
    transcripts: str | None = None  # kind=audio_folder: one file with all transcripts
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_config: str | None = None
    limit: int = 0  # read at most this many records (0: all)


def _files(patterns: list[str], suffixes: tuple[str, ...]) -> list[Path]:
    out = []
    for p in sources.expand_paths(patterns) if patterns else []:
        out += sorted(f for f in p.rglob("*") if f.suffix.lower() in suffixes) if p.is_dir() else [p]
    return [p for p in out if p.suffix.lower() in suffixes]


def _folders(patterns: list[str]) -> list[Path]:
    if not patterns:
        raise ValueError("source.paths is empty: name the folder(s) to read")
    out = []
    for pat in patterns:
        p = Path(pat)
        if not p.is_dir():
            raise FileNotFoundError(f"source folder {p} does not exist (relative paths start at {Path.cwd()})")
        out.append(p)
    return out


def _not_utf8(where: str, e: UnicodeDecodeError) -> str:
    bad = e.object[e.start : e.start + 1].hex()
    return f"{where}: not UTF-8 (byte 0x{bad} at column {e.start + 1}); re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(origin, row) of a record file; a row that cannot be read is ``{"__error__": why}``, and the
    rows after it are still read (issue 22: one bad line never stops a build)."""
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if suffix == ".jsonl":
        with _open_binary(path) as f:  # bytes, decoded line by line: a non-UTF-8 line is that line's error
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, {"__error__": _not_utf8(where, e)}
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, {"__error__": f"not valid JSON ({e.msg})"}
                    continue
                yield where, row if isinstance(row, dict) else {"__error__": f"a JSON {type(row).__name__}, not an object"}
    elif suffix == ".csv":
        # surrogateescape keeps undecodable bytes as lone surrogates, so a bad row is found and named, not fatal
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            for rowno, row in enumerate(csv.DictReader(f), 2):
                where = f"{path}:{rowno}"
                bad = next((v for v in row.values() if isinstance(v, str) and _SURROGATE.search(v)), None)
                if bad is not None:
                    col = _SURROGATE.search(bad).start() + 1
                    yield where, {"__error__": f"{where}: not UTF-8 (a field holds an undecodable byte at character {col}); re-encode the file as UTF-8"}
                else:
                    yield where, dict(row)
    elif suffix == ".parquet":
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}#row{i}", row
    else:
        raise ValueError(f"{path}: records are read from .jsonl, .csv or .parquet, not {path.suffix!r}")


def _read_text_file(path: Path) -> str:
    """A caption or transcript file, stripped. Raises ValueError naming the file when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(_not_utf8(f"{path}:{line}", e)) from None


def _sphinx_or_tab(path: Path) -> tuple[dict[str, str | ValueError], list[tuple[str, str]]]:
    """Transcripts file: ``id<TAB>text`` lines, or Sphinx's ``<s> text </s> (id)``.

    Returns (id -> text, [(file:line, error)]). A line that is not UTF-8 maps its id to the error,
    so that only its clip fails; a line with no id is an error of its own (no clip to charge it to)."""
    out: dict[str, str | ValueError] = {}
    orphans: list[tuple[str, str]] = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line, problem = raw.decode("utf-8", "replace"), ValueError(_not_utf8(f"{path}:{lineno}", e))
        else:
            problem = None
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()]+)\)\s*", line)
        if m:
            out[m.group(2)] = problem or m.group(1)
        elif "\t" in line:
            key, text = line.split("\t", 1)
            out[key.strip()] = problem or text.strip()
        else:
            orphans.append((f"{path}:{lineno}", f"{path}:{lineno}: cannot read transcript line {line!r:.80}; use 'id<TAB>text'"))
    return out, orphans


def _side_text(media: Path, name: str) -> dict[str, Any]:
    """``{name: text}`` from the media file's same-name ``.txt`` (None if absent); an unreadable
    one makes the record an error that names the text file and line."""
    txt = media.with_suffix(".txt")
    if not txt.is_file():
        return {name: None}
    try:
        return {name: _read_text_file(txt)}
    except ValueError as e:
        return {name: None, "__error__": str(e)}


def _raw_records(cfg: SourceConfig) -> Iterator[dict[str, Any]]:
    if cfg.kind == "text":
        for path in _files(cfg.paths, sources.TEXT_SUFFIXES + (".gz",)):
            if path.suffix in (".jsonl", ".parquet") or path.name.endswith(".jsonl.gz"):
                for origin, row in _rows(path):
                    yield {"__origin__": origin, "__dir__": str(path.parent), **row}
            else:  # one document per file: a file that cannot be read is one bad record
                try:
                    docs = list(sources.iter_file_documents(path, cfg.text_field))
                except ValueError as e:
                    docs = [e]
                for doc in docs:
                    rec = {"__error__": str(doc)} if isinstance(doc, ValueError) else {"text": doc}
                    yield {"__origin__": str(path), "__dir__": str(path.parent), **rec}
    elif cfg.kind == "records":
        for path in _files(cfg.paths, (".jsonl", ".csv", ".parquet", ".gz")):
            for origin, row in _rows(path):
                yield {"__origin__": origin, "__dir__": str(path.parent), **row}
    elif cfg.kind == "image_folder":
        for folder in _folders(cfg.paths):
            for img in sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES):
                yield {"__origin__": str(img), "__dir__": str(folder), "image": str(img.resolve()), **_side_text(img, "caption")}
    elif cfg.kind == "audio_folder":
        folders = _folders(cfg.paths)
        table, orphans = _sphinx_or_tab(Path(cfg.transcripts)) if cfg.transcripts else ({}, [])
        for where, problem in orphans:
            yield {"__origin__": where, "__dir__": str(folders[0]), "__error__": problem}
        for folder in folders:
            for wav in sorted(f for f in folder.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES):
                rec = _side_text(wav, "text") if wav.with_suffix(".txt").is_file() else {"text": table.get(wav.stem)}
                if isinstance(rec["text"], ValueError):
                    rec = {"text": None, "__error__": str(rec["text"])}
                yield {"__origin__": str(wav), "__dir__": str(folder), "audio": str(wav.resolve()), **rec}
    elif cfg.kind == "video_folder":
        for folder in _folders(cfg.paths):
            for clip in sorted(f for f in folder.rglob("*") if f.suffix.lower() in VIDEO_SUFFIXES):
                yield {"__origin__": str(clip), "__dir__": str(folder), "video": str(clip.resolve()), **_side_text(clip, "caption")}
    elif cfg.kind == "hf":
        if not cfg.hf_dataset:
            raise ValueError("source.kind=hf needs source.hf_dataset (a hub name, a local folder or a save_to_disk folder)")
        # streamed: iter_records stops at `limit` and nothing after it is downloaded (issue 21)
        for i, row in enumerate(sources.iter_hf_rows(cfg.hf_dataset, cfg.hf_split, cfg.hf_config, limit=cfg.limit)):
            yield {"__origin__": f"{cfg.hf_dataset}[{cfg.hf_split}][{i}]", "__dir__": ".", **row}


def iter_records(cfg: SourceConfig) -> Iterator[dict[str, Any]]:
    """Records of a source, with ``columns`` applied (template field <- source column)."""
    for n, rec in enumerate(_raw_records(cfg)):
        if cfg.limit and n >= cfg.limit:
            return
        for target, column in cfg.columns.items():
            if column not in rec:
                rec.setdefault("__error__", f"no column '{column}' for field '{target}' (has {sorted(k for k in rec if not k.startswith('__'))})")
            else:
                rec[target] = rec[column]
        yield rec
