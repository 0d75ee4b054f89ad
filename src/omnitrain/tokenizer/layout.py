"""The token layout: one id space for text, image and audio tokens (the contract of DESIGN.md).

Ranges, in id order::

    [0, V_text)                  text: the text tokenizer's ids (bos/eos/pad may live here)
    [special_base, size_base)    specials the text tokenizer lacks: boi eoi eol boa eoa, chat roles
    [size_base, image_base)      image size tokens: <1> .. <max_grid> (h and w of a code grid)
    [image_base, audio_base)     image codes: one codebook
    [audio_base, vocab_size)     audio codes: K ranges of C codes, level l code c -> audio_base + l*C + c

Serialization (``serialize`` / ``parse`` are exact inverses):

    image:  <boi> <h> <w> c(0,0) .. c(0,w-1) <eol> .. c(h-1,0) .. c(h-1,w-1) <eol> <eoi>
    audio:  <boa> f0[l0] f0[l1] .. f0[lK-1] f1[l0] .. <eoa>      (frame-major, level order)
    text:   plain text ids; specials (bos, eos, chat roles) are their own segments

Chat: the layout also records the chat template (:class:`ChatTemplate`), so that the shard builder
(``chat`` template parts), ``omnitrain generate chat=true`` and anyone reading ``layout.json`` write
conversations the same way. The default, ``omnitrain-v1``, is one turn per message::

    <role> content segments (text / image / audio) <end_of_turn>       role: <system> <user> <assistant>

and a generation prompt is the conversation so far, then ``<assistant>``. In SFT the model learns
what it generates after that prompt: the content of assistant turns and the template items after it.

A layout is saved as ``layout.json`` with a content hash; shards, checkpoints and eval results
carry that hash and refuse to load under another one (:func:`check_layout_hash`). Hash contract of
the chat template: the default template is left out of the hashed content, so every layout built
before the template was recorded keeps its hash (and its shards and checkpoints still load); a
non-default template changes the hash; a ``layout.json`` without ``chat_template`` loads as the default.

Legend: h/w code grid, T audio frames, K residual levels, C codes per level, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MODALITIES = ("text", "image", "audio")
TEXT, IMAGE, AUDIO = 0, 1, 2  # modality indices used by modality_of()

# Special tokens in a fixed order (the order is part of the layout and so of its hash).
SPECIAL_NAMES = ("bos", "eos", "pad", "boi", "eoi", "eol", "boa", "eoa", "system", "user", "assistant", "end_of_turn")
# Specials that live at the text level (a segment of their own); the rest are image/audio structure.
TEXT_SPECIALS = ("bos", "eos", "pad", "system", "user", "assistant", "end_of_turn")


ROLE, CONTENT = "<role>", "<content>"  # the placeholders of a chat turn


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes segments; recorded in ``layout.json`` (module docstring).

    ``turn`` is one message, in order: ``"<role>"`` (the role's own special: ``<system>``, ``<user>``,
    ``<assistant>``), ``"<content>"`` (the message's text / image / audio segments) and names of
    text-level specials (TEXT_SPECIALS). ``roles`` are the roles a message may have; an
    ``"assistant"`` role is always the one that answers. The generation prompt is the part of an
    assistant turn before ``<content>``; generation stops at the first special after it (or ``<eos>``).
    """

    name: str = "omnitrain-v1"
    turn: tuple[str, ...] = (ROLE, CONTENT, "end_of_turn")
    roles: tuple[str, ...] = ("system", "user", "assistant")

    def __post_init__(self) -> None:
        object.__setattr__(self, "turn", tuple(self.turn))  # lists from layout.json / configs
        object.__setattr__(self, "roles", tuple(self.roles))
        if self.turn.count(ROLE) != 1 or self.turn.count(CONTENT) != 1 or self.turn.index(ROLE) > self.turn.index(CONTENT):
            raise ValueError(f"chat template {self.name!r}: a turn holds {ROLE!r} once, then {CONTENT!r} once; got {list(self.turn)}")
        bad = [t for t in self.turn if t not in (ROLE, CONTENT) and t not in TEXT_SPECIALS]
        if bad:
            raise ValueError(f"chat template {self.name!r}: turn items {bad} are not {ROLE}, {CONTENT} or one of {TEXT_SPECIALS}")
        if "assistant" not in self.roles or not set(self.roles) <= {"system", "user", "assistant"}:
            raise ValueError(f"chat template {self.name!r}: roles {list(self.roles)} must include assistant, "
                             "from system, user, assistant")  # fmt: skip

    @property
    def stop(self) -> str:
        """The special that ends an assistant reply (what generation stops at)."""
        after = self.turn[self.turn.index(CONTENT) + 1 :]
        return after[0] if after else "eos"


DEFAULT_CHAT_TEMPLATE = ChatTemplate()


class LayoutMismatchError(ValueError):
    """Something (a shard, a checkpoint, eval results) was made under another token layout."""


def check_layout_hash(expected: str, found: str, what: str) -> None:
    """Raise a :class:`LayoutMismatchError` naming both hashes when they differ."""
    if expected != found:
        raise LayoutMismatchError(
            f"{what} was built with token layout {found}, but the current layout is {expected}. "
            "Ids mean different things under different layouts: rebuild it with the current tokenizers "
            "(or point the config at the layout.json it was built with)."
        )


# --------------------------------------------------------------------------- segments
@dataclass(eq=False)
class TextSegment:
    ids: np.ndarray  # [n] text-tokenizer ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextSegment) and np.array_equal(self.ids, other.ids)


@dataclass(eq=False)
class ImageSegment:
    codes: np.ndarray  # [h, w] codebook indices in [0, C_image)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageSegment) and np.array_equal(self.codes, other.codes)


@dataclass(eq=False)
class AudioSegment:
    codes: np.ndarray  # [T, K] per-level codebook indices in [0, C_audio)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AudioSegment) and np.array_equal(self.codes, other.codes)


@dataclass(frozen=True)
class SpecialSegment:
    name: str  # one of TEXT_SPECIALS


Segment = TextSegment | ImageSegment | AudioSegment | SpecialSegment


def normalize(segments: list[Segment]) -> list[Segment]:
    """The canonical form ``parse`` returns: adjacent text merged, empty text dropped."""
    out: list[Segment] = []
    for seg in segments:
        if isinstance(seg, TextSegment):
            if len(seg.ids) == 0:
                continue
            if out and isinstance(out[-1], TextSegment):
                out[-1] = TextSegment(np.concatenate([out[-1].ids, np.asarray(seg.ids, dtype=np.int64)]))
                continue
            seg = TextSegment(np.asarray(seg.ids, dtype=np.int64))
        out.append(seg)
    return out


# --------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class TokenLayout:
    """Id ranges of the unified vocabulary. Build with :meth:`build`, save/load as ``layout.json``."""

    text_vocab_size: int
    text_fingerprint: str
    specials: dict[str, int]  # name -> id, every name of SPECIAL_NAMES
    max_grid: int  # largest image grid side (size tokens <1>..<max_grid>)
    image_codebook_size: int  # 0: no image range
    image_fingerprint: str
    audio_codebook_size: int  # 0: no audio range
    audio_levels: int  # K
    audio_fingerprint: str
    size_base: int
    image_base: int
    audio_base: int
    vocab_size: int
    schema_version: int = SCHEMA_VERSION
    chat_template: ChatTemplate = DEFAULT_CHAT_TEMPLATE  # how conversations are written (module docstring)

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(
        cls,
        text_vocab_size: int,
        text_fingerprint: str = "",
        text_specials: dict[str, int] | None = None,
        image_codebook_size: int = 0,
        image_fingerprint: str = "",
        audio_codebook_size: int = 0,
        audio_levels: int = 0,
        audio_fingerprint: str = "",
        max_grid: int = 64,
        chat_template: ChatTemplate = DEFAULT_CHAT_TEMPLATE,
    ) -> TokenLayout:
        """Lay out the ranges. ``text_specials`` maps special names the text tokenizer already has
        (typically bos/eos/pad) to their ids; every other special gets a new id after the text range."""
        if text_vocab_size <= 0:
            raise ValueError(f"text_vocab_size must be positive, got {text_vocab_size}")
        if (audio_codebook_size > 0) != (audio_levels > 0):
            raise ValueError("give both audio_codebook_size and audio_levels (K), or neither")
        if max_grid < 1:
            raise ValueError(f"max_grid must be >= 1, got {max_grid}")
        text_specials = dict(text_specials or {})
        for name, i in text_specials.items():
            if name not in SPECIAL_NAMES or not 0 <= i < text_vocab_size:
                raise ValueError(f"text special {name}={i} is not a special name or not a text id")
        specials, nxt = {}, text_vocab_size
        for name in SPECIAL_NAMES:
            if name in text_specials:
                specials[name] = text_specials[name]
            else:
                specials[name], nxt = nxt, nxt + 1
        size_base = nxt
        image_base = size_base + max_grid
        audio_base = image_base + image_codebook_size
        vocab_size = audio_base + audio_codebook_size * audio_levels
        return cls(
            text_vocab_size, text_fingerprint, specials, max_grid, image_codebook_size, image_fingerprint,
            audio_codebook_size, audio_levels, audio_fingerprint, size_base, image_base, audio_base, vocab_size,
            chat_template=chat_template,
        )  # fmt: skip

    @classmethod
    def from_tokenizers(
        cls, text: Any, image: Any = None, audio: Any = None, max_grid: int = 64,
        chat_template: ChatTemplate = DEFAULT_CHAT_TEMPLATE,
    ) -> TokenLayout:  # fmt: skip
        """Build from a text tokenizer (``vocab_size``, ``fingerprint``, ``special_ids``) and optional
        image / audio tokenizers following ``omnitrain.tokenizer.base``."""
        return cls.build(
            text.vocab_size, text.fingerprint, text.special_ids,
            image_codebook_size=image.codebook_size if image else 0,
            image_fingerprint=image.fingerprint if image else "",
            audio_codebook_size=audio.codebook_size if audio else 0,
            audio_levels=audio.n_levels if audio else 0,
            audio_fingerprint=audio.fingerprint if audio else "",
            max_grid=max_grid, chat_template=chat_template,
        )  # fmt: skip

    # ---------------------------------------------------------------- identity and files
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["specials"] = {n: self.specials[n] for n in SPECIAL_NAMES}
        d["audio_order"] = "frame_major_level_order"
        d["image_order"] = "row_major_eol_after_each_row"
        return d

    @property
    def hash(self) -> str:
        """Content hash: 16 hex chars of sha256 over the canonical JSON of every field (the default
        chat template left out, so layouts from before it was recorded keep their hash)."""
        d = self.to_dict()
        if self.chat_template == DEFAULT_CHAT_TEMPLATE:
            del d["chat_template"]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            path = path / "layout.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**self.to_dict(), "hash": self.hash}, indent=2) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a layout
        return path

    @classmethod
    def load(cls, path: str | Path, expect_hash: str | None = None) -> TokenLayout:
        """Load ``layout.json`` (or a folder holding one); verify its hash, and ``expect_hash`` if given."""
        path = Path(path)
        if path.is_dir():
            path = path / "layout.json"
        if not path.is_file():
            raise FileNotFoundError(f"no token layout at {path}: build one with `omnitrain tokenizer layout`")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); rebuild it with `omnitrain tokenizer layout`") from e
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{path} has layout schema_version {d.get('schema_version')}, this omnitrain reads "
                f"{SCHEMA_VERSION}; rebuild the layout or use a matching omnitrain version"
            )
        stored = d.pop("hash", None)
        d.pop("audio_order", None), d.pop("image_order", None)
        names = {f.name for f in dataclasses.fields(cls)}
        try:  # no chat_template: a layout from before it was recorded, which used the default
            template = ChatTemplate(**d.pop("chat_template", {}))
        except TypeError as e:
            raise ValueError(f"{path}: chat_template has unknown keys ({e}); it holds name, turn and roles") from e
        layout = cls(**{k: v for k, v in d.items() if k in names}, chat_template=template)
        if stored != layout.hash:
            raise ValueError(f"{path}: stored hash {stored} does not match its content ({layout.hash}); "
                             "the file was edited by hand or corrupted. Rebuild it.")  # fmt: skip
        if expect_hash is not None:
            check_layout_hash(expect_hash, layout.hash, str(path))
        return layout

    # ---------------------------------------------------------------- id helpers
    def size_token(self, n: int) -> int:
        if not 1 <= n <= self.max_grid:
            raise ValueError(f"image grid side {n} is outside 1..{self.max_grid}; raise max_grid in the layout")
        return self.size_base + n - 1

    def describe(self) -> str:
        return (
            f"TokenLayout {self.hash}: vocab {self.vocab_size} = text {self.text_vocab_size} + "
            f"specials {self.size_base - self.text_vocab_size} + sizes {self.max_grid} + image "
            f"{self.image_codebook_size} + audio {self.audio_levels}x{self.audio_codebook_size}"
        )

    # ---------------------------------------------------------------- chat
    def chat_segments(
        self, messages: list[tuple[str, list[Segment]]], add_generation_prompt: bool = False
    ) -> list[tuple[Segment, bool]]:
        """A conversation ``[(role, content segments)]`` -> ``(segment, learned)`` pairs through the chat
        template. ``learned`` (SFT) marks what the assistant generates: its content and the items after
        it in the turn. ``add_generation_prompt`` appends the opening of an assistant turn."""
        tpl, out = self.chat_template, []
        for i, (role, content) in enumerate(messages):
            if role not in tpl.roles:
                raise ValueError(f"message {i} has role {role!r}; chat template {tpl.name!r} has roles {list(tpl.roles)}")
            learned = False  # a turn is prompt up to its content
            for item in tpl.turn:
                if item == CONTENT:
                    learned = role == "assistant"
                    out += [(seg, learned) for seg in content]
                else:
                    out.append((SpecialSegment(role if item == ROLE else item), learned))
        if add_generation_prompt:
            opening = tpl.turn[: tpl.turn.index(CONTENT)]
            out += [(SpecialSegment("assistant" if item == ROLE else item), False) for item in opening]
        return out

    def chat_prompt(self, messages: list[tuple[str, list[Segment]]], add_generation_prompt: bool = True) -> np.ndarray:
        """Ids of a conversation prefix for generation: the messages, then (by default) the opening of
        the assistant's turn, so the model's next token starts the reply."""
        return self.serialize([seg for seg, _ in self.chat_segments(messages, add_generation_prompt)])

    # ---------------------------------------------------------------- serialize / parse
    def serialize(self, segments: list[Segment]) -> np.ndarray:
        """Segments -> one id sequence (int64 [n]). Raises ValueError on out-of-range content."""
        sp, out = self.specials, []
        for seg in segments:
            if isinstance(seg, TextSegment):
                ids = np.asarray(seg.ids, dtype=np.int64).reshape(-1)
                if ids.size and (ids.min() < 0 or ids.max() >= self.text_vocab_size):
                    raise ValueError(f"text id out of range [0, {self.text_vocab_size}): {ids.min()}..{ids.max()}")
                clash = np.isin(ids, [sp[n] for n in TEXT_SPECIALS])
                if clash.any():
                    raise ValueError(f"text segment holds special id {ids[clash][0]}; use a SpecialSegment for it")
                out.append(ids)
            elif isinstance(seg, SpecialSegment):
                if seg.name not in TEXT_SPECIALS:
                    raise ValueError(f"special '{seg.name}' is not a text-level special; choose from {TEXT_SPECIALS}")
                out.append(np.array([sp[seg.name]], dtype=np.int64))
            elif isinstance(seg, ImageSegment):
                codes = np.asarray(seg.codes, dtype=np.int64)
                if codes.ndim != 2 or codes.size == 0:
                    raise ValueError(f"image codes must be a non-empty [h, w] grid, got shape {codes.shape}")
                _check_codes(codes, self.image_codebook_size, "image")
                h, w = codes.shape
                rows = np.concatenate([codes + self.image_base, np.full((h, 1), sp["eol"])], axis=1)  # [h, w+1]
                head = [sp["boi"], self.size_token(h), self.size_token(w)]
                out.append(np.concatenate([head, rows.reshape(-1), [sp["eoi"]]]).astype(np.int64))
            elif isinstance(seg, AudioSegment):
                codes = np.asarray(seg.codes, dtype=np.int64)
                if codes.ndim != 2 or codes.shape[1] != self.audio_levels:
                    raise ValueError(f"audio codes must be [T, K={self.audio_levels}], got shape {codes.shape}")
                _check_codes(codes, self.audio_codebook_size, "audio")
                offsets = self.audio_base + np.arange(self.audio_levels) * self.audio_codebook_size  # [K]
                body = (codes + offsets).reshape(-1)  # [T, K] -> [T*K], frame-major
                out.append(np.concatenate([[sp["boa"]], body, [sp["eoa"]]]).astype(np.int64))
            else:
                raise TypeError(f"not a segment: {seg!r}")
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def parse(self, ids: np.ndarray | list[int]) -> list[Segment]:
        """One id sequence -> segments (canonical form). Raises ValueError at the first malformed span."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"id out of the layout's range [0, {self.vocab_size})")
        sp, n = self.specials, len(ids)
        by_id = {v: k for k, v in sp.items()}
        out: list[Segment] = []
        kind = self._kind_table()[ids]  # [n] 0 text, 1 text-special, 2 other
        i = 0
        while i < n:
            if kind[i] == 0:  # a run of plain text
                j = i + 1 + int(np.argmax(kind[i + 1 :] != 0)) if (kind[i + 1 :] != 0).any() else n
                out.append(TextSegment(ids[i:j].copy()))
                i = j
            elif kind[i] == 1:
                out.append(SpecialSegment(by_id[int(ids[i])]))
                i += 1
            elif ids[i] == sp["boi"]:
                seg, i = self._parse_image(ids, i)
                out.append(seg)
            elif ids[i] == sp["boa"]:
                seg, i = self._parse_audio(ids, i)
                out.append(seg)
            else:
                raise ValueError(f"id {ids[i]} at position {i} ({self.token_name(int(ids[i]))}) outside an image/audio span")
        return out

    def _parse_image(self, ids: np.ndarray, i: int) -> tuple[ImageSegment, int]:
        sp = self.specials
        if i + 3 > len(ids):
            raise ValueError(f"image span at position {i} is truncated")
        h, w = (int(ids[i + 1]) - self.size_base + 1, int(ids[i + 2]) - self.size_base + 1)
        if not (1 <= h <= self.max_grid and 1 <= w <= self.max_grid):
            raise ValueError(f"image span at position {i} lacks its <h> <w> size tokens")
        start, end = i + 3, i + 3 + h * (w + 1)
        if end >= len(ids) or ids[end] != sp["eoi"]:
            raise ValueError(f"image span at position {i} ({h}x{w}) is truncated or lacks <eoi> at {end}")
        rows = ids[start:end].reshape(h, w + 1)  # [h*(w+1)] -> [h, w+1]
        if not (rows[:, -1] == sp["eol"]).all():
            raise ValueError(f"image span at position {i}: a row does not end with <eol>")
        codes = rows[:, :-1] - self.image_base  # [h, w]
        if codes.min() < 0 or codes.max() >= self.image_codebook_size:
            raise ValueError(f"image span at position {i} holds a non-image id")
        return ImageSegment(codes), end + 1

    def _parse_audio(self, ids: np.ndarray, i: int) -> tuple[AudioSegment, int]:
        rest = ids[i + 1 :]
        stop = np.flatnonzero(rest == self.specials["eoa"])
        if stop.size == 0:
            raise ValueError(f"audio span at position {i} has no <eoa>")
        body, k, c = rest[: stop[0]], self.audio_levels, self.audio_codebook_size
        if body.size % k:
            raise ValueError(f"audio span at position {i} has {body.size} codes, not a multiple of K={k}")
        frames = body.reshape(-1, k) - self.audio_base  # [T*K] -> [T, K]
        codes = frames - np.arange(k) * c  # undo the per-level offsets
        if frames.size and ((codes < 0) | (codes >= c)).any():
            raise ValueError(f"audio span at position {i} holds a code at the wrong level or a non-audio id")
        return AudioSegment(codes), i + 1 + stop[0] + 1

    # ---------------------------------------------------------------- per-token tables and masks
    def _kind_table(self) -> np.ndarray:
        table = np.full(self.vocab_size, 2, dtype=np.int8)
        table[: self.text_vocab_size] = 0
        for name in TEXT_SPECIALS:
            table[self.specials[name]] = 1
        return table

    def modality_of(self, ids: np.ndarray) -> np.ndarray:
        """Modality index per token (TEXT=0, IMAGE=1, AUDIO=2): image structure tokens count as image,
        <boa>/<eoa> as audio, text-level specials as text. Used for per-modality loss weights."""
        table = np.zeros(self.vocab_size, dtype=np.int8)
        sp = self.specials
        table[[sp["boi"], sp["eoi"], sp["eol"]]] = IMAGE
        table[self.size_base : self.audio_base] = IMAGE
        table[[sp["boa"], sp["eoa"]]] = AUDIO
        table[self.audio_base :] = AUDIO
        return table[np.asarray(ids)]

    def mask(self, what: str, level: int | None = None) -> np.ndarray:
        """Boolean [V] mask of the ids of one class: "text", "image", "audio" (all levels, or one
        ``level``), "size", or "special"."""
        m = np.zeros(self.vocab_size, dtype=bool)
        if what == "text":
            m[: self.text_vocab_size] = True
            m[[self.specials[n] for n in TEXT_SPECIALS]] = False
        elif what == "image":
            m[self.image_base : self.audio_base] = True
        elif what == "audio":
            c = self.audio_codebook_size
            lo = self.audio_base + (level or 0) * c
            m[lo : (lo + c if level is not None else self.vocab_size)] = True
        elif what == "size":
            m[self.size_base : self.image_base] = True
        elif what == "special":
            m[list(self.specials.values())] = True
        else:
            raise ValueError(f"unknown mask {what!r}; choose text, image, audio, size or special")
        return m

    def token_name(self, i: int) -> str:
        """Human-readable name of one id, for error messages and debugging."""
        by_id = {v: k for k, v in self.specials.items()}
        if i in by_id:
            return f"<{by_id[i]}>"
        if i < self.text_vocab_size:
            return f"text:{i}"
        if self.size_base <= i < self.image_base:
            return f"<size {i - self.size_base + 1}>"
        if self.image_base <= i < self.audio_base:
            return f"image:{i - self.image_base}"
        lvl, code = divmod(i - self.audio_base, max(self.audio_codebook_size, 1))
        return f"audio:l{lvl}:{code}"


def _check_codes(codes: np.ndarray, size: int, what: str) -> None:
    if size == 0:
        raise ValueError(f"this layout has no {what} range; build it with a {what} tokenizer")
    if codes.size and (codes.min() < 0 or codes.max() >= size):
        raise ValueError(f"{what} code out of range [0, {size}): {codes.min()}..{codes.max()}")
