"""One stream of the loader (a rank's dataloader worker): the mixture of sources and the packing of
their documents into rows, with the stream's whole position as a small state. The behaviour is
described in ``omnitrain.data.loader``'s docstring; what a stream reads of each source is
``omnitrain.data.reading``'s."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from omnitrain.data.audio_regroup import AudioGrouping
from omnitrain.data.packing import Doc, best_fit, doc_runs, write_doc
from omnitrain.data.reading import SourceStream, _rng
from omnitrain.tokenizer.layout import MODALITIES

if TYPE_CHECKING:
    from omnitrain.data.loader import LoaderConfig

PACKING_KEYS = ("placed", "capacity", "docs", "truncated", "truncated_tokens", "dropped")


# ----------------------------------------------------------------------------- mixture
def source_shares(cfg: LoaderConfig, manifests: dict[str, dict]) -> dict[str, float]:
    """Token share per source: the given weights, or solved from target modality shares."""
    names = list(cfg.sources)
    if cfg.modality_shares is None:
        w = np.array([cfg.sources[n].weight for n in names], dtype=float)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("source weights must be >= 0 with a positive sum")
        return dict(zip(names, (w / w.sum()).tolist(), strict=True))
    from scipy.optimize import nnls  # scipy.optimize: ~0.3 s to import, only for modality_shares

    comp = np.array([[manifests[n]["tokens"][m] for n in names] for m in MODALITIES], dtype=float)  # [M, S]
    comp /= np.maximum(comp.sum(axis=0, keepdims=True), 1)  # each source's modality composition
    target = np.array([cfg.modality_shares.get(m, 0.0) for m in MODALITIES], dtype=float)
    target /= target.sum()
    big = 1e3  # the shares must sum to one: a heavily weighted extra equation
    q, _ = nnls(np.vstack([comp, big * np.ones(len(names))]), np.append(target, big))
    if np.abs(comp @ q - target).max() > 0.01:
        raise ValueError(f"modality_shares {cfg.modality_shares} cannot be reached with these sources (closest: "
                         f"{dict(zip(MODALITIES, np.round(comp @ q, 3).tolist(), strict=True))}); add a source of the missing modality")  # fmt: skip
    return dict(zip(names, q.tolist(), strict=True))


# ----------------------------------------------------------------------------- one stream
class Stream:
    """Mixture + packing for one (rank, worker); yields batches and carries its own state."""

    def __init__(self, cfg: LoaderConfig, sources: dict[str, list[str]], shares: dict[str, float], stream: int,
                 n_streams: int, layout_hash: str | None, pad_id: int, entries: dict[str, list[dict]] | None = None,
                 grouping: AudioGrouping | None = None) -> None:  # fmt: skip
        self.cfg, self.shares, self.pad_id, self.stream = cfg, shares, pad_id, stream
        self.grouping = grouping  # delay / depth: documents regrouped to one position per audio frame (audio_regroup)
        entries, opts = entries or {}, cfg.read_options()
        self.sources = {n: SourceStream(n, urls, stream, n_streams, cfg.seed, layout_hash, entries.get(n), opts)
                        for n, urls in sources.items()}  # fmt: skip
        self.drawn = dict.fromkeys(sources, 0)  # tokens drawn per source
        self.since = dict.fromkeys(sources, 0)  # ``drawn`` when the shares last changed (OmniLoader.set_shares): the mix counts from there
        self.counts = [0] * len(MODALITIES)  # target tokens placed in rows, per modality
        self.pending: Doc | None = None  # split mode: the rest of the last document read, cut at a row's end
        # counters in target positions (T per row), see PACKING_KEYS and OmniLoader.packing_stats
        self.placed = self.capacity = self.docs = self.truncated = self.truncated_tokens = self.dropped = 0
        self.rows: list[list[Doc]] = []  # whole-document mode: the packing buffer's rows, in the order handed out
        self.buffer: dict | None = None  # where that buffer began (sources, drawn, docs, number) + rows handed out
        self.mod_w = np.array([cfg.modality_weights.get(m, 1.0) for m in MODALITIES], dtype=np.float32)
        self._weights = self.mod_w.tolist()

    def _pick(self) -> str:
        """The source furthest behind its share of the tokens drawn (the first of equals)."""
        drawn = {n: d - self.since.get(n, 0) for n, d in self.drawn.items()}
        total = sum(drawn.values()) + 1
        best, best_deficit = "", -float("inf")
        for name, share in self.shares.items():
            deficit = share * total - drawn[name]
            if deficit > best_deficit:
                best, best_deficit = name, deficit
        return best

    def _next_doc(self) -> Doc:
        name = self._pick()
        src = self.sources[name]
        ids, meta = src.next()
        origin = (name, *src.last)  # where it was read (after any part with nothing to read)
        self.docs += 1
        ids, runs = self._ids_runs(ids, meta)
        self.drawn[name] += len(ids)
        return Doc(ids, runs, 0, origin)

    def _ids_runs(self, ids: np.ndarray, meta: dict) -> tuple[np.ndarray, list[tuple[int, int, int, float]]]:
        """A sample's ids and runs as packed: flat, or regrouped to [positions, K] (``cfg.audio_layout``)."""
        runs = doc_runs(len(ids), meta, self._weights)
        return (ids, runs) if self.grouping is None else self.grouping.regroup_runs(ids, runs)

    def _split_row(self, ids: np.ndarray, weights: np.ndarray, docs: np.ndarray) -> None:
        """Fill one row with documents, cutting the last one: its rest starts the next row, its first
        token repeated as an input (that token was learned as this row's last target)."""
        T1, pos, doc_no = len(ids), 0, 0
        while pos < T1:
            doc = self.pending if self.pending is not None else self._next_doc()
            self.pending = None
            n = len(doc.ids) - doc.start
            take = n if n < T1 - pos else T1 - pos
            write_doc(doc, take, pos, doc_no, ids, weights, docs, self.counts)
            if take < n:
                self.pending = Doc(doc.ids, doc.runs, doc.start + take - 1, doc.origin)
            pos, doc_no = pos + take, doc_no + 1
        self.placed += T1 - 1

    def _pack_buffer(self, number: int) -> None:
        """Read ``pack_buffer`` documents and pack them whole by best-fit decreasing into ``self.rows``."""
        self.buffer = {"number": number, "sources": {n: s.state() for n, s in self.sources.items()},
                       "drawn": dict(self.drawn), "docs": self.docs, "rows_out": 0,
                       "shares": dict(self.shares), "since": dict(self.since)}  # fmt: skip
        docs = [self._next_doc() for _ in range(self.cfg.pack_buffer)]
        rows = best_fit([len(d) for d in docs], self.cfg.seq_len + 1)
        # best fit opens rows longest document first: hand them out shuffled, so that a batch's
        # lengths and sources do not depend on where it falls in the buffer
        order = _rng(self.cfg.seed, "rows", self.stream, number).permutation(len(rows))
        self.rows = [[docs[i] for i in rows[r]] for r in order]

    def _whole_row(self, ids: np.ndarray, weights: np.ndarray, docs: np.ndarray) -> None:
        """Fill one row with whole documents: the next row of the packing buffer."""
        if self.buffer is None or self.buffer["rows_out"] == len(self.rows):
            self._pack_buffer(0 if self.buffer is None else self.buffer["number"] + 1)
        row = self.rows[self.buffer["rows_out"]]
        self.buffer["rows_out"] += 1
        T1, pos = len(ids), 0
        for doc_no, doc in enumerate(row):
            take = min(len(doc), T1)  # only a document alone in its row can be longer than the row
            write_doc(doc, take, pos, doc_no, ids, weights, docs, self.counts)
            pos += take
        if len(row[0]) > T1:  # truncated: its first T+1 tokens fill the row, the rest is dropped
            self.truncated += 1
            self.truncated_tokens += T1 - 1
            self.dropped += len(row[0]) - T1
        else:
            self.placed += pos - 1

    def next_batch(self) -> dict[str, torch.Tensor]:
        B, T1 = self.cfg.batch_size, self.cfg.seq_len + 1
        K = () if self.grouping is None else (self.grouping.K,)
        ids = np.full((B, T1, *K), self.pad_id, dtype=np.int64)  # [B, T+1] (grouped: [B, T+1, K])
        if K:
            ids[..., 1:] = -1  # channels 1..K-1: no audio level
        weights = np.zeros((B, T1), dtype=np.float32)  # [B, T+1] weight of each token as a target
        docs = np.full((B, T1), -1, dtype=np.int64)  # [B, T+1] document number in its row, -1: padding
        fill = self._split_row if self.cfg.split_documents else self._whole_row
        for r in range(B):
            fill(ids[r], weights[r], docs[r])
        self.capacity += B * (T1 - 1)
        targets = ids[:, 1:]
        loss_weights = weights[:, 1:] if not K else weights[:, 1:, None] * (targets >= 0)  # grouped: [B, T, K]
        return {  # (write_doc gave 0 weight to a target whose input is in another document, and to padding)
            "input_ids": torch.from_numpy(ids[:, :-1].copy()),
            "targets": torch.from_numpy(targets.copy()),
            "loss_weights": torch.from_numpy(np.ascontiguousarray(loss_weights, dtype=np.float32)),
            "doc_ids": torch.from_numpy(docs[:, :-1].copy()),
            # every row one document (number 0) and then padding: plain causal attention gives the same result (padding
            # comes last and carries no loss), so the model may skip the document mask. Decided here, on the host, from
            # the numpy rows: not a data-dependent branch (a device read) in the model's forward
            "one_document": bool((docs[:, :-1] <= 0).all()),
        }

    def state(self) -> dict:
        pending, d = None, self.pending
        if d is not None and d.origin is not None:  # where its document was read, to read it again on resume
            name, epoch, shard, sample = d.origin
            pending = {"source": name, "epoch": epoch, "shard": shard, "sample": sample, "start": d.start}
        elif d is not None:  # the rest of a document resumed from a version-1 state: kept in that form
            mod, w = np.zeros(len(d.ids), dtype=np.int8), np.zeros(len(d.ids), dtype=np.float32)
            for a, b, m, wt in d.runs:
                mod[a:b], w[a:b] = m, wt
            pending = {"ids": d.ids[d.start :].tolist(), "weights": w[d.start :].tolist(), "mod": mod[d.start :].tolist()}
        return {"sources": {n: s.state() for n, s in self.sources.items()}, "drawn": dict(self.drawn), "since": dict(self.since),
                "modality_tokens": dict(zip(MODALITIES, self.counts, strict=True)), "pending": pending,
                "packing": {k: getattr(self, k) for k in PACKING_KEYS},
                "buffer": None if self.buffer is None else dict(self.buffer)}  # fmt: skip

    def load(self, s: dict) -> None:
        for n, st in s["sources"].items():
            self.sources[n].load(st)
        self.drawn = dict(s["drawn"])
        self.since = dict(s.get("since") or dict.fromkeys(self.drawn, 0))
        self.counts = [s["modality_tokens"].get(m, 0) for m in MODALITIES]
        for k, v in _packing(s).items():
            setattr(self, k, v)
        self.pending, self.buffer, self.rows = None, None, []
        pending, buffer = s.get("pending"), s.get("buffer")
        if pending is not None and "source" in pending:  # re-read the cut document: its source stands just after it
            src = self.sources[pending["source"]]
            after = (src.epoch, src.shard, src.sample)
            src.epoch, src.shard, src.sample = pending["epoch"], pending["shard"], pending["sample"]
            ids, meta = src.next()
            assert (src.epoch, src.shard, src.sample) == after, "the cut document's position does not lead to the saved one"
            origin = (pending["source"], pending["epoch"], pending["shard"], pending["sample"])
            self.pending = Doc(*self._ids_runs(ids, meta), pending["start"], origin)
        elif pending is not None:  # version 1: the rest itself, as lists
            ids, w, mod = (np.asarray(pending[k]) for k in ("ids", "weights", "mod"))
            cuts = [0, *(np.flatnonzero((mod[1:] != mod[:-1]) | (w[1:] != w[:-1])) + 1).tolist(), len(ids)]
            runs = [(a, b, int(mod[a]), float(w[a])) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
            self.pending = Doc(ids.astype(np.uint32), runs, 0, None)
        if isinstance(buffer, dict):  # re-read and re-pack the buffer from where it began
            saved = ({n: src.state() for n, src in self.sources.items()}, dict(self.drawn), self.docs)
            shares, since = self.shares, self.since  # the buffer was packed with the mixture of its time
            for n, st in buffer["sources"].items():
                self.sources[n].load(st)
            self.drawn, self.docs = dict(buffer["drawn"]), buffer["docs"]
            self.shares, self.since = buffer.get("shares", shares), dict(buffer.get("since", since))
            self._pack_buffer(buffer["number"])
            self.buffer["rows_out"] = buffer["rows_out"]
            self.shares, self.since = shares, since
            assert ({n: src.state() for n, src in self.sources.items()}, self.drawn, self.docs) == saved, "re-packing the buffer did not reach the saved position"
        elif buffer:  # version 1: documents looked ahead, not placed yet
            warnings.warn(f"loader state version 1: {len(buffer)} documents read ahead for packing are skipped "
                          "(whole-document packing is best-fit decreasing since version 2)", stacklevel=2)  # fmt: skip


def _packing(state: dict) -> dict[str, int]:
    """A stream state's packing counters by name (version 1 saved [placed, capacity, truncated, docs])."""
    p = state["packing"]
    p = dict(zip(("placed", "capacity", "truncated", "docs"), p, strict=True)) if isinstance(p, list) else p
    return {k: p.get(k, 0) for k in PACKING_KEYS}
