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
``to_flat`` inverts ``to_grouped`` exactly (tested on every layout).
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
    def to_grouped(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flat ids [n] -> (grouped [m, K] int64, src [m]: the flat index whose modality and loss weight each
        position takes). A trailing ``<boa>`` with nothing after it (a generation prompt) stays as it is."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        K, n = self.K, len(ids)
        blocks, srcs, cur = [], [], 0
        for b in np.flatnonzero(ids == self.boa).tolist():
            if b < cur:
                continue
            single = np.full((b + 1 - cur, K), -1, dtype=np.int64)  # text / image / specials up to <boa>
            single[:, 0] = ids[cur : b + 1]
            blocks.append(single)
            srcs.append(np.arange(cur, b + 1))
            cur = b + 1
            if b + 1 == n:
                break
            stop = np.flatnonzero(ids[b + 1 :] == self.eoa)
            if stop.size == 0:
                raise ValueError(f"audio span at position {b} has no <eoa>: the document is cut or malformed; rebuild its shards")
            e = b + 1 + int(stop[0])
            body = ids[b + 1 : e]
            if body.size % K:
                raise ValueError(f"audio span at position {b} has {body.size} codes, not a multiple of K={K}")
            frames = body.reshape(-1, K)  # [F*K] -> [F, K]
            F = len(frames)
            first = b + 1 + np.arange(F) * K  # flat index of each frame's level-0 code
            if self.layout == "depth":
                grid = np.concatenate([frames, np.full((1, K), -1, dtype=np.int64)])  # [F+1, K]: the frames, <eoa>
                grid[F, 0] = self.eoa
                src = np.append(first, e)
            else:  # delay: level l of frame f at span position f + l
                grid = np.full((F + K - 1, K), -1, dtype=np.int64)  # [F+K-1, K]
                for lvl in range(K):
                    grid[lvl : lvl + F, lvl] = frames[:, lvl]
                grid[F, 0] = self.eoa
                src = np.concatenate([first, np.full(K - 1, e)])
            blocks.append(grid)
            srcs.append(src)
            cur = e + 1
        if cur < n:
            single = np.full((n - cur, K), -1, dtype=np.int64)
            single[:, 0] = ids[cur:]
            blocks.append(single)
            srcs.append(np.arange(cur, n))
        if not blocks:
            return np.zeros((0, K), dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(blocks), np.concatenate(srcs)

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
