"""Generation: KV cache = no cache, batching = alone, constrained spans always parse, streaming events."""

from __future__ import annotations

import pytest
import torch

from omnitrain.model.generate import SamplingConfig, generate
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.tokenizer.layout import AudioSegment, ImageSegment, TokenLayout

LAYOUT = TokenLayout.build(60, "t", {"bos": 1, "eos": 2, "pad": 3}, image_codebook_size=16, audio_codebook_size=8, audio_levels=2, max_grid=4)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=LAYOUT.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.3)).eval()


@pytest.mark.parametrize("constrain", [False, True])
def test_kv_cache_equals_no_cache_and_batching_equals_alone(model, constrain):
    prompts = [[1, 10, 11, 12, 13, 14], [1, 20, 21]]
    cfg = SamplingConfig(max_new_tokens=24, greedy=True, constrain=constrain)
    cached = generate(model, LAYOUT, prompts, cfg).tokens
    uncached = generate(model, LAYOUT, prompts, cfg, use_cache=False).tokens
    assert cached == uncached
    for i, p in enumerate(prompts):
        assert generate(model, LAYOUT, [p], cfg).tokens[0] == cached[i]  # left padding changes nothing
    sampled = SamplingConfig(max_new_tokens=24, temperature=0.8, top_k=20, top_p=0.9, seed=3, constrain=constrain)
    assert generate(model, LAYOUT, prompts, sampled).tokens == generate(model, LAYOUT, prompts, sampled, use_cache=False).tokens


@pytest.mark.parametrize("seed", range(6))
def test_constrained_image_and_audio_spans_always_parse(model, seed):
    sp = LAYOUT.specials
    events = []
    img = generate(model, LAYOUT, [[1, sp["boi"]]], SamplingConfig(max_new_tokens=40, seed=seed, stop=[[sp["eoi"]]], cfg_scale=2.0),
                   on_event=lambda r, k, p: events.append((k, p)))  # fmt: skip
    ids = [1, sp["boi"], *img.tokens[0]]
    assert ids[-1] == sp["eoi"]
    (_, image) = LAYOUT.parse(ids)
    assert isinstance(image, ImageSegment)
    rows = [p for k, p in events if k == "image_row"]
    assert len(rows) == image.codes.shape[0] and rows[-1] == image.codes[-1].tolist()  # streamed row by row
    events.clear()
    aud = generate(model, LAYOUT, [[1, sp["boa"]]], SamplingConfig(max_new_tokens=25, seed=seed, audio_chunk_frames=2),
                   on_event=lambda r, k, p: events.append((k, p)))  # fmt: skip
    toks = aud.tokens[0]
    span = toks[: toks.index(sp["eoa"]) + 1] if sp["eoa"] in toks else toks[: len(toks) // 2 * 2] + [sp["eoa"]]
    (_, audio) = LAYOUT.parse([1, sp["boa"], *span])
    chunks = [p for k, p in events if k == "audio_chunk"]
    assert len(chunks) == audio.codes.shape[0] // 2 and all(c.shape == (2, 2) for c in chunks)
    assert isinstance(audio, AudioSegment) and audio.codes.shape[1] == 2


def test_stop_sequences_and_errors(model):
    out = generate(model, LAYOUT, [[1, 10]], SamplingConfig(max_new_tokens=50, greedy=True, constrain=False, stop=[[]])).tokens[0]
    assert len(out) == 50
    first = out[0]
    stopped = generate(model, LAYOUT, [[1, 10]], SamplingConfig(max_new_tokens=50, greedy=True, constrain=False, stop=[[first]])).tokens[0]
    assert stopped == [first]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, LAYOUT, [[]], SamplingConfig())
    with pytest.raises(ValueError, match="not allowed"):  # a prompt that breaks the layout grammar
        generate(model, LAYOUT, [[1, LAYOUT.image_base]], SamplingConfig())


def _generate(d, text_tokenizer_dir, tmp_path, *extra):
    import json

    from omnitrain.cli import main

    argv = ["generate", f"run={d / 'model'}", f"tokenizers.text={text_tokenizer_dir}", f"tokenizers.image={d / 'image.pt'}",
            f"tokenizers.audio={d / 'audio.pt'}", "tokenizers.max_grid=16", f"out_dir={tmp_path}", "sampling.max_new_tokens=60", *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads((tmp_path / "result.json").read_text())


def test_generate_cli_reads_image_and_audio_prompts_and_writes_png_and_wav(omni_model_dir, text_tokenizer_dir, tmp_path):
    import numpy as np
    import soundfile as sf
    from PIL import Image

    photo, clip = tmp_path / "in.png", tmp_path / "in.wav"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype("uint8")).save(photo)
    sf.write(clip, np.sin(np.arange(8000) / 10.0).astype("float32") * 0.3, 16000)
    out = _generate(omni_model_dir, text_tokenizer_dir, tmp_path / "t", f"images=[{photo}]", f"audios=[{clip}]", "text=a picture of", "chat=true")
    assert out["samples"][0]["new_tokens"] > 0 and out["time_to_first_token"] > 0

    out = _generate(omni_model_dir, text_tokenizer_dir, tmp_path / "i", "text=a red square", "output=image", "image_grid=[3,4]", "num_samples=2")
    for i, s in enumerate(out["samples"]):
        assert s["parts"][0].startswith("[image 3x4 codes ->"), s  # a whole grid, every time
        assert Image.open(tmp_path / "i" / f"sample{i}-0_000.png").size == (4 * 8, 3 * 8)

    out = _generate(omni_model_dir, text_tokenizer_dir, tmp_path / "a", "text=hello", "output=audio", "sampling.greedy=true")
    part = out["samples"][0]["parts"][0]
    assert part.startswith("[audio ") and part.endswith(".wav]"), part  # closed at whole frames when cut by max_new_tokens
    assert out["time_to_first_audio_chunk"] is None or out["time_to_first_audio_chunk"] > 0


def test_generate_refuses_the_wrong_tokenizers_and_missing_files(omni_model_dir, text_tokenizer_dir, tmp_path, capsys):
    from omnitrain.cli import main
    from omnitrain.tokenizer.image import ImageTokenizerConfig, VQImageTokenizer

    VQImageTokenizer(ImageTokenizerConfig(codebook_size=64, base_channels=8, max_channels=16)).save(tmp_path / "other.pt")
    base = ["generate", f"run={omni_model_dir / 'model'}", f"tokenizers.text={text_tokenizer_dir}", f"tokenizers.audio={omni_model_dir / 'audio.pt'}",
            "tokenizers.max_grid=16", f"out_dir={tmp_path}"]  # fmt: skip
    assert main([*base, f"tokenizers.image={tmp_path / 'other.pt'}", "text=hi"]) == 1
    err = capsys.readouterr().err
    assert "make token layout" in err and "the ones the shards were built with" in err
    assert main([*base, f"tokenizers.image={omni_model_dir / 'image.pt'}", "images=[/no/such.png]"]) == 1
    assert "/no/such.png does not exist" in capsys.readouterr().err
    assert main(["generate", f"run={tmp_path}"]) == 1
    assert "not an omnitrain model folder" in capsys.readouterr().err
