"""Real text that ships with Debian packages, for offline tests, the demo and the tokenizer report.

* :func:`gettext_parallel`: aligned UI strings in many languages, read from the gettext catalogs
  of ``iso-codes``, ``libgtk2.0-common`` and ``libglib2.0-data`` (``/usr/share/locale``); English
  is the msgid itself. Every entry is assigned for good to a ``train`` or ``heldout`` split by a
  hash of its key, so a tokenizer trained on ``train`` is measured on text it never saw.
* :func:`handbook_text`: book prose from ``debian-handbook`` (HTML, tags stripped).

Online, any text dataset does the same job; these exist so that everything runs without a network.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from omnitrain.sources.text import html_to_text

LOCALE_DIR = Path("/usr/share/locale")
HANDBOOK_DIR = Path("/usr/share/doc/debian-handbook/html")
# The 20 languages GPT-4o's tokenizer announcement cites, in its order.
GPT4O_LANGUAGES = ("gu", "te", "ta", "mr", "hi", "ur", "ar", "fa", "ru", "ko", "vi", "zh", "ja", "tr", "it", "de", "es", "pt", "fr", "en")
DEFAULT_DOMAINS = ("gtk20", "gtk20-properties", "glib20", "iso_3166-1", "iso_639-3", "gdk-pixbuf")
_LOCALE_ALIASES = {"zh": ("zh_CN", "zh_Hans"), "pt": ("pt", "pt_BR")}
_APT_HINT = "install the Debian packages iso-codes libgtk2.0-common libglib2.0-data (bash setup.sh does, as root)"


def read_mo(path: Path) -> dict[str, str]:
    """msgid -> msgstr of a compiled gettext catalog (.mo), first plural form, context dropped."""
    data = path.read_bytes()
    if len(data) < 28:
        raise ValueError(f"{path} is not a gettext .mo file (too short)")
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic == 0x950412DE else ">" if magic == 0xDE120495 else None
    if endian is None:
        raise ValueError(f"{path} is not a gettext .mo file (bad magic {magic:#x})")
    n, orig_off, trans_off = struct.unpack(endian + "3I", data[8:20])
    out = {}
    for i in range(n):
        olen, ooff = struct.unpack(endian + "2I", data[orig_off + 8 * i : orig_off + 8 * i + 8])
        tlen, toff = struct.unpack(endian + "2I", data[trans_off + 8 * i : trans_off + 8 * i + 8])
        msgid = data[ooff : ooff + olen].decode("utf-8", "replace").split("\x00")[0].split("\x04")[-1]
        msgstr = data[toff : toff + tlen].decode("utf-8", "replace").split("\x00")[0]
        if msgid and msgstr:  # the empty msgid holds the catalog header
            out[msgid] = msgstr
    return out


def _locale_dirs(lang: str) -> list[Path]:
    return [LOCALE_DIR / d / "LC_MESSAGES" for d in _LOCALE_ALIASES.get(lang, (lang,))]


def split_of(key: str, heldout_percent: int = 30) -> str:
    """'heldout' for a stable ``heldout_percent`` of keys, else 'train'."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < heldout_percent else "train"


def gettext_parallel(langs: tuple[str, ...] | list[str] = GPT4O_LANGUAGES, domains: tuple[str, ...] = DEFAULT_DOMAINS) -> dict[str, dict[str, str]]:
    """lang -> {"domain/msgid": text}. English maps each msgid to itself.

    Raises:
        FileNotFoundError: when no catalog exists for a language (with the install hint).
    """
    english: dict[str, str] = {}
    out: dict[str, dict[str, str]] = {}
    for lang in langs:
        if lang == "en":
            continue
        entries: dict[str, str] = {}
        for domain in domains:
            for d in _locale_dirs(lang):
                mo = d / f"{domain}.mo"
                if mo.is_file():
                    for msgid, msgstr in read_mo(mo).items():
                        entries[f"{domain}/{msgid}"] = msgstr
                        english[f"{domain}/{msgid}"] = msgid
                    break
        if not entries:
            raise FileNotFoundError(f"no gettext catalogs for language '{lang}' under {LOCALE_DIR}: {_APT_HINT}")
        out[lang] = entries
    if "en" in langs:
        out["en"] = english
    return out


def heldout_texts(langs: tuple[str, ...] | list[str] = GPT4O_LANGUAGES, split: str = "heldout", aligned: bool = False) -> dict[str, list[str]]:
    """lang -> the strings of one split, in a stable order.

    With ``aligned`` only the entries translated in *every* language are kept, so each language
    says exactly the same thing (few entries: Urdu has ~240 strings); without it each language
    keeps all its entries of the split (the catalogs translate the same UI strings, so the text is
    of the same kind, but the amount differs per language).
    """
    par = gettext_parallel(langs)
    keys = set.intersection(*(set(v) for v in par.values())) if aligned else None
    out = {}
    for lang in langs:
        chosen = sorted(k for k in (keys if aligned else par[lang]) if split_of(k) == split)
        if not chosen:
            raise ValueError(f"no {split} gettext entries for '{lang}'{' shared by all languages' if aligned else ''}")
        out[lang] = [par[lang][k] for k in chosen]
    return out


def handbook_text(lang_dir: str = "en-US", max_chars: int | None = None) -> list[str]:
    """Chapters of the Debian Administrator's Handbook as plain text, one string per HTML page."""
    root = HANDBOOK_DIR / lang_dir
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: install the Debian package debian-handbook (setup.sh does, as root)")
    docs, total = [], 0
    for page in sorted(root.glob("*.html")):
        text = html_to_text(page.read_text(encoding="utf-8", errors="replace"))
        if text:
            docs.append(text)
            total += len(text)
        if max_chars and total >= max_chars:
            break
    return docs


def write_tokenizer_corpus(out_dir: Path, langs: tuple[str, ...] | list[str] = GPT4O_LANGUAGES, handbook_chars: int = 3_000_000) -> list[Path]:
    """Write a multilingual training corpus as jsonl: the *train* split of every language's gettext
    strings (one document per language and catalog domain) plus English handbook prose."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "corpus.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for lang, entries in gettext_parallel(langs).items():
            by_domain: dict[str, list[str]] = {}
            for key, text in entries.items():
                if split_of(key) == "train":
                    by_domain.setdefault(key.split("/", 1)[0], []).append(text)
            for domain, texts in sorted(by_domain.items()):
                f.write(json.dumps({"text": "\n".join(texts), "source": f"gettext/{lang}/{domain}"}, ensure_ascii=False) + "\n")
        for doc in handbook_text(max_chars=handbook_chars) if handbook_chars > 0 else []:
            f.write(json.dumps({"text": doc, "source": "debian-handbook/en-US"}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return [path]
