"""Text normalisers applied to references and hypotheses before WER/CER.

Two normalisers that follow the rules of the ones shipped with OpenAI Whisper (so that figures are
comparable with published Whisper-style WER numbers), written here from those rules:

- `BasicTextNormalizer`: any language. Lowercase, drop ``[bracketed]``/``<tagged>``/``(parenthesised)``
  text, turn every mark, symbol and punctuation character (Unicode categories M, S, P) into a space,
  collapse whitespace.
- `EnglishTextNormalizer`: English. The basic steps plus fillers (hmm, uh, um, mm...) removed,
  contractions and titles expanded ("won't" -> "will not", "'s" -> " is" as Whisper does,
  "mr" -> "mister"), spelled-out numbers to digits ("twenty one" -> "21", "one hundred and five" ->
  "105", "twenty first" -> "21st", "two point five" -> "2.5", "five dollars and fifty cents" ->
  "$5.50", "ten percent" -> "10%"), British -> American spelling, diacritics stripped.

The British -> American table is Whisper's ``english.json`` (1,739 entries), read at run time as data
from the PyPI package ``whisper-normalizer`` (MIT); none of that package's code is used.

Known differences from Whisper's implementation (deliberate, documented): a lone "oh"/"o" stays a
word (Whisper writes "oh my" as "0 my"); "$1" stays "$1" (Whisper rewrites every bare "1" as "one",
also inside "$1"); "point five" with no number before it is left as words; "10 one" stays two numbers
(Whisper: "11"); "ninety ninth" is "99th" (Whisper: "90 ninth").
"""

from __future__ import annotations

import json
import re
import unicodedata
from fractions import Fraction
from functools import lru_cache

__all__ = ["BasicTextNormalizer", "EnglishTextNormalizer", "get_normalizer"]

_BRACKETS = re.compile(r"[<\[][^>\]]*[>\]]")  # [laughs], <unk>
_PARENS = re.compile(r"\(([^)]+?)\)")  # (noise)
_SPACES = re.compile(r"\s+")

# Letters that NFKD does not decompose into base letter + combining mark.
_EXTRA_DIACRITICS = {"œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "ß": "ss",
                     "ẞ": "SS", "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "th",
                     "ł": "l", "Ł": "L", "ı": "i"}


def _symbols_to_spaces(s: str, keep: str = "", strip_diacritics: bool = False) -> str:
    """Replaces every Unicode mark/symbol/punctuation character with a space (those in `keep` stay)."""
    s = unicodedata.normalize("NFKD" if strip_diacritics else "NFKC", s)
    out = []
    for c in s:
        if c in keep:
            out.append(c)
        elif strip_diacritics and c in _EXTRA_DIACRITICS:
            out.append(_EXTRA_DIACRITICS[c])
        elif strip_diacritics and unicodedata.category(c) == "Mn":
            continue  # the accent of "é" after NFKD: drop it, keep the "e"
        elif unicodedata.category(c)[0] in "MSP":
            out.append(" ")
        else:
            out.append(c)
    return "".join(out)


class BasicTextNormalizer:
    """Language-agnostic normaliser (Whisper's ``BasicTextNormalizer`` rules).

    Example: ``"Hello, World! [noise] (cough)"`` -> ``"hello world"``.
    """

    def __call__(self, s: str) -> str:
        s = s.lower()
        s = _BRACKETS.sub("", s)
        s = _PARENS.sub("", s)
        s = _symbols_to_spaces(s).lower()
        return _SPACES.sub(" ", s).strip()


# ---------------------------------------------------------------- English: words and contractions

_FILLERS = re.compile(r"\b(hmm|mm|mhm|mmm|uh|um)\b")

# Order matters: whole-word forms first, then perfect tenses, then the generic suffixes.
_CONTRACTIONS: list[tuple[str, str]] = [
    (r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\blet's\b", "let us"),
    (r"\bain't\b", "aint"), (r"\by'all\b", "you all"), (r"\bwanna\b", "want to"),
    (r"\bgotta\b", "got to"), (r"\bgonna\b", "going to"), (r"\bi'ma\b", "i am going to"),
    (r"\bimma\b", "i am going to"), (r"\bwoulda\b", "would have"), (r"\bcoulda\b", "could have"),
    (r"\bshoulda\b", "should have"), (r"\bma'am\b", "madam"),
]
_TITLES = {
    "mr": "mister", "mrs": "missus", "st": "saint", "dr": "doctor", "prof": "professor",
    "capt": "captain", "gov": "governor", "ald": "alderman", "gen": "general", "sen": "senator",
    "rep": "representative", "pres": "president", "rev": "reverend", "hon": "honorable",
    "asst": "assistant", "assoc": "associate", "lt": "lieutenant", "col": "colonel",
    "jr": "junior", "sr": "senior", "esq": "esquire",
}
_CONTRACTIONS += [(rf"\b{short}\b", f"{full} ") for short, full in _TITLES.items()]
_CONTRACTIONS += [
    (r"'d been\b", " had been"), (r"'s been\b", " has been"), (r"'d gone\b", " had gone"),
    (r"'s gone\b", " has gone"), (r"'d done\b", " had done"), (r"'s got\b", " has got"),
    # Generic suffixes. "'s" -> " is" also hits possessives ("john's" -> "john is"); Whisper does
    # the same, and doing it on both sides keeps WER unaffected.
    (r"n't\b", " not"), (r"'re\b", " are"), (r"'s\b", " is"), (r"'d\b", " would"),
    (r"'ll\b", " will"), (r"'t\b", " not"), (r"'ve\b", " have"), (r"'m\b", " am"),
]
_CONTRACTIONS_RE = [(re.compile(p), r) for p, r in _CONTRACTIONS]


@lru_cache(maxsize=1)
def british_to_american() -> dict[str, str]:
    """Whisper's British -> American spelling table, read from the ``whisper-normalizer`` package.

    Raises:
        ImportError: when the package is missing (with the install command).
    """
    from importlib.resources import files

    try:
        path = files("whisper_normalizer") / "normalizers" / "english.json"
        return json.loads(path.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ImportError(
            "the English WER normaliser reads its British -> American spelling table from the PyPI "
            "package whisper-normalizer: pip install 'whisper-normalizer==0.1.15' "
            "(or use normalizer='basic')"
        ) from e


# ---------------------------------------------------------------- English: numbers

_ONES = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
_MULTIPLIERS = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9,
                "trillion": 10**12, "quadrillion": 10**15}
_IRREGULAR_ORDINALS = {1: "first", 2: "second", 3: "third", 5: "fifth", 8: "eighth", 9: "ninth", 12: "twelfth"}
_ORDINALS = {_IRREGULAR_ORDINALS.get(n, w + "th"): n for w, n in _ONES.items() if n > 0}  # "fourth"
_ORDINALS.update({w[:-1] + "ieth": n for w, n in _TENS.items()})  # twentieth
_ORDINALS.update({w + "th": n for w, n in _MULTIPLIERS.items()})  # hundredth
_PLURAL_TENS = {w[:-1] + "ies": n for w, n in _TENS.items()}  # "the sixties" -> "60s"
_CURRENCY = {"dollar": "$", "dollars": "$", "pound": "£", "pounds": "£", "euro": "€", "euros": "€",
             "cent": "¢", "cents": "¢"}
_DIGIT_WORD = {w: str(n) for w, n in _ONES.items() if n < 10} | {"oh": "0", "o": "0"}
_NUMBER_WORDS = set(_ONES) | set(_TENS) | set(_MULTIPLIERS) | set(_ORDINALS)
_ARABIC = re.compile(r"^([$£€¢]?)(\d+(?:\.\d+)?)$")
_AND_A_HALF = re.compile(rf"(\b(?:{'|'.join(sorted(set(_ONES) | set(_TENS) | set(_MULTIPLIERS)))}|\d+)\s+)and a half\b")


def _suffix(n: int) -> str:
    if n % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _concat_or_add(value: int | str | None, n: int, place: int, prev: str | None) -> int | str:
    """Adds `n` into the empty low places of `value` ("twenty" + "one" = 21), else writes the digits
    after it ("one" "two" = "12", "nineteen" "sixty" = "1960"), as Whisper reads spoken numbers."""
    if value is None:
        return n
    if isinstance(value, str) or prev in _ONES and n < 100:
        if isinstance(value, str) and prev in _TENS and n < 10 and value.endswith("0"):
            return value[:-1] + str(n)  # "twenty twenty one" -> "2021"
        return str(value) + str(n)
    if value % place == 0:
        return value + n
    return str(value) + str(n)


def _times(value: int | str | None, mult: int) -> int | str:
    """Multiplies: "two hundred" -> 200, "one thousand two hundred" -> 1200, "2.5 million" -> 2500000."""
    if value is None:
        return mult
    if isinstance(value, str):
        f = Fraction(value) * mult
        return int(f) if f.denominator == 1 else str(float(f))
    return value // mult * mult + (value % mult) * mult


class _NumberParser:
    """Turns spelled-out numbers in a lowercased, punctuation-free word list into digits."""

    def __call__(self, words: list[str]) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(words):
            j, text = self._number(words, i)
            if j == i:
                out.append(words[i])
                i += 1
            else:
                out.append(text)
                i = j
        return out

    def _number(self, words: list[str], i: int, units: bool = True) -> tuple[int, str]:
        """Reads the longest number phrase at `i`; returns (end index, its text) or (i, "").

        With `units`, a following "percent" or currency word is folded in ("$5", "10%")."""
        value: int | str | None = None
        prefix = ""  # "$" of "$5"
        prev: str | None = None
        j = i
        while j < len(words):
            w, nxt = words[j], (words[j + 1] if j + 1 < len(words) else None)
            if prev is not None and _ARABIC.match(prev) and w not in _MULTIPLIERS:
                break  # "10 one" is two numbers; "2.5 million" is one
            m = _ARABIC.match(w)
            if m and value is None:
                prefix, digits = m.groups()
                value = int(digits) if "." not in digits else digits
            elif w in ("zero", "oh", "o") and (w == "zero" or value is not None or nxt in _ONES):
                value = str(value if value is not None else "") + "0"  # "one oh one" -> "101"
            elif w in _ONES:
                value = _concat_or_add(value, _ONES[w], 10 if _ONES[w] < 10 else 100, prev)
            elif w in _TENS:
                value = _concat_or_add(value, _TENS[w], 100, prev)
            elif w in _MULTIPLIERS:
                value = _times(value, _MULTIPLIERS[w])
            elif w in _ORDINALS or w in _PLURAL_TENS:
                n = _ORDINALS.get(w) or _PLURAL_TENS[w]
                if n in _MULTIPLIERS.values():
                    value = _times(value, n)
                else:
                    value = _concat_or_add(value, n, 10 if n < 10 else 100, prev)
                tail = "s" if w in _PLURAL_TENS else _suffix(int(str(value)[-2:]))
                return j + 1, prefix + str(value) + tail
            elif w == "and" and prev in _MULTIPLIERS and nxt in _NUMBER_WORDS - set(_MULTIPLIERS):
                pass  # "one hundred and five"
            elif w == "point" and value is not None and nxt in _DIGIT_WORD:
                digits = ""
                while j + 1 < len(words) and words[j + 1] in _DIGIT_WORD:
                    j += 1
                    digits += _DIGIT_WORD[words[j]]
                value = f"{value}.{digits}"
            else:
                break
            prev = w
            j += 1
        if value is None:
            return i, ""
        text = str(value)
        rest = words[j:]
        if not units:
            return j, text
        if rest[:1] == ["percent"] or rest[:2] == ["per", "cent"]:
            return j + (1 if rest[0] == "percent" else 2), text + "%"
        if not prefix and rest and rest[0] in _CURRENCY:
            symbol = _CURRENCY[rest[0]]
            j += 1
            if symbol != "¢" and words[j:j + 1] == ["and"]:
                k, cents = self._number(words, j + 1, units=False)  # "five dollars and fifty cents" -> "$5.50"
                if k > j + 1 and words[k:k + 1] and words[k] in ("cent", "cents") and cents.isdigit():
                    return k + 1, f"{symbol}{text}.{int(cents):02d}"
            return j, symbol + text
        return j, prefix + text


class EnglishTextNormalizer:
    """English normaliser following Whisper's ``EnglishTextNormalizer`` rules (see module docstring).

    Example: ``"Mr. Smith won't pay twenty one dollars for the colour grey, um."`` ->
    ``"mister smith will not pay $21 for the color gray"``.
    """

    def __init__(self) -> None:
        self._spelling = british_to_american()
        self._numbers = _NumberParser()

    def __call__(self, s: str) -> str:
        s = s.lower()
        s = _BRACKETS.sub("", s)
        s = _PARENS.sub("", s)
        s = _FILLERS.sub("", s)
        s = re.sub(r"\s+'", "'", s)  # "don 't" -> "don't"
        s = s.replace("’", "'")
        for pattern, repl in _CONTRACTIONS_RE:
            s = pattern.sub(repl, s)
        s = re.sub(r"(\d),(\d)", r"\1\2", s)  # "1,234" -> "1234"
        s = re.sub(r"\.([^0-9]|$)", r" \1", s)  # periods that are not decimal points
        s = _symbols_to_spaces(s, keep=".%$¢€£", strip_diacritics=True)
        # Digits glued to letters get a space ("10kg" -> "10 kg"), except ordinal/plural suffixes.
        s = re.sub(r"([a-z])([0-9])", r"\1 \2", s)
        s = re.sub(r"([0-9])([a-z])", r"\1 \2", s)
        s = re.sub(r"([0-9])\s+(st|nd|rd|th|s)\b", r"\1\2", s)
        s = _AND_A_HALF.sub(r"\1point five", s)  # "three and a half" -> "3.5"
        words = self._numbers(s.split())
        words = [self._spelling.get(w, w) for w in words]
        s = " ".join(words)
        s = re.sub(r"(?<![$£€¢.\d])\b1(s?)\b(?![.\d%])", r"one\1", s)  # readability
        # Symbols left that are not attached to a number ("$ sign", "50 %") go.
        s = re.sub(r"[.$¢€£]([^0-9])", r" \1", s + " ")
        s = re.sub(r"([^0-9])%", r"\1 ", s)
        return _SPACES.sub(" ", s).strip()


def get_normalizer(name: str):
    """Returns the normaliser called `name`: ``"whisper"`` (English), ``"basic"`` or ``"none"``.

    Raises:
        ValueError: for any other name.
    """
    if name == "whisper":
        return EnglishTextNormalizer()
    if name == "basic":
        return BasicTextNormalizer()
    if name == "none":
        return lambda s: s
    raise ValueError(f"normalizer={name!r} is not one of 'whisper', 'basic', 'none'")
