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
* ``hf``: any Hugging Face dataset (hub name online; local folder or ``save_to_disk`` offline).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from omnitrain.sources import text as sources

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")


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


def _rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if suffix == ".jsonl":
        with sources.open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{lineno}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"{path}:{lineno}", {"__error__": f"not valid JSON ({e.msg})"}
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for rowno, row in enumerate(csv.DictReader(f), 2):
                yield f"{path}:{rowno}", dict(row)
    elif suffix == ".parquet":
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}#row{i}", row
    else:
        raise ValueError(f"{path}: records are read from .jsonl, .csv or .parquet, not {path.suffix!r}")


def _sphinx_or_tab(path: Path) -> dict[str, str]:
    """Transcripts file: ``id<TAB>text`` lines, or Sphinx's ``<s> text </s> (id)``."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*(?:<s>)?\s*(.*?)\s*(?:</s>)?\s*\(([^()]+)\)\s*", line)
        if m:
            out[m.group(2)] = m.group(1)
        elif "\t" in line:
            key, text = line.split("\t", 1)
            out[key.strip()] = text.strip()
        else:
            raise ValueError(f"{path}: cannot read transcript line {line!r:.80}; use 'id<TAB>text'")
    return out


def _raw_records(cfg: SourceConfig) -> Iterator[dict[str, Any]]:
    if cfg.kind == "text":
        for path in _files(cfg.paths, sources.TEXT_SUFFIXES + (".gz",)):
            if path.suffix in (".jsonl", ".parquet") or path.name.endswith(".jsonl.gz"):
                for origin, row in _rows(path):
                    yield {"__origin__": origin, "__dir__": str(path.parent), **row}
            else:
                for doc in sources.iter_file_documents(path, cfg.text_field):
                    yield {"__origin__": str(path), "__dir__": str(path.parent), "text": doc}
    elif cfg.kind == "records":
        for path in _files(cfg.paths, (".jsonl", ".csv", ".parquet", ".gz")):
            for origin, row in _rows(path):
                yield {"__origin__": origin, "__dir__": str(path.parent), **row}
    elif cfg.kind == "image_folder":
        for folder in _folders(cfg.paths):
            for img in sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES):
                cap = img.with_suffix(".txt")
                caption = cap.read_text(encoding="utf-8").strip() if cap.is_file() else None
                yield {"__origin__": str(img), "__dir__": str(folder), "image": str(img.resolve()), "caption": caption}
    elif cfg.kind == "audio_folder":
        for folder in _folders(cfg.paths):
            table = _sphinx_or_tab(Path(cfg.transcripts)) if cfg.transcripts else {}
            for wav in sorted(f for f in folder.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES):
                txt = wav.with_suffix(".txt")
                text = txt.read_text(encoding="utf-8").strip() if txt.is_file() else table.get(wav.stem)
                yield {"__origin__": str(wav), "__dir__": str(folder), "audio": str(wav.resolve()), "text": text}
    elif cfg.kind == "video_folder":
        for folder in _folders(cfg.paths):
            for clip in sorted(f for f in folder.rglob("*") if f.suffix.lower() in VIDEO_SUFFIXES):
                cap = clip.with_suffix(".txt")
                caption = cap.read_text(encoding="utf-8").strip() if cap.is_file() else None
                yield {"__origin__": str(clip), "__dir__": str(folder), "video": str(clip.resolve()), "caption": caption}
    elif cfg.kind == "hf":
        if not cfg.hf_dataset:
            raise ValueError("source.kind=hf needs source.hf_dataset (a hub name, a local folder or a save_to_disk folder)")
        ds = sources.load_hf_dataset(cfg.hf_dataset, cfg.hf_split, cfg.hf_config)
        for i, row in enumerate(ds):
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
