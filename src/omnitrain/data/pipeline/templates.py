"""Task templates: a small, data-driven description of how one record becomes one token sequence.

A template is a list of parts, each naming *one* thing and whether the model learns it::

    # data_pipelines/templates/asr.yaml
    parts:
      - {special: bos}
      - {audio: audio, learn: false}     # the record's "audio" field, encoded by the audio codec
      - {literal: "Transcript: ", learn: false}
      - {text: text}                     # the record's "text" field, learned
      - {special: eos}

Part kinds: ``special`` (bos, eos, system, user, assistant, end_of_turn), ``literal`` (fixed
text), ``text`` / ``image`` / ``audio`` / ``video`` (a record field; a video becomes its sampled
frames, each followed by the audio codes of its time window), ``interleaved`` (a field holding a list
of ``{"text": ...}``, ``{"image": ...}``, ``{"audio": ...}`` items) and ``chat`` (a field holding
``[{"role", "content"}]`` turns; content is a string or an interleaved list; turns are written with
the chat template the layout records (``TokenLayout.chat_template``, by default ``<role> content
<end_of_turn>``); only the content and ``<end_of_turn>`` of assistant turns are learned, as in SFT;
none with ``learn: false``). :class:`SampleEncoder` turns
(template, record) into ids, the ``[start, end, modality]`` segments and the learned spans that go into a shard.

Preference pairs (DPO): parts with ``branch: chosen`` / ``branch: rejected`` hold the two answers;
one sample stores prompt, chosen and rejected once, and ``meta["branches"]`` the ``[start, end]``
spans of each branch. The chosen sequence is the sample without the rejected spans, and the other
way round (``omnitrain.train.dpo``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from omnitrain.tokenizer.layout import (
    MODALITIES,
    AudioSegment,
    ImageSegment,
    Segment,
    SpecialSegment,
    TextSegment,
    TokenLayout,
)

KINDS = ("special", "literal", "text", "image", "audio", "video", "interleaved", "chat")
BRANCHES = ("chosen", "rejected")


@dataclass
class Part:
    special: str | None = None
    literal: str | None = None
    text: str | None = None
    image: str | None = None
    audio: str | None = None
    video: str | None = None
    interleaved: str | None = None
    chat: str | None = None
    learn: bool = True
    optional: bool = False  # a missing/empty field is skipped instead of an error
    branch: str | None = None  # preference pairs: "chosen" or "rejected" (None: shared by both)
    # text parts: tokenize " " + the value, so that its first word is cut as it is mid-sentence
    # ("▁two", not "t" + "wo") when it follows a prompt such as "Transcript:"
    lead_space: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a template part names exactly one of {KINDS}, got {given or 'none'}")
        if self.branch is not None and self.branch not in BRANCHES:
            raise ValueError(f"a template part's branch is one of {BRANCHES}, got {self.branch!r}")
        if self.lead_space and self.kind != "text":
            raise ValueError(f"lead_space applies to text parts, not to a {self.kind} part")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)


@dataclass
class Template:
    name: str
    parts: list[Part] = field(default_factory=list)

    def fields(self) -> set[str]:
        """The record fields this template reads."""
        return {getattr(p, p.kind) for p in self.parts if p.kind not in ("special", "literal")}


class MediaEncoder(Protocol):
    """What the template engine needs to turn a field into codes (see ``pipeline.media``)."""

    def image_codes(self, value: Any) -> np.ndarray: ...  # [h, w]

    def audio_codes(self, value: Any) -> np.ndarray: ...  # [T, K]

    def video_segments(self, value: Any) -> list[Segment]: ...  # frames and audio windows, in time order


class SkipSample(ValueError):
    """This record cannot become a sample (the reason goes to errors.jsonl)."""


@dataclass
class Encoded:
    ids: np.ndarray  # [n] int64
    segments: list[list]  # [[start, end, modality], ...] covering ids
    learn: list[list[int]]  # [[start, end], ...] trained-on spans
    branches: dict[str, list[list[int]]] = field(default_factory=dict)  # preference pairs: spans of each branch


class SampleEncoder:
    """(template, record) -> token ids through the text tokenizer, the media tokenizers and the layout."""

    def __init__(self, layout: TokenLayout, text_tokenizer: Any, media: MediaEncoder | None = None) -> None:
        self.layout, self.text, self.media = layout, text_tokenizer, media

    def encode(self, template: Template, record: dict[str, Any]) -> Encoded:
        pieces: list[tuple[Segment, bool, str | None]] = []  # (segment, learned, branch)
        for part in template.parts:
            pieces += [(s, learned, part.branch) for s, learned in self._part(part, record)]
        if not any(isinstance(s, (TextSegment, ImageSegment, AudioSegment)) for s, _, _ in pieces):
            raise SkipSample("empty sample: no text, image or audio content")
        ids, segments, learn, branches, pos = [], [], [], {}, 0
        for seg, learned, branch in pieces:
            seg_ids = self.layout.serialize([seg])
            n = len(seg_ids)
            if n == 0:
                continue
            mod = MODALITIES[int(self.layout.modality_of(seg_ids[:1])[0])]
            if segments and segments[-1][2] == mod and segments[-1][1] == pos:
                segments[-1][1] = pos + n  # merge runs of one modality
            else:
                segments.append([pos, pos + n, mod])
            if learned:
                if learn and learn[-1][1] == pos:
                    learn[-1][1] = pos + n
                else:
                    learn.append([pos, pos + n])
            if branch is not None:
                spans = branches.setdefault(branch, [])
                if spans and spans[-1][1] == pos:
                    spans[-1][1] = pos + n
                else:
                    spans.append([pos, pos + n])
            ids.append(seg_ids)
            pos += n
        if branches and set(branches) != set(BRANCHES):
            raise SkipSample(f"a preference sample needs both a chosen and a rejected answer, got {sorted(branches)}")
        return Encoded(np.concatenate(ids), segments, learn, branches)

    # ------------------------------------------------------------------ parts
    def _field(self, record: dict[str, Any], name: str, part: Part) -> Any:
        value = record.get(name)
        if value is None or (isinstance(value, (str, list)) and len(value) == 0):
            if part.optional:
                return None
            raise SkipSample(f"field '{name}' is missing or empty (record has {sorted(k for k in record if not k.startswith('__'))})")
        return value

    def _text(self, s: str) -> TextSegment:
        if not isinstance(s, str):
            raise SkipSample(f"expected text, got {type(s).__name__}")
        return TextSegment(np.asarray(self.text.encode(s), dtype=np.int64))

    def _media(self, kind: str, value: Any) -> Segment:
        if self.media is None:
            raise ValueError(f"the template has {kind} parts but no {kind} tokenizer is configured")
        if kind == "image":
            return ImageSegment(self.media.image_codes(value))
        return AudioSegment(self.media.audio_codes(value))

    def _interleaved(self, items: list[Any]) -> list[Segment]:
        out: list[Segment] = []
        for item in items:
            if isinstance(item, str):
                out.append(self._text(item))
                continue
            if not isinstance(item, dict) or len(item.keys() & {"text", "image", "audio"}) != 1:
                raise SkipSample(f"interleaved item {item!r:.80} must be a string or one of text/image/audio")
            kind = next(k for k in ("text", "image", "audio") if k in item)
            out.append(self._text(item[kind]) if kind == "text" else self._media(kind, item[kind]))
        return out

    def _part(self, part: Part, record: dict[str, Any]) -> list[tuple[Segment, bool]]:
        kind = part.kind
        if kind == "special":
            return [(SpecialSegment(part.special), part.learn)]
        if kind == "literal":
            return [(self._text(part.literal), part.learn)]
        value = self._field(record, getattr(part, kind), part)
        if value is None:
            return []
        if kind == "text":
            if part.lead_space and isinstance(value, str) and not value.startswith(" "):
                value = " " + value
            return [(self._text(value), part.learn)]
        if kind in ("image", "audio"):
            return [(self._media(kind, value), part.learn)]
        if kind == "video":
            if self.media is None:
                raise ValueError("the template has video parts but no image tokenizer / audio codec is configured")
            return [(s, part.learn) for s in self.media.video_segments(value)]
        if kind == "interleaved":
            return [(s, part.learn) for s in self._interleaved([value] if isinstance(value, str) else value)]
        return self._chat(value, part.learn)

    def _chat(self, turns: list[dict[str, Any]], learn: bool = True) -> list[tuple[Segment, bool]]:
        """Turns -> segments through the layout's chat template (``TokenLayout.chat_segments``)."""
        roles = self.layout.chat_template.roles
        messages: list[tuple[str, list[Segment]]] = []
        for i, turn in enumerate(turns):
            role = turn.get("role") if isinstance(turn, dict) else None
            if role not in roles:
                raise SkipSample(f"chat turn {i} has role {role!r}; roles are {roles}")
            content = turn.get("content")
            messages.append((role, self._interleaved([content] if isinstance(content, str) else list(content or []))))
        # SFT: only what the assistant says is learned (its content and <end_of_turn>), never its role marker
        return [(seg, learn and learned) for seg, learned in self.layout.chat_segments(messages)]
