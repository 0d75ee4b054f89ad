"""The demo's corpus, made on the spot from local packages: every item has known content, so the
held-out splits can be scored exactly.

* reading: digit strings rendered with DejaVu / Liberation monospace fonts (caption = the digits);
* forms: small rendered documents of ``KEY value`` lines with a question about one field (doc QA);
* speech: flite-synthesised sentences (from the Debian handbook) and spoken digit strings in several
  voices; the real LibriVox clips of ``pocketsphinx-testdata`` are read by their own pipeline;
* text: Debian handbook pages; real photos: scikit-image's samples.

Rendering puts each character in a 16 x 24 pixel cell, two by three image codes at the tokenizers'
8-pixel downsampling, so a tiny model learns to read in minutes (measured: see the demo's report).
Held-out contents are drawn first and never appear in a training split. Each split is a jsonl of
records with paths relative to it, the input of ``data_pipelines/pipeline/records.yaml``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from omnitrain.sources.text import html_to_text

FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation2"))
FONTS = ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "LiberationMono-Regular.ttf", "LiberationMono-Bold.ttf")
CELL_W, CELL_H, FONT_SIZE = 16, 24, 20
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
# form fields: key printed on the page, the name the question uses, how a value is drawn
FORM_FIELDS = {
    "NO": ("number", lambda r: f"{r.randrange(1000):03d}"),
    "QTY": ("quantity", lambda r: f"{r.randrange(100):02d}"),
    "DAY": ("day", lambda r: r.choice(DAYS)),
    "BOX": ("box", lambda r: r.choice("ABCDEFGH") + str(r.randrange(10))),
}
# what `omnitrain eval`'s docvqa task puts after the question (omnitrain.eval.tasks.DocVQAConfig.prompt):
# the training samples carry it too, so the model sees at evaluation the prompt it was trained with
DOCQA_PROMPT = "Answer the question using a single word or phrase."
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
# spoken questions: relation -> (what the answer adds to the digit, the question's words)
RELATIONS = {"after": (1, "what comes after {}"), "before": (-1, "what comes before {}")}
# flite duration_stretch (speaking rate) of the questions: held-out questions are spoken at rates between the
# training ones, so no held-out utterance is ever heard in training while every fact is (a 2-core model learns
# to recognise a spoken digit at a new rate; it cannot learn counting from 18 facts with some held out)
S2S_TRAIN_RATES = (0.8, 0.9, 1.0, 1.1, 1.2)
S2S_TEST_RATES = (0.85, 0.95, 1.05, 1.15)
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "horse", "motorcycle_left", "brick", "coins", "moon", "page")


@dataclass
class CorpusConfig:
    """How much of each kind to make (train / held out); the defaults are the full demo's."""

    digits_train: int = 2000  # rendered digit strings (reading / captioning, and text -> image)
    digits_test: int = 50
    digits_length: int = 3
    forms_train: int = 1200  # rendered forms with a question (document QA)
    forms_test: int = 50
    speech_digits_train: int = 600  # spoken digit strings
    speech_digits_test: int = 40
    sentences_train: int = 300  # spoken handbook sentences
    sentences_test: int = 20
    voices: list[str] = field(default_factory=lambda: ["kal16", "slt", "rms", "awb"])
    text_docs: int = 40  # handbook pages for language modelling
    text_test_docs: int = 4  # further pages, held out for perplexity
    # spoken questions answered in speech ("what comes after four" -> "five"): see make_spoken_questions
    s2s_train: int = 360  # training questions, distinct (relation, digit, voice, rate) renderings
    s2s_test: int = 30  # held-out questions, spoken at rates never heard in training
    tts_test: int = 20  # held-out digit strings (the first of speech_digits_test) the model speaks, for TTS intelligibility
    s2s_relations: list[str] = field(default_factory=lambda: ["after", "before"])  # of RELATIONS
    s2s_monologue: bool = True  # the assistant writes its answer's text before speaking it (Moshi's inner monologue)
    assistant_voice: str = "awb"  # the one voice answers and TTS speak in (pocketsphinx: 10 of 10 digit words, see README)
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [r for r in self.s2s_relations if r not in RELATIONS]
        if bad or not self.s2s_relations:
            raise ValueError(f"data.s2s_relations={self.s2s_relations}: give one or more of {sorted(RELATIONS)}")
        if self.assistant_voice not in self.voices:
            raise ValueError(f"data.assistant_voice={self.assistant_voice!r} is not among data.voices={self.voices}: "
                             "pick one of them (flite voices: kal16, slt, rms, awb)")  # fmt: skip


# ----------------------------------------------------------------------------- rendering
def font_paths() -> list[Path]:
    found = [d / f for f in FONTS for d in FONT_DIRS if (d / f).is_file()]
    if not found:
        raise FileNotFoundError(f"no monospace font among {FONTS} in {[str(d) for d in FONT_DIRS]}: "
                                "install fonts-dejavu-core / fonts-liberation2 (bash setup.sh does, as root)")  # fmt: skip
    return found


def render_lines(lines: list[str], font: Path, rng: random.Random, width_cells: int | None = None) -> Image.Image:
    """Text lines -> a grayscale-looking RGB image, one character per 16 x 24 cell, light noise."""
    cols = width_cells or max(map(len, lines))
    w, h = cols * CELL_W, len(lines) * CELL_H
    bg, ink = rng.randint(200, 255), rng.randint(0, 70)
    img = Image.new("L", (w, h), bg)
    draw = ImageDraw.Draw(img)
    face = ImageFont.truetype(str(font), FONT_SIZE)
    for row, line in enumerate(lines):
        for col, ch in enumerate(line):
            if ch == " ":
                continue
            dx, dy = rng.randint(-1, 1), rng.randint(-1, 1)  # slight jitter: no two renderings are identical
            x, y = col * CELL_W + CELL_W / 2 + dx, row * CELL_H + CELL_H / 2 + dy
            draw.text((x, y), ch, fill=ink, font=face, anchor="mm")
    arr = np.asarray(img, dtype=np.float32) + np.random.default_rng(rng.randrange(2**32)).normal(0, 6, (h, w))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert("RGB")


def _distinct(rng: random.Random, n: int, draw: Any, exclude: set[str]) -> list[str]:
    """n distinct values of ``draw(rng)`` not in ``exclude`` (fewer if the space runs out)."""
    out: list[str] = []
    seen = set(exclude)
    for _ in range(50 * n + 100):
        if len(out) == n:
            break
        v = draw(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_digits(out: Path, n_train: int, n_test: int, length: int, seed: int) -> dict[str, Path]:
    """Rendered digit strings: ``{split}.jsonl`` rows ``{id, image, caption}`` (caption: the digits).
    The held-out strings never occur in the training split."""
    rng, fonts = random.Random(seed), font_paths()
    digits = lambda r: "".join(str(r.randrange(10)) for _ in range(length))  # noqa: E731
    test = _distinct(rng, n_test, digits, set())
    train_space = [s for s in (f"{i:0{length}d}" for i in range(10**length)) if s not in set(test)]
    train = [rng.choice(train_space) for _ in range(n_train)]  # repeats are other renderings (font, jitter, noise)
    paths = {}
    for split, values in (("test", test), ("train", train)):
        rows = []
        for i, v in enumerate(values):
            name = f"{split}/{i:05d}.png"
            (out / split).mkdir(parents=True, exist_ok=True)
            render_lines([v], fonts[i % len(fonts)], rng).save(out / name)
            rows.append({"id": f"digits-{split}-{i}", "image": name, "caption": v})
        paths[split] = _write_jsonl(out / f"{split}.jsonl", rows)
    return paths


def make_forms(out: Path, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """Rendered forms of three ``KEY value`` lines: ``{split}.jsonl`` rows ``{id, image, question,
    answer, answers, prompted_question, fields}``; the held-out pages (their whole content) never occur in training."""
    rng, fonts = random.Random(seed + 1), font_paths()

    def page(r: random.Random) -> str:
        keys = r.sample(sorted(FORM_FIELDS), 3)
        return "|".join(f"{k} {FORM_FIELDS[k][1](r)}" for k in keys)

    test = _distinct(rng, n_test, page, set())
    train = _distinct(rng, n_train, page, set(test))
    paths = {}
    for split, pages in (("test", test), ("train", train)):
        rows = []
        for i, content in enumerate(pages):
            lines = content.split("|")
            fields = dict(line.split(" ", 1) for line in lines)
            key = rng.choice(sorted(fields))
            name = f"{split}/{i:05d}.png"
            (out / split).mkdir(parents=True, exist_ok=True)
            render_lines(lines, fonts[i % len(fonts)], rng, width_cells=8).save(out / name)
            question = f"What is the {FORM_FIELDS[key][0]}?"
            rows.append({"id": f"forms-{split}-{i}", "image": name, "question": question, "answer": fields[key], "answers": [fields[key]],
                         "prompted_question": f"{question}\n{DOCQA_PROMPT}", "fields": fields})  # fmt: skip
        paths[split] = _write_jsonl(out / f"{split}.jsonl", rows)
    return paths


# ----------------------------------------------------------------------------- speech
def spoken_digits(s: str) -> str:
    return " ".join(DIGIT_WORDS[int(c)] for c in s)


def handbook_sentences(pages: list[Path], min_words: int = 4, max_words: int = 9) -> list[str]:
    """Short plain sentences (letters, spaces, commas) from handbook pages, in page order, distinct."""
    out, seen = [], set()
    for page in pages:
        for sent in re.split(r"(?<=[.!?])\s+", html_to_text(page.read_text(encoding="utf-8", errors="replace"))):
            sent = " ".join(sent.split())
            if re.fullmatch(r"[A-Z][A-Za-z ,']+[.]", sent) and min_words <= len(sent.split()) <= max_words and sent not in seen:
                seen.add(sent)
                out.append(sent)
    return out


def synthesize(items: list[tuple], workers: int = 2) -> None:
    """(text, voice, wav path[, duration stretch]) -> flite WAVs (16 kHz or 8 kHz mono, as the voice speaks);
    a stretch above 1 speaks slower."""
    if shutil.which("flite") is None:
        raise FileNotFoundError("flite is not installed: apt-get install flite (bash setup.sh does, as root)")

    def one(item: tuple) -> None:
        text, voice, path, *stretch = item
        rate = ["--setf", f"duration_stretch={stretch[0]}"] if stretch else []
        subprocess.run(["flite", "-voice", voice, *rate, "-t", text, "-o", path], check=True, capture_output=True)

    with ThreadPoolExecutor(workers) as pool:
        list(tqdm(pool.map(one, items), total=len(items), desc="flite", unit=" utterances", mininterval=2.0))


def make_speech(out: Path, cfg: CorpusConfig, sentences: list[str]) -> dict[str, Path]:
    """flite speech: ``{split}.jsonl`` rows ``{id, audio, text, kind, voice}`` (kind: digits | sentence),
    ``digits_{split}.jsonl`` (the digit strings alone, for ASR), ``tts_train.jsonl`` (the training digit
    strings in the assistant's voice) and ``tts_test.jsonl`` (``{id, text}``: the held-out strings, for
    TTS intelligibility); held-out digit strings and sentences never occur in training."""
    rng = random.Random(cfg.seed + 2)
    length = cfg.digits_length
    digits = lambda r: "".join(str(r.randrange(10)) for _ in range(length))  # noqa: E731
    test_d = _distinct(rng, cfg.speech_digits_test, digits, set())
    space = [s for s in (f"{i:0{length}d}" for i in range(10**length)) if s not in set(test_d)]
    train_d = [rng.choice(space) for _ in range(cfg.speech_digits_train)]
    sents = list(sentences)
    rng.shuffle(sents)
    test_s, train_s = sents[: cfg.sentences_test], sents[cfg.sentences_test : cfg.sentences_test + cfg.sentences_train]
    paths, jobs = {}, []
    # TTS speaks as the assistant does: the training digit strings again, all in its one voice (a text prompt
    # says nothing of the voice: four voices would make the target a blur of them); held out: the test strings' text
    (out / "tts").mkdir(parents=True, exist_ok=True)
    tts = []
    for i, v in enumerate(train_d):
        tts.append({"id": f"tts-train-{i}", "audio": f"tts/{i:05d}.wav", "text": spoken_digits(v), "voice": cfg.assistant_voice})
        jobs.append((tts[-1]["text"], cfg.assistant_voice, str(out / tts[-1]["audio"])))
    paths["tts_train"] = _write_jsonl(out / "tts_train.jsonl", tts)
    paths["tts_test"] = _write_jsonl(out / "tts_test.jsonl", [{"id": f"tts-test-{i}", "text": spoken_digits(v)} for i, v in enumerate(test_d[: cfg.tts_test])])
    for split, d_vals, s_vals in (("test", test_d, test_s), ("train", train_d, train_s)):
        (out / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for kind, texts in (("digits", [spoken_digits(v) for v in d_vals]), ("sentence", s_vals)):
            for text in texts:
                i, voice = len(rows), cfg.voices[len(rows) % len(cfg.voices)]
                name = f"{split}/{i:05d}.wav"
                rows.append({"id": f"speech-{split}-{i}", "audio": name, "text": text, "kind": kind, "voice": voice})
                jobs.append((text, voice, str(out / name)))
        paths[split] = _write_jsonl(out / f"{split}.jsonl", rows)
        # ASR reads the digit strings only (see recipes/data/demo.yaml); TTS and the codec read both kinds
        paths[f"digits_{split}"] = _write_jsonl(out / f"digits_{split}.jsonl", [r for r in rows if r["kind"] == "digits"])
    synthesize(jobs)
    return paths


def spoken_question(relation: str, digit: int) -> tuple[str, str]:
    """("what comes after four", "five"): a question about a digit and its answer, both as words."""
    step, words = RELATIONS[relation]
    answer = digit + step
    if not 0 <= answer <= 9:
        raise ValueError(f"nothing comes {relation} {DIGIT_WORDS[digit]} among the digits")
    return words.format(DIGIT_WORDS[digit]), DIGIT_WORDS[answer]


def s2s_messages(question_audio: str, answer_audio: str, answer_text: str | None) -> list[dict[str, Any]]:
    """A spoken question and its spoken answer as chat ``messages`` (the ``chat`` template): the user turn is
    the question's audio, the assistant turn its answer's audio, after the answer's text when given (inner
    monologue). Training learns exactly the assistant's content and end of turn; ``omnitrain eval``'s s2s
    prompt is the same prefix up to the assistant's turn."""
    reply = ([{"text": answer_text}] if answer_text is not None else []) + [{"audio": answer_audio}]
    return [{"role": "user", "content": [{"audio": question_audio}]}, {"role": "assistant", "content": reply}]


def make_spoken_questions(out: Path, cfg: CorpusConfig) -> dict[str, Path]:
    """Spoken digit questions answered in speech (issue 23): ``train.jsonl`` chat records ``{id, messages,
    question, answer, voice, rate}`` and ``test.jsonl`` (the held-out s2s manifest, ``{id, audio, answer,
    question, voice, rate}``). Questions ("what comes after four") are spoken by every voice at flite rates
    ``S2S_TRAIN_RATES``; held-out ones at ``S2S_TEST_RATES``, never heard in training. Answers ("five") are
    spoken once per digit by ``cfg.assistant_voice``."""
    facts = [(rel, d) for rel in cfg.s2s_relations for d in range(10) if 0 <= d + RELATIONS[rel][0] <= 9]
    combos = {split: [(rel, d, v, r) for rel, d in facts for v in cfg.voices for r in rates]
              for split, rates in (("train", S2S_TRAIN_RATES), ("test", S2S_TEST_RATES))}  # fmt: skip
    for split, n in (("train", cfg.s2s_train), ("test", cfg.s2s_test)):
        if not 0 < n <= len(combos[split]):
            raise ValueError(f"data.s2s_{split}={n}: there are {len(combos[split])} distinct {split} questions "
                             f"({len(facts)} facts x {len(cfg.voices)} voices x rates); give 1 to {len(combos[split])}")  # fmt: skip
    rng = random.Random(cfg.seed + 3)
    jobs, paths = [], {}
    (out / "answers").mkdir(parents=True, exist_ok=True)
    for word in sorted({spoken_question(rel, d)[1] for rel, d in facts}):
        jobs.append((word, cfg.assistant_voice, str(out / "answers" / f"{word}.wav")))
    for split in ("test", "train"):
        (out / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (rel, d, voice, rate) in enumerate(rng.sample(combos[split], getattr(cfg, f"s2s_{split}"))):
            question, answer = spoken_question(rel, d)
            audio = f"{split}/{i:05d}.wav"
            jobs.append((question, voice, str(out / audio), rate))
            row = {"id": f"s2s-{split}-{i}", "question": question, "answer": answer, "voice": voice, "rate": rate}
            if split == "train":
                row["messages"] = s2s_messages(audio, f"answers/{answer}.wav", answer if cfg.s2s_monologue else None)
            else:
                row["audio"] = audio
            rows.append(row)
        paths[split] = _write_jsonl(out / f"{split}.jsonl", rows)
    synthesize(jobs)
    return paths


# ----------------------------------------------------------------------------- the whole corpus
def photos(out: Path) -> Path:
    """Real photos from scikit-image, each with a same-name .txt caption (an ``image_folder`` source)."""
    skdata = Path(__import__("skimage").__file__).parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        if (skdata / f"{name}.png").is_file():
            shutil.copy(skdata / f"{name}.png", out / f"{name}.png")
            (out / f"{name}.txt").write_text(f"a picture of {name.replace('_', ' ')}")
    return out


def make_corpus(out: Path, cfg: CorpusConfig) -> dict[str, Any]:
    """Everything the demo trains and evaluates on, under ``out``; returns the paths and counts."""
    out = Path(out)
    pages = sorted(HANDBOOK.glob("*.html"))
    if len(pages) < cfg.text_docs + cfg.text_test_docs:
        raise FileNotFoundError(f"{HANDBOOK} holds {len(pages)} pages, the demo reads {cfg.text_docs + cfg.text_test_docs}: "
                                "install debian-handbook (bash setup.sh does, as root)")  # fmt: skip
    text_train, text_test = pages[: cfg.text_docs], pages[len(pages) - cfg.text_test_docs :]
    digits = make_digits(out / "digits", cfg.digits_train, cfg.digits_test, cfg.digits_length, cfg.seed)
    forms = make_forms(out / "forms", cfg.forms_train, cfg.forms_test, cfg.seed)
    # sentences from pages the text LM does not read, so speech and text stay independent tasks
    speech = make_speech(out / "speech", cfg, handbook_sentences(pages[cfg.text_docs : len(pages) - cfg.text_test_docs]))
    s2s = make_spoken_questions(out / "s2s", cfg)
    corpus = {
        "digits": {k: str(v) for k, v in digits.items()},
        "forms": {k: str(v) for k, v in forms.items()},
        "speech": {k: str(v) for k, v in speech.items()},
        "s2s": {k: str(v) for k, v in s2s.items()},
        "photos": str(photos(out / "photos")),
        "text": {"train": [str(p) for p in text_train], "test": [str(p) for p in text_test]},
        "librivox": str(LIBRIVOX),
    }
    counts = {name: {split: sum(1 for _ in open(p)) for split, p in corpus[name].items()} for name in ("digits", "forms", "speech", "s2s")}
    corpus["counts"] = {**counts, "text": {"train": len(text_train), "test": len(text_test)}, "photos": len(list((out / "photos").glob("*.png")))}
    (out / "corpus.json").write_text(json.dumps(corpus, indent=2) + "\n")
    return corpus


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a split, with media paths made absolute."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for r in rows:
        for k in ("image", "audio"):
            if k in r:
                r[k] = str((path.parent / r[k]).resolve())
    return rows


def tokenizer_inputs(out: Path, corpus: dict[str, Any], per_kind: int = 300) -> tuple[Path, Path]:
    """jsonl lists of what the image tokenizer and the audio codec train on: photos + rendered pages,
    synthesised speech + LibriVox (training splits only)."""
    images = [str(p.resolve()) for p in sorted(Path(corpus["photos"]).glob("*.png"))]
    for name in ("digits", "forms"):
        images += [r["image"] for r in read_jsonl(corpus[name]["train"])[:per_kind]]
    audio = [r["audio"] for r in read_jsonl(corpus["speech"]["train"])[::2][:per_kind]]
    audio += [str(p.resolve()) for p in sorted(Path(corpus["librivox"]).glob("*.wav"))]
    return (_write_jsonl(out / "image_tokenizer.jsonl", [{"path": p} for p in images]),
            _write_jsonl(out / "audio_codec.jsonl", [{"path": p} for p in audio]))  # fmt: skip
