"""Direct preference optimisation (Rafailov et al. 2023) on (prompt, chosen, rejected) in any modality.

Legend: P pairs per batch, R = 2P rows (chosen, rejected, chosen, ...), T = seq_len tokens.

Data. A preference shard sample (templates ``preference`` / ``preference_text``) holds the prompt
once and both answers, ``meta["branches"]`` giving the spans of each. :class:`PreferenceLoader`
turns one sample into two rows: the chosen sequence (the sample without the rejected spans) and
the rejected one, each a document of its own, padded to T (a longer pair is cut at T and counted).
Loss weights are the template's learn mask (the answers and their ``<end_of_turn>``, never the
prompt) times the modality weights. Mixture over sources and exact resume are the streaming
loader's (``omnitrain.data.loader.Stream``); pairs are read in the training process (no workers).
With ``model.audio_layout`` delay / depth each row is regrouped to one position per audio frame, as
the LM loader does, and ``log pi(y|x)`` sums every audio level's log-probabilities too
(``Transformer.forward(per_row=True)``).

Loss. With ``log pi(y|x)`` the weighted sum of the answer tokens' log-probabilities and
``h = beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))``::

    loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)

(``eps`` = ``label_smoothing``: conservative DPO, Mitchell 2023, for noisy preference labels).
Logged: ``rewards/chosen`` and ``rewards/rejected`` (``beta * (log pi - log ref)``),
``rewards/margin`` (their difference), ``rewards/accuracy`` (share of pairs with margin > 0),
``logps/chosen`` / ``logps/rejected``.

Reference. The frozen initial model. ``reference: on_the_fly`` keeps a copy and runs it on every
batch (no file, twice the forward cost); ``precomputed`` scores every pair of the training data
once before training (rank 0), writes ``reference_logps`` (default ``run_dir/reference_logps.json``,
keyed by a hash of each pair's content, so resumes and later runs reuse it) and the loader hands the
values out with each batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from omnitrain.data.audio_regroup import AudioGrouping
from omnitrain.data.loader import LoaderConfig, OmniLoader, Stream, read_shard_samples
from omnitrain.tokenizer.layout import MODALITIES


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the KL anchor to the reference
    label_smoothing: float = 0.0  # eps of conservative DPO: the share of labels assumed flipped
    reference: Literal["on_the_fly", "precomputed"] = "on_the_fly"
    reference_logps: str | None = None  # precomputed: the file (None: run_dir/reference_logps.json)

    def __post_init__(self) -> None:
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo: need beta > 0 and 0 <= label_smoothing < 0.5 (got beta={self.beta}, "
                             f"label_smoothing={self.label_smoothing})")  # fmt: skip


# ----------------------------------------------------------------------------- pairs
def pair_key(ids: np.ndarray, meta: dict) -> str:
    """A pair's identity: its ids and branch spans (the same pair in any shard, any run)."""
    h = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.uint32).tobytes())
    h.update(json.dumps(meta["branches"], sort_keys=True).encode())
    return h.hexdigest()[:20]


def pair_rows(ids: np.ndarray, meta: dict, mod_w: np.ndarray) -> list[dict[str, np.ndarray]]:
    """One preference sample -> [chosen, rejected], each {ids, weights} of its whole sequence."""
    if "branches" not in meta:
        raise ValueError(f"sample {meta.get('origin')} is not a preference pair (no meta.branches): build the shards "
                         "with the preference or preference_text template")  # fmt: skip
    n = len(ids)
    mod = np.zeros(n, dtype=np.int8)
    for start, end, m in meta["segments"]:
        mod[start:end] = MODALITIES.index(m)
    learn = np.zeros(n, dtype=np.float32)
    for start, end in meta.get("learn", []):
        learn[start:end] = 1.0
    inside = {b: np.zeros(n, dtype=bool) for b in ("chosen", "rejected")}
    for b, spans in meta["branches"].items():
        for start, end in spans:
            inside[b][start:end] = True
    rows = []
    for other in ("rejected", "chosen"):  # the chosen row drops the rejected spans, and vice versa
        keep = ~inside[other]
        rows.append({"ids": ids[keep].astype(np.int64), "weights": (learn * mod_w[mod])[keep]})
    return rows


def pairs_batch(pairs: list[list[dict[str, np.ndarray]]], seq_len: int, pad_id: int, grouping: AudioGrouping | None = None
                ) -> tuple[dict[str, torch.Tensor], int]:  # fmt: skip
    """P pairs -> a batch of R = 2P rows (chosen, rejected alternating), and how many rows were cut. ``grouping``
    (``model.audio_layout`` delay / depth): each row regrouped to one position per audio frame, as the LM loader
    packs documents (``omnitrain.data.audio_regroup``): ids / targets [R, T, K], loss weights [R, T, K] (a position's
    weight on each channel that has a target), ``seq_len`` counting positions."""
    T1, rows, cut = seq_len + 1, [], 0
    K = () if grouping is None else (grouping.K,)
    for pair in pairs:
        for r in pair:
            row_ids, row_w = r["ids"], r["weights"]
            if grouping is not None:
                row_ids, src = grouping.to_grouped(row_ids)  # [m, K], [m]: the flat token each position stands for
                row_w = row_w[src]
            n = min(len(row_ids), T1)
            cut += int(len(row_ids) > T1)
            ids = np.full((T1, *K), pad_id, dtype=np.int64)  # [T+1] (grouped: [T+1, K])
            if K:
                ids[:, 1:] = -1  # channels >= 1: no audio level
            w = np.zeros(T1, dtype=np.float32)
            docs = np.full(T1, -1, dtype=np.int64)
            ids[:n], w[:n], docs[:n] = row_ids[:n], row_w[:n], 0
            rows.append((ids, w, docs))
    ids = np.stack([r[0] for r in rows])  # [R, T+1] (grouped: [R, T+1, K])
    w = np.stack([r[1] for r in rows])[:, 1:]  # [R, T]
    docs = np.stack([r[2] for r in rows])  # [R, T+1]
    w = np.where(docs[:, 1:] >= 0, w, 0.0)  # [R, T]: padding carries no weight
    targets = ids[:, 1:]
    weights = w[..., None] * (targets >= 0) if K else w  # grouped: [R, T, K]
    batch = {"input_ids": torch.from_numpy(ids[:, :-1].copy()), "targets": torch.from_numpy(targets.copy()),
             "loss_weights": torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)),
             "doc_ids": torch.from_numpy(docs[:, :-1].copy())}  # fmt: skip
    return batch, cut


class PreferenceLoader(OmniLoader):
    """Batches of ``data.batch_size`` pairs (2 x batch_size rows) for one rank, with exact resume.

    Also yields ``ref_logps`` [R] when a table of precomputed reference log-probabilities is given."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1, reference: dict[str, list[float]] | None = None):
        if cfg.workers:
            raise ValueError("the preference loader reads in the training process: set data.workers=0")
        super().__init__(cfg, rank, world_size)
        self.reference, self.cut = reference, 0

    def _start(self) -> Any:
        stream = self.make_stream(0)
        if self.states[0] is not None:
            stream.load(self.states[0])
        self._order = [0]
        return (self._next_pairs(stream) for _ in iter(int, 1))

    def _next_pairs(self, stream: Stream) -> tuple[dict[str, torch.Tensor], dict, int]:
        pairs, keys = [], []
        for _ in range(self.cfg.batch_size):
            name = stream._pick()  # the mixture's deficit scheduler: the source furthest behind its share
            ids, meta = stream.sources[name].next()
            stream.drawn[name] += len(ids)
            stream.docs += 1
            pairs.append(pair_rows(ids, meta, stream.mod_w))
            keys.append(pair_key(ids, meta))
        batch, cut = pairs_batch(pairs, self.cfg.seq_len, self.pad_id, self.grouping)
        stream.truncated += cut
        placed = int((batch["doc_ids"] >= 0).sum())
        stream.placed, stream.capacity = stream.placed + placed, stream.capacity + batch["doc_ids"].numel()
        if self.reference is not None:
            missing = [k for k in keys if k not in self.reference]
            if missing:
                raise ValueError(f"{len(missing)} pair(s) of this batch have no precomputed reference log-probabilities "
                                 "(the data changed since they were computed): delete the reference_logps file to recompute")  # fmt: skip
            batch["ref_logps"] = torch.tensor([v for k in keys for v in self.reference[k]], dtype=torch.float32)  # [R]
        return batch, stream.state(), 0


def make_preference_loader(reference: dict[str, list[float]] | None = None) -> Any:
    return lambda data, rank, world_size: PreferenceLoader(data, rank, world_size, reference)


# ----------------------------------------------------------------------------- the objective
def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[R, T, V] logits -> [R] weighted sums of the targets' log-probabilities."""
    logp = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(weights)  # [R, T]
    return (logp * weights.float()).sum(-1)


def batch_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[R] weighted sums of a batch's target log-probabilities under ``model`` (through its wrapper's forward): flat
    rows from the logits; grouped rows ([R, T, K]) from the model's per-row scoring of every audio level
    (``Transformer.forward(per_row=True)``; ``frames``: depth's frame rows, found on the host by the trainer)."""
    if batch["input_ids"].dim() == 3:
        return model(batch["input_ids"], batch["doc_ids"], batch["targets"], batch["loss_weights"], frames=batch.get("frames"),
                     per_row=True)  # fmt: skip
    return sequence_logps(model(batch["input_ids"], batch["doc_ids"]), batch["targets"], batch["loss_weights"])


class DPOObjective:
    """The DPO loss per pair; the step's loss is the mean over all pairs of the step (all micro-batches, ranks)."""

    keys = ["sum_loss", "pairs", "sum_reward_chosen", "sum_reward_rejected", "sum_correct", "sum_logp_chosen",
            "sum_logp_rejected"] + [f"tokens/{m}" for m in MODALITIES]  # fmt: skip

    def __init__(self, cfg: DPOConfig, modality_table: torch.Tensor, reference: torch.nn.Module | None) -> None:
        self.cfg, self.table, self.reference = cfg, modality_table, reference

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0] // 2, dtype=torch.float32, device=batch["input_ids"].device)

    def loss(self, model: Any, batch: dict[str, torch.Tensor], denom: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        logps = batch_logps(model, batch)  # [R]
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            if self.reference is None:
                raise ValueError("dpo.reference=precomputed but the batch carries no ref_logps")
            with torch.no_grad():
                ref = batch_logps(self.reference, batch)
        chosen, rejected = (logps - ref)[0::2], (logps - ref)[1::2]  # [P] each: log-ratios to the reference
        h = self.cfg.beta * (chosen - rejected)
        eps = self.cfg.label_smoothing
        per_pair = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)  # [P]
        loss = per_pair.sum() / denom
        with torch.no_grad():
            targets, real = batch["targets"], batch["doc_ids"] >= 0  # [R, T] (grouped: targets [R, T, K])
            levels = None
            if targets.dim() == 3:  # grouped: channel 0 by its id, the level codes of channels >= 1 are audio
                levels, targets = ((targets[..., 1:] >= 0) & real[..., None]).sum(), targets[..., 0]
            mod = self.table[targets]
            r_c, r_r = self.cfg.beta * chosen.detach(), self.cfg.beta * rejected.detach()
            sums = [per_pair.detach().sum(), torch.tensor(float(len(h)), device=h.device), r_c.sum(), r_r.sum(),
                    (r_c > r_r).float().sum(), logps.detach()[0::2].sum(), logps.detach()[1::2].sum()]  # fmt: skip
            sums += [((mod == i) & real).sum().float() + (levels if levels is not None and m == "audio" else 0)
                     for i, m in enumerate(MODALITIES)]  # fmt: skip
        return loss, torch.stack(sums)

    def summary(self, sums: torch.Tensor, count: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
        s = dict(zip(self.keys, sums.tolist(), strict=True))
        n = max(s["pairs"], 1.0)
        row = {"loss": s["sum_loss"] / n, "rewards/chosen": s["sum_reward_chosen"] / n, "rewards/rejected": s["sum_reward_rejected"] / n,
               "rewards/margin": (s["sum_reward_chosen"] - s["sum_reward_rejected"]) / n, "rewards/accuracy": s["sum_correct"] / n,
               "logps/chosen": s["sum_logp_chosen"] / n, "logps/rejected": s["sum_logp_rejected"] / n}  # fmt: skip
        return row, {m: int(s[f"tokens/{m}"]) for m in MODALITIES}


# ----------------------------------------------------------------------------- precomputed reference
@torch.no_grad()
def precompute_reference(model: torch.nn.Module, data: LoaderConfig, pad_id: int, path: Path, device: Any) -> dict[str, list[float]]:
    """Score every pair of ``data.sources`` with ``model`` (the frozen reference); write and return
    ``{pair key: [log ref(chosen), log ref(rejected)]}``. An existing file is reused."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())["logps"]
    loader = OmniLoader(data)  # its manifests, shard urls and audio grouping (no stream is started)
    mod_w = np.array([data.modality_weights.get(m, 1.0) for m in MODALITIES], dtype=np.float32)
    was_training = model.training
    model.eval()
    table: dict[str, list[float]] = {}
    for urls in loader.urls.values():
        for url in urls:
            samples = read_shard_samples(url, loader.layout_hash)
            for start in range(0, len(samples), max(data.batch_size, 1)):
                chunk = samples[start : start + data.batch_size]
                batch, _ = pairs_batch([pair_rows(ids, meta, mod_w) for ids, meta in chunk], data.seq_len, pad_id, loader.grouping)
                batch = {k: v.to(device) for k, v in batch.items()}
                logps = batch_logps(model, batch)
                for j, (ids, meta) in enumerate(chunk):
                    table[pair_key(ids, meta)] = [float(logps[2 * j]), float(logps[2 * j + 1])]
    model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"schema_version": 1, "pairs": len(table), "logps": table}) + "\n")
    tmp.replace(path)
    return table
