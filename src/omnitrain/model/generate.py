"""Any-to-any generation: KV cache, batched prompts, sampling, layout-constrained decoding, CFG, streaming.

Legend: B prompts, L longest prompt, V vocab.

* Prompts of different lengths are left-padded; padding is masked out of attention and positions
  start at each prompt's first real token, so a prompt gives the same tokens alone or in a batch.
* Sampling: greedy, or temperature / top-k / top-p; stop sequences end a row.
* Layout constraints (``constrain=True``): every row runs a :class:`LayoutConstraint`, so an image
  span is exactly ``<h> <w>`` then h rows of w codes with ``<eol>``, an audio span whole frames of K
  level-ordered codes; the logits of disallowed ids are set to -inf before sampling.
* Classifier-free guidance for images (``cfg_scale > 1``): each row runs beside an unconditional
  twin (the prompt reduced to ``<bos>`` + the open span); inside an image span the logits are
  ``uncond + scale * (cond - uncond)``.
* Streaming: ``on_event(row, kind, payload)`` gets text tokens, each finished image row of codes and
  each audio chunk of frames as they are produced; time to first token and to first audio chunk are
  measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from omnitrain.model.transformer import KVCache, Transformer
from omnitrain.tokenizer.constraints import LayoutConstraint
from omnitrain.tokenizer.layout import TokenLayout


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop: list[list[int]] = field(default_factory=list)  # id sequences that end a row (kept in the output)
    constrain: bool = True
    cfg_scale: float = 1.0  # > 1: classifier-free guidance inside image spans
    audio_chunk_frames: int = 10  # frames per streamed audio chunk
    seed: int = 0


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt
    time_to_first_token: float
    time_to_first_audio_chunk: float | None
    tokens_per_second: float


def _filter(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p on [B, V] logits (disallowed ids are already -inf)."""
    logits = logits / max(cfg.temperature, 1e-6)
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


@torch.no_grad()
def generate(
    model: Transformer,
    layout: TokenLayout | None,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    on_event: Callable[[int, str, object], None] | None = None,
    use_cache: bool = True,
) -> GenerationResult:
    """New tokens for each prompt (ids, each starting with e.g. ``<bos>``), batched and left-padded.

    Args:
        model: the transformer; put in eval mode.
        layout: the token layout (None: plain text ids, no constraints, no guidance, no media events).
        prompts: one id list per row.
        cfg: sampling, stop sequences, constraints, guidance, seed.
        on_event: called as ``on_event(row, kind, payload)`` for every new token (see the module doc).
        use_cache: False runs the whole sequence again at every step, the reference the KV cache is tested against.
    """
    model.eval()
    device = next(model.parameters()).device
    B = len(prompts)
    if B == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <bos>)")
    constraints = [LayoutConstraint(layout).feed(p) for p in prompts] if (cfg.constrain and layout) else None
    guided = cfg.cfg_scale != 1.0 and layout is not None
    rows = list(prompts)
    if guided:  # unconditional twins: <bos> and the span the prompt opened (if any)
        rows += [[layout.specials["bos"], *(_open_span(p, layout))] for p in prompts]
    n_rows, L = len(rows), max(map(len, rows))
    ids = torch.full((n_rows, L), layout.specials["pad"] if layout else 0, dtype=torch.long)
    valid = torch.zeros(n_rows, L, dtype=torch.bool)
    for i, p in enumerate(rows):
        ids[i, L - len(p) :] = torch.tensor(p)
        valid[i, L - len(p) :] = True
    ids, valid = ids.to(device), valid.to(device)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # [n_rows, L]
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    cache = KVCache(model, n_rows, L + cfg.max_new_tokens) if use_cache else None
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    t0 = time.perf_counter()
    ttft = ttfa = None
    seq, seq_valid, next_pos = ids, valid, positions[:, -1] + 1
    logits = model.forward_cached(ids, positions, valid, cache)[:, -1]  # [n_rows, V]; cache None: the plain full pass
    for _ in range(cfg.max_new_tokens):
        logits = logits.float()
        if guided:
            cond, uncond = logits[:B], logits[B:]
            in_image = torch.tensor([c.modality == "image" for c in constraints] if constraints else [False] * B, device=device)
            logits = torch.where(in_image[:, None], uncond + cfg.cfg_scale * (cond - uncond), cond)
        if constraints:
            allowed = torch.from_numpy(np.stack([c.allowed() for c in constraints])).to(device)
            logits = logits.masked_fill(~allowed, float("-inf"))
        if cfg.greedy:
            nxt = logits.argmax(-1)
        else:
            probs = _filter(logits, cfg).softmax(-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
        for i in range(B):
            if done[i]:
                continue
            tok = int(nxt[i])
            out[i].append(tok)
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            if constraints:
                constraints[i].step(tok)
            kind = _emit(i, tok, out[i], layout, constraints[i] if constraints else None, cfg, on_event)
            if kind == "audio_chunk" and ttfa is None:
                ttfa = time.perf_counter() - t0
            if any(len(s) and out[i][-len(s) :] == s for s in cfg.stop):
                done[i] = True
        if all(done):
            break
        step = nxt if not guided else torch.cat([nxt, nxt])  # the twins follow the same tokens
        step = torch.where(torch.tensor(done + done * guided, device=device), torch.zeros_like(step), step)[:, None]
        seq_valid = torch.cat([seq_valid, torch.ones_like(step, dtype=torch.bool)], 1)  # [n_rows, L + steps so far]
        if cache is not None:  # only the new token goes through the model
            logits = model.forward_cached(step, next_pos[:, None], seq_valid, cache)[:, -1]
        else:  # the reference: the whole sequence again, without a cache
            seq = torch.cat([seq, step], 1)
            pos = (seq_valid.long().cumsum(1) - 1).clamp(min=0)
            logits = model.forward_cached(seq, pos, seq_valid, None)[:, -1]
        next_pos = next_pos + 1
    total = sum(map(len, out))
    return GenerationResult(out, ttft or 0.0, ttfa, total / max(time.perf_counter() - t0, 1e-9))


def _open_span(prompt: list[int], layout: TokenLayout) -> list[int]:
    """The unfinished image/audio span at the end of a prompt (e.g. ``<boi> <h> <w>``), for the CFG twin."""
    c = LayoutConstraint(layout)
    start = None
    for k, t in enumerate(prompt):
        if c.mode == "text" and t in (layout.specials["boi"], layout.specials["boa"]):
            start = k
        c.step(t)
        if c.mode == "text":
            start = None
    return prompt[start:] if start is not None else []


def _emit(row: int, tok: int, out: list[int], layout: TokenLayout | None, c: LayoutConstraint | None,
          cfg: SamplingConfig, on_event: Callable | None) -> str:  # fmt: skip
    """Tell the listener what just became available; returns the event kind."""
    if layout is None or c is None:
        kind, payload = "token", tok
    elif tok == layout.specials["eol"]:
        w = c.w
        kind, payload = "image_row", [t - layout.image_base for t in out[-1 - w : -1]]
    elif c.mode == "audio" and c.count and c.count % (cfg.audio_chunk_frames * layout.audio_levels) == 0:
        k, n = layout.audio_levels, cfg.audio_chunk_frames * layout.audio_levels
        codes = np.array(out[-n:]).reshape(-1, k) - layout.audio_base - np.arange(k) * layout.audio_codebook_size
        kind, payload = "audio_chunk", codes  # [frames, K]
    elif c.mode == "text" and tok < layout.text_vocab_size:
        kind, payload = "text_token", tok
    else:
        kind, payload = "token", tok
    if on_event is not None:
        on_event(row, kind, payload)
    return kind
