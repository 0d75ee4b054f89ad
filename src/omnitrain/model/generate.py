"""Any-to-any generation: KV cache, batched prompts, sampling, layout-constrained decoding, CFG, streaming.

Legend: B prompts, L longest prompt, V vocab.

* Prompts of different lengths are left-padded; padding is masked out of attention and positions
  start at each prompt's first real token, so a prompt gives the same tokens alone or in a batch.
* Sampling: greedy, or temperature / top-k / top-p; stop sequences end a row.
* Layout constraints (``constrain=True``): every row runs a :class:`LayoutConstraint`, so an image
  span is exactly ``<h> <w>`` then h rows of w codes with ``<eol>``, an audio span whole frames of K
  level-ordered codes; the logits of disallowed ids are set to -inf before sampling.
* Classifier-free guidance (``cfg_scale != 1``, needs the constraints): each row runs beside an
  unconditional twin (the prompt reduced to ``<bos>`` + the open span); inside an image or audio
  span the logits are ``uncond + scale * (cond - uncond)`` (in delay / depth: every audio level's).
  Text is never guided: guidance sharpens what the condition says about the media it asks for.
* Audio layouts delay / depth (``model.audio_layout``): ``generate_grouped``, one position per frame, the output
  in the flat layout.
* Speech continuation: a prompt may end inside an audio span (flat: anywhere, a partial frame is completed;
  delay / depth: on a whole frame); the model continues the span.
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

from omnitrain.data.audio_regroup import AudioGrouping
from omnitrain.model.audio_layouts import level_slice
from omnitrain.model.transformer import KVCache, Transformer, decoding_mask
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
    cfg_scale: float = 1.0  # != 1: classifier-free guidance inside image and audio spans
    audio_chunk_frames: int = 10  # frames per streamed audio chunk
    seed: int = 0


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt
    time_to_first_token: float
    time_to_first_audio_chunk: float | None
    tokens_per_second: float


def left_pad(rows: list[torch.Tensor], blank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths, right-aligned: rows [len_i, ...] -> (ids [B, L, ...] filled with ``blank`` [...]
    before each row, valid [B, L], False on that left padding)."""
    L = max(len(r) for r in rows)
    ids = blank.expand(len(rows), L, *blank.shape).clone()
    valid = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, L - len(r) :] = r
        valid[i, L - len(r) :] = True
    return ids, valid

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
    inner = getattr(model, "inner", model)  # eval_in_training's wrapper (forward_cached over the strategy's forward)
    if inner.cfg.audio_layout != "flat":  # one position per audio frame: its own loop (below)
        if inner is not model:
            raise ValueError(f"model.audio_layout={inner.cfg.audio_layout} generates through the model itself (its level "
                             "heads, depth transformer and KV cache), not a wrapper's forward: evaluate generation tasks "
                             "in training with one process or ddp, or with omnitrain eval on the export")  # fmt: skip
        return generate_grouped(model, layout, prompts, cfg, on_event, use_cache)
    model.eval()
    device = next(model.parameters()).device
    B = len(prompts)
    if B == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <bos>)")
    guided = _check_guidance(cfg, layout)
    constraints = [LayoutConstraint(layout).feed(p) for p in prompts] if (cfg.constrain and layout) else None
    rows = list(prompts)
    if guided:  # unconditional twins: <bos> and the span the prompt opened (if any)
        rows += [[layout.specials["bos"], *(_open_span(p, layout))] for p in prompts]
    n_rows, L = len(rows), max(map(len, rows))
    ids, valid = left_pad([torch.tensor(p, dtype=torch.long) for p in rows], torch.tensor(layout.specials["pad"] if layout else 0))
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
            in_span = torch.tensor([c.modality != "text" for c in constraints], device=device)  # an image or audio span
            logits = torch.where(in_span[:, None], uncond + cfg.cfg_scale * (cond - uncond), cond)
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


def _check_guidance(cfg: SamplingConfig, layout: TokenLayout | None) -> bool:
    """Whether ``cfg`` asks for classifier-free guidance (errors for settings under which it cannot apply)."""
    if cfg.cfg_scale == 1.0:
        return False
    if not cfg.cfg_scale >= 0:  # (NaN too)
        raise ValueError(f"cfg_scale={cfg.cfg_scale}: use a scale >= 0 (1: no guidance; MusicGen uses 3)")
    if layout is None or not cfg.constrain:
        raise ValueError(f"cfg_scale={cfg.cfg_scale} guides inside image and audio spans, which the layout constraint "
                         "tracks: pass the token layout and constrain=True, or use cfg_scale=1")  # fmt: skip
    return True


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


# ----------------------------------------------------------------------------- delay / depth audio layouts
def _sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> int:
    """One id from [V'] logits (disallowed ones already -inf)."""
    if cfg.greedy:
        return int(logits.argmax())
    probs = _filter(logits.float()[None], cfg).softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=gen)[0, 0])


class _GroupedRow:
    """One row's decoding state in a delay / depth layout: the flat output so far, and the open audio span.

    A prompt may end inside an audio span with whole frames (speech continuation): those frames start the span
    (they are the prompt's, never output again), and in delay the levels of its last K-1 frames that sit at later
    positions are placed there as the prompt fixed them (``fixed``), beside the new frames' lower levels."""

    def __init__(self, g: AudioGrouping, layout: TokenLayout, prompt: list[int], prompt_grouped: np.ndarray, constrain: bool) -> None:
        self.g, self.layout, self.out = g, layout, []
        self.flat = LayoutConstraint(layout).feed(prompt) if constrain else None
        start = g.open_span_start(np.asarray(prompt))
        self.in_audio = start is not None  # the prompt opened the span to generate (<boa>, maybe frames after it)
        self.n_prompt = (len(prompt) - start - 1) // g.K if self.in_audio else 0  # whole frames the prompt holds
        self.span: list[list[int]] = prompt_grouped[len(prompt_grouped) - self.n_prompt :].tolist() if self.n_prompt else []
        self.frames_done, self.F = self.n_prompt, None  # frames in the flat sequence so far; frames in the span once <eoa> came
        self.pending = g.pending_levels(np.asarray(prompt))  # delay: [K-1, K] the prompt's codes for the next positions

    @property
    def in_tail(self) -> bool:  # delay, after <eoa>: positions that only place the delayed levels
        return self.F is not None

    @property
    def in_span(self) -> bool:  # the next position belongs to an audio span (its frames or its delay tail)
        return self.in_audio or self.in_tail

    def codes(self) -> int:  # level-0 codes placed in the span
        return self.F if self.F is not None else len(self.span)

    def fixed(self, p: int, lvl: int) -> int | None:
        """delay: the code the prompt fixes at span position ``p``, level ``lvl`` (None: one to generate)."""
        j = p - self.n_prompt
        return int(self.pending[j, lvl]) if 0 <= j < len(self.pending) and self.pending[j, lvl] >= 0 else None

    def place(self, row: list[int]) -> list[tuple[str, object]]:
        """Record one generated position; returns the (kind, payload) events it completes, in order."""
        g, events = self.g, []
        tok = row[0]
        if not self.in_span:  # text / image / specials: one token per position
            self._flat([tok])
            self.in_audio, self.span = tok == g.boa, []
            events.append(("text_token" if tok < self.layout.text_vocab_size and tok >= 0 else "token", tok))
            return events
        if tok == g.eoa and not self.in_tail:
            self.F, self.in_audio = len(self.span), False
        self.span.append(row)
        lag = g.K - 1 if g.layout == "delay" else 0  # a frame is complete lag positions after its level 0
        complete = min(self.codes(), len(self.span) - lag)
        while self.frames_done < complete:
            f = self.frames_done
            frame = [self.span[f + lvl][lvl] for lvl in range(g.K)] if lag else self.span[f]
            self._flat(frame)
            self.frames_done += 1
            events.append(("frame", np.asarray(frame) - self.layout.audio_base - np.arange(g.K) * self.layout.audio_codebook_size))
        if self.F is not None and self.frames_done == self.F and len(self.span) >= self.F + max(lag, 1):
            self._flat([g.eoa])
            self.F, self.span, self.frames_done, self.n_prompt = None, [], 0, 0
            self.pending = self.pending[:0]  # the prompt's span is closed: a later span is all generated
            events.append(("token", g.eoa))
        return events

    def _flat(self, ids: list[int]) -> None:
        self.out += ids
        if self.flat is not None:
            self.flat.feed(ids)


@torch.no_grad()
def generate_grouped(model: Transformer, layout: TokenLayout | None, prompts: list[list[int]], cfg: SamplingConfig,
                     on_event: Callable[[int, str, object], None] | None = None, use_cache: bool = True) -> GenerationResult:  # fmt: skip
    """``generate`` for ``model.audio_layout`` delay / depth: one position per step (a text token, or an audio frame
    position), the new tokens returned in the flat layout (so ``layout.parse`` and the codecs read them as ever).

    Per position: channel 0 from the main head (in an audio span only level-0 codes and ``<eoa>``; elsewhere the
    layout's constraints); delay: level l of the frame l positions back from level l's rows of the output matrix
    (the delay undone when a frame's last level arrives); depth: the frame's levels 1..K-1 one by one from the depth
    transformer. Each level is sampled within its own id range. ``max_new_tokens`` counts positions.

    A prompt may end with ``<boa>`` or inside an audio span on a whole frame (the model continues the audio).
    Guidance (``cfg_scale != 1``) mixes every logit the position samples inside an image span (channel 0, as
    flat) and an audio span: channel 0 and every level, from the conditional row and its unconditional twin
    (``<bos>`` + the open span) run through the same heads. All levels, as MusicGen guides all its codebooks:
    in text-to-speech the text conditions each level, and the depth transformer's levels see the guided lower
    codes only through its input, so guiding level 0 alone would leave the acoustic levels unguided."""
    if layout is None:
        raise ValueError(f"model.audio_layout={model.cfg.audio_layout}: generation needs the token layout (pass layout=)")
    guided = _check_guidance(cfg, layout)
    model.eval()
    model.set_modalities(layout.modality_of(np.arange(layout.vocab_size)))
    g = AudioGrouping.of(layout, model.cfg.audio_layout)
    K, device, B, pad = g.K, next(model.parameters()).device, len(prompts), layout.specials["pad"]
    if B == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <bos>)")
    rows_in = list(prompts) + ([[layout.specials["bos"], *_open_span(p, layout)] for p in prompts] if guided else [])
    grouped = []  # the conditional rows, then (guided) their unconditional twins
    for i, p in enumerate(rows_in):
        try:
            grouped.append(g.to_grouped(np.asarray(p), open_end=True)[0])
        except ValueError as e:
            raise ValueError(f"prompt {i % B}: {e}; a prompt may end with <boa>, inside an audio span on a whole frame, "
                             "or outside audio spans") from None  # fmt: skip
    n_rows, L = len(grouped), max(len(x) for x in grouped)
    blank = torch.full((K,), -1, dtype=torch.long)
    blank[0] = pad  # a padding position: the pad token, no higher levels
    ids, valid = left_pad([torch.from_numpy(x).long() for x in grouped], blank)
    ids, valid = ids.to(device), valid.to(device)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # [n_rows, L]
    rows = [_GroupedRow(g, layout, list(p), grouped[i], cfg.constrain) for i, p in enumerate(prompts)]
    W, gen = model.output.weight, torch.Generator(device="cpu").manual_seed(cfg.seed)
    slices = [level_slice(model, lvl, K) for lvl in range(K)]
    level0_or_eoa = torch.from_numpy(layout.mask("audio", level=0)).to(device)
    level0_or_eoa[g.eoa] = True
    cache = KVCache(model, n_rows, L + cfg.max_new_tokens) if use_cache else None

    def hidden(x: torch.Tensor, pos: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:  # -> [n_rows, D] of the last position
        past = cache.length if cache is not None else 0
        return model.norm(model.hidden(x, pos, decoding_mask(key_valid, x.shape[1], past), cache))[:, -1]

    def guide(logits: torch.Tensor, on: bool) -> torch.Tensor:
        """[1 or 2, V'] (the row; with guidance its twin) -> [V'] float logits."""
        logits = logits.float()
        return logits[1] + cfg.cfg_scale * (logits[0] - logits[1]) if on else logits[0]

    done, t0, ttft, ttfa, n_frames = [False] * B, time.perf_counter(), None, None, [0] * B
    seq, seq_valid, next_pos = ids, valid, positions[:, -1] + 1
    h = hidden(ids, positions, valid)  # [n_rows, D]
    for _ in range(cfg.max_new_tokens):
        step = torch.full((B, K), -1, dtype=torch.long)
        step[:, 0] = pad
        for i, r in enumerate(rows):
            if done[i]:
                continue
            hi_ = h[[i, B + i]] if guided else h[i : i + 1]  # [1 or 2, D]: the row (and its twin)
            on = guided and (r.in_span or (r.flat is not None and r.flat.modality == "image"))  # guided here
            new = [-1] * K
            if not r.in_tail:  # channel 0 (in a delay tail it is empty)
                allowed = level0_or_eoa if r.in_audio else (torch.from_numpy(r.flat.allowed()).to(device) if r.flat else None)
                logits0 = guide(hi_ @ W.t(), on)  # [V]
                new[0] = _sample(logits0 if allowed is None else logits0.masked_fill(~allowed, float("-inf")), cfg, gen)
            is_code = r.in_audio and new[0] != g.eoa
            if g.layout == "delay" and r.in_span:
                p, count = len(r.span), r.codes() + int(is_code)
                for lvl in range(1, K):
                    if 0 <= p - lvl < count:  # level l of frame p - l: fixed by the prompt, or sampled
                        lo, hi = slices[lvl]
                        fixed = r.fixed(p, lvl)
                        new[lvl] = fixed if fixed is not None else lo + _sample(guide(hi_ @ W[lo:hi].t(), on), cfg, gen)
            elif g.layout == "depth" and is_code:  # the frame's levels 1..K-1, each from the ones below it
                for lvl in range(1, K):
                    prev = model.tok_embeddings(torch.tensor([new[:lvl]], device=device))  # [1, lvl, D]
                    x = model.depth(hi_, prev.expand(len(hi_), -1, -1))[:, -1]  # [1 or 2, D]
                    lo, hi = slices[lvl]
                    new[lvl] = lo + _sample(guide(x @ W[lo:hi].t(), on), cfg, gen)
            step[i] = torch.tensor(new)
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            for kind, payload in r.place(new):
                if kind == "frame":
                    n_frames[i] += 1
                    if n_frames[i] % cfg.audio_chunk_frames:
                        continue
                    kind, payload = "audio_chunk", np.asarray(r.out[-cfg.audio_chunk_frames * K :]).reshape(-1, K) - (
                        layout.audio_base + np.arange(K) * layout.audio_codebook_size)  # [frames, K]
                    ttfa = ttfa if ttfa is not None else time.perf_counter() - t0
                if on_event is not None:
                    on_event(i, kind, payload)
            if any(len(s) and r.out[-len(s) :] == s for s in cfg.stop):
                done[i] = True
        if all(done):
            break
        step = (torch.cat([step, step]) if guided else step).to(device)[:, None]  # [n_rows, 1, K]: twins follow their rows
        seq_valid = torch.cat([seq_valid, torch.ones(n_rows, 1, dtype=torch.bool, device=device)], 1)
        if cache is not None:
            h = hidden(step, next_pos[:, None], seq_valid)
        else:  # the reference: the whole sequence again
            seq = torch.cat([seq, step], 1)
            h = hidden(seq, (seq_valid.long().cumsum(1) - 1).clamp(min=0), seq_valid)
        next_pos = next_pos + 1
    out = [r.out for r in rows]
    return GenerationResult(out, ttft or 0.0, ttfa, sum(map(len, out)) / max(time.perf_counter() - t0, 1e-9))
