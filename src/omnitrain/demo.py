"""``omnitrain demo``: the framework end to end on data made from local packages, on a CPU.

It is a small configuration of the real path (same tokenizers, layout, files), never a separate
code path. Stages that later parts of omnitrain add (shards, loader, model, training, eval) are
listed as pending until they exist, so the demo always runs everything that does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omnitrain.tokenizer.layout import SpecialSegment, TextSegment, TokenLayout, normalize
from omnitrain.tokenizer.report import TokenizerReportConfig, write_report
from omnitrain.tokenizer.text import (
    TextCorpusConfig,
    TextTokenizerConfig,
    TrainTextTokenizerConfig,
    train_text_tokenizer,
)

PENDING = [
    ("image tokenizer + audio codec", "issue 3"),
    ("token shards from text/image/audio sources", "issue 4"),
    ("streaming loader with packing", "issue 5"),
    ("the omni transformer", "issue 6"),
    ("training with Fabric", "issue 7"),
    ("evaluation before/after (WER, ANLS, perplexity)", "issue 9"),
]


@dataclass
class DemoConfig:
    run_dir: Path = Path("runs/demo")
    tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    corpus: TextCorpusConfig = field(default_factory=TextCorpusConfig)
    report_languages: list[str] = field(default_factory=list)  # empty: all 20


def _stage(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.perf_counter()
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    summary: dict = {}

    t = _stage("1/3 text tokenizer (SentencePiece BPE on Debian's multilingual text)")
    tok_dir = run / "tokenizer" / "text"
    tok = train_text_tokenizer(TrainTextTokenizerConfig(run_dir=tok_dir, tokenizer=cfg.tokenizer, corpus=cfg.corpus))
    summary["text_tokenizer"] = {"vocab_size": tok.vocab_size, "seconds": round(time.perf_counter() - t, 1)}

    t = _stage("2/3 token layout (one id space) and an exact serialize/parse round trip")
    layout = TokenLayout.from_tokenizers(tok)
    layout.save(run / "layout.json")
    reloaded = TokenLayout.load(run / "layout.json", expect_hash=layout.hash)
    sample = "def add(a, b):\n    return a + b  # indentation survives\nBonjour, ça va ? नमस्ते 你好"
    segments = [SpecialSegment("bos"), TextSegment(np.array(tok.encode(sample))), SpecialSegment("eos")]
    ids = reloaded.serialize(segments)
    back = reloaded.parse(ids)
    text_back = tok.decode([int(i) for i in back[1].ids])
    if back != normalize(segments) or text_back != sample:
        raise RuntimeError("layout round trip failed: this is a bug, please report it")
    print(f"{layout.describe()}\nround trip of {len(ids)} ids: exact ({text_back[:40]!r}...)")
    if layout.image_codebook_size == 0 and layout.audio_levels == 0:
        print("(text-only layout: image and audio ranges appear once their tokenizers are trained)")
    summary["layout"] = {"hash": layout.hash, "vocab_size": layout.vocab_size}

    t = _stage("3/3 tokenizer compression report (ours vs o200k_base vs cl100k_base)")
    langs = cfg.report_languages or TokenizerReportConfig().languages
    report = write_report(TokenizerReportConfig(tokenizer=tok_dir, languages=langs, out_dir=run / "tokenizer" / "report"))
    rows = report["rows"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("ours", "o200k_base", "cl100k_base")}
    print(f"mean tokens/char over {len(rows)} languages: ours {mean['ours']:.3f}, "
          f"o200k_base {mean['o200k_base']:.3f}, cl100k_base {mean['cl100k_base']:.3f} -> {run / 'tokenizer/report/report.md'}")  # fmt: skip
    summary["compression_mean_tokens_per_char"] = mean

    print("\n== not yet in omnitrain (the demo grows as they land):")
    for what, issue in PENDING:
        print(f"   - {what} ({issue})")
    summary["pending"] = [w for w, _ in PENDING]
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\ndemo done in {summary['seconds']}s: text tokenizer vocab {tok.vocab_size}, layout {layout.hash}, "
          f"{len(rows)}-language report -> {run}")  # fmt: skip
    return summary
