"""Generation in every audio layout (issue 23): classifier-free guidance on every audio level, and prompts that
end inside an audio span (speech continuation), each checked against a direct computation without the KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnitrain.data.audio_regroup import AudioGrouping
from omnitrain.model.audio_layouts import level_slice
from omnitrain.model.generate import SamplingConfig, generate
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.constraints import LayoutConstraint
from omnitrain.tokenizer.layout import AudioSegment, SpecialSegment, TextSegment
from tests.model.test_audio_layouts import LAYOUTS, speech_layout

LAYOUT = speech_layout()  # K=3 levels of 32 codes
K, SP = LAYOUT.audio_levels, LAYOUT.specials
BOA, EOA, BOS = SP["boa"], SP["eoa"], SP["bos"]


@pytest.fixture(scope="module", params=LAYOUTS)
def model(request) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=LAYOUT.vocab_size, dim=64, n_layers=2, n_heads=4, audio_layout=request.param))
    m.set_modalities(LAYOUT.modality_of(np.arange(LAYOUT.vocab_size)))
    return m.eval()


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, LAYOUT.audio_codebook_size, (n, K))  # [n, K] codes


def tts_prompt(text: list[int]) -> list[int]:
    return [BOS, *text, BOA]


def continuation_prompt(n_frames: int, seed: int = 0) -> list[int]:
    """``<bos> text <boa>`` + n whole frames, the span left open."""
    ids = LAYOUT.serialize([SpecialSegment("bos"), TextSegment(np.array([20, 21])), AudioSegment(frames(n_frames, seed))])
    return ids[:-1].tolist()  # without <eoa>


def twin_of(prompt: list[int]) -> list[int]:
    """The unconditional prompt: <bos> + the audio span the prompt opened."""
    return [BOS, *prompt[len(prompt) - 1 - prompt[::-1].index(BOA) :]]


def guided(c: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
    return u + scale * (c - u)


def check_guided_greedy(model: Transformer, prompt: list[int], out: list[int], scale: float) -> int:
    """Every token of a greedy, guided ``out`` (one audio span from the prompt's end) is the argmax of
    ``uncond + scale * (cond - uncond)`` over its allowed ids, both computed here in one pass over the whole
    conditional sequence and one over its twin (no cache); returns how many tokens were checked."""
    out = out[: out.index(EOA) + 1] if EOA in out else out
    twin, layout, checked = twin_of(prompt), model.cfg.audio_layout, 0
    W = model.output.weight
    level0_or_eoa = torch.from_numpy(LAYOUT.mask("audio", level=0))
    level0_or_eoa[EOA] = True
    if layout == "flat":
        lc, lu = (model(torch.tensor([s + out]))[0].float() for s in (prompt, twin))  # [T, V]
        c = LayoutConstraint(LAYOUT).feed(prompt)
        for k, tok in enumerate(out):
            mixed = guided(lc[len(prompt) + k - 1], lu[len(twin) + k - 1], scale)
            assert c.modality == "audio" and int(mixed.masked_fill(~torch.from_numpy(c.allowed()), float("-inf")).argmax()) == tok
            c.step(tok)
            checked += 1
        return checked
    g = AudioGrouping.of(LAYOUT, layout)
    cells, _ = g.cells(np.asarray(prompt + out), open_end=True)  # [m, K] flat index of every cell
    grid_c, grid_u = (torch.from_numpy(g.to_grouped(np.asarray(s + out), open_end=True)[0]) for s in (prompt, twin))
    h_c, h_u = (model.norm(model.hidden(x[None]))[0] for x in (grid_c, grid_u))  # [m, D]
    n_c, n_u = (len(g.to_grouped(np.asarray(s), open_end=True)[0]) for s in (prompt, twin))
    flat = prompt + out
    for q in range(n_c, len(grid_c)):  # the generated positions
        h = torch.stack([h_c[q - 1], h_u[q - n_c + n_u - 1]])  # [2, D] the row and its twin, one position back
        for lvl in range(K):
            idx = int(cells[q, lvl])
            if idx < len(prompt):  # empty, or a code the prompt fixed (delay continuation): not sampled
                continue
            if lvl == 0:  # the whole vocabulary, masked to level-0 codes and <eoa> after guidance
                lo, logits = 0, (h @ W.t()).float()
                mixed = guided(logits[0], logits[1], scale).masked_fill(~level0_or_eoa, float("-inf"))
            else:
                lo, hi = level_slice(model, lvl, K)
                x = h if layout == "delay" else model.depth(h, model.tok_embeddings(grid_c[q, :lvl])[None].expand(2, -1, -1))[:, -1]
                logits = (x @ W[lo:hi].t()).float()
                mixed = guided(logits[0], logits[1], scale)
            assert lo + int(mixed.argmax()) == flat[idx], (q, lvl)
            checked += 1
    return checked


@torch.no_grad()
def test_guidance_follows_the_formula_on_every_level(model):
    """Greedy guided output = the argmax of the guided logits of a direct pass over the row and its twin, channel 0
    and every level, for a text-to-speech prompt and a continuation prompt; scale 1 is the unguided output."""
    prompts = [tts_prompt([20, 21, 22]), continuation_prompt(4)]
    plain = generate(model, LAYOUT, prompts, SamplingConfig(max_new_tokens=12, greedy=True)).tokens
    assert generate(model, LAYOUT, prompts, SamplingConfig(max_new_tokens=12, greedy=True, cfg_scale=1.0)).tokens == plain
    out = generate(model, LAYOUT, prompts, SamplingConfig(max_new_tokens=12, greedy=True, cfg_scale=5.0)).tokens
    assert out != plain  # guidance changed something (a fixed model and seed: deterministic)
    for p, o in zip(prompts, out, strict=True):
        assert check_guided_greedy(model, p, o, 5.0) >= 12  # at least a position's worth of tokens per prompt
    for p, o in zip(prompts, plain, strict=True):  # the same check, scale 1: the plain conditional argmax
        check_guided_greedy(model, p, o, 1.0)


@torch.no_grad()
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_kv_cache_equals_no_cache_with_and_without_guidance(model, scale):
    prompts = [tts_prompt([20, 21]), [BOS, 30, 31], continuation_prompt(3, seed=1)]
    cfg = SamplingConfig(max_new_tokens=16, seed=5, temperature=1.3, cfg_scale=scale, audio_chunk_frames=2)
    events: list[tuple] = []
    out = generate(model, LAYOUT, prompts, cfg, on_event=lambda *e: events.append(e))
    assert out.tokens == generate(model, LAYOUT, prompts, cfg, use_cache=False).tokens
    assert any(kind == "audio_chunk" for _, kind, _ in events)


@torch.no_grad()
def test_continuation_prompts_give_well_formed_audio(model):
    """A prompt ending inside an open span on whole frames: the model continues the span; the prompt's frames are
    not repeated, every continued frame has each level in its own id range, and the whole sequence parses."""
    prompts = [continuation_prompt(n, seed=n) for n in (1, 2, 5)]  # (delay: fewer, as many and more frames than K-1)
    cfg = SamplingConfig(max_new_tokens=14, seed=2)
    out = generate(model, LAYOUT, prompts, cfg).tokens
    assert out == generate(model, LAYOUT, prompts, cfg, use_cache=False).tokens
    for p, o in zip(prompts, out, strict=True):
        body = o[: o.index(EOA)] if EOA in o else o[: len(o) // K * K]
        assert len(body) % K == 0 and len(body) >= K  # whole frames, at least one
        tail = o[len(body) + 1 :] if EOA in o else []
        segs = LAYOUT.parse([*p, *body, EOA, *tail] if tail or EOA not in o else p + o)
        audio = next(s for s in segs if isinstance(s, AudioSegment))
        n_prompt = (len(p) - p.index(BOA) - 1) // K
        assert audio.codes.shape == (n_prompt + len(body) // K, K)
        np.testing.assert_array_equal(audio.codes[:n_prompt], np.asarray(p[p.index(BOA) + 1 :]).reshape(-1, K) - (
            LAYOUT.audio_base + np.arange(K) * LAYOUT.audio_codebook_size))  # the prompt's frames, then the new ones


@torch.no_grad()
def test_prompt_errors(model):
    partial = continuation_prompt(3)[:-1]  # the last frame without its top level
    if model.cfg.audio_layout == "flat":  # flat continues a partial frame: its missing level comes first
        o = generate(model, LAYOUT, [partial], SamplingConfig(max_new_tokens=4, seed=0)).tokens[0]
        lo, hi = LAYOUT.audio_base + (K - 1) * LAYOUT.audio_codebook_size, LAYOUT.vocab_size
        assert lo <= o[0] < hi
    else:
        with pytest.raises(ValueError, match=r"prompt 1: the audio span at position 3 ends inside a frame: 8 codes, not a multiple of K=3"):
            generate(model, LAYOUT, [[BOS, 20], partial], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="constrain=True"):
        generate(model, LAYOUT, [[BOS]], SamplingConfig(max_new_tokens=2, cfg_scale=2.0, constrain=False))
    with pytest.raises(ValueError, match="scale >= 0"):
        generate(model, LAYOUT, [[BOS]], SamplingConfig(max_new_tokens=2, cfg_scale=-1.0))


def test_regrouping_an_open_span_places_the_prompt_frames_and_its_pending_levels():
    for name in ("delay", "depth"):
        g = AudioGrouping.of(LAYOUT, name)
        p = np.asarray(continuation_prompt(4))
        b = int(np.flatnonzero(p == BOA)[0])
        grouped, src = g.to_grouped(p, open_end=True)
        assert len(grouped) == b + 1 + 4 and len(src) == len(grouped)  # one position per prompt frame
        closed = g.to_grouped(np.append(p, EOA))[0]
        np.testing.assert_array_equal(grouped, closed[: len(grouped)])  # the closed span's first positions, exactly
        span, pending = p[b + 1 :].reshape(4, K), g.pending_levels(p)
        if name == "depth":
            assert pending.shape == (0, K)
        else:  # the prompt's levels that sit at the next K-1 positions (those the closed span has there too)
            assert pending.tolist() == [[-1, span[3, 1], span[2, 2]], [-1, -1, span[3, 2]]]
            later = closed[len(grouped) : len(grouped) + K - 1]
            np.testing.assert_array_equal(pending[:, 1:], later[:, 1:])
        with pytest.raises(ValueError, match="no <eoa>"):
            g.to_grouped(p)  # the loader's documents must close their spans


@torch.no_grad()
def test_generation_through_the_in_training_wrapper(model):
    """eval_in_training's sharded generation runs ``generate`` on a wrapper of the strategy's forward (no cache): flat
    gives the model's own tokens; delay / depth need the model itself and say so."""
    from omnitrain.eval.in_training import _Forward

    prompts, cfg = [tts_prompt([20, 21])], SamplingConfig(max_new_tokens=6, greedy=True)
    if model.cfg.audio_layout == "flat":
        assert generate(_Forward(model, model), LAYOUT, prompts, cfg, use_cache=False).tokens == generate(model, LAYOUT, prompts, cfg).tokens
    else:
        with pytest.raises(ValueError, match="generates through the model itself"):
            generate(_Forward(model, model), LAYOUT, prompts, cfg, use_cache=False)
