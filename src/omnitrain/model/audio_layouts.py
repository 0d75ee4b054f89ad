"""The model side of ``model.audio_layout`` delay / depth: frame embeddings, per-level heads and their loss.

Legend: B batch, T positions, K levels (channels), D dim, V vocab, C codes per level, N = B*T rows, Na frames.

Batches of these layouts come from the loader regrouped (``omnitrain.data.audio_regroup``): ``input_ids``,
``targets``, ``loss_weights`` [B, T, K], channel 0 the position's token, channels 1..K-1 higher audio levels
(-1: none). The input of a position is the sum of the embeddings of its codes (MusicGen, Moshi), through the
one ``tok_embeddings``: a level's codes have their own ids, so no table is added. Outputs:

* channel 0 (text, specials, image codes, level-0 audio codes, ``<eoa>``): the main output head over the whole
  vocabulary, exactly as in flat;
* ``delay``: level l >= 1 from the same hidden state, scored against level l's C rows of the output matrix
  only (K slices of one matrix, so K heads without new parameters);
* ``depth``: levels 1..K-1 of a frame from ``omnitrain.model.depth.DepthTransformer``, given the hidden
  state and the frame's lower levels (teacher forcing in training).

The loss sums every channel's weighted cross entropy (+ z-loss) over the step's total weight, so a level
code weighs what it weighs in flat. Stats: per modality (channels >= 1 count as audio; ``tokens/audio``
counts every level code, as in flat) and per level (``LEVEL_KEYS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from omnitrain.model.loss import LEVEL_KEYS, LOSS_KEYS, MAX_AUDIO_LEVELS, linear_cross_entropy, loss_stats
from omnitrain.tokenizer.layout import AUDIO

if TYPE_CHECKING:
    from omnitrain.model.transformer import Transformer


def audio_base_of(modality_table: torch.Tensor) -> int:
    """The first id of the audio code range: the layout puts it last (``[audio_base, V)``), after the image range
    and its size tokens, so it is where the table's final run of audio ids begins (<boa>/<eoa> are earlier)."""
    table = modality_table.cpu()
    not_audio = torch.nonzero(table != AUDIO)
    return int(not_audio[-1]) + 1 if len(not_audio) else 0


def level_slice(model: Transformer, level: int, K: int) -> tuple[int, int]:
    """[lo, hi) ids of audio level ``level``."""
    base = model.audio_base
    C = (model.cfg.vocab_size - base) // K
    if base >= model.cfg.vocab_size or C * K != model.cfg.vocab_size - base:
        raise ValueError(f"model.audio_layout={model.cfg.audio_layout} needs the layout's audio ranges: call "
                         "model.set_modalities(layout.modality_of(arange(V))) (training and load_model do)")  # fmt: skip
    return base + level * C, base + (level + 1) * C


def frame_rows(targets: torch.Tensor) -> torch.Tensor:
    """targets [B, T, K] -> [Na] the flat indices (into B*T) of the positions whose target is an audio frame. ``nonzero``
    waits for its input: the trainer calls this on the loader's host batch (``train.step``), not on the device."""
    return torch.nonzero(targets[..., 1].flatten() >= 0)[:, 0]


def grouped_loss(model: Transformer, h: torch.Tensor, targets: torch.Tensor, w: torch.Tensor, denom: torch.Tensor | float,
                 frames: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """h [B, T, D] (after the final norm), targets / w [B, T, K] -> (loss, stats [len(LOSS_KEYS)]). depth: ``frames``
    [Na] (``frame_rows(targets)``, computed on the host by the trainer; None: here, a device-to-host sync)."""
    B, T, K = targets.shape
    if K > MAX_AUDIO_LEVELS:
        raise ValueError(f"K={K} audio levels: at most {MAX_AUDIO_LEVELS} are logged per level (loss.MAX_AUDIO_LEVELS)")
    z, weight = model.cfg.z_loss, model.output.weight
    hf, t0, w0 = h.flatten(0, 1), targets[..., 0].flatten(), w[..., 0].flatten()  # [N, D], [N], [N]
    loss, ce, correct, lse = linear_cross_entropy(hf, weight, t0, w0, z, denom)  # channel 0: the whole vocabulary
    stats = loss_stats(ce, correct, lse, t0, w0, model.modality_table, z)  # [len(LOSS_KEYS)], levels zero
    lo0, hi0 = level_slice(model, 0, K)
    level0 = ((t0 >= lo0) & (t0 < hi0)).float()
    _add_level(stats, 0, ce, correct, w0 * level0, level0)
    if model.cfg.audio_layout == "delay":  # level l from the same hidden state, against its own output rows
        rows = [(hf, targets[..., lvl].flatten(), w[..., lvl].flatten(), lvl) for lvl in range(1, K)]
    else:  # depth: only the positions whose target is a frame go through the depth transformer
        frames = frame_rows(targets) if frames is None else frames  # [Na] (here: a host sync, the number of frames)
        tf, wf = targets.flatten(0, 1)[frames], w.flatten(0, 1)[frames]  # [Na, K]
        prev = model.tok_embeddings(tf[:, : K - 1])  # [Na, K-1, D]: the frame's levels 0..K-2, teacher-forced
        out = model.depth(hf[frames], prev)  # [Na, K-1, D]: step s predicts level s+1
        rows = [(out[:, lvl - 1], tf[:, lvl], wf[:, lvl], lvl) for lvl in range(1, K)]
    for x, t, wl, lvl in rows:
        lo, hi = level_slice(model, lvl, K)
        t_local = torch.where(t >= 0, t - lo, t)  # ids -> codes of the level (-1 stays ignored)
        l_loss, l_ce, l_correct, l_lse = linear_cross_entropy(x, weight[lo:hi], t_local, wl, z, denom)
        loss = loss + l_loss
        present = (t >= 0).float()
        wl = wl * present
        stats[0] += (l_ce * wl).sum().detach()
        stats[1] += z * (l_lse.detach().square() * wl).sum()
        i = LOSS_KEYS.index("sum_loss/audio")
        sel = (wl > 0).float()
        stats[i : i + 3] += torch.stack([(l_ce * sel).sum(), (l_correct.float() * sel).sum(), sel.sum()])
        _add_level(stats, lvl, l_ce, l_correct, wl, present)
    return loss, stats


def grouped_logps(model: Transformer, h: torch.Tensor, targets: torch.Tensor, w: torch.Tensor,
                  frames: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """h [B, T, D] (after the final norm), targets / w [B, T, K] -> [B]: each row's weighted sum of its targets'
    log-probabilities over every channel, as ``grouped_loss`` scores them (channel 0 over the vocabulary, level l over
    its C rows, from the hidden state or the depth transformer), differentiable: DPO's sequence log-likelihood
    (``omnitrain.train.dpo``). The logits are materialised ([B, T, V]), as DPO does for flat rows."""
    B, T, K = targets.shape
    weight, hf = model.output.weight, h.flatten(0, 1)  # [V, D], [N, D]

    def logp(x: torch.Tensor, rows: torch.Tensor, t: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        """x [n, D] scored against the output rows ``rows`` [c, D], local targets t [n] (-1: none) -> [n] weighted."""
        lp = torch.log_softmax((x @ rows.t()).float(), dim=-1)  # [n, c]
        return lp.gather(-1, t.clamp(min=0)[:, None])[:, 0] * (wt * (t >= 0))

    total = logp(hf, weight, targets[..., 0].flatten(), w[..., 0].flatten())  # [N] channel 0: the whole vocabulary
    if model.cfg.audio_layout == "delay":
        levels = [(hf, targets[..., lvl].flatten(), w[..., lvl].flatten(), lvl, None) for lvl in range(1, K)]
    else:  # depth: the frames' levels from the depth transformer, teacher-forced (as in grouped_loss)
        frames = frame_rows(targets) if frames is None else frames  # [Na]
        tf, wf = targets.flatten(0, 1)[frames], w.flatten(0, 1)[frames]  # [Na, K]
        out = model.depth(hf[frames], model.tok_embeddings(tf[:, : K - 1]))  # [Na, K-1, D]
        levels = [(out[:, lvl - 1], tf[:, lvl], wf[:, lvl], lvl, frames) for lvl in range(1, K)]
    for x, t, wl, lvl, at in levels:
        lo, hi = level_slice(model, lvl, K)
        part = logp(x, weight[lo:hi], torch.where(t >= 0, t - lo, t), wl)  # [N] or [Na]
        total = total + part if at is None else total.index_add(0, at, part)
    return total.view(B, T).sum(-1)  # [N] -> [B, T] -> [B]


def _add_level(stats: torch.Tensor, level: int, ce: torch.Tensor, correct: torch.Tensor, w: torch.Tensor, present: torch.Tensor) -> None:
    """Add one level's sums (loss, correct, targets over the rows with weight > 0) to ``stats`` in place."""
    sel = ((w > 0) & (present > 0)).float()
    i = len(LOSS_KEYS) - len(LEVEL_KEYS) + 3 * level
    stats[i : i + 3] += torch.stack([(ce.detach() * sel).sum(), (correct.float() * sel).sum(), sel.sum()])
