"""``omnitrain demo``: the framework end to end on data made from local packages, on a CPU.

It is a small configuration of the real path (the same tokenizers, layout, shard builder,
trainer and generator), never a separate code path. The training stage runs the recipe
``experiment=demo`` (composed by Hydra, as ``omnitrain train`` does, with ``train_overrides`` on
top). Stages that later parts of omnitrain add (evaluation) are listed as pending until they
exist, so the demo always runs everything that does.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from omnitrain.config import from_dict
from omnitrain.pipeline.build import BuildConfig, PipelineConfig, TokenizersConfig, build_shards
from omnitrain.pipeline.inspect import InspectConfig, inspect_shards
from omnitrain.pipeline.media import MediaConfig
from omnitrain.tokenizer.audio_train import AudioTrainConfig, train_audio_codec
from omnitrain.tokenizer.build import load_media_tokenizers
from omnitrain.tokenizer.image_train import ImageTrainConfig, train_image_tokenizer
from omnitrain.tokenizer.layout import SpecialSegment, TextSegment, TokenLayout, normalize
from omnitrain.tokenizer.report import TokenizerReportConfig, write_report
from omnitrain.tokenizer.text import (
    TextCorpusConfig,
    TextTokenizerConfig,
    TrainTextTokenizerConfig,
    train_text_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]
PENDING = [
    ("post-training: SFT and preference tuning", "issue 8"),
    ("evaluation before/after (WER, ANLS, perplexity)", "issue 9"),
]
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "horse", "motorcycle_left", "brick", "coins", "moon", "page")


@dataclass
class DemoConfig:
    run_dir: Path = Path("runs/demo")
    tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    corpus: TextCorpusConfig = field(default_factory=TextCorpusConfig)
    image: ImageTrainConfig = field(default_factory=ImageTrainConfig)  # its run_dir is set by the demo
    audio: AudioTrainConfig = field(default_factory=AudioTrainConfig)  # its run_dir is set by the demo
    media: MediaConfig = field(default_factory=MediaConfig)
    text_docs: int = 40  # handbook pages in the text shards
    report_languages: list[str] = field(default_factory=list)  # empty: all 20
    train_steps: int = 200  # steps of `omnitrain train experiment=demo` (0: skip training and generation)
    train_overrides: list[str] = field(default_factory=list)  # more overrides for the training recipe


def _stage(name: str) -> float:
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def _pipeline(name: str, **changes: object) -> PipelineConfig:
    data = yaml.safe_load((REPO / "data_pipelines" / "pipeline" / f"{name}.yaml").read_text())
    for key, value in changes.items():
        data["source"][key] = value
    return from_dict(PipelineConfig, data)


def _caption_folder(out: Path) -> Path:
    """Real photos from scikit-image, captioned with what they show."""
    skdata = Path(__import__("skimage").__file__).parent / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        if (skdata / f"{name}.png").is_file():
            shutil.copy(skdata / f"{name}.png", out / f"{name}.png")
            (out / f"{name}.txt").write_text(f"a picture of {name.replace('_', ' ')}")
    return out


def run_demo(cfg: DemoConfig) -> dict:
    t_start = time.perf_counter()
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    summary: dict = {"stages": {}}

    t = _stage("1/8 text tokenizer (SentencePiece BPE on Debian's multilingual text)")
    tok_dir = run / "tokenizer" / "text"
    tok = train_text_tokenizer(TrainTextTokenizerConfig(run_dir=tok_dir, tokenizer=cfg.tokenizer, corpus=cfg.corpus))
    summary["stages"]["text_tokenizer"] = {"vocab_size": tok.vocab_size, "seconds": round(time.perf_counter() - t, 1)}

    t = _stage("2/8 image tokenizer (VQ autoencoder on scikit-image photos)")
    cfg.image.run_dir = run / "tokenizer" / "image"
    img_metrics = train_image_tokenizer(cfg.image)
    summary["stages"]["image_tokenizer"] = {"init": img_metrics["init"], "trained": img_metrics["final"], "seconds": round(time.perf_counter() - t, 1)}

    t = _stage("3/8 audio codec (RVQ on LibriVox read speech)")
    cfg.audio.run_dir = run / "tokenizer" / "audio"
    aud_metrics = train_audio_codec(cfg.audio)
    summary["stages"]["audio_codec"] = {"init": aud_metrics["init"], "trained": aud_metrics["trained"], "seconds": round(time.perf_counter() - t, 1)}

    t = _stage("4/8 token layout (one id space) and an exact serialize/parse round trip")
    image_ckpt, audio_ckpt = cfg.image.run_dir / "image_tokenizer.pt", cfg.audio.run_dir / "audio_codec.pt"
    image, audio = load_media_tokenizers(image_ckpt, audio_ckpt)
    layout = TokenLayout.from_tokenizers(tok, image, audio)
    layout.save(run / "layout.json")
    sample = "def add(a, b):\n    return a + b  # indentation survives\nBonjour, ça va ? नमस्ते 你好"
    segments = [SpecialSegment("bos"), TextSegment(np.array(tok.encode(sample))), SpecialSegment("eos")]
    back = layout.parse(layout.serialize(segments))
    if back != normalize(segments) or tok.decode(back[1].ids.tolist()) != sample:
        raise RuntimeError("layout round trip failed: this is a bug, please report it")
    print(layout.describe())
    summary["layout"] = {"hash": layout.hash, "vocab_size": layout.vocab_size}

    t = _stage("5/8 token shards: text LM, image captioning, speech recognition")
    tokenizers = TokenizersConfig(text=tok_dir, image=str(image_ckpt), audio=str(audio_ckpt))
    handbook = sorted(Path("/usr/share/doc/debian-handbook/html/en-US").glob("*.html"))[: cfg.text_docs]
    jobs = [
        ("text_lm", _pipeline("debian_text", paths=[str(p) for p in handbook])),
        ("caption", from_dict(PipelineConfig, {"name": "photos_caption", "template": "caption",
                                               "source": {"kind": "image_folder", "paths": [str(_caption_folder(run / "data" / "photos"))]}})),
        ("asr", _pipeline("librivox_asr")),
    ]  # fmt: skip
    summary["shards"] = {}
    shutil.rmtree(run / "shards", ignore_errors=True)  # the tokenizers were just retrained: a new id space
    for name, pipeline in jobs:
        out = run / "shards" / name
        stats = build_shards(BuildConfig(pipeline=pipeline, tokenizers=tokenizers, media=cfg.media, out_dir=out, shard_samples=16))
        summary["shards"][name] = {"samples": stats["samples"], "tokens": stats["tokens"], "errors": stats["errors"]}
        inspect_shards(InspectConfig(shards=out, samples=1))
    summary["stages"]["shards_seconds"] = round(time.perf_counter() - t, 1)

    t = _stage("6/8 tokenizer compression report (ours vs o200k_base vs cl100k_base)")
    langs = cfg.report_languages or TokenizerReportConfig().languages
    report = write_report(TokenizerReportConfig(tokenizer=tok_dir, languages=langs, out_dir=run / "tokenizer" / "report"))
    rows = report["rows"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("ours", "o200k_base", "cl100k_base")}
    print(f"mean tokens/char over {len(rows)} languages: ours {mean['ours']:.3f}, o200k_base {mean['o200k_base']:.3f}, "
          f"cl100k_base {mean['cl100k_base']:.3f} -> {run / 'tokenizer/report/report.md'}")  # fmt: skip
    summary["compression_mean_tokens_per_char"] = mean

    if cfg.train_steps:
        summary["train"], summary["generate"] = _train_and_generate(cfg, run, tokenizers)

    print("\n== not yet in omnitrain (the demo grows as they land):")
    for what, issue in PENDING:
        print(f"   - {what} ({issue})")
    summary["pending"] = [w for w, _ in PENDING]
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    n_samples = sum(s["samples"] for s in summary["shards"].values())
    trained = f", trained {summary['train']['step']} steps (loss {summary['train']['first_loss']:.2f} -> {summary['train']['loss']:.2f})" if cfg.train_steps else ""
    print(f"\ndemo done in {summary['seconds']}s: 3 tokenizers, layout {layout.hash} (vocab {layout.vocab_size}), "
          f"{n_samples} samples in 3 shard sets, {len(rows)}-language report{trained} -> {run}")  # fmt: skip
    return summary


def _train_and_generate(cfg: DemoConfig, run: Path, tokenizers: TokenizersConfig) -> tuple[dict, dict]:
    from omnitrain.cli import COMMANDS, compose, recipes_dir
    from omnitrain.prompting import GenerateConfig, TokenizerPaths, run_generate
    from omnitrain.runlog import read_metrics
    from omnitrain.train import train

    t = _stage("7/8 training: the tiny omni model on the three shard sets (recipes/experiment/demo.yaml, Fabric)")
    shards = {name: run / "shards" / name for name in ("text_lm", "caption", "asr")}
    overrides = [f"run_dir={run / 'train'}", f"steps={cfg.train_steps}", "resume=never",
                 *(f"data.sources.{k}.path={v}" for k, v in shards.items()), *cfg.train_overrides]  # fmt: skip
    shutil.rmtree(run / "train", ignore_errors=True)  # new tokenizers, new shards: a new run
    train_cfg, plain = compose(next(c for c in COMMANDS if c.name == "train"), overrides, recipes_dir())
    result = train(train_cfg, plain)
    rows = read_metrics(run / "train")
    trained = {"step": result["step"], "tokens": result["tokens"], "first_loss": rows[0]["loss"], "loss": rows[-1]["loss"],
               **{k: rows[-1][k] for k in rows[-1] if k.startswith(("loss/", "acc/"))}, "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip

    t = _stage("8/8 generation: caption a photo, transcribe speech (the trained directions), and text -> image (PNG)")
    skdata = Path(__import__("skimage").__file__).parent / "data"
    paths = TokenizerPaths(text=str(tokenizers.text), image=tokenizers.image, audio=tokenizers.audio, max_grid=tokenizers.max_grid)
    grid = cfg.media.image_size // cfg.image.model.downsample
    outputs = {}
    for name, changes in {
        "caption": {"images": [str(skdata / "astronaut.png")], "output": "text"},
        "text_to_image": {"text": "a picture of coffee", "output": "image", "image_grid": [grid, grid]},
        "asr": {"audios": [str(LIBRIVOX / "sense_and_sensibility_01_austen_64kb-0870.wav")], "output": "text"},
    }.items():
        gen = GenerateConfig(run=run / "train", tokenizers=paths, out_dir=run / "generate" / name, media=cfg.media, **changes)
        gen.sampling.max_new_tokens, gen.sampling.temperature = 300, 0.8
        outputs[name] = run_generate(gen)["samples"][0]["parts"]
    return trained, {**outputs, "seconds": round(time.perf_counter() - t, 1)}
