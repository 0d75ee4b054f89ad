"""Audio layouts at the shard/loader boundary: flat shards regrouped into one position per audio frame.

Legend: n flat ids of a document, m positions, F frames of an audio span, K levels (RVQ codebooks).

Shards always hold the flat serialization of ``omnitrain.tokenizer.layout`` (``<boa>`` then F frames of K
level-ordered codes, ``<eoa>``), so one shard set serves every ``model.audio_layout``; the loader regroups
each document before packing (``Stream``), so rows pack *positions* and ``seq_len`` counts positions.
A grouped document is an int64 array [m, K]: channel 0 holds the position's token (text, special, image
code, the level-0 code of a frame); channel l >= 1 holds a level-l audio code or -1 (none).

* ``flat``: no regrouping (today's layout: K positions per frame).
* ``depth``: ``<boa>``, then frame f at one position ``[c_f0 .. c_f(K-1)]``, then ``<eoa>``: F + 2 positions.
* ``delay`` (MusicGen's delay pattern, Copet et al. 2023): level l of frame f sits at span position f + l,
  so a position's level-l code is predicted having seen the lower levels of its frame. ``<boa>``, F frame
  positions, then K-1 tail positions that flush the delayed levels: the first carries ``<eoa>`` on
  channel 0 (so the end of the audio is decided where its last level-0 code would have followed), the
  others nothing (-1). F + K positions.

Positions per audio second: 1/K of flat for depth, and for delay up to the K-1 tail positions per span.
``to_flat`` inverts ``to_grouped`` exactly (tested on every layout). ``cells`` says which cell each flat id went
to (log-likelihoods score a continuation there). Generation prompts may end with ``<boa>`` or, with
``open_end``, inside a span on a whole frame (speech continuation; delay: ``pending_levels`` are the prompt's
codes that belong to the next K-1 positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omnitrain.tokenizer.layout import TokenLayout

AUDIO_LAYOUTS = ("flat", "delay", "depth")


def check_audio_layout(value: str, key: str) -> None:
    if value not in AUDIO_LAYOUTS:
        raise ValueError(f"{key}={value!r}: choose one of {', '.join(AUDIO_LAYOUTS)} (flat: K positions per audio "
                         "frame; delay / depth: one)")  # fmt: skip


@dataclass(frozen=True)
class AudioGrouping:
    """What regrouping needs of a token layout, for one audio layout (delay or depth)."""

    layout: str  # delay | depth
    K: int  # levels
    C: int  # codes per level
    audio_base: int
    boa: int
    eoa: int

    @classmethod
    def of(cls, layout: TokenLayout, audio_layout: str) -> AudioGrouping | None:
        """The grouping of ``audio_layout`` under ``layout`` (None for flat)."""
        check_audio_layout(audio_layout, "audio_layout")
        if audio_layout == "flat":
            return None
        if layout.audio_levels < 2:
            raise ValueError(f"audio_layout={audio_layout} groups the K levels of a frame, but the token layout has "
                             f"K={layout.audio_levels}: use audio_layout=flat")  # fmt: skip
        sp = layout.specials
        return cls(audio_layout, layout.audio_levels, layout.audio_codebook_size, layout.audio_base, sp["boa"], sp["eoa"])

    @property
    def tail(self) -> int:
        """Positions after the last frame that carry delayed levels (the first also holds ``<eoa>``)."""
        return self.K - 1 if self.layout == "delay" else 0

    # ------------------------------------------------------------------ flat -> grouped
    def to_grouped(self, ids: np.ndarray, open_end: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Flat ids [n] -> (grouped [m, K] int64, src [m]: the flat index whose modality and loss weight each
        position takes). A trailing ``<boa>`` with nothing after it (a generation prompt) stays as it is;
        ``open_end``: so may a trailing span without ``<eoa>`` holding whole frames (a speech-continuation
        prompt), grouped as far as the prompt goes (delay: the levels of its last K-1 frames that sit at later
        positions are left out; ``pending_levels`` gives them)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        cells, src = self.cells(ids, open_end)
        return np.where(cells >= 0, ids[cells.clip(min=0)], -1), src

    def cells(self, ids: np.ndarray, open_end: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Where ``to_grouped`` puts each flat id: (cells [m, K], the flat index of each grouped cell or -1 where it
        is empty; src [m]). Every flat id lands in exactly one cell (a log-likelihood scores its cell)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        K, n = self.K, len(ids)
        blocks, srcs, cur = [], [], 0

        def single(a: int, b: int) -> None:  # text / image / specials: one id per position, on channel 0
            cell = np.full((b - a, K), -1, dtype=np.int64)
            cell[:, 0] = np.arange(a, b)
            blocks.append(cell)
            srcs.append(np.arange(a, b))

        for b in np.flatnonzero(ids == self.boa).tolist():
            if b < cur:
                continue
            single(cur, b + 1)  # up to and with <boa>
            cur = b + 1
            if b + 1 == n:
                break
            stop = np.flatnonzero(ids[b + 1 :] == self.eoa)
            if stop.size == 0 and not open_end:
                raise ValueError(f"audio span at position {b} has no <eoa>: the document is cut or malformed; rebuild its shards")
            e = b + 1 + int(stop[0]) if stop.size else n  # open_end: the span runs to the end
            codes = e - b - 1
            if codes % K:
                where = "ends inside a frame" if e == n else "is malformed"
                raise ValueError(f"the audio span at position {b} {where}: {codes} codes, not a multiple of K={K}"
                                 + ("; end the prompt on a whole frame" if e == n else ""))  # fmt: skip
            F = codes // K
            frames = b + 1 + np.arange(F * K).reshape(F, K)  # [F, K] flat index of each frame's codes
            if self.layout == "depth":
                grid = frames if e == n else np.concatenate([frames, np.full((1, K), -1, dtype=np.int64)])  # [F(+1), K]
            else:  # delay: level l of frame f at span position f + l
                grid = np.full((F + K - 1 if e < n else F, K), -1, dtype=np.int64)  # [F+K-1 (open: F), K]
                for lvl in range(K):
                    n_l = max(0, min(F, len(grid) - lvl))  # (open: level l of the last l frames comes later)
                    grid[lvl : lvl + n_l, lvl] = frames[:n_l, lvl]
            if e < n:
                grid[F, 0] = e  # <eoa>: where the next frame's level 0 would be
            blocks.append(grid)
            srcs.append(np.concatenate([frames[:, 0], np.full(len(grid) - F, e)]))
            cur = e + 1
        if cur < n:
            single(cur, n)
        if not blocks:
            return np.zeros((0, K), dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(blocks), np.concatenate(srcs)

    def pending_levels(self, ids: np.ndarray) -> np.ndarray:
        """delay, a prompt ending in an open span of F whole frames: [K-1, K] the codes of the next K-1 positions
        that the prompt already fixes (row j: level l > j of frame F+j-l; -1 elsewhere, and where that frame
        would precede the span). depth / no open span: [0, K]."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        K, b = self.K, self.open_span_start(ids)
        if self.layout != "delay" or b is None:
            return np.zeros((0, K), dtype=np.int64)
        frames = ids[b + 1 :].reshape(-1, K)  # [F, K] (to_grouped has checked whole frames)
        F, out = len(frames), np.full((K - 1, K), -1, dtype=np.int64)
        for j in range(K - 1):
            for lvl in range(j + 1, K):
                if 0 <= F + j - lvl < F:
                    out[j, lvl] = frames[F + j - lvl, lvl]
        return out

    def open_span_start(self, ids: np.ndarray) -> int | None:
        """The index of the ``<boa>`` of an audio span still open at the end of ``ids`` (None: none is open)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        opens = np.flatnonzero(ids == self.boa)
        if not opens.size or (ids[opens[-1] :] == self.eoa).any():
            return None
        return int(opens[-1])

    def regroup_runs(self, ids: np.ndarray, runs: list[tuple[int, int, int, float]]
                     ) -> tuple[np.ndarray, list[tuple[int, int, int, float]]]:  # fmt: skip
        """A document's flat ids and runs ``(start, end, modality, weight)`` -> grouped ids [m, K] and runs over positions."""
        grouped, src = self.to_grouped(ids)
        mod, w = np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=np.float64)
        for s, e, m, wt in runs:
            mod[s:e], w[s:e] = m, wt
        pm, pw = mod[src], w[src]  # [m]
        cuts = [0, *(np.flatnonzero((pm[1:] != pm[:-1]) | (pw[1:] != pw[:-1])) + 1).tolist(), len(src)]
        out = [(a, b, int(pm[a]), float(pw[a])) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
        return grouped, out

    # ------------------------------------------------------------------ grouped -> flat
    def to_flat(self, grouped: np.ndarray) -> np.ndarray:
        """Grouped [m, K] -> flat ids [n], the exact inverse of ``to_grouped`` (a trailing open span: its
        complete frames so far; delay: frames whose every level has been placed)."""
        g = np.asarray(grouped, dtype=np.int64)
        K, out, p, m = self.K, [], 0, len(g)
        while p < m:
            tok = int(g[p, 0])
            if tok != self.boa:
                if tok >= 0:
                    out.append(tok)
                p += 1
                continue
            out.append(tok)
            end = p + 1 + int(np.argmax(g[p + 1 :, 0] == self.eoa)) if (g[p + 1 :, 0] == self.eoa).any() else m
            F = end - p - 1
            if self.layout == "depth":
                out += g[p + 1 : end].reshape(-1).tolist()
            else:
                span = g[p + 1 : min(end + K - 1, m)]  # [F + K - 1 (or fewer: still open), K]
                done = F if end < m else max(0, len(span) - (K - 1))
                frames = np.stack([span[lvl : lvl + done, lvl] for lvl in range(K)], axis=1) if done else np.zeros((0, K), np.int64)
                out += frames.reshape(-1).tolist()
            if end < m:
                out.append(self.eoa)
            p = end + (self.tail if self.layout == "delay" else 1) if end < m else m  # past <eoa> (delay: and its tail)
        return np.asarray(out, dtype=np.int64)
