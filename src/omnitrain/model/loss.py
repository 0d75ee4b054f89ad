"""The training loss of the transformer, and its bookkeeping per modality.

Legend: B batch, T tokens, N = B*T rows, D dim, V vocab, M modalities.

* ``linear_cross_entropy``: the output projection fused with the weighted cross entropy (+ z-loss),
  a chunk of rows of logits at a time (sized from a byte budget, ``chunk_rows``), so the [N, V] logits
  are never held whole. Its matmuls run in the compute dtype (bf16 under autocast or with bf16
  weights; the GEMMs accumulate in fp32) and everything after them in fp32.
* ``lm_loss``: the same numbers from logits a caller already holds (the reference the fused path is
  tested against).
* ``LOSS_KEYS`` / ``loss_stats`` / ``loss_metrics``: additive sums per modality (summed over
  micro-batches and ranks before anything is divided), then the logged metrics
  (``loss/<m>``, ``acc/<m>``, ``tokens/<m>``, ``z_loss``); with a delay / depth audio layout also per audio
  level (``loss/audio_l<l>``, ``acc/audio_l<l>``, ``tokens/audio_l<l>``: ``omnitrain.model.audio_layouts``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnitrain.tokenizer.layout import MODALITIES

# Bytes of one chunk's fp32 [n, V] logits (the chunk's transient peak is ~2.5x this: logits, log-softmax, and the
# softmax in the compute dtype). CUDA: 256 MiB is 1,024 rows at V = 64k. Estimated, not measured (no GPU here): each
# of the ~47 element-wise passes over such a chunk moves ~0.1 ms of memory at 3 TB/s, so a kernel launch (~5 us) is
# noise, where at the former 32 MiB (128 rows) launches were about a third of the time; ~0.6 GiB transient is <1 % of
# an 80 GB GPU. CPU: 32 MiB, the former size (2^23 logits), measured ~15 % faster than projection + F.cross_entropy;
# CPU has no launch cost to amortise, and the 2-core test machines share their RAM.
CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}

# Additive sums of one batch: summed over micro-batches and ranks before anything is divided.
# Then per audio level, for the delay / depth layouts (zeros in flat, and for levels a layout lacks): a fixed
# number of slots so that the objective's keys do not depend on the layout (Mimi and EnCodec have at most 32 levels)
MAX_AUDIO_LEVELS = 32
LEVEL_KEYS = [f"{k}/audio_l{lvl}" for lvl in range(MAX_AUDIO_LEVELS) for k in ("sum_loss", "sum_correct", "tokens")]
LOSS_KEYS = ["sum_weighted", "sum_z"] + [f"{k}/{m}" for m in MODALITIES for k in ("sum_loss", "sum_correct", "tokens")] + LEVEL_KEYS


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i w_i (CE_i + z lse_i^2) / denom`` of ``logits = h @ weight.T``, ``chunk`` rows of logits at a time.

    The gradients are computed in the forward pass, chunk by chunk, and backward only scales them by
    the incoming gradient: memory O(chunk x V) instead of several [N, V] tensors (logits,
    log-softmax, their gradients). With p the softmax, s_i = w_i / denom, a_i = s_i (1 + 2 z lse_i):
    d/dlogit_ij = a_i p_ij - s_i [j = t_i]. The row scales and the one-hot term are applied to the
    small [n, D] factors, so the [n, V] chunk sees only log-softmax, argmax, exp and two matmuls.

    ``dtype``: the matmuls' dtype. fp32: everything in fp32 (the CPU tests' 1e-5 parity). bf16: h, weight and
    the softmax enter the three matmuls in bf16 (the GEMMs accumulate in fp32; their outputs are rounded to bf16
    and go on in fp32), the log-softmax, CE, z-loss and the sum of grad_weight over chunks stay fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, w, z_loss, denom, chunk, dtype):  # noqa: ANN001, ANN205
        N = h.shape[0]
        low = dtype != torch.float32
        hm, wm = h.to(dtype), weight.to(dtype)  # cast once, not per chunk as autocast would (fp32: no copy)
        need = h.requires_grad or weight.requires_grad
        f32 = dict(dtype=torch.float32, device=h.device)
        ce, lse, correct = torch.empty(N, **f32), torch.empty(N, **f32), torch.empty(N, dtype=torch.bool, device=h.device)
        grad_h = torch.empty_like(h) if need else None
        grad_w = torch.zeros(weight.shape, **f32) if need else None
        s_all = w / denom  # [N]
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            hc, t = hm[s:e], targets[s:e]
            logits = (hc @ wm.t()).float()  # [n, V]
            correct[s:e] = logits.argmax(-1) == t
            logp = torch.log_softmax(logits, dim=-1)  # [n, V]
            rows = torch.arange(e - s, device=h.device)
            ce[s:e] = -logp[rows, t]
            lse_c = logits[:, 0] - logp[:, 0]  # logsumexp, from any column
            lse[s:e] = lse_c
            if need:
                del logits
                p = logp.exp_().to(wm.dtype)  # softmax, in place
                sc = s_all[s:e, None]  # [n, 1]
                a = sc * (1.0 + 2.0 * z_loss * lse_c[:, None])  # [n, 1]
                grad_h[s:e] = ((p @ wm).float() * a - weight[t].float() * sc).to(h.dtype)  # [n, D]
                if low:
                    x = (h[s:e].float() * a).to(dtype)  # [n, D], scaled in fp32, then the matmul's dtype
                    grad_w += (p.t() @ x).float()  # [V, D] in bf16 (fp32 accumulation inside), summed in fp32
                else:
                    grad_w.addmm_(p.t(), hc * a)  # [V, D], accumulated in place
                grad_w.index_add_(0, t, -(h[s:e].float() * sc))
        loss = ((ce * w).sum() + z_loss * (lse.square() * w).sum()) / denom
        if need:
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce, correct, lse)
        return loss, ce, correct, lse

    @staticmethod
    def backward(ctx, grad_loss, *_):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None, None, None


def chunk_rows(n_rows: int, vocab: int, device: torch.device | str, chunk_bytes: int | None = None) -> int:
    """Rows of logits per chunk: as many as fit ``chunk_bytes`` of fp32 [rows, V] logits (default
    ``CHUNK_BYTES`` of the device type), then evened out so that the chunks are equal (512 rows in 2 x 256,
    not 481 + 31)."""
    budget = chunk_bytes or CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cpu"])
    return _equal_chunks(n_rows, budget // (4 * vocab))


def _equal_chunks(n_rows: int, rows: int) -> int:
    """At most ``rows`` rows per chunk, as equal as possible: ceil(n / ceil(n / rows))."""
    n, rows = max(n_rows, 1), max(1, min(n_rows, rows))
    return -(-n // -(-n // rows))


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, w: torch.Tensor, z_loss: float = 0.0,
                         denom: torch.Tensor | float = 1.0, chunk: int | None = None, chunk_bytes: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """h [N, D], weight [V, D], targets [N], w [N] -> (loss, ce [N], correct [N], lse [N]): the weighted
    cross entropy (+ z-loss) of ``h @ weight.T`` over ``denom`` without materialising the [N, V] logits.
    Negative targets (ignore) carry no loss. ``chunk``: rows of logits at a time; default from
    ``chunk_bytes`` (``chunk_rows``: 963 rows at V = 8,704 on CPU, 1,024 at V = 64k on CUDA).

    The matmuls run in autocast's dtype when autocast is on (bf16-mixed: fp32 master weights, bf16 matmuls),
    else in the inputs' dtype (bf16-true: bf16; fp32 inputs: all fp32, as exact as before). Measured on CPU
    (B*T = 2,048, V = 8,704, fp32): ~15 % faster than the projection + F.cross_entropy."""
    N, V = h.shape[0], weight.shape[0]
    chunk = chunk_rows(N, V, h.device, chunk_bytes) if chunk is None else _equal_chunks(N, chunk)
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.promote_types(h.dtype, weight.dtype)
    w, targets = w.masked_fill(targets < 0, 0.0), targets.clamp(min=0)  # no .any() check: no device sync per step
    if not torch.is_tensor(denom):
        denom = torch.tensor(float(denom), device=h.device)
    return _LinearCrossEntropy.apply(h, weight, targets, w.float(), float(z_loss), denom.float(), chunk, dtype)


def loss_stats(ce: torch.Tensor, correct: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, w: torch.Tensor,
               modality_table: torch.Tensor, z_loss: float) -> torch.Tensor:  # fmt: skip
    """Per-token CE / correctness / logsumexp [N] -> the additive sums of ``LOSS_KEYS`` [len(LOSS_KEYS)]."""
    with torch.no_grad():
        ce, lse, w = ce.detach().float(), lse.detach().float(), w.float()
        out = [(ce * w).sum(), z_loss * (lse.square() * w).sum()]
        mod = modality_table[targets.clamp(min=0)]  # [N]
        for i in range(len(MODALITIES)):
            sel = ((mod == i) & (w > 0)).float()
            out += [(ce * sel).sum(), (correct.float() * sel).sum(), sel.sum()]
        return torch.cat([torch.stack(out), out[0].new_zeros(len(LEVEL_KEYS))])  # no per-level sums in flat


def loss_metrics(stats: torch.Tensor, loss: torch.Tensor, denom: torch.Tensor | float) -> dict[str, float]:
    """``LOSS_KEYS`` sums of one batch -> a dict with them, ``loss``, ``z_loss``, and ``loss/<m>``, ``acc/<m>``."""
    m = dict(zip(LOSS_KEYS, stats.tolist(), strict=True))
    m["z_loss"] = m["sum_z"] / float(denom)
    for mod in MODALITIES:
        m[f"tokens/{mod}"] = n = int(m[f"tokens/{mod}"])
        if n:
            m[f"loss/{mod}"], m[f"acc/{mod}"] = m[f"sum_loss/{mod}"] / n, m[f"sum_correct/{mod}"] / n
    m.update(level_metrics(m))  # (the raw sums of LOSS_KEYS stay, as for the modalities)
    m["loss"] = float(loss.detach())
    return m


def level_metrics(sums: dict[str, float]) -> dict[str, float]:
    """``loss/audio_l<l>``, ``acc/audio_l<l>``, ``tokens/audio_l<l>`` of the levels that had targets (none in flat)."""
    row: dict[str, float] = {}
    for lvl in range(MAX_AUDIO_LEVELS):
        n = int(sums[f"tokens/audio_l{lvl}"])
        if n:
            row[f"loss/audio_l{lvl}"] = sums[f"sum_loss/audio_l{lvl}"] / n
            row[f"acc/audio_l{lvl}"] = sums[f"sum_correct/audio_l{lvl}"] / n
            row[f"tokens/audio_l{lvl}"] = n
    return row


def lm_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], modality_table: torch.Tensor, z_loss: float = 0.0,
            denom: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """logits [B, T, V] and a loader batch -> (weighted next-token loss, metrics per modality), for
    callers that hold logits already; training goes through ``Transformer.forward(..., targets=)``,
    which computes the same numbers without materialising the logits.

    ``denom``: what the weighted sum is divided by (default: this batch's total weight). The trainer
    passes the weight of the whole step over all micro-batches and ranks (see ``train.py``)."""
    targets, w = batch["targets"], batch["loss_weights"].float()
    flat = logits.flatten(0, 1).float()  # [B*T, V]
    ce = F.cross_entropy(flat, targets.flatten(), reduction="none")  # [B*T]
    if denom is None:
        denom = w.sum().clamp(min=1.0)
    loss = (ce * w.flatten()).sum() / denom
    lse = torch.logsumexp(flat, dim=-1) if z_loss else torch.zeros_like(ce)
    if z_loss:
        loss = loss + z_loss * (lse.square() * w.flatten()).sum() / denom
    with torch.no_grad():
        correct = flat.argmax(-1) == targets.flatten()
    stats = loss_stats(ce, correct, lse, targets.flatten(), w.flatten(), modality_table, z_loss)
    return loss, loss_metrics(stats, loss, denom)
