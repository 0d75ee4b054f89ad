"""``omnitrain generate``: prompts made of text, image and audio files -> ids -> generation -> text, PNG and WAV.

    omnitrain generate run=runs/demo/train images=[photo.png] text="a picture of"        # caption
    omnitrain generate run=runs/demo/train text="a picture of coffee" output=image       # text -> image
    omnitrain generate run=runs/demo/train audios=[speech.wav] output=text               # speech -> text
    omnitrain generate run=runs/demo/train text="Hello there" output=audio               # text -> speech

A prompt is ``<bos>`` then the images, the audio clips and the text, in that order. With ``chat=true``
they are one user turn (after a ``system`` turn when given), written with the chat template the
layout records and followed by the opening of the assistant's turn (``TokenLayout.chat_prompt``,
the same format the SFT shards were built with); ``output=image`` / ``audio`` opens an
image / audio span, which layout-constrained decoding fills with a whole code grid / whole frames.
The tokenizers are the ones the model's training shards were built with (their manifest records
them) unless ``tokenizers.*`` says otherwise; a tokenizer whose layout differs from the model's is
refused. Results go to ``out_dir``: ``result.json`` (parts, timings) and one PNG / WAV per span.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from omnitrain.data.pipeline.inspect import decode_sample
from omnitrain.data.pipeline.media import MediaConfig, MediaTokenizers
from omnitrain.model.generate import SamplingConfig, generate
from omnitrain.model.io import find_model_dir, load_model
from omnitrain.tokenizer import bundle
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.layout import (
    AudioSegment,
    ImageSegment,
    Segment,
    SpecialSegment,
    TextSegment,
    TokenLayout,
)


@dataclass
class GenerateConfig:
    run: Path = Path("runs/demo/train")  # a training run directory (its model/ export) or a model folder
    tokenizers: TokenizerPaths = field(default_factory=TokenizerPaths)
    text: str | None = None
    images: list[str] = field(default_factory=list)  # image files, placed before the text
    audios: list[str] = field(default_factory=list)  # audio files, placed before the text
    output: Literal["text", "image", "audio"] = "text"  # what to generate
    image_grid: list[int] | None = None  # output=image: [h, w] codes (None: the model chooses, within the layout's max_grid)
    chat: bool = False  # wrap the prompt in a user turn and answer as the assistant (the layout's chat template)
    system: str | None = None  # chat=true: a system message before the user turn
    num_samples: int = 1  # continuations of the same prompt, batched
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    media: MediaConfig = field(default_factory=MediaConfig)  # how input images / audio are prepared
    out_dir: Path = Path("runs/generate")
    device: str = "cpu"


def build_prompt(cfg: GenerateConfig, layout: TokenLayout, text_tok: Any, media: MediaTokenizers | None) -> list[int]:
    if cfg.system is not None and not cfg.chat:
        raise ValueError("system=... is a chat message: pass chat=true with it (or drop system)")
    if (cfg.images or cfg.output == "image") and (media is None or media.image is None):
        raise ValueError("this model's layout has no image tokenizer: images cannot be read or generated")
    if (cfg.audios or cfg.output == "audio") and (media is None or media.audio is None):
        raise ValueError("this model's layout has no audio codec: audio cannot be read or generated")
    parts: list[Segment] = []
    for path in cfg.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        parts.append(ImageSegment(media.image_codes(path)))
    for path in cfg.audios:
        if not Path(path).is_file():
            raise FileNotFoundError(f"audio file {path} does not exist")
        parts.append(AudioSegment(media.audio_codes(path)))
    if cfg.text:
        parts.append(TextSegment(np.asarray(text_tok.encode(cfg.text))))
    ids = layout.serialize([SpecialSegment("bos")]).tolist()
    if cfg.chat:
        system = [("system", [TextSegment(np.asarray(text_tok.encode(cfg.system)))])] if cfg.system is not None else []
        ids += layout.chat_prompt(system + [("user", parts)]).tolist()
    else:
        ids += layout.serialize(parts).tolist()
    if cfg.output == "image":
        grid = [layout.size_token(n) for n in cfg.image_grid] if cfg.image_grid else []
        return ids + [layout.specials["boi"], *grid]
    return ids + ([layout.specials["boa"]] if cfg.output == "audio" else [])


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    model, layout = load_model(cfg.run, cfg.device)
    if layout is None:
        raise ValueError(f"{cfg.run} has no layout.json: the model cannot tell text from image or audio ids")
    model_dir = find_model_dir(cfg.run)
    assert model_dir is not None  # load_model found it
    paths = cfg.tokenizers if cfg.tokenizers.text else bundle.recorded_paths(model_dir, Path(cfg.run))
    tok = bundle.load(paths, expect_layout=layout, device=cfg.device, what=f"the model {cfg.run}")
    text_tok, image, audio = tok.text, tok.image, tok.audio
    media = MediaTokenizers(image, audio, cfg.media, layout.max_grid) if (image or audio) else None
    prompt = build_prompt(cfg, layout, text_tok, media)
    sp = layout.specials
    end = {"text": layout.chat_template.stop if cfg.chat else "eos", "image": "eoi", "audio": "eoa"}[cfg.output]
    sampling = cfg.sampling
    sampling.stop = sampling.stop or [[sp[end]]]
    if cfg.output == "image" and cfg.image_grid:  # room for the whole grid: h rows of w codes + <eol>, then <eoi>
        h, w = cfg.image_grid
        sampling.max_new_tokens = max(sampling.max_new_tokens, h * (w + 1) + 1)
    result = generate(model, layout, [prompt] * cfg.num_samples, sampling)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    opened = {"image": 1 + 2 * bool(cfg.image_grid), "audio": 1}.get(cfg.output, 0)  # the open span at the end of the prompt
    for i, new in enumerate(result.tokens):
        ids = prompt[len(prompt) - opened :] + new
        complete = _complete_prefix(_close_audio(ids, layout), layout)
        parts = decode_sample(np.asarray(complete), layout, text_tok, media, out, f"sample{i}")
        note = None if len(complete) == len(ids) else f"the last {len(ids) - len(complete)} tokens end mid-span: raise sampling.max_new_tokens"
        samples.append({"new_tokens": len(new), "parts": parts, "note": note})
        print(f"sample {i}: " + " ".join(p[:200] for p in parts) + (f"  ({note})" if note else ""))
    summary = {"prompt_tokens": len(prompt), "samples": samples, "time_to_first_token": result.time_to_first_token,
               "time_to_first_audio_chunk": result.time_to_first_audio_chunk, "tokens_per_second": result.tokens_per_second}  # fmt: skip
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"generate: {cfg.num_samples} sample(s), {sum(s['new_tokens'] for s in samples)} tokens at {result.tokens_per_second:.0f} tokens/s, "
          f"first token after {result.time_to_first_token * 1e3:.0f} ms -> {out}")  # fmt: skip
    return summary


def _close_audio(ids: list[int], layout: TokenLayout) -> list[int]:
    """An audio span still open at max_new_tokens is cut at its last whole frame and closed."""
    sp = layout.specials
    opens = [i for i, t in enumerate(ids) if t == sp["boa"]]
    if not opens or sp["eoa"] in ids[opens[-1] :]:
        return ids
    n = len(ids) - opens[-1] - 1
    return ids[: len(ids) - n % layout.audio_levels] + [sp["eoa"]]


def _complete_prefix(ids: list[int], layout: TokenLayout) -> list[int]:
    """The longest prefix of ``ids`` that parses (an image / audio span cut by max_new_tokens is dropped)."""
    for end in range(len(ids), -1, -1):
        try:
            layout.parse(np.asarray(ids[:end], dtype=np.int64))
            return ids[:end]
        except ValueError:
            continue
    return []
