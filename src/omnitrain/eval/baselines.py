"""Classical baselines that put the model's eval numbers in context: pocketsphinx for ASR, tesseract
plus a transparent key-value heuristic for document QA. Both run offline on CPU. Also the systems
``omnitrain eval`` runs in a model's place (``model.kind=pocketsphinx | tesseract``, or none: samples
scored as they are).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from math import gcd
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import soundfile as sf
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    from omnitrain.eval.harness import ModelSpec

__all__ = ["PocketsphinxASR", "TesseractDocQA", "OcrWord"]

SAMPLE_RATE = 16_000


class PocketsphinxASR:
    """CMU pocketsphinx with the US English model that the PyPI wheel ships (~1-2 s per utterance).

    Raises:
        ImportError: when the ``pocketsphinx`` package is missing (with the pip command).
    """

    def __init__(self, **decoder_options) -> None:
        try:
            from pocketsphinx import Decoder  # pocketsphinx: optional (the eval extra)
        except ImportError as e:
            raise ImportError("the ASR baseline needs pocketsphinx: pip install 'pocketsphinx>=5.0'") from e
        self._decoder = Decoder(samprate=SAMPLE_RATE, loglevel="FATAL", **decoder_options)

    def transcribe(self, audio_paths: list[str]) -> list[str]:
        """Lowercase transcripts, one per audio file (any rate or channel count: resampled to 16 kHz mono)."""
        return [self._one(p) for p in audio_paths]

    def _one(self, path: str) -> str:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        if sr != SAMPLE_RATE:
            # scipy.signal: ~0.6 s to import, only for audio not at 16 kHz
            from scipy.signal import resample_poly

            g = gcd(sr, SAMPLE_RATE)
            mono = resample_poly(mono, SAMPLE_RATE // g, sr // g)
        pcm = (np.clip(mono, -1, 1) * 32767).astype(np.int16)
        d = self._decoder
        d.start_utt()
        d.process_raw(pcm.tobytes(), full_utt=True)
        d.end_utt()
        hyp = d.hyp()
        return hyp.hypstr.lower() if hyp is not None else ""


class OcrWord:
    """One word tesseract found: its text and horizontal extent in pixels."""

    __slots__ = ("text", "left", "right", "height")

    def __init__(self, text: str, left: int, right: int, height: int) -> None:
        self.text, self.left, self.right, self.height = text, left, right, height

    def __repr__(self) -> str:
        return f"OcrWord({self.text!r}, {self.left}-{self.right})"


# Words that carry no field name in the questions the generator and DocVQA ask.
_STOP = set("what is the of a an which who whom on in at to does do did was were for this that "
            "applicant's applicant page document form value".split())  # fmt: skip
# Label abbreviations written out before matching ("Invoice No." -> "invoice number").
_LABEL_WORDS = {"no": "number", "#": "number", "nr": "number", "num": "number", "dob": "date of birth",
                "tel": "phone", "e-mail": "email", "qty": "quantity", "amt": "amount"}  # fmt: skip


def _words(s: str) -> list[str]:
    out = []
    for w in re.findall(r"[a-z0-9#@'\-]+", s.lower()):
        out += _LABEL_WORDS.get(w.strip("'"), w).split()
    return out


class TesseractDocQA:
    """Answers a question about a page by OCR plus a key-value lookup.

    The heuristic, in order:

    1. OCR the page with ``tesseract --psm 4`` (TSV: words with boxes, grouped into lines). When it
       reads fewer than 10 words, OCR it again after a 3x3 median filter: tesseract reads nothing
       on many noisy pages, while the filter hurts small clean text (measured: ANLS 0.45 always
       filtered vs 0.56 never filtered on 30 noisy pages).
    2. Split every line into cells at horizontal gaps wider than the text height (columns).
    3. Table questions ("What is the <column> value for <row>?"): the cell of the row whose first
       cell matches <row>, under the header cell that matches <column>.
    4. Other questions: every cell is a candidate label; its value is the next cell on the line, or
       the next line when the label ends its line. The label whose words best match the question's
       content words (stop words and non-words dropped, "No."/"#" read as "number") wins; ties go to
       the label that starts with the question's first content word, then to the shorter label.
       The first line (title or issuer) is never a label.
    5. "Which company issued ...?", or no label shares a word with the question: the page's first
       cell (the issuer's name or the title) is returned.

    Raises:
        RuntimeError: when the tesseract binary or its language data is missing (with apt names).
    """

    def __init__(
        self, lang: str = "eng", psm: int = 4, denoise: bool = True, tesseract_cmd: str = "tesseract"
    ) -> None:
        self.cmd = shutil.which(tesseract_cmd)
        if self.cmd is None:
            raise RuntimeError(
                "the OCR baseline needs tesseract: apt-get install --no-install-recommends "
                f"tesseract-ocr tesseract-ocr-{lang}"
            )
        self.lang, self.psm, self.denoise = lang, psm, denoise
        self._ocr = lru_cache(maxsize=64)(self._run_ocr)  # several questions per page: OCR once

    def answer(self, image_path: str, question: str) -> str:
        """The value of the field the question names, as read from the page ("" if none found)."""
        lines = self._ocr(str(image_path))
        if not lines:
            return ""
        cells = [self._cells(line) for line in lines]
        if re.search(r"\bwhich company\b|\bissued\b", question, re.IGNORECASE):
            return cells[0][0][0] if cells[0] else ""
        table = re.match(r"what is the (.+?) value for (.+?)\??$", question.strip(), re.IGNORECASE)
        if table:
            return self._table_cell(cells, table.group(1), table.group(2))
        return self._key_value(cells, question)

    def ocr_text(self, image_path: str) -> str:
        """The page's OCR text, one line per OCR line (for inspection)."""
        return "\n".join(" ".join(w.text for w in line) for line in self._ocr(str(image_path)))

    def _run_ocr(self, image_path: str) -> list[list[OcrWord]]:
        if not Path(image_path).is_file():
            raise FileNotFoundError(image_path)
        lines = self._tesseract(image_path)
        if self.denoise and sum(len(line) for line in lines) < 10:
            with tempfile.TemporaryDirectory() as tmp:
                page = Path(tmp) / "page.png"
                Image.open(image_path).convert("L").filter(ImageFilter.MedianFilter(3)).save(page)
                lines = self._tesseract(str(page))
        return lines

    def _tesseract(self, image_path: str) -> list[list[OcrWord]]:
        run = subprocess.run(
            [self.cmd, image_path, "stdout", "-l", self.lang, "--psm", str(self.psm), "tsv"],
            capture_output=True, text=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"},
        )  # fmt: skip  (tesseract's OpenMP threads only slow it down on a shared 2-core machine)
        if run.returncode != 0:
            raise RuntimeError(
                f"tesseract failed on {image_path}: {run.stderr.strip()[-300:]} (language data: "
                f"apt-get install tesseract-ocr-{self.lang})"
            )
        lines: dict[tuple[int, int, int], list[OcrWord]] = {}
        for row in run.stdout.splitlines()[1:]:
            f = row.split("\t")
            if len(f) < 12 or f[0] != "5" or not f[11].strip():
                continue
            left, width, height = int(f[6]), int(f[8]), int(f[9])
            lines.setdefault((int(f[2]), int(f[3]), int(f[4])), []).append(
                OcrWord(f[11].strip(), left, left + width, height)
            )
        return [sorted(ws, key=lambda w: w.left) for _, ws in sorted(lines.items())]

    @staticmethod
    def _cells(line: list[OcrWord]) -> list[tuple[str, float]]:
        """(text, x centre) of each column cell; a "Label: value" cell is split at its colon."""
        height = sorted(w.height for w in line)[len(line) // 2]
        groups: list[list[OcrWord]] = [[line[0]]]
        for w in line[1:]:
            if w.left - groups[-1][-1].right > 1.0 * height:
                groups.append([w])
            else:
                groups[-1].append(w)
        cells = []
        for g in groups:
            text = " ".join(w.text for w in g)
            label, colon, value = text.partition(":")
            centre = (g[0].left + g[-1].right) / 2
            if colon and label and value.strip():
                cells += [(label + ":", centre), (value.strip(), centre)]
            else:
                cells.append((text, centre))
        return cells

    @staticmethod
    def _table_cell(cells: list[list[tuple[str, float]]], column: str, row: str) -> str:
        col, rowname = column.strip().lower(), row.strip().lower()
        header = next((c for c in cells if any(t.lower() == col for t, _ in c)), None)
        body = next((c for c in cells if c and c[0][0].lower().rstrip(":") == rowname), None)
        if header is None or body is None or len(body) < 2:
            return ""
        x = next(x for t, x in header if t.lower() == col)
        return min(body[1:], key=lambda c: abs(c[1] - x))[0]

    @staticmethod
    def _key_value(cells: list[list[tuple[str, float]]], question: str) -> str:
        wanted = [w for w in _words(question) if w not in _STOP]
        best, best_key = "", (0.0, False, 0)
        for i, line in enumerate(cells):
            if i == 0 and len(cells) > 1:
                continue  # the first line is the title or issuer, never a label
            for j, (label, _) in enumerate(line):
                lw = [w for w in _words(label) if w not in _STOP and w.isalpha()]  # "Tax (5%)" -> tax
                if not lw:
                    continue
                hits = sum(1 for w in set(lw) if w in wanted or any(_stem(w) == _stem(q) for q in wanted))
                if not hits:
                    continue
                if j + 1 < len(line):
                    value = line[j + 1][0]
                elif j == len(line) - 1 and i + 1 < len(cells) and cells[i + 1]:
                    value = cells[i + 1][0][0]
                else:
                    continue
                # precision + recall of the label's words against the question's; then a label that
                # starts with the question's first content word ("tax amount" -> "Tax", not "Amount")
                first = bool(wanted) and _stem(lw[0]) == _stem(wanted[0])
                score = (hits / len(set(lw)) + hits / max(1, len(set(wanted))), first, -len(lw))
                if score > best_key:
                    best, best_key = value, score
        if best_key[0] == 0.0:
            return cells[0][0][0] if cells and cells[0] else ""
        return best


def _stem(w: str) -> str:
    """Crude suffix stripping so "billed" meets "bill" and "signed" meets "sign"."""
    return re.sub(r"(ing|ed|es|s)$", "", w) if len(w) > 4 else w


# ----------------------------------------------------------------------------- systems in a model's place
def _baseline_info(kind: str, spec: ModelSpec) -> dict[str, Any]:
    """results.json's model block for a baseline system: no checkpoint, no layout."""
    return {"kind": kind, "path": None, "checkpoint_step": None, "layout_hash": None, "name": spec.name or kind}


class PocketsphinxSystem:
    """The ASR baseline (PyPI pocketsphinx, its bundled US English model): transcripts only."""

    kind = "asr"

    def __init__(self, spec: ModelSpec) -> None:
        self.asr = PocketsphinxASR()
        self.info = _baseline_info("pocketsphinx", spec)

    def transcribe(self, paths: list[str]) -> list[str]:
        return self.asr.transcribe(paths)


class TesseractSystem:
    """The OCR baseline for document QA (Debian tesseract-ocr): its answer to (page, question)."""

    kind = "docqa"

    def __init__(self, spec: ModelSpec) -> None:
        self.qa = TesseractDocQA()
        self.info = _baseline_info("tesseract", spec)

    def answer(self, image_path: str, question: str) -> str:
        return self.qa.answer(image_path, question)


class SamplesOnly:
    """No model: every task scores completions made elsewhere (``humaneval.samples``)."""

    kind = "samples"

    def __init__(self, spec: ModelSpec, samples: list[str]) -> None:
        self.info = _baseline_info("samples", spec)
        self.info.update(path=", ".join(samples), name=spec.name or ", ".join(Path(s).stem for s in samples))
