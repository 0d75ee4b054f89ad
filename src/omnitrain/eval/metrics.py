"""Metrics: ANLS for document QA, corpus WER/CER for speech.

- ANLS (Biten et al. 2019, "Scene Text Visual Question Answering", the DocVQA metric): per question,
  the best over the accepted answers of ``1 - NL`` where ``NL = levenshtein / max(len)``, and 0 when
  ``NL >= threshold`` (0.5). Compared case- and whitespace-insensitively.
- WER/CER: corpus level, total edits over total reference words (characters), computed by jiwer on
  text normalised by Whisper's own normalisers (`omnitrain.eval.normalizers`), so that figures compare
  with published ones. This is not the mean of per-utterance WERs, which over-weights short utterances.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from omnitrain.eval.normalizers import get_normalizer
from omnitrain.sources.text import iter_file_documents

__all__ = ["anls", "mean_anls", "corpus_wer", "corpus_cer"]

_BOOTSTRAP_SAMPLES = 1000


def _anls_text(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().lower())


def _levenshtein(a: str, b: str) -> int:
    from rapidfuzz.distance import Levenshtein  # optional: installed with jiwer (the eval extra)

    return Levenshtein.distance(a, b)


def anls(prediction: str, references: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (the DocVQA metric).

    Args:
        prediction: the model's answer.
        references: every accepted answer; the best match counts.
        threshold: a normalised distance at or above this scores 0 (0.5 in DocVQA).

    Returns:
        A score in [0, 1]; 1.0 when prediction and a reference are both empty after normalisation.

    Raises:
        ValueError: when `references` is empty.
    """
    if not references:
        raise ValueError("anls needs at least one reference answer; got an empty list")
    pred = _anls_text(prediction)
    best = 0.0
    for ref in references:
        ref = _anls_text(ref)
        longest = max(len(pred), len(ref))
        if longest == 0:
            return 1.0
        nl = _levenshtein(pred, ref) / longest
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def mean_anls(predictions: list[str], references: list[list[str]], threshold: float = 0.5) -> dict:
    """Mean ANLS over a set of questions.

    Returns:
        ``{"anls": mean, "stderr": standard error of the mean (sample std / sqrt(n)), "n": count}``.

    Raises:
        ValueError: when the lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("mean_anls needs at least one prediction")
    scores = np.array([anls(p, r, threshold) for p, r in zip(predictions, references, strict=True)])
    stderr = float(scores.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else 0.0
    return {"anls": float(scores.mean()), "stderr": stderr, "n": len(scores)}


def _edit_counts(refs: list[str], hyps: list[str], unit: str) -> np.ndarray:
    """Per-utterance [substitutions, deletions, insertions, reference length], shape (n, 4)."""
    import jiwer  # jiwer: optional (the eval extra)

    counts = np.zeros((len(refs), 4), dtype=np.int64)
    # jiwer 4 aligns an empty reference against the hypothesis as pure insertions, which is the
    # behaviour we document; it only refuses a corpus whose references are all empty (the caller checks).
    process = jiwer.process_words if unit == "word" else jiwer.process_characters
    out = process(refs, hyps)
    for i, chunks in enumerate(out.alignments):
        for c in chunks:
            if c.type == "substitute":
                counts[i, 0] += c.ref_end_idx - c.ref_start_idx
            elif c.type == "delete":
                counts[i, 1] += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                counts[i, 2] += c.hyp_end_idx - c.hyp_start_idx
        counts[i, 3] = len(refs[i].split()) if unit == "word" else len(refs[i])
    return counts


def _bootstrap_stderr(counts: np.ndarray, seed: int = 0) -> float:
    """Standard deviation of the corpus error rate over utterance-level bootstrap resamples."""
    n = len(counts)
    if n < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(_BOOTSTRAP_SAMPLES, n))  # (samples, n) utterance picks
    edits = counts[:, :3].sum(axis=1)[idx].sum(axis=1)
    lengths = counts[:, 3][idx].sum(axis=1)
    ok = lengths > 0  # a resample of only empty references has no rate
    return float((edits[ok] / lengths[ok]).std(ddof=1))


def _corpus_rate(references: list[str], hypotheses: list[str], normalizer: str, unit: str,
                 keep_spaces: bool = True) -> dict:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")
    norm = get_normalizer(normalizer)
    # strip: Whisper's normalisers can leave an edge space ("Hello." -> "hello "), a character for CER
    refs = [norm(r).strip() for r in references]
    hyps = [norm(h).strip() for h in hypotheses]
    if unit == "word":
        refs, hyps = [" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps]
    elif not keep_spaces:
        refs, hyps = ["".join(r.split()) for r in refs], ["".join(h.split()) for h in hyps]
    if not any(refs):
        raise ValueError(
            f"every reference is empty after the {normalizer!r} normaliser ({len(refs)} utterances); "
            "a corpus error rate needs at least one reference word"
        )
    counts = _edit_counts(refs, hyps, unit)
    s, d, i, length = (int(x) for x in counts.sum(axis=0))
    name = "wer" if unit == "word" else "cer"
    return {
        name: (s + d + i) / length,
        "substitutions": s,
        "deletions": d,
        "insertions": i,
        "ref_words" if unit == "word" else "ref_chars": length,
        "n": len(refs),
        "stderr": _bootstrap_stderr(counts),
        "stderr_method": f"bootstrap over utterances ({_BOOTSTRAP_SAMPLES} resamples, seed 0)",
    }


def corpus_wer(references: list[str], hypotheses: list[str], normalizer: str = "whisper") -> dict:
    """Corpus word error rate: (S + D + I) / reference words, summed over all utterances.

    Both sides go through the same normaliser first. An utterance whose reference is empty after
    normalisation adds its hypothesis words as insertions and nothing to ``ref_words``.

    Args:
        references: ground-truth transcripts.
        hypotheses: system outputs, one per reference.
        normalizer: ``"whisper"`` (Whisper's English normaliser, the reference implementation in
            transformers; see `omnitrain.eval.normalizers`), ``"basic"`` or ``"none"``.

    Returns:
        ``{"wer", "substitutions", "deletions", "insertions", "ref_words", "n", "stderr",
        "stderr_method"}``; ``stderr`` is the bootstrap standard error over utterances.

    Raises:
        ValueError: on length mismatch, an unknown normaliser, or when every reference is empty.
        ImportError: for ``"whisper"``/``"basic"`` without transformers or whisper-normalizer.
    """
    return _corpus_rate(references, hypotheses, normalizer, "word")


def corpus_cer(references: list[str], hypotheses: list[str], normalizer: str = "basic",
               keep_spaces: bool = False) -> dict:
    """Corpus character error rate, for languages written without spaces (Chinese, Japanese, Thai).

    Whitespace is removed before alignment unless `keep_spaces` (so "你好 世界" and "你好世界" agree).
    Empty references behave as in `corpus_wer`.

    Returns:
        ``{"cer", "substitutions", "deletions", "insertions", "ref_chars", "n", "stderr",
        "stderr_method"}``.

    Raises:
        ValueError: on length mismatch, an unknown normaliser, or when every reference is empty.
    """
    return _corpus_rate(references, hypotheses, normalizer, "char", keep_spaces=keep_spaces)


def char_accuracy(prediction: str, target: str) -> float:
    """The share of the target's characters that the prediction has at the same position (a reading
    task's partial credit: "1284" for "1234" scores 0.75; extra characters cost nothing, missing ones do)."""
    if not target:
        return float(not prediction)
    return sum(a == b for a, b in zip(prediction, target, strict=False)) / len(target)


def text_chunks(paths: list[str], chunk_chars: int) -> list[str]:
    """Held-out text in windows of about ``chunk_chars`` characters, cut at word boundaries. Files are
    read as the text pipelines read them (``omnitrain.sources.text.iter_file_documents``: .txt/.md, .html
    pages' visible text, jsonl/parquet ``text``, .gz). A last window of 20 words or fewer is dropped
    (too few tokens to mean anything)."""
    chunks: list[str] = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"perplexity text {path} does not exist")
        for doc in iter_file_documents(Path(path)):
            cur: list[str] = []
            for w in doc.split():
                cur.append(w)
                if sum(map(len, cur)) + len(cur) >= chunk_chars:
                    chunks.append(" ".join(cur))
                    cur = []
            if len(cur) > 20:
                chunks.append(" ".join(cur))
    if not chunks:  # every text shorter than a window: nothing to score (a perplexity of 0 tokens is undefined)
        raise ValueError(f"perplexity: no window of text in {paths}: each file holds fewer than 21 words, or "
                         f"no text at all; give longer held-out texts or a smaller perplexity.chunk_chars")  # fmt: skip
    return chunks
