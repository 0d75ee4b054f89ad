"""Document QA data: a seeded synthetic DocVQA-style generator (``omnitrain eval make-docqa``) and a
reader for it and for local or hub copies of DocVQA.

The generator draws invoices, forms and tables with PIL on the system's fonts, fills every field
with a seeded random value (names, dates, amounts, ids, addresses, table cells) and asks about one
field per document. Clean renders are easy (tesseract scores ANLS 1.0 on them), so pages are
degraded: small fonts, grey text, label variants and distractor fields, rotation, blur, noise and
optional JPEG artefacts. Output::

    out_dir/images/doc_00000.png ...
    out_dir/docqa.jsonl   {"id", "image" (relative), "question", "answers", "kind", "field", "font", ...}
"""

from __future__ import annotations

import io
import json
import random
import time
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["MakeDocQAConfig", "make_docqa", "load_docqa", "find_fonts", "KINDS"]

KINDS = ("invoice", "form", "table")
FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))
# Regular Latin faces of the Debian packages fonts-dejavu-core, fonts-liberation2, fonts-noto-core.
FONT_STEMS = (
    "DejaVuSans", "DejaVuSerif", "DejaVuSansMono", "DejaVuSansCondensed",
    "LiberationSans-Regular", "LiberationSerif-Regular", "LiberationMono-Regular",
    "NotoSans-Regular", "NotoSerif-Regular", "NotoSansMono-Regular",
)  # fmt: skip


@dataclass
class MakeDocQAConfig:
    """Settings of ``omnitrain eval make-docqa``.

    Attributes:
        out_dir: where images/ and docqa.jsonl are written.
        n: number of documents.
        seed: every value, layout and degradation derives from (seed, document index).
        kinds: document kinds, drawn in turn: any of "invoice", "form", "table".
        fonts: font file stems ("LiberationSans-Regular") or paths; empty: every font found.
        width: page width in pixels.
        height: page height in pixels (font sizes scale with it: 1024 gives 11-16 px body text).
        noise: std of additive Gaussian pixel noise, as a fraction of the 0-255 range.
        max_rotation_deg: each page is rotated by a uniform angle in [-max, max].
        blur: each page is blurred with a Gaussian of radius uniform in [0, blur] pixels.
        jpeg_quality: when set, pages go through a JPEG round trip at this quality (saved as PNG).
        questions_per_doc: questions asked about each document (distinct fields).
    """

    out_dir: Path = Path("runs/docqa")
    n: int = 200
    seed: int = 0
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    fonts: list[str] = field(default_factory=list)
    width: int = 768
    height: int = 1024
    noise: float = 0.05
    max_rotation_deg: float = 3.0
    blur: float = 0.5
    jpeg_quality: int | None = None
    questions_per_doc: int = 1

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"docqa kinds={self.kinds}: choose from {list(KINDS)}")
        checks = {
            "n": self.n >= 1, "width": self.width >= 256, "height": self.height >= 256,
            "noise": 0 <= self.noise <= 1, "max_rotation_deg": 0 <= self.max_rotation_deg <= 45,
            "blur": self.blur >= 0, "questions_per_doc": self.questions_per_doc >= 1,
            "jpeg_quality": self.jpeg_quality is None or 1 <= self.jpeg_quality <= 95,
        }  # fmt: skip
        for key, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"docqa {key}={getattr(self, key)!r} is out of range (n >= 1, width/height >= 256, "
                    "0 <= noise <= 1, 0 <= max_rotation_deg <= 45, blur >= 0, jpeg_quality 1..95 or None)"
                )


def find_fonts(names: list[str] | None = None) -> list[Path]:
    """Font files to render with: the given stems/paths, or every known regular face installed.

    Raises:
        ValueError: when a named font is not found, or no font is installed (with the apt names).
    """
    installed: dict[str, Path] = {}
    for root in FONT_DIRS:
        for p in sorted(root.rglob("*.ttf")) if root.is_dir() else []:
            installed.setdefault(p.stem, p)
    if names:
        out = []
        for name in names:
            p = Path(name)
            if p.is_file():
                out.append(p)
            elif name in installed:
                out.append(installed[name])
            else:
                raise ValueError(f"docqa font {name!r} not found (installed: {sorted(installed)[:20]}...)")
        return out
    out = [installed[s] for s in FONT_STEMS if s in installed]
    if not out:
        raise ValueError(
            "no fonts to render documents with: apt-get install fonts-dejavu-core fonts-liberation2 "
            "fonts-noto-core, or pass docqa.fonts=[/path/to/font.ttf]"
        )
    return out


# ---------------------------------------------------------------- field values

FIRST = ("James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth William Susan Richard "
         "Jessica Joseph Sarah Thomas Karen Daniel Nancy Matthew Lisa Anthony Betty Mark Sandra Amara "
         "Kenji Priya Mateo Ingrid Tomasz Aisha Olu Chen Sofia").split()  # fmt: skip
LAST = ("Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez "
        "Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Thompson White Harris Clark Lewis "
        "Walker Okafor Tanaka Novak Lindqvist Kowalski Haddad Moreau Fischer Rossi Costa").split()  # fmt: skip
STREETS = "Oak Maple Cedar Elm Pine Lake Hill Park River Mill Church Station Bridge Market High".split()
STREET_KINDS = ("Street", "Avenue", "Road", "Lane", "Drive", "Boulevard", "Way", "Court")
CITIES = ("Springfield Riverton Fairview Georgetown Franklin Clinton Greenville Bristol Salem "
          "Madison Ashland Dover Oxford Milton Newport Burlington Kingston Lakewood Arlington").split()  # fmt: skip
COMPANY_SUFFIX = ("Ltd", "LLC", "Inc.", "& Co.", "Supplies", "Industries", "Logistics", "Partners", "GmbH")
PRODUCTS = ("Paper A4 ream", "Toner cartridge", "Desk lamp", "Office chair", "USB cable", "Monitor stand",
            "Stapler", "Notebook pack", "Whiteboard", "Label printer", "Coffee beans 1kg", "Hard drive 2TB",
            "Ethernet switch", "Keyboard", "Webcam", "Filing cabinet", "Extension cord", "Headset")  # fmt: skip
REGIONS = ("North", "South", "East", "West", "Central", "Coastal", "Highlands", "Metro", "Valley", "Delta")
DATE_FORMATS = ("%Y-%m-%d", "%d/%m/%Y", "%m/%d/%Y", "%B %d, %Y", "%d %b %Y")


def _date(rng: random.Random) -> str:
    d = date(2015, 1, 1) + timedelta(days=rng.randrange(11 * 365))
    return d.strftime(rng.choice(DATE_FORMATS))


def _money(x: float) -> list[str]:
    """Accepted spellings of an amount: "$1,234.50", "1234.50", "1,234.50"."""
    return [f"${x:,.2f}", f"{x:.2f}", f"{x:,.2f}"]


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _address(rng: random.Random) -> tuple[str, str, str]:
    street = f"{rng.randint(1, 9999)} {rng.choice(STREETS)} {rng.choice(STREET_KINDS)}"
    return street, rng.choice(CITIES), f"{rng.randint(10000, 99999)}"


# A document is a list of lines; each line is a list of (text, x fraction) cells, plus the fields
# that can be asked about: {field: (question, answers)}.
Line = list[tuple[str, float]]


def _invoice(rng: random.Random) -> tuple[str, list[Line], dict]:
    vendor = f"{rng.choice(LAST)} {rng.choice(COMPANY_SUFFIX)}"
    customer = _name(rng)
    street, city, postcode = _address(rng)
    inv = f"INV-{rng.randint(10000, 99999)}"
    order = f"PO-{rng.randint(10000, 99999)}"  # a distractor next to the invoice number
    issued, due = _date(rng), _date(rng)
    items = [(rng.choice(PRODUCTS), rng.randint(1, 12), round(rng.uniform(2, 400), 2)) for _ in range(rng.randint(2, 6))]
    subtotal = round(sum(q * p for _, q, p in items), 2)
    tax_rate = rng.choice((0.05, 0.08, 0.1, 0.2))
    tax = round(subtotal * tax_rate, 2)
    total = round(subtotal + tax, 2)
    inv_label = rng.choice(("Invoice number:", "Invoice No.:", "Invoice #:"))
    lines: list[Line] = [
        [(vendor, 0.0), ("INVOICE", 0.7)],
        [(f"{rng.randint(1, 999)} {rng.choice(STREETS)} {rng.choice(STREET_KINDS)}, {rng.choice(CITIES)}", 0.0)],
        [],
        [(inv_label, 0.0), (inv, 0.3), ("Order number:", 0.55), (order, 0.8)],
        [("Invoice date:", 0.0), (issued, 0.3), ("Due date:", 0.55), (due, 0.8)],
        [],
        [("Bill to:", 0.0)],
        [(customer, 0.0)],
        [(street, 0.0)],
        [(f"{city} {postcode}", 0.0)],
        [],
        [("Description", 0.0), ("Qty", 0.5), ("Unit price", 0.62), ("Amount", 0.82)],
    ]
    lines += [[(d, 0.0), (str(q), 0.5), (f"{p:,.2f}", 0.62), (f"{q * p:,.2f}", 0.82)] for d, q, p in items]
    lines += [
        [],
        [("Subtotal", 0.62), (f"{subtotal:,.2f}", 0.82)],
        [(f"Tax ({tax_rate:.0%})", 0.62), (f"{tax:,.2f}", 0.82)],
        [(rng.choice(("Total due", "Amount due", "Total")), 0.62), (f"${total:,.2f}", 0.82)],
    ]
    fields = {
        "invoice_number": ("What is the invoice number?", [inv]),
        "order_number": ("What is the order number?", [order]),
        "invoice_date": ("What is the invoice date?", [issued]),
        "due_date": ("What is the due date?", [due]),
        "vendor": ("Which company issued the invoice?", [vendor]),
        "customer": ("Who is the invoice billed to?", [customer]),
        "subtotal": ("What is the subtotal?", _money(subtotal)),
        "tax": ("What is the tax amount?", _money(tax)),
        "total": ("What is the total amount due?", _money(total)),
    }
    return "invoice", lines, fields


def _form(rng: random.Random) -> tuple[str, list[Line], dict]:
    name = _name(rng)
    street, city, postcode = _address(rng)
    first, last = name.split()
    values = {
        "name": ("Full name", name, "What is the applicant's full name?"),
        "date_of_birth": ("Date of birth", _date(rng), "What is the applicant's date of birth?"),
        "phone": ("Phone", f"({rng.randint(200, 989)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}",
                  "What is the applicant's phone number?"),
        "email": ("Email", f"{first.lower()}.{last.lower()}@example.{rng.choice(('com', 'org', 'net'))}",
                  "What is the applicant's email address?"),
        "street": ("Street address", street, "What is the applicant's street address?"),
        "city": ("City", city, "What city does the applicant live in?"),
        "postal_code": ("Postal code", postcode, "What is the applicant's postal code?"),
        "account_number": ("Account number", f"{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}-{rng.randint(10, 99)}",
                           "What is the account number?"),
        "signed": ("Date signed", _date(rng), "On what date was the form signed?"),
    }  # fmt: skip
    title = rng.choice(("Account Application Form", "Customer Registration", "Membership Application"))
    lines: list[Line] = [[(title, 0.0)], [(f"Reference {rng.randint(100000, 999999)}", 0.0)], []]
    stacked = rng.random() < 0.5  # label above value, as in boxed forms; else "Label: value"
    for label, value, _ in values.values():
        if stacked:
            lines += [[(label, 0.0)], [(value, 0.04)], []]
        else:
            lines += [[(label + ":", 0.0), (value, 0.35)], []]
    fields = {k: (q, [v]) for k, (_, v, q) in values.items()}
    return "form", lines, fields


def _table(rng: random.Random) -> tuple[str, list[Line], dict]:
    cols = rng.choice((["Q1", "Q2", "Q3", "Q4"], ["Jan", "Feb", "Mar", "Apr", "May"], ["2021", "2022", "2023"]))
    rows = rng.sample(REGIONS, rng.randint(3, 7))
    what = rng.choice(("units sold", "orders", "visitors", "revenue (USD)"))
    cells = {(r, c): rng.randint(10, 99999) for r in rows for c in cols}
    x = [0.0] + [0.3 + 0.65 * i / len(cols) for i in range(len(cols))]
    lines: list[Line] = [[(f"Regional {what}", 0.0)], [], [("Region", 0.0)] + list(zip(cols, x[1:], strict=True))]
    lines += [[(r, 0.0)] + [(f"{cells[r, c]:,}", xi) for c, xi in zip(cols, x[1:], strict=True)] for r in rows]
    lines += [[], [(f"Source: internal report {rng.randint(1, 99)}", 0.0)]]
    fields = {
        f"{r}/{c}": (f"What is the {c} value for {r}?", [f"{cells[r, c]:,}", str(cells[r, c])])
        for r in rows for c in cols
    }  # fmt: skip
    return "table", lines, fields


BUILDERS = {"invoice": _invoice, "form": _form, "table": _table}


# ---------------------------------------------------------------- rendering and degradation


def _render(lines: list[Line], font_path: Path, cfg: MakeDocQAConfig, rng: random.Random):
    size = max(8, round(cfg.height * rng.uniform(0.011, 0.016)))  # 11-16 px at 1024
    ink = rng.randint(0, 90)  # grey, not black, text
    paper = rng.randint(225, 255)
    font = ImageFont.truetype(str(font_path), size)
    title = ImageFont.truetype(str(font_path), round(size * 1.5))
    img = Image.new("L", (cfg.width, cfg.height), paper)
    draw = ImageDraw.Draw(img)
    margin = round(cfg.width * rng.uniform(0.05, 0.1))
    usable = cfg.width - 2 * margin
    y = round(cfg.height * rng.uniform(0.04, 0.08))
    drawn = []
    for i, line in enumerate(lines):
        f = title if i == 0 else font
        for text, xf in line:
            draw.text((margin + round(xf * usable), y), text, fill=ink, font=f)
            drawn.append(text)
        y += round(f.size * rng.uniform(1.35, 1.6)) if line else round(size * 0.8)
        if y > cfg.height - 2 * size:
            break  # long documents are cut at the page end; only fields drawn are asked about
    return img, drawn, {"font_size": size, "ink": ink, "paper": paper}


def _degrade(img, cfg: MakeDocQAConfig, rng: random.Random):
    angle = rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)
    if angle:
        img = img.rotate(angle, resample=Image.BICUBIC, fillcolor=255)
    radius = rng.uniform(0, cfg.blur)
    if radius > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    if cfg.noise > 0:
        nrng = np.random.default_rng(rng.getrandbits(32))
        arr = np.asarray(img, dtype=np.float32) + nrng.normal(0, 255 * cfg.noise, (img.height, img.width))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if cfg.jpeg_quality is not None:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=cfg.jpeg_quality)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("L")
    return img, {"rotation_deg": round(angle, 3), "blur_radius": round(radius, 3)}


def _asked_fields(drawn: list[str], fields: dict, k: int, rng: random.Random) -> list[str]:
    """Up to `k` distinct fields whose answer is drawn on the page (not cut at the bottom)."""
    text = "\n".join(drawn)
    shown = sorted(key for key, (_, answers) in fields.items() if any(a in text for a in answers))
    return rng.sample(shown, min(k, len(shown)))


def make_docqa(cfg: MakeDocQAConfig) -> dict:
    """Writes a synthetic document-QA set: ``out_dir/images/*.png`` and ``out_dir/docqa.jsonl``.

    Deterministic for a seed: document ``i`` draws everything from ``Random(seed * 1_000_003 + i)``.

    Returns:
        A summary: ``{"out_dir", "jsonl", "documents", "questions", "kinds", "fonts", "seconds"}``.
    """
    t0 = time.time()
    fonts = find_fonts(cfg.fonts)
    (cfg.out_dir / "images").mkdir(parents=True, exist_ok=True)
    records, kinds = [], {}
    for i in range(cfg.n):
        rng = random.Random(cfg.seed * 1_000_003 + i)
        kind, lines, fields = BUILDERS[cfg.kinds[i % len(cfg.kinds)]](rng)
        font = fonts[rng.randrange(len(fonts))]
        img, drawn, look = _render(lines, font, cfg, rng)
        img, damage = _degrade(img, cfg, rng)
        rel = f"images/doc_{i:05d}.png"
        img.save(cfg.out_dir / rel)
        kinds[kind] = kinds.get(kind, 0) + 1
        for j, key in enumerate(_asked_fields(drawn, fields, cfg.questions_per_doc, rng)):
            question, answers = fields[key]
            records.append({"id": f"{i:05d}-{j}", "image": rel, "question": question, "answers": answers,
                            "kind": kind, "field": key.split("/")[0] if kind != "table" else "cell",
                            "font": font.stem, **look, **damage})  # fmt: skip
    jsonl = cfg.out_dir / "docqa.jsonl"
    with open(jsonl, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    (cfg.out_dir / "config.json").write_text(json.dumps(settings, indent=2) + "\n")
    print(f"make-docqa: {cfg.n} documents, {len(records)} questions in {time.time() - t0:.1f}s; wrote {jsonl} "
          f"and {cfg.n} page(s) in {cfg.out_dir / 'images'}; evaluate with `omnitrain eval tasks=[docvqa] docvqa.path={jsonl}`")  # fmt: skip
    return {"out_dir": str(cfg.out_dir), "jsonl": str(jsonl), "documents": cfg.n, "questions": len(records),
            "kinds": kinds, "fonts": [p.stem for p in fonts], "seconds": round(time.time() - t0, 2)}  # fmt: skip


# ---------------------------------------------------------------- reading sets back

HUB_DOCVQA = "lmms-lab/DocVQA"


def load_docqa(path: str | Path, split: str = "validation", cache_dir: str | Path | None = None) -> list[dict]:
    """Reads a document-QA set as ``[{"id", "image": absolute path, "question", "answers", ...}]``.

    Args:
        path: a make-docqa folder or its ``docqa.jsonl``; a local copy of ``lmms-lab/DocVQA`` (a folder
            or file of parquet/jsonl with question/answers/image columns); or the hub name
            ``lmms-lab/DocVQA`` (config ``DocVQA``; needs network).
        split: the split for local parquet copies (file names containing it) and the hub.
        cache_dir: where images embedded in parquet are written as PNG files
            (default ``~/.cache/omnitrain/docvqa/<split>``).

    Raises:
        FileNotFoundError: when `path` does not exist and is not the hub name.
        RuntimeError: when the hub cannot be reached (says to use make-docqa or a local copy).
    """
    p = Path(path)
    if str(path) == HUB_DOCVQA and not p.exists():
        return _load_hub(split, cache_dir)
    if p.is_dir() and (p / "docqa.jsonl").is_file():
        p = p / "docqa.jsonl"
    if p.is_file() and p.suffix == ".jsonl" and _is_ours(p):
        root = p.parent
        with open(p) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for r in rows:
            r["image"] = str((root / r["image"]).resolve())
        return rows
    if p.exists():
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.suffix in (".parquet", ".jsonl"))
        matching = [q for q in files if split in q.name] or files
        if not matching:
            raise FileNotFoundError(f"no parquet or jsonl files under {p}")
        import datasets  # datasets: ~0.5 s to import, only for parquet / jsonl copies

        kind = "parquet" if matching[0].suffix == ".parquet" else "json"
        ds = datasets.load_dataset(kind, data_files=[str(q) for q in matching], split="train")
        return _from_hf(ds, matching[0].parent, split, cache_dir)
    raise FileNotFoundError(
        f"docqa data {path} does not exist: run `omnitrain eval make-docqa`, pass a local copy of "
        f"{HUB_DOCVQA}, or '{HUB_DOCVQA}' with network access"
    )


def _is_ours(p: Path) -> bool:
    with open(p) as f:
        first = f.readline()
    return bool(first.strip()) and isinstance(json.loads(first).get("image"), str)


def _load_hub(split: str, cache_dir) -> list[dict]:
    import datasets  # datasets: ~0.5 s to import, only for the hub set

    try:
        ds = datasets.load_dataset(HUB_DOCVQA, "DocVQA", split=split)
    except Exception as e:  # offline: ConnectionError, LocalEntryNotFoundError, ... all mean the same here
        raise RuntimeError(
            f"could not load {HUB_DOCVQA} (config DocVQA, split {split}) from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Offline, generate a synthetic set with `omnitrain eval "
            "make-docqa` or pass the folder of a local copy (parquet files)"
        ) from e
    return _from_hf(ds, None, split, cache_dir)


def _from_hf(ds, root: Path | None, split: str, cache_dir) -> list[dict]:
    """Rows of a DocVQA-layout dataset, images written to PNG files once."""
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "omnitrain" / "docvqa" / split
    missing = [c for c in ("question", "answers", "image") if c not in ds.column_names]
    if missing:
        raise ValueError(f"DocVQA data lacks columns {missing} (has {ds.column_names})")
    cache.mkdir(parents=True, exist_ok=True)
    out = []
    for i, row in enumerate(ds):
        rid = str(row.get("questionId", row.get("id", i)))
        image = row["image"]
        if isinstance(image, str):  # a path in a jsonl copy
            path = Path(image) if Path(image).is_absolute() or root is None else root / image
        else:
            path = cache / f"{rid}.png"
            if not path.exists():
                if isinstance(image, dict):  # parquet without HF feature metadata: {"bytes", "path"}
                    image = Image.open(io.BytesIO(image["bytes"]))
                image.save(path)
        answers = row["answers"]
        out.append({"id": rid, "image": str(path), "question": row["question"],
                    "answers": list(answers) if isinstance(answers, (list, tuple)) else [answers],
                    "kind": "docvqa", "field": ",".join(row.get("question_types") or [])})  # fmt: skip
    return out
