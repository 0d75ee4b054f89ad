"""Layout-constrained decoding: which ids may come next, given what was generated so far.

The grammar is the serialization of :mod:`omnitrain.tokenizer.layout`:

* text mode: text ids, text-level specials (not <pad>), <boi>, <boa>;
* after <boi>: a size token <h>, then a size token <w>;
* inside an image: w image codes then <eol>, h times, then <eoi> (exactly h x w codes);
* inside audio: level-l codes at position l of each frame (K per frame, level order), and <eoa>
  only at a frame boundary.

Generation applies ``allowed()`` as a mask on the logits before sampling and feeds every chosen
id to ``step()``. ``feed(prefix)`` replays a prompt.
"""

from __future__ import annotations

import numpy as np

from omnitrain.tokenizer.layout import TokenLayout


class LayoutConstraint:
    """Incremental state machine over one sequence (one per batch row)."""

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        sp = layout.specials
        self._text = layout.mask("text")
        for name in ("bos", "eos", "system", "user", "assistant", "end_of_turn"):
            self._text[sp[name]] = True
        if layout.image_codebook_size:
            self._text[sp["boi"]] = True
        if layout.audio_levels:
            self._text[sp["boa"]] = True
        self._size = layout.mask("size")
        self._image = layout.mask("image")
        self._levels = [layout.mask("audio", level=k) for k in range(layout.audio_levels)]
        self._only = {name: self._one(sp[name]) for name in ("eol", "eoi")}
        self._level0_or_eoa = self._levels[0] | self._one(sp["eoa"]) if layout.audio_levels else None
        self.reset()

    def _one(self, i: int) -> np.ndarray:
        m = np.zeros(self.layout.vocab_size, dtype=bool)
        m[i] = True
        return m

    def reset(self) -> None:
        self.mode = "text"  # text | h | w | image | audio
        self.h = self.w = self.row = self.col = self.count = 0

    @property
    def modality(self) -> str:
        """The modality of the next token: "text", "image" or "audio"."""
        return {"text": "text", "audio": "audio"}.get(self.mode, "image")

    def allowed(self) -> np.ndarray:
        """Boolean [V] mask of the ids allowed next."""
        if self.mode == "text":
            return self._text
        if self.mode in ("h", "w"):
            return self._size
        if self.mode == "image":
            if self.row == self.h:
                return self._only["eoi"]
            return self._image if self.col < self.w else self._only["eol"]
        level = self.count % self.layout.audio_levels
        return self._level0_or_eoa if level == 0 else self._levels[level]

    def step(self, token: int) -> None:
        """Advance by one id; raises ValueError if ``token`` is not allowed here."""
        if not self.allowed()[token]:
            raise ValueError(f"{self.layout.token_name(token)} is not allowed in {self.mode} mode")
        sp, lay = self.layout.specials, self.layout
        if self.mode == "text":
            if token == sp["boi"]:
                self.mode = "h"
            elif token == sp["boa"]:
                self.mode, self.count = "audio", 0
        elif self.mode == "h":
            self.mode, self.h = "w", token - lay.size_base + 1
        elif self.mode == "w":
            self.mode, self.w, self.row, self.col = "image", token - lay.size_base + 1, 0, 0
        elif self.mode == "image":
            if token == sp["eoi"]:
                self.mode = "text"
            elif token == sp["eol"]:
                self.row, self.col = self.row + 1, 0
            else:
                self.col += 1
        else:  # audio
            self.mode, self.count = ("text", 0) if token == sp["eoa"] else ("audio", self.count + 1)

    def feed(self, ids: np.ndarray | list[int]) -> LayoutConstraint:
        for t in np.asarray(ids).reshape(-1):
            self.step(int(t))
        return self
