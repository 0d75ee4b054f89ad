"""Audio layouts (issue 23): the same flat shards regrouped to one position per frame (delay, depth), a tiny
model's loss and per-level stats on such batches, and generation that returns valid flat audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.data.audio_regroup import AudioGrouping
from omnitrain.data.loader import LoaderConfig, OmniLoader, SourceSpec
from omnitrain.data.shards import SCHEMA_VERSION, Sample
from omnitrain.model.generate import SamplingConfig, generate
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.layout import AudioSegment, SpecialSegment, TextSegment, TokenLayout
from tests.synthetic import write_shard_set

LAYOUTS = ("flat", "delay", "depth")


def speech_layout(K: int = 3) -> TokenLayout:
    return TokenLayout.build(1000, "synthetic", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=64,
                             audio_codebook_size=32, audio_levels=K)  # fmt: skip


def make_speech_shards(folder: Path, layout: TokenLayout, n_shards: int = 4, per_shard: int = 12, seed: int = 0) -> Path:
    """TTS-like samples ``<bos> text <boa> frames <eoa> <eos>``: each frame's levels follow its level 0 (learnable)."""
    rng, K, k, shards = np.random.default_rng(seed), layout.audio_levels, 0, []
    folder.mkdir(parents=True, exist_ok=True)
    layout.save(folder)
    for _ in range(n_shards):
        samples = []
        for _ in range(per_shard):
            F, start = int(rng.integers(8, 40)), int(rng.integers(32))
            codes = np.stack([(start + np.arange(F) * (lvl + 1)) % 32 for lvl in range(K)], axis=1)  # [F, K]
            text = 10 + (start + np.arange(int(rng.integers(3, 12)))) % 50
            ids = layout.serialize([SpecialSegment("bos"), TextSegment(text), AudioSegment(codes), SpecialSegment("eos")])
            a = 1 + len(text)
            meta = {"schema_version": SCHEMA_VERSION, "layout_hash": layout.hash, "source": "speech", "template": "tts",
                    "segments": [[1, a, "text"], [a, a + F * K + 2, "audio"]], "learn": [[1, len(ids)]], "origin": f"speech:{k}"}  # fmt: skip
            samples.append(Sample(f"p000-{k:09d}", ids.astype(np.uint32), meta))
            k += 1
        shards.append(samples)
    return write_shard_set(folder, "speech", layout, shards, "tts")


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> tuple[TokenLayout, Path]:
    layout = speech_layout()
    return layout, make_speech_shards(tmp_path_factory.mktemp("speech") / "speech", layout)


def loader(path: Path, audio_layout: str, seq_len: int = 96) -> OmniLoader:
    return OmniLoader(LoaderConfig(sources={"speech": SourceSpec(str(path))}, seq_len=seq_len, batch_size=4, audio_layout=audio_layout))


@pytest.mark.parametrize("audio_layout", ["delay", "depth"])
def test_regrouping_inverts_exactly_and_takes_one_position_per_frame(audio_layout):
    layout = speech_layout()
    g, K, rng = AudioGrouping.of(layout, audio_layout), layout.audio_levels, np.random.default_rng(0)
    for F in (0, 1, 2, 5, 17):
        segs = [SpecialSegment("bos"), TextSegment(np.array([11, 12])), AudioSegment(rng.integers(0, 32, (F, K))),
                TextSegment(np.array([13])), AudioSegment(rng.integers(0, 32, (3, K))), SpecialSegment("eos")]  # fmt: skip
        ids = layout.serialize(segs)
        grouped, src = g.to_grouped(ids)
        assert np.array_equal(g.to_flat(grouped), ids) and len(src) == len(grouped)
        extra = K - 1 if audio_layout == "delay" else 1  # the delay tail (its first position holds <eoa>) / <eoa>
        assert len(grouped) == 2 + 2 + 1 + (1 + F + extra) + (1 + 3 + extra)  # one position per frame
        levels = (grouped[:, 1:] - layout.audio_base) // layout.audio_codebook_size  # each channel holds its own level
        assert ((grouped[:, 1:] < 0) | (levels == np.arange(1, K))).all()


def test_flat_batches_are_unchanged_and_grouped_batches_take_one_position_per_frame(speech):
    layout, path = speech
    K = layout.audio_levels
    flat = next(loader(path, "flat"))
    assert flat["input_ids"].shape == (4, 96) and flat["loss_weights"].shape == (4, 96)
    flat_codes = flat["input_ids"] >= layout.audio_base
    assert flat_codes.sum() > 0  # flat: one code per audio position
    for name in ("delay", "depth"):
        b = next(loader(path, name))
        ids = b["input_ids"]
        assert ids.shape == (4, 96, K) and b["targets"].shape == (4, 96, K) and b["doc_ids"].shape == (4, 96)
        assert (b["loss_weights"][b["targets"] < 0] == 0).all() and b["loss_weights"].sum() > 0
        codes, positions = (ids >= layout.audio_base).sum(), (ids >= layout.audio_base).any(-1).sum()
        spans = (ids[..., 0] == layout.specials["boa"]).sum() + 4  # (+ a span cut at each row's start)
        if name == "depth":
            assert codes == K * positions  # every audio position holds a whole frame: 1/K of flat's positions
        else:  # delay: a frame per position, but for the K-1 tail positions of each span
            assert K * (positions - (K - 1) * spans) <= codes <= K * positions


@pytest.mark.slow  # ~17 s each on 2 loaded cores
@pytest.mark.parametrize("audio_layout", ["delay", "depth"])
def test_every_level_carries_loss_and_gradient_and_is_logged(speech, audio_layout):
    """What the layout guarantees (not what a tiny run happens to learn): every level has target tokens, a finite
    loss of its own and a gradient reaching the parameters that predict it, for a few optimizer steps."""
    layout, path = speech
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, audio_layout=audio_layout, z_loss=1e-5))
    model.set_modalities(layout.modality_of(np.arange(layout.vocab_size)))
    opt, data = torch.optim.AdamW(model.parameters(), lr=3e-3), loader(path, audio_layout)
    for _ in range(3):
        loss, m = model.loss(next(data))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.output.weight.grad.abs().sum() > 0
        if audio_layout == "depth":
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "depth" in n)
        opt.step()
        opt.zero_grad()
    assert np.isfinite(m["loss"])
    for lvl in range(layout.audio_levels):
        assert m[f"tokens/audio_l{lvl}"] > 0 and np.isfinite(m[f"loss/audio_l{lvl}"])
    assert m["tokens/audio"] > sum(m[f"tokens/audio_l{lvl}"] for lvl in range(layout.audio_levels))  # + <boa> / <eoa>
    with pytest.raises(ValueError, match="data.audio_layout"):
        model.loss(next(loader(path, "flat")))


@pytest.mark.parametrize("audio_layout", ["delay", "depth"])
def test_generation_gives_valid_flat_audio_with_and_without_the_cache(speech, audio_layout):
    layout, _ = speech
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, audio_layout=audio_layout))
    boa, eoa = layout.specials["boa"], layout.specials["eoa"]
    prompts = [[1, 20, 21, boa], [1, 30], layout.serialize([SpecialSegment("bos"), AudioSegment(np.zeros((2, 3), int))]).tolist()]
    events = []
    cfg = SamplingConfig(max_new_tokens=24, seed=3, audio_chunk_frames=4, stop=[[eoa]])
    out = generate(model, layout, prompts, cfg, on_event=lambda *e: events.append(e))
    assert out.tokens == generate(model, layout, prompts, cfg, use_cache=False).tokens
    speech_out = out.tokens[0]
    body = speech_out[: speech_out.index(eoa)] if eoa in speech_out else speech_out[: len(speech_out) // 3 * 3]
    assert len(body) >= 3 and len(body) % 3 == 0  # whole frames in the flat layout
    segs = layout.parse([1, boa, *body, eoa])
    assert isinstance(segs[1], AudioSegment) and segs[1].codes.shape[1] == 3  # each level within its own range
    assert any(kind == "audio_chunk" for row, kind, _ in events if row == 0) == (len(body) // 3 >= 4)  # a chunk: 4 frames
    # guidance, speech continuation: tests/model/test_audio_layouts_generate.py


@torch.no_grad()
@pytest.mark.parametrize("audio_layout", LAYOUTS)
def test_loglikelihood_scores_the_regrouped_sequence_as_training_does(audio_layout, tmp_path, monkeypatch):
    """``TextLM.loglikelihood_tokens`` (omnitrain eval, the lm-eval adapter, perplexity) under every audio layout: each
    request's log-likelihood is minus the training loss of its continuation's cells (loss weights on exactly those
    cells, the batch regrouped as the loader does); requests sharing an input share a forward; text-only requests
    score as in flat; is_greedy follows the argmax. The in-training wrapper (channel 0's logits only) refuses audio."""
    from omnitrain.eval.harness import ModelSpec, TextLM
    from omnitrain.eval.in_training import _Forward

    layout = speech_layout()
    K = layout.audio_levels
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, audio_layout=audio_layout))
    model.set_modalities(layout.modality_of(np.arange(layout.vocab_size)))
    model.eval()
    lm = TextLM(model, None, None, [1], [2], ModelSpec(max_length=512), batch_size=2, layout=layout)
    span = layout.serialize([AudioSegment(np.random.default_rng(0).integers(0, 32, (6, K)))]).tolist()  # <boa> 6 frames <eoa>
    pairs = [([1, 20, 21], [22, 23]), ([1, 20, 21], [24]),  # text; the same input (one forward)
             ([1, *span, 30], [31, 32]),  # speech in the context (ASR-like)
             ([1, 20, 21], [*span, 2]),  # speech in the continuation (TTS-like)
             ([1, 20, *span[: 1 + 3 * K]], [*span[1 + 3 * K :], 2]),  # continuing an audio span on a frame boundary
             ([1, 20, *span[: 3 + 2 * K]], [*span[3 + 2 * K :]])]  # ... and inside a frame  # fmt: skip
    scores = lm.loglikelihood_tokens(pairs, progress=False)
    g = AudioGrouping.of(layout, audio_layout)
    for (c, k), (ll, _) in zip(pairs, scores, strict=True):
        full = np.asarray(c + k)
        if g is None:
            inp, tgt, w = full[:-1], full[1:], (np.arange(1, len(full)) >= len(c))
        else:  # the loader's regrouping; weights on the continuation's cells
            cells, _ = g.cells(full)
            grid = g.to_grouped(full)[0]
            inp, tgt, w = grid[:-1], grid[1:], cells[1:] >= len(c)
        loss, _ = model(torch.from_numpy(inp)[None], None, torch.from_numpy(tgt)[None], torch.from_numpy(w).float()[None], 1.0)
        assert w.sum() == len(k) and ll == pytest.approx(-float(loss), rel=1e-4, abs=1e-4)
    short = TextLM(model, None, None, [1], [2], ModelSpec(max_length=6), batch_size=2, layout=layout)  # cut: 6 + 1 positions
    c, k = pairs[2]  # speech in the context, cut inside its span
    full = np.asarray(c + k)
    grid, cells = (full[None], np.arange(len(full))[:, None]) if g is None else (g.to_grouped(full)[0], g.cells(full)[0])
    grid, cells = grid.reshape(len(cells), -1)[-7:], cells[-7:]  # the last max_length + 1 positions, as the loader cuts
    w = torch.from_numpy(cells[1:] >= len(c)).float()
    if g is None:
        grid, w = grid[:, 0], w[:, 0]
    loss, _ = model(torch.from_numpy(grid[:-1])[None], None, torch.from_numpy(grid[1:])[None], w[None], 1.0)
    assert short.loglikelihood_tokens([pairs[2]], progress=False)[0][0] == pytest.approx(-float(loss), rel=1e-4)
    alone = lm.loglikelihood_tokens([pairs[1]], progress=False)[0]
    assert alone[0] == pytest.approx(scores[1][0], abs=1e-5)
    ids = torch.tensor([1, 20, 21])
    logits = model(ids[None] if g is None else torch.from_numpy(g.to_grouped(ids.numpy())[0])[None])[0, -1]  # [V]
    best = int(logits.argmax())
    assert [x[1] for x in lm.loglikelihood_tokens([([1, 20, 21], [best]), ([1, 20, 21], [best + 1])], progress=False)] == [True, False]
    from omnitrain.eval.cache import ScoreCache  # a resumed eval: every score from the cache, no forward

    lm.cache = ScoreCache(tmp_path / "scores.jsonl", {"model": audio_layout})
    assert lm.loglikelihood_tokens(pairs, progress=False) == scores
    lm.cache = ScoreCache(tmp_path / "scores.jsonl", {"model": audio_layout})
    monkeypatch.setattr(model, "hidden", lambda *a, **k: pytest.fail("a cached request ran the model"))
    assert lm.cache.loaded == len(pairs) and lm.loglikelihood_tokens(pairs, progress=False) == scores
    monkeypatch.undo()
    lm.cache = None
    if g is not None:  # in training: the wrapper's forward gives channel 0's logits only
        wrapped = TextLM(_Forward(model, model), None, None, [1], [2], ModelSpec(max_length=512), batch_size=2, layout=layout)
        assert wrapped.loglikelihood_tokens(pairs[:3], progress=False)[2][0] == pytest.approx(scores[2][0], abs=1e-4)
        with pytest.raises(ValueError, match="channel 0's logits only"):
            wrapped.loglikelihood_tokens(pairs[3:4], progress=False)
