"""ANLS and corpus WER/CER against hand-computed values (the normalisers: test_normalizers.py)."""

import pytest

from omnitrain.eval.metrics import anls, corpus_cer, corpus_wer, mean_anls

# ---------------------------------------------------------------- ANLS


def test_anls_exact_case_and_whitespace_insensitive():
    assert anls("INV-20391", ["INV-20391"]) == 1.0
    assert anls("  Hello   World ", ["hello world"]) == 1.0


def test_anls_partial_match():
    # "inv-2039" vs "inv-20391": 1 deletion, max len 9 -> 1 - 1/9
    assert anls("inv-2039", ["INV-20391"]) == pytest.approx(8 / 9)


def test_anls_multi_reference_takes_best():
    # vs "$1,234.50": insert "$", ",", "0" -> 3 edits / 9 -> 0.667
    # vs "1234.50": insert "0" -> 1 edit / 7 -> 0.857  <- best
    assert anls("1234.5", ["$1,234.50", "1234.50"]) == pytest.approx(6 / 7)


def test_anls_threshold_is_strict():
    # "ab" vs "abcd": 2 edits / 4 = NL 0.5, not < 0.5 -> 0
    assert anls("ab", ["abcd"]) == 0.0
    # "abc" vs "abcd": 1 / 4 = 0.25 -> 0.75
    assert anls("abc", ["abcd"]) == pytest.approx(0.75)
    assert anls("ab", ["abcd"], threshold=0.6) == pytest.approx(0.5)


def test_anls_empty_strings():
    assert anls("", [""]) == 1.0
    assert anls("  ", [""]) == 1.0
    assert anls("", ["a"]) == 0.0  # 1 edit / 1 -> NL 1
    with pytest.raises(ValueError, match="at least one reference"):
        anls("x", [])


def test_mean_anls_and_stderr():
    # scores [1, 0]: mean 0.5, sample std sqrt(0.5), stderr sqrt(0.5)/sqrt(2) = 0.5
    out = mean_anls(["a", "b"], [["a"], ["c"]])
    assert out == {"anls": 0.5, "stderr": pytest.approx(0.5), "n": 2}
    with pytest.raises(ValueError):
        mean_anls(["a"], [["a"], ["b"]])


# ---------------------------------------------------------------- WER / CER


def test_wer_counts():
    # "a b c d" -> "a x c" : b->x substitution, d deleted; "e f" -> "e f g": g inserted
    # (1 + 1 + 1) / (4 + 2) = 0.5
    out = corpus_wer(["a b c d", "e f"], ["a x c", "e f g"], normalizer="none")
    assert (out["substitutions"], out["deletions"], out["insertions"]) == (1, 1, 1)
    assert out["ref_words"] == 6 and out["n"] == 2
    assert out["wer"] == pytest.approx(0.5)
    # both utterances have rate 0.5, so every bootstrap resample does too
    assert out["stderr"] == 0.0 and "bootstrap" in out["stderr_method"]


def test_corpus_wer_is_not_mean_of_utterance_wers():
    # utt 1: 10 words, 0 errors; utt 2: 1 word, 1 substitution.
    # corpus: 1 / 11 = 0.0909; mean of per-utterance WERs would be (0 + 1) / 2 = 0.5
    refs = ["one two three four five six seven eight nine ten", "yes"]
    hyps = ["one two three four five six seven eight nine ten", "no"]
    out = corpus_wer(refs, hyps, normalizer="none")
    assert out["wer"] == pytest.approx(1 / 11)
    assert 0 < out["stderr"] < 0.5  # resamples range from 0/20 to 2/2


def test_empty_reference_counts_insertions_only():
    # utt 2 has no reference words: its 2 hypothesis words are insertions; ref words = 2 (utt 1)
    # -> 2 / 2 = 1.0
    out = corpus_wer(["hello world", ""], ["hello world", "uh oh"], normalizer="basic")
    assert (out["insertions"], out["ref_words"], out["wer"]) == (2, 2, 1.0)
    # the whisper normaliser drops the filler "uh" (and writes "oh" as "0"): 1 insertion / 2 = 0.5
    assert corpus_wer(["hello world", ""], ["hello world", "uh oh"])["wer"] == pytest.approx(0.5)
    # an empty hypothesis is all deletions
    assert corpus_wer(["a b"], [""], normalizer="none")["deletions"] == 2


def test_all_empty_references_raise():
    with pytest.raises(ValueError, match="every reference is empty"):
        corpus_wer(["", "[noise]"], ["a", "b"], normalizer="basic")
    with pytest.raises(ValueError, match="normalizer='english' is not one of"):
        corpus_wer(["a"], ["a"], normalizer="english")


def test_wer_normalizer_makes_formatting_free():
    refs = ["Mr. Smith paid twenty one dollars for the colour grey."]
    hyps = ["mister smith paid $21 for the color gray"]
    assert corpus_wer(refs, hyps)["wer"] == 0.0
    # basic keeps numbers/spelling: ref "mr smith paid twenty one dollars for the colour grey" (10)
    # vs hyp "mister smith paid 21 for the color gray" (8): mr->mister, twenty->21, one, dollars
    # deleted, colour->color, grey->gray = 4 S + 2 D = 6 / 10
    assert corpus_wer(refs, hyps, normalizer="basic")["wer"] == pytest.approx(0.6)


def test_cer_without_spaces():
    # "你好世界" -> "你好世": 1 deletion / 4 characters
    out = corpus_cer(["你好世界"], ["你好世"])
    assert out["cer"] == pytest.approx(0.25) and out["ref_chars"] == 4
    assert corpus_cer(["你好 世界"], ["你好世界"])["cer"] == 0.0
    assert corpus_cer(["ab"], ["a b"], keep_spaces=True)["insertions"] == 1
    # the edge space Whisper's normaliser leaves after "Hello." is no character to insert
    assert corpus_cer(["Hello."], ["hello"], normalizer="whisper", keep_spaces=True)["cer"] == 0.0
