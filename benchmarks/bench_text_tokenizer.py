"""Text tokenizer: training time, encode/decode throughput and compression, side by side with
tiktoken's o200k_base (GPT-4o) on the same text in the same run (medians of several repeats)."""

from __future__ import annotations

import inspect
import statistics
import tempfile
import time
from pathlib import Path

from _table import print_rows  # benchmarks/ is on sys.path when these run


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    import json
    import textwrap

    from omnitrain.sources import corpora
    from omnitrain.tokenizer.report import load_tiktoken
    from omnitrain.tokenizer.text import (
        TextCorpusConfig,
        TextTokenizerConfig,
        TrainTextTokenizerConfig,
        train_text_tokenizer,
    )

    repeats = 3 if quick else 7
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainTextTokenizerConfig(
            run_dir=Path(tmp), tokenizer=TextTokenizerConfig(vocab_size=8000),
            corpus=TextCorpusConfig(local=["gettext_debian", "debian_handbook"]),
        )  # fmt: skip
        t0 = time.perf_counter()
        ours = train_text_tokenizer(cfg)
        train_s = time.perf_counter() - t0
    o200k = load_tiktoken("o200k_base")
    # one document per language (its held-out strings joined by newlines) plus three Python modules:
    # whole documents, as a data pipeline encodes them (a list of ~40k tiny strings mostly measures
    # per-call overhead, tiktoken's thread-pool task per string in particular)
    texts = ["\n".join(strings) for strings in corpora.heldout_texts().values()]
    texts += [inspect.getsource(m) for m in (json, textwrap, inspect)]
    n_chars = sum(map(len, texts))
    mb = sum(len(t.encode()) for t in texts) / 1e6

    ours_ids = ours.encode(texts)
    ref_ids = o200k.encode_ordinary_batch(texts)
    enc_ours = _median_seconds(lambda: ours.encode(texts), repeats)
    enc_ref = _median_seconds(lambda: o200k.encode_ordinary_batch(texts), repeats)
    dec_ours = _median_seconds(lambda: ours.decode(ours_ids), repeats)
    dec_ref = _median_seconds(lambda: o200k.decode_batch(ref_ids), repeats)
    exact = sum(a == b for a, b in zip(ours.decode(ours_ids), texts, strict=True)) / len(texts)
    tpc_ours = sum(map(len, ours_ids)) / n_chars
    tpc_ref = sum(map(len, ref_ids)) / n_chars

    rows = [
        {"metric": "train 8k BPE (Debian corpus)", "value": train_s, "unit": "s", "baseline": None, "note": f"{ours.vocab_size} pieces"},
        {"metric": "encode throughput", "value": mb / enc_ours, "unit": "MB/s", "baseline": mb / enc_ref, "note": "baseline: tiktoken o200k_base, 2 threads each"},
        {"metric": "decode throughput", "value": mb / dec_ours, "unit": "MB/s", "baseline": mb / dec_ref, "note": "baseline: tiktoken o200k_base"},
        {"metric": "tokens per char (20 langs + code)", "value": tpc_ours, "unit": "tok/char", "baseline": tpc_ref, "note": "ours 8k vocab vs o200k 200k vocab"},
        {"metric": "exact round trip", "value": exact, "unit": "share", "baseline": None, "note": f"{len(texts)} documents"},
    ]
    print_rows(rows, "ours", "o200k_base")
    return rows


if __name__ == "__main__":
    run()
