"""Reading raw text from files and Hugging Face datasets, with errors that name the file and line.

Supported: ``.txt`` / ``.md`` / ``.rst`` / ``.html`` (a file is one document; HTML tags stripped), ``.jsonl`` (one JSON object per line, the text in
``text_field``), ``.parquet`` (column ``text_field``), each optionally ``.gz``-compressed; glob
patterns; and any Hugging Face dataset: by hub name (online), a local data folder, or a
``save_to_disk`` folder (offline), always streamed through a shuffle buffer.
"""

from __future__ import annotations

import glob
import gzip
import html.parser
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".md", ".rst", ".html")
SHUFFLE_BUFFER = 10_000  # rows held to shuffle a streamed Hugging Face dataset (as in datasets' streaming guide)


class _TextOnly(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style") and self._skip > 0
        if tag in ("p", "div", "pre", "li", "h1", "h2", "h3", "h4", "tr", "dt", "dd", "br", "title"):
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page: one line per block element, whitespace runs collapsed."""
    parser = _TextOnly()
    parser.feed(markup)
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    return "\n".join(line for line in lines if line)


def expand_paths(patterns: list[str] | list[Path]) -> list[Path]:
    """Expand globs and folders (recursively, supported suffixes) into a sorted file list.

    Raises:
        FileNotFoundError: when a pattern matches nothing (naming the pattern).
    """
    out: list[Path] = []
    for pat in patterns:
        pat = str(pat)
        matches = sorted(glob.glob(pat, recursive=True)) if any(c in pat for c in "*?[") else [pat]
        if not matches or not Path(matches[0]).exists():
            raise FileNotFoundError(f"no file matches {pat!r}: check the path (relative paths start at {Path.cwd()})")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out += sorted(f for f in p.rglob("*") if f.is_file() and _base_suffix(f) in TEXT_SUFFIXES)
            else:
                out.append(p)
    return out


def _base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def iter_file_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of one file. Raises ValueError naming file (and line) on malformed content."""
    suffix = _base_suffix(path)
    try:
        if suffix in (".txt", ".md", ".rst"):
            with open_text(path) as f:
                yield f.read()
        elif suffix == ".html":
            with open_text(path) as f:
                yield html_to_text(f.read())
        elif suffix == ".jsonl":
            with open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from e
                    if not isinstance(record, dict) or text_field not in record:
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise ValueError(f"{path}:{lineno}: no '{text_field}' field (has {keys}); set text_field")
                    if not isinstance(record[text_field], str):
                        raise ValueError(f"{path}:{lineno}: '{text_field}' is not a string")
                    yield record[text_field]
        elif suffix == ".parquet":
            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise ValueError(f"{path}: no column '{text_field}' (columns: {table.column_names}); set text_field")
            for value in table.column(text_field).to_pylist():
                if value is not None:
                    yield value
        else:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet (or .gz)")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from e


def load_hf_dataset(name_or_path: str, split: str = "train", config: str | None = None, streaming: bool = True) -> Any:
    """A Hugging Face dataset: a ``save_to_disk`` folder, a local data folder, or a hub name.

    ``streaming`` (the default): an ``IterableDataset`` that reads rows as they are asked for, so a
    reader that stops early (``max_chars``, ``limit``) never downloads the rest (issue 21: the README's
    fineweb-edu example would otherwise fetch the whole 10BT sample first). Otherwise a ``Dataset``."""
    import datasets  # datasets: ~0.5 s to import, only for Hugging Face datasets

    path = Path(name_or_path)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has splits {list(ds)}, not '{split}'; set the split")
            ds = ds[split]
        return ds.to_iterable_dataset() if streaming else ds
    try:
        return datasets.load_dataset(name_or_path, config, split=split, streaming=streaming)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise ValueError(
            f"could not load Hugging Face dataset {name_or_path!r} (split {split!r}): {e}. Offline, pass a local "
            "folder or a `save_to_disk` folder; online, check the name and split."
        ) from e


def iter_hf_rows(name_or_path: str, split: str = "train", config: str | None = None, limit: int = 0, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Rows of a Hugging Face dataset, streamed and shuffled in a buffer of ``SHUFFLE_BUFFER`` rows
    (``limit`` rows when that is smaller, so a small ``limit`` reads little more than it keeps) with
    ``seed``: the same order on every run, so builds stay deterministic and restartable."""
    ds = load_hf_dataset(name_or_path, split, config, streaming=True)
    buffer = min(SHUFFLE_BUFFER, limit) if limit else SHUFFLE_BUFFER
    if buffer > 1:
        ds = ds.shuffle(seed=seed, buffer_size=buffer)  # shuffles the order of the dataset's files too
    yield from ds


def iter_hf_documents(name_or_path: str, split: str, field: str, config: str | None = None) -> Iterator[str]:
    """The ``field`` texts of a Hugging Face dataset, streamed (see :func:`iter_hf_rows`); the caller
    stops when it has enough (``corpus.max_chars``) and nothing more is read."""
    for i, row in enumerate(iter_hf_rows(name_or_path, split, config)):
        if i == 0 and field not in row:
            raise ValueError(f"dataset {name_or_path!r} has no column '{field}' (columns: {sorted(row)}); set text_field")
        if row.get(field) is not None:
            yield row[field]
