"""Pretrained codecs in every audio layout (issue 23, item 4): Mimi (K=8 levels of 2048 codes at 12.5 frames/s) and
EnCodec 24 kHz (its published bandwidths 1.5-24 kbps: K=32 levels of 1024 codes at 75 frames/s), each through the
transformers adapter (``tokenizer.pretrained_audio``) with the published shapes and random weights (none can be
downloaded here). Real speech (flite) -> shards built by the pipeline -> regrouped by the loader -> a training step
-> generation (text-to-speech and speech continuation) -> codes decoded by the codec to a wav, in flat, delay, depth."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.config import from_dict
from omnitrain.data.audio_regroup import AudioGrouping
from omnitrain.data.loader import LoaderConfig, OmniLoader, SourceSpec
from omnitrain.data.pipeline.build import BuildConfig, PipelineConfig, build_shards
from omnitrain.data.shards import iter_shard, read_manifest
from omnitrain.model.generate import SamplingConfig, generate
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.audio_io import read_audio, write_wav
from omnitrain.tokenizer.bundle import TokenizerPaths, load_media_tokenizers
from omnitrain.tokenizer.layout import AudioSegment, TokenLayout
from tests.conftest import REPO
from tests.model.test_audio_layouts import LAYOUTS

tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(shutil.which("flite") is None, reason="Debian flite missing: run setup.sh as root")
SENTENCES = ["seven two nine", "the quick brown fox", "hello there", "one more time"]


def tiny_mimi() -> torch.nn.Module:
    """kyutai/mimi's shapes where they set the token layout (24 kHz, hop 960 then x2 -> 12.5 Hz, 2048 codes, 32
    levels of which Moshi uses 8: ``tokenizers.audio_levels=8``), every width tiny."""
    cfg = tf.MimiConfig(hidden_size=16, num_filters=4, codebook_size=2048, codebook_dim=8, vector_quantization_hidden_dimension=8,
                        num_quantizers=32, num_semantic_quantizers=1, upsample_groups=16, num_hidden_layers=1, intermediate_size=32,
                        num_attention_heads=2, num_key_value_heads=2, head_dim=8, sliding_window=16, max_position_embeddings=256)  # fmt: skip
    model = tf.MimiModel(cfg)
    with torch.no_grad():  # codebooks come from checkpoints (zeros here): make them distinct
        for rvq in (model.quantizer.semantic_residual_vector_quantizer, model.quantizer.acoustic_residual_vector_quantizer):
            for layer in rvq.layers:
                layer.codebook.embed_sum.normal_()
    return model


def tiny_encodec() -> torch.nn.Module:
    """facebook/encodec_24khz's shapes (24 kHz, hop 320 -> 75 Hz, 1024 codes, bandwidths 1.5-24 kbps), tiny widths."""
    model = tf.EncodecModel(tf.EncodecConfig(hidden_size=16, num_filters=4, num_lstm_layers=1))
    with torch.no_grad():
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_(std=0.003)  # about the random encoder's latent scale
    return model


CODECS = {"mimi": (tiny_mimi, 8, 2048, 12.5), "encodec": (tiny_encodec, 32, 1024, 75.0)}  # make, K, C, frames per second
LEVELS = {"mimi": 8, "encodec": None}  # tokenizers.audio_levels (EnCodec: every level of its 24 kbps)


@pytest.fixture(scope="module")
def speech_records(tmp_path_factory) -> Path:
    """TTS records over real (synthetic-voice) speech: flite's slt voice, 16 kHz."""
    d = tmp_path_factory.mktemp("speech")
    rows = []
    for i, s in enumerate(SENTENCES):
        subprocess.run(["flite", "-voice", "slt", "-t", s, "-o", str(d / f"s{i}.wav")], check=True)
        rows.append({"text": s, "audio": f"s{i}.wav"})
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "rows.jsonl"


@pytest.fixture(scope="module", params=list(CODECS))
def codec_shards(request, tmp_path_factory, speech_records, text_tokenizer_dir) -> tuple[str, Path, Path]:
    """(codec name, its save_pretrained folder, tts shards built with it by the pipeline)."""
    name = request.param
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name)
    CODECS[name][0]().save_pretrained(folder)
    out = folder / "shards"
    build_shards(BuildConfig(pipeline=from_dict(PipelineConfig, {"name": "tts", "template": "tts",
                                                                 "source": {"kind": "records", "paths": [str(speech_records)]}}),
                             tokenizers=TokenizerPaths(text=str(text_tokenizer_dir), audio=str(folder), audio_levels=LEVELS[name]), out_dir=out,
                             templates_dir=REPO / "data_pipelines" / "template"))  # fmt: skip
    return name, folder, out


def test_the_codec_sets_the_layout_and_the_shards_regroup_exactly(codec_shards):
    name, folder, out = codec_shards
    _, K, C, rate = CODECS[name]
    _, codec = load_media_tokenizers(None, folder, audio_levels=LEVELS[name])
    layout = TokenLayout.load(out)
    assert (codec.n_levels, codec.codebook_size, codec.frame_rate, codec.sample_rate) == (K, C, rate, 24000)
    assert (layout.audio_levels, layout.audio_codebook_size) == (K, C) and layout.vocab_size == layout.audio_base + K * C
    manifest = read_manifest(out)
    assert manifest["config"]["tokenizers"]["audio_levels"] == LEVELS[name]  # recorded: eval / generate load the same K
    if name == "mimi":
        assert load_media_tokenizers(None, folder)[1].n_levels == 32  # the checkpoint's own: all its levels
        with pytest.raises(ValueError, match=r"n_levels=40 must be in \[2, 32\]"):
            load_media_tokenizers(None, folder, audio_levels=40)
    samples = [s for sh in manifest["shards"] for s in iter_shard(out / sh["name"], expect_hash=manifest["layout_hash"])]
    assert len(samples) == len(SENTENCES)
    for layout_name in ("delay", "depth"):
        g = AudioGrouping.of(layout, layout_name)
        for s in samples:
            ids = s.ids.astype(np.int64)
            grouped, _ = g.to_grouped(ids)
            assert np.array_equal(g.to_flat(grouped), ids)
            F = next(x for x in layout.parse(ids) if isinstance(x, AudioSegment)).codes.shape[0]
            assert F > rate * 0.5  # flite's clip: over half a second of frames
            assert len(ids) - len(grouped) == F * (K - 1) - (K - 2 if layout_name == "delay" else 0)  # 1 position per frame


@pytest.mark.slow  # 5-40 s each on 2 loaded cores (EnCodec's 32 levels: depth runs 31 depth steps per frame)
@pytest.mark.parametrize("audio_layout", LAYOUTS)
def test_each_layout_trains_generates_and_decodes_to_a_wav(codec_shards, audio_layout, tmp_path):
    name, folder, out = codec_shards
    _, K, C, rate = CODECS[name]
    _, codec = load_media_tokenizers(None, folder, audio_levels=LEVELS[name])
    layout = TokenLayout.load(out)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, audio_layout=audio_layout))
    model.set_modalities(layout.modality_of(np.arange(layout.vocab_size)))
    # a training step on the loader's batch (grouped: one position per frame)
    batch = next(OmniLoader(LoaderConfig(sources={"tts": SourceSpec(str(out))}, seq_len=128, batch_size=2, audio_layout=audio_layout)))
    assert batch["input_ids"].shape == ((2, 128) if audio_layout == "flat" else (2, 128, K))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, m = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    W = model.output.weight.grad  # every level's output rows get a gradient
    assert all(W[layout.audio_base + lvl * C : layout.audio_base + (lvl + 1) * C].abs().sum() > 0 for lvl in range(K))
    if audio_layout != "flat":
        assert all(m[f"tokens/audio_l{lvl}"] > 0 for lvl in range(K))
    opt.step()
    # text-to-speech, and a continuation of the first clip's first 3 frames; then the codec decodes every frame
    sample = next(iter_shard(out / read_manifest(out)["shards"][0]["name"]))
    ids = sample.ids.astype(np.int64).tolist()
    boa = ids.index(layout.specials["boa"])
    prompts = [ids[: boa + 1], ids[: boa + 1 + 3 * K]]
    n_frames = 4
    steps = n_frames * K if audio_layout == "flat" else n_frames + (K - 1 if audio_layout == "delay" else 0)
    res = generate(model, layout, prompts, SamplingConfig(max_new_tokens=steps, seed=1))
    if audio_layout != "flat":  # (flat's cache is tested in test_generate; here its K x 4 uncached steps cost a minute)
        assert res.tokens == generate(model, layout, prompts, SamplingConfig(max_new_tokens=steps, seed=1), use_cache=False).tokens
    eoa = layout.specials["eoa"]
    for k, (p, new) in enumerate(zip(prompts, res.tokens, strict=True)):
        body = new[: new.index(eoa)] if eoa in new else new
        segs = layout.parse([*p, *body, eoa])  # each level in its own id range, whole frames
        codes = next(x for x in segs if isinstance(x, AudioSegment)).codes  # [F, K] the prompt's frames + the new ones
        assert codes.shape[1] == K and codes.shape[0] == 3 * k + len(body) // K and len(body) // K >= 1
        wav = codec.decode(torch.from_numpy(codes)[None])[0]  # [1, S]
        path = write_wav(tmp_path / f"{name}_{audio_layout}_{k}.wav", wav, codec.sample_rate)
        back = read_audio(path, codec.sample_rate, resample_ok=False)  # (a wav at another rate: an error)
        assert len(back) == round(codes.shape[0] * codec.sample_rate / rate) and np.abs(back).max() > 0  # frames -> samples


def test_audio_levels_is_for_pretrained_codecs_only(tmp_path):
    from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec

    RVQAudioCodec(AudioCodecConfig(channels=8, latent_dim=16, n_levels=2, codebook_size=32)).save(tmp_path / "audio.pt")
    with pytest.raises(ValueError, match="audio_levels=8 picks the levels of a pretrained codec.*drop audio_levels"):
        load_media_tokenizers(None, tmp_path / "audio.pt", audio_levels=8)
