"""The WER normalisers are the reference ones: transformers' Whisper normalisers with Whisper's
spelling table, checked string for string on a large corpus built here, plus their wiring."""

import gettext
import glob
import html
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from omnitrain.eval import normalizers
from omnitrain.eval.normalizers import get_normalizer

# ---------------------------------------------------------------- corpus: spelled-out numbers

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()  # fmt: skip
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = [(10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand")]
_ORDINAL = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
            "nine": "ninth", "twelve": "twelfth"}  # fmt: skip


def _words(n: int, rng: random.Random) -> str:
    """English words for 0 <= n < 10**15, with the variants speakers use picked at random
    ("one hundred and five" / "one hundred five", "twenty-one" / "twenty one", "a hundred")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (rng.choice(["-", " "]) + _ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = ("a" if hundreds == 1 and rng.random() < 0.2 else _ONES[hundreds]) + " hundred"
        return head + ((rng.choice([" and ", " "]) + _words(rest, rng)) if rest else "")
    for scale, name in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            joiner = " and " if rest and rest < 100 and rng.random() < 0.5 else " "
            return f"{_words(head, rng)} {name}" + (joiner + _words(rest, rng) if rest else "")
    raise AssertionError(n)


def _ordinal_words(n: int, rng: random.Random) -> str:
    words = _words(n, rng)
    head, sep, last = max((words.rpartition(s) for s in (" ", "-")), key=lambda p: len(p[0]))
    if last in _ORDINAL:
        last = _ORDINAL[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def _number(rng: random.Random) -> int:
    """Log-uniform over 0 .. 10**13, so small and huge numbers both appear often."""
    return int(10 ** rng.uniform(0, 13)) - 1 if rng.random() < 0.8 else rng.randrange(0, 100)


def _ordinal_suffix(n: int) -> str:
    return "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


# ---------------------------------------------------------------- corpus: fragments by topic

_CONTRACTIONS = ["won't", "can't", "don't", "isn't", "let's", "ain't", "y'all", "wanna", "gotta", "gonna",
                 "i'ma", "imma", "woulda", "coulda", "shoulda", "ma'am", "he's been", "she'd been",
                 "it's gone", "we'd gone", "they'd done", "she's got", "they're", "john's", "you'd", "we'll",
                 "I've", "I'm", "shan't", "o'clock", "rock 'n' roll", "'tis", "dogs'", "it 's", "don 't",
                 "won’t", "it’s", "‘quoted’", "we’ve", "y’all"]  # fmt: skip
_TITLES = ["Mr.", "Mrs", "Dr.", "St.", "St", "Prof.", "Capt.", "Gov.", "Ald.", "Gen.", "Sen.", "Rep.", "Pres.",
           "Rev.", "Hon.", "Asst.", "Assoc.", "Lt.", "Col.", "Jr.", "Sr.", "Esq.", "Ms.", "Mx."]  # fmt: skip
_FILLERS = ["hmm", "mm", "mhm", "mmm", "uh", "um", "umm", "uhh", "Um,", "uh-huh", "erm", "Hmm..."]
_ELLIPSES = ["...", "…", ". . .", "wait...", "...and then", "so…", "1...2", "....", "?!", "!!"]
_LONE = list("abcdefghijklmnopqrstuvwxyz") + ["O", "I", "A", "o o", "oh", "U.S.A.", "e.g.", "i.e.", "a.m.",
                                               "p.m.", "Ph.D.", "x", "X"]  # fmt: skip
_GLUED = ["mp3", "covid19", "a1b2c3", "x86_64", "4k", "10kg", "2x", "h2o", "b2b", "v1.2.3", "ipv6", "3d", "1o1",
          "o1", "1-800-555-0199", "+1 (555) 010-9999", "1a", "a1", "R2-D2", "7up", "99luftballons", "5g",
          "s3cr3t", "1one", "one1", "0x1F", "1e10", "2nd-hand", "24/7", "9-5", "1st-class", "3rd-party"]  # fmt: skip
_UNICODE = ["café", "naïve", "résumé", "Zoë", "Straße", "œuvre", "Øresund", "Łódź", "İstanbul", "ﬁnance",
            "１２３", "x²", "ǅ", "🙂", "αβγ", "привет", "東京", "٣٤", "१२", "e\u0301", "a\u00a0b", "a\u200db",
            "—", "–", "“quoted”", "« guillemets »", "¿qué?", "¡hola!", "Æsir", "þorn", "ðe", "ħ", "ŋ", "Ⅻ",
            "№ 5", "©2024", "™", "°C", "µs", "÷", "×", "±", "√2", "∞", "Ångström", "façade", "coöperate"]  # fmt: skip
_BRACKETS = ["[laughs]", "<unk>", "(noise)", "(", ")", "[unclosed", "a) b", "((nested))", "{curly}", "(1)",
             "[1]", "<b>bold</b>", "(twenty one)", "[", "]", "<", ">", "(a) (b)"]  # fmt: skip
_HYPHENS = ["twenty-one", "well-known", "e-mail", "-", "--", "re-enter", "x-ray", "one-third", "-5", "+7",
            "5-4", "mid-1990s", "self-", "-ish", "state-of-the-art"]  # fmt: skip
_SYMBOLS = ["&", "@", "#1", "100 #", "+", "=", "*", "^", "~", "|", "\\", "/", "$", "£", "€", "¢", "%", "$ sign",
            "50 %", "% of", ".", ",", "1,000", "1,2,3", ",5", "5.", ".5", "5.5.5", "$.50", "john.doe@example.com",
            "www.example.co.uk", "http://x.org/a?b=1", "C++", "C#", ".NET", "node.js"]  # fmt: skip
_CURRENCY_WORDS = ["dollar", "dollars", "pound", "pounds", "euro", "euros", "cent", "cents", "penny", "pence"]
_UNITS = ["percent", "per cent", "%", "million", "billion", "thousand", "hundred", "dozen", "half", "halves",
          "quarter", "quarters", "third", "thirds", "point", "and a half", "and a quarter", "o'clock"]  # fmt: skip


def _fragment(rng: random.Random, spellings: list[str]) -> str:
    """One fragment on one of the topics where normalisers are known to disagree."""
    n = _number(rng)
    small = rng.randrange(0, 100)
    topic = rng.randrange(16)
    if topic == 0:  # spelled-out cardinals, with units and currencies
        return f"{_words(n, rng)} {rng.choice(_UNITS + _CURRENCY_WORDS + ['', '', 'apples'])}"
    if topic == 1:  # ordinals, spelled and written
        return rng.choice(
            [
                _ordinal_words(n, rng),
                f"the {_ordinal_words(small, rng)}",
                f"{n}{_ordinal_suffix(n)}",
                f"{small} {_ordinal_suffix(small)}",
                f"{n}th",
            ]
        )
    if topic == 2:  # digit strings spoken one by one, "oh" for zero, years
        return " ".join(
            rng.choice(_ONES[:10] + ["oh", "o", "double", "triple"]) for _ in range(rng.randrange(1, 8))
        )
    if topic == 3:  # decimals and spoken money
        return rng.choice(
            [
                f"{_words(small, rng)} point {' '.join(rng.choices(_ONES[:10], k=rng.randrange(1, 4)))}",
                f"point {rng.choice(_ONES[:10])}",
                f"{_words(small, rng)} dollars and {_words(rng.randrange(1, 100), rng)} cents",
                f"{_words(small, rng)} {rng.choice(_CURRENCY_WORDS)} and {_words(small, rng)} "
                f"{rng.choice(_CURRENCY_WORDS)}",
                f"{_words(small, rng)} and a half",
                f"a {rng.choice(['million', 'thousand', 'hundred'])}",
            ]
        )
    if topic == 4:  # written money and percents
        sym = rng.choice("$£€¢")
        value = rng.choice([f"{n:,}", str(n), f"{small}.{rng.randrange(100):02d}", f"{small / 7:.3f}"])
        return rng.choice(
            [
                f"{sym}{value}",
                f"{value}{sym}",
                f"{sym} {value}",
                f"{value}%",
                f"{value} %",
                f"{sym}{value} {rng.choice(['million', 'billion', 'k', 'm'])}",
                f"-{sym}{value}",
            ]
        )
    if topic == 5:  # times and dates
        h, m = rng.randrange(0, 25), rng.randrange(0, 60)
        return rng.choice(
            [
                f"{h}:{m:02d}",
                f"{h}:{m:02d} {rng.choice(['a.m.', 'p.m.', 'am', 'PM'])}",
                f"{h}{rng.choice(['am', 'pm'])}",
                f"{h}:{m:02d}:{rng.randrange(60):02d}",
                f"{_words(h, rng)} {_words(m, rng)}",
                f"half past {_words(h % 13, rng)}",
                f"quarter to {h % 13}",
                f"{rng.randrange(1, 32)}/{rng.randrange(1, 13)}/{1900 + small}",
                f"{rng.choice(['the', 'in the', ''])} {1900 + 10 * rng.randrange(10)}s",
                f"'{10 * rng.randrange(10)}s",
                f"{_words(1900 + small, rng)}",
                f"{_words(19, rng)} {_words(small, rng)}",
                f"twenty twenty {_ONES[small % 10]}",
            ]
        )
    if topic == 6:  # fractions
        a, b = rng.randrange(1, 10), rng.randrange(2, 17)
        return rng.choice(
            [
                f"{a}/{b}",
                f"{_words(a, rng)} {_ordinal_words(b, rng)}s",
                "½",
                "¾",
                "⅓",
                f"{a} {rng.choice(['½', '1/2', 'and a half'])}",
                f"one {_ordinal_words(b, rng)}",
            ]
        )
    if topic == 7:
        return rng.choice(_CONTRACTIONS)
    if topic == 8:
        return f"{rng.choice(_TITLES)} {rng.choice(['Smith', 'Louis', 'Jones', 'John'])}"
    if topic == 9:  # British and American spellings from Whisper's own table, in any case
        word = rng.choice(spellings)
        return rng.choice([word, word.capitalize(), word.upper(), word + "s", word + "'s", f"({word})"])
    if topic == 10:
        return rng.choice(_FILLERS + _ELLIPSES)
    if topic == 11:
        return rng.choice(_LONE)
    if topic == 12:
        return rng.choice(_GLUED)
    if topic == 13:
        return rng.choice(_UNICODE)
    if topic == 14:
        return rng.choice(_BRACKETS + _HYPHENS)
    return rng.choice(_SYMBOLS + [str(n), f"{n:,}", f"{n} {_words(small, rng)}", f"{_words(small, rng)} {n}"])


_JOINERS = [" ", " ", " ", ", ", ". ", "... ", " - ", "-", "; ", "—", "\n", "  ", "! ", "? ", ": ", "/", "'", '"']  # fmt: skip
_FILLER_TEXT = "the of and to a in is it you that he was for on are with as i his they be at one have this".split()  # fmt: skip


def _synthetic(n: int, seed: int) -> list[str]:
    """`n` sentences of 1-6 fragments (`_fragment`) and common words, joined by punctuation, in
    random case; seeded, so every run tests the same strings."""
    rng = random.Random(seed)
    spellings = sorted({w for pair in normalizers.english_spelling_mapping().items() for w in pair})
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(1, 7)):
            parts.append(_fragment(rng, spellings) if rng.random() < 0.7 else rng.choice(_FILLER_TEXT))
            parts.append(rng.choice(_JOINERS))
        s = "".join(parts[:-1]) + rng.choice(["", "", ".", "!", "?", "...", " ", ","])
        out.append(rng.choice([s, s, s.capitalize(), s.upper(), s.title()]))
    # Every cardinal and ordinal up to 1,000 spelled out, on its own: the number parser's core.
    out += [_words(i, rng) for i in range(1001)] + [_ordinal_words(i, rng) for i in range(1, 1001)]
    return out


# ---------------------------------------------------------------- corpus: real English text on the machine

LOCALE_DIR = Path("/usr/share/locale/fr/LC_MESSAGES")  # any locale: the msgids are the English originals
HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")


def _gettext_msgids() -> list[str]:
    """The English source strings of every gettext catalog of one locale (Debian ships ~60,000:
    command-line help, menus, error messages); empty when none are installed."""
    ids = set()
    for path in sorted(LOCALE_DIR.glob("*.mo")):
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # the parsed .mo, keyed by msgid
        for key in catalog:
            msgid = key[0] if isinstance(key, tuple) else key  # (msgid, n) for plural forms
            ids.add(msgid.split("\x04")[-1])  # "context\x04msgid"
    ids.discard("")  # the catalog header
    return sorted(ids)


def _handbook_sentences() -> list[str]:
    """Sentences of the Debian Administrator's Handbook (HTML), tags dropped; empty when absent."""
    sentences = set()
    for path in sorted(glob.glob(str(HANDBOOK / "*.html"))):
        text = html.unescape(re.sub(r"<[^>]+>", " ", Path(path).read_text(encoding="utf-8")))
        sentences.update(s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip())
    return sorted(sentences)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _synthetic(30_000, seed=17) + _gettext_msgids() + _handbook_sentences()


def _reference_english():
    """Whisper's English normaliser built here, independently of omnitrain's wiring."""
    from importlib.resources import files

    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    table = json.loads(
        (files("whisper_normalizer") / "normalizers" / "english.json").read_text(encoding="utf-8")
    )
    return EnglishTextNormalizer(table)


def _differences(ours, reference, corpus: list[str]) -> list[tuple[str, str, str]]:
    return [
        (s, a, b) for s, a, b in zip(corpus, map(ours, corpus), map(reference, corpus), strict=True) if a != b
    ]


# ---------------------------------------------------------------- tests


def test_the_synthetic_corpus_covers_the_hard_cases():
    strings = _synthetic(3_000, seed=17)
    assert strings == _synthetic(3_000, seed=17)  # deterministic
    text = "\n".join(strings)
    for needle in ["$", "£", "%", "½", "...", "…", "won't", "’", "colour", "twenty", "first", ":", "/", "[", "(",
                   "-", "é", "1st", "mp3", "Mr."]:  # fmt: skip
        assert needle in text, needle


@pytest.mark.slow
def test_whisper_and_basic_normalisers_equal_the_reference_on_a_large_corpus(corpus):
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    assert len(corpus) >= 30_000
    diffs = _differences(get_normalizer("whisper"), _reference_english(), corpus)
    assert not diffs, f"{len(diffs)} of {len(corpus)} differ, e.g. {diffs[:5]}"
    diffs = _differences(get_normalizer("basic"), BasicTextNormalizer(), corpus)
    assert not diffs, f"{len(diffs)} of {len(corpus)} differ, e.g. {diffs[:5]}"


def test_whisper_normaliser_reads_the_spelling_table_and_the_numbers():
    norm = get_normalizer("whisper")
    table = normalizers.english_spelling_mapping()
    assert len(table) == 1739 and table["colour"] == "color"
    assert (
        norm("Mr. Smith paid twenty one dollars for the colour grey.")
        == "mister smith paid $21 for the color gray"
    )
    assert get_normalizer("basic")("The Colour, [noise] twenty-one!") == "the colour twenty one "
    assert get_normalizer("none")("A, b") == "A, b"


def test_unknown_normaliser_names_the_choices():
    with pytest.raises(ValueError, match="'whisper', 'basic', 'none'"):
        get_normalizer("english")


def test_missing_spelling_table_raises_with_the_install_command(monkeypatch):
    normalizers.english_spelling_mapping.cache_clear()
    monkeypatch.setitem(sys.modules, "whisper_normalizer", None)  # as if not installed
    try:
        with pytest.raises(ImportError, match="pip install --no-deps 'whisper-normalizer"):
            get_normalizer("whisper")
    finally:
        normalizers.english_spelling_mapping.cache_clear()


def test_missing_transformers_raises_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers.models.whisper", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        get_normalizer("basic")
    assert get_normalizer("none")("x") == "x"  # needs neither


def test_importing_the_metrics_does_not_import_transformers():
    code = "import sys, omnitrain.eval.metrics; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
