"""The text tokenizer: a SentencePiece BPE that gives back exactly the text it was given.

Exactness matters: HumanEval depends on indentation, and SentencePiece's default normalisation
(NFKC + collapsing whitespace + a dummy leading space) is lossy. We train with
``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``,
``add_dummy_prefix=False``, whitespace-only pieces allowed (indentation becomes a few tokens, not
one per space), ``"\\n"`` as a piece of its own, and byte fallback so that any UTF-8 string
round-trips (a character outside the vocabulary becomes its UTF-8 bytes).

Ids 0-3 are SentencePiece's <unk> <s> </s> <pad>; the token layout reuses 1-3 as <bos> <eos>
<pad>. Layout specials (<boi>, <|user|>, ...) are *not* in this vocabulary: a user typing "<boi>"
gets text tokens, never an image marker.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import sentencepiece as spm
from tqdm.auto import tqdm

from omnitrain.config import to_dict
from omnitrain.sources import corpora
from omnitrain.sources import text as sources

MODEL_FILE = "text_tokenizer.model"
_META = "\u2581"  # SentencePiece's whitespace symbol


@dataclass
class TextTokenizerConfig:
    """SentencePiece training settings (see the module docstring for the fixed exactness settings)."""

    vocab_size: int = 8000
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True  # any UTF-8 text round-trips; turn off only if you accept <unk>
    character_coverage: float = 0.9995  # share of characters that get pieces of their own (rest: bytes)
    split_digits: bool = True  # numbers as single digits (arithmetic, digit strings in the demo)
    user_defined_symbols: list[str] = field(default_factory=lambda: ["\n"])
    max_sentence_length: int = 16384  # bytes; longer documents are cut into chunks at line breaks
    input_sentence_size: int = 2_000_000  # chunks sampled for training (0: all)
    num_threads: int = 0  # 0: all cores

    def __post_init__(self) -> None:
        if self.vocab_size < 260 and self.byte_fallback:
            raise ValueError(f"vocab_size={self.vocab_size} is too small: byte fallback alone needs 256 + 4 ids")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise ValueError(f"character_coverage={self.character_coverage} must be in [0.9, 1.0]")


@dataclass
class TextCorpusConfig:
    """Where the training text comes from; give files, a Hugging Face dataset, local corpora, or several."""

    files: list[str] = field(default_factory=list)  # .txt / .jsonl / .parquet (+ .gz), globs, folders
    text_field: str = "text"  # the jsonl key / parquet column holding the text
    hf_dataset: str | None = None  # hub name (online), local folder or save_to_disk folder
    hf_split: str = "train"
    hf_config: str | None = None
    local: list[Literal["gettext_debian", "debian_handbook"]] = field(default_factory=list)
    max_chars: int = 200_000_000  # stop reading after this many characters


@dataclass
class TrainTextTokenizerConfig:
    run_dir: Path = Path("runs/tokenizer/text")
    tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    corpus: TextCorpusConfig = field(default_factory=TextCorpusConfig)


class TextTokenizer:
    """A trained SentencePiece model with batched, exact encode/decode."""

    def __init__(self, model_proto: bytes, source: str = "<memory>") -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._proto = model_proto
        self.source = source
        norm = self._sp.normalize("a  b\n").replace("\u2581", " ")  # U+2581 is how SentencePiece shows spaces
        if norm != "a  b\n":
            raise ValueError(
                f"{source} normalises text (e.g. {'a  b'!r} -> {norm!r}), so decoding would not give back the "
                "input. Retrain it with `omnitrain tokenizer train-text` (identity normalisation)."
            )

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load from a run folder (holding ``text_tokenizer.model``) or a ``.model`` file."""
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no text tokenizer at {path}: train one with `omnitrain tokenizer train-text`")
        try:
            return cls(path.read_bytes(), source=str(path))
        except RuntimeError as e:
            raise ValueError(f"{path} is not a SentencePiece model ({e}); point at a text_tokenizer.model") from e

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self._proto).hexdigest()[:16]

    @property
    def special_ids(self) -> dict[str, int]:
        """The specials this vocabulary has, by layout name (the layout reuses them)."""
        ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        return {k: v for k, v in ids.items() if v >= 0}

    def encode(self, text: str | list[str], num_threads: int = 0) -> list[int] | list[list[int]]:
        """One string -> ids; a list of strings -> a list of id lists (encoded in parallel)."""
        if isinstance(text, str):
            return self._encode_one(text)
        texts = list(text)
        out = self._sp.encode(texts, num_threads=num_threads or os.cpu_count() or 1)
        return [self._encode_one(t) if _META in t else ids for t, ids in zip(texts, out, strict=True)]

    def _encode_one(self, text: str) -> list[int]:
        # SentencePiece shows spaces as U+2581 and decodes that character back to a space; a literal
        # U+2581 in the input is written as its three UTF-8 byte pieces, which decode to itself.
        if _META not in text:
            return self._sp.encode(text)
        meta = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode()]
        if self._sp.unk_id() in meta:
            raise ValueError(f"text contains U+2581, which {self.source} can only keep with byte_fallback=true")
        out: list[int] = []
        for k, part in enumerate(text.split(_META)):
            out += (meta if k else []) + self._sp.encode(part)
        return out

    def decode(self, ids: list[int] | list[list[int]]) -> str | list[str]:
        """Ids -> text; a list of id lists -> a list of strings."""
        if len(ids) and not isinstance(ids[0], int) and hasattr(ids[0], "__len__"):
            return [self._sp.decode([int(i) for i in row]) for row in ids]
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def save(self, run_dir: Path) -> Path:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / MODEL_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(self._proto)
        tmp.replace(path)
        return path


def _chunks(doc: str, max_bytes: int) -> Iterator[str]:
    """Cut a document into pieces of at most ``max_bytes`` UTF-8 bytes, at line breaks when possible
    (SentencePiece silently drops training sentences longer than max_sentence_length)."""
    if len(doc.encode("utf-8")) <= max_bytes:
        yield doc
        return
    buf, size = [], 0
    for line in doc.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        while n > max_bytes:  # a single huge line: hard cut on characters
            cut = max_bytes // 4
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield line[:cut]
            line = line[cut:]
            n = len(line.encode("utf-8"))
        if size + n > max_bytes:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def iter_corpus(corpus: TextCorpusConfig, workdir: Path) -> Iterator[str]:
    """All documents of the configured sources, in a deterministic order."""
    paths = sources.expand_paths(corpus.files) if corpus.files else []
    if "gettext_debian" in corpus.local or "debian_handbook" in corpus.local:
        if "gettext_debian" in corpus.local:
            paths += corpora.write_tokenizer_corpus(workdir / "gettext", handbook_chars=0)
        if "debian_handbook" in corpus.local:
            yield from corpora.handbook_text()
    if not paths and corpus.hf_dataset is None and not corpus.local:
        raise ValueError("the text corpus is empty: set corpus.files, corpus.hf_dataset or corpus.local")
    for path in paths:
        yield from sources.iter_file_documents(path, corpus.text_field)
    if corpus.hf_dataset is not None:
        yield from sources.iter_hf_documents(corpus.hf_dataset, corpus.hf_split, corpus.text_field, corpus.hf_config)


def train_text_tokenizer(cfg: TrainTextTokenizerConfig) -> TextTokenizer:
    """Train on the corpus, save ``text_tokenizer.model`` + ``config.json`` + ``stats.json`` in
    ``cfg.run_dir``, verify the exact round trip on a sample, and print a one-line summary."""
    tc, run_dir = cfg.tokenizer, Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chunks, n_chars = [], 0
    bar = tqdm(desc="reading text", unit=" chars", unit_scale=True, leave=False)
    for doc in iter_corpus(cfg.corpus, run_dir / "corpus_cache"):
        for piece in _chunks(doc, tc.max_sentence_length):
            if piece.strip():
                chunks.append(piece)
                n_chars += len(piece)
                bar.update(len(piece))
        if n_chars >= cfg.corpus.max_chars:
            break
    bar.close()
    if not chunks:
        raise ValueError("the corpus holds no text: check the sources in the corpus config")
    threads = tc.num_threads or os.cpu_count() or 1
    print(f"training SentencePiece {tc.model_type} (vocab {tc.vocab_size}) on {len(chunks):,} chunks, "
          f"{n_chars / 1e6:.1f}M chars, {threads} threads ...", flush=True)  # fmt: skip
    t1 = time.perf_counter()
    try:
        proto = _train_sentencepiece(chunks, tc, threads)
    except RuntimeError as e:  # SentencePiece reports config problems as RuntimeError("INTERNAL: ...")
        reason = str(e).split("]")[-1].strip()
        raise ValueError(f"SentencePiece could not train on this corpus: {reason} "
                         "(set tokenizer.vocab_size / tokenizer.character_coverage)") from e  # fmt: skip
    train_s = time.perf_counter() - t1
    tok = TextTokenizer(proto)
    tok.save(run_dir)
    # Exactness check on a spread sample of what we trained on: one failure is a bug we must hear of.
    sample = chunks[:: max(1, len(chunks) // 500)]
    decoded = tok.decode(tok.encode(sample))
    bad = [s for s, d in zip(sample, decoded, strict=True) if s != d]
    if bad:
        raise RuntimeError(f"text tokenizer round trip failed on {len(bad)}/{len(sample)} samples: {bad[0][:80]!r}")
    n_tokens = sum(len(ids) for ids in tok.encode(sample))
    stats = {
        "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint, "chunks": len(chunks), "chars": n_chars,
        "train_seconds": round(train_s, 2), "total_seconds": round(time.perf_counter() - t0, 2),
        "roundtrip_checked": len(sample), "tokens_per_char_sample": round(n_tokens / sum(map(len, sample)), 4),
    }  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False) + "\n")
    (run_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"text tokenizer: vocab {tok.vocab_size}, {stats['tokens_per_char_sample']} tokens/char, exact round trip "
          f"on {len(sample)} samples, trained in {train_s:.1f}s -> {run_dir / MODEL_FILE}")  # fmt: skip
    return tok


def _train_sentencepiece(chunks: list[str], tc: TextTokenizerConfig, threads: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_writer=model,
        vocab_size=tc.vocab_size,
        model_type=tc.model_type,
        byte_fallback=tc.byte_fallback,
        character_coverage=tc.character_coverage,
        split_digits=tc.split_digits,
        user_defined_symbols=tc.user_defined_symbols,
        max_sentence_length=tc.max_sentence_length,
        input_sentence_size=tc.input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=threads,
        # exactness: no normalisation, no whitespace collapsing, no dummy prefix
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,  # fmt: skip
        hard_vocab_limit=False,  # a small corpus may not support vocab_size pieces: take what it gives
        minloglevel=2,
    )
    return model.getvalue()
