"""``omnitrain demo``: the framework end to end on data it makes itself, on a CPU, in minutes.

It is a small configuration of the real path, never a separate one: the corpus (``demo_data``)
goes through the same tokenizer trainers, token layout, shard builder (the ``records`` /
``image_folder`` / ``audio_folder`` pipelines with the caption, text-to-image, doc QA, ASR, TTS, chat
(spoken questions answered in speech) and text LM templates), the trainer (``experiment=demo`` composed by Hydra exactly as ``omnitrain
train`` does, ``train_overrides`` on top), the eval harness's model adapter and metrics, and
generation. The untrained model (the very weights training starts from, ``init_from``) and the
trained one are evaluated on the same held-out sets; ``demo_report`` writes ``report.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from omnitrain.config import from_dict
from omnitrain.data.pipeline.build import BuildConfig, PipelineConfig, build_shards
from omnitrain.data.pipeline.inspect import InspectConfig, inspect_shards
from omnitrain.data.pipeline.media import MediaConfig
from omnitrain.demo.corpus import (
    CELL_W,
    CorpusConfig,
    make_corpus,
    read_jsonl,
    spoken_digits,
    tokenizer_inputs,
)
from omnitrain.demo.report import (
    ANSWER_MAX_TOKENS,
    TEXT_CHUNK_CHARS,
    codec_ceiling,
    evaluate,
    loss_drop,
    write_demo_report,
)
from omnitrain.eval.in_training import build_evaluator
from omnitrain.model.generate_command import GenerateConfig, run_generate
from omnitrain.model.io import save_model
from omnitrain.model.transformer import Transformer
from omnitrain.tokenizer import bundle
from omnitrain.tokenizer.audio_train import AudioTrainConfig, train_audio_codec
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.tokenizer.image_train import ImageTrainConfig, train_image_tokenizer
from omnitrain.tokenizer.layout import SpecialSegment, TextSegment, TokenLayout, normalize
from omnitrain.tokenizer.report import TokenizerReportConfig, write_report
from omnitrain.tokenizer.text import (
    TextCorpusConfig,
    TextTokenizerConfig,
    TrainTextTokenizerConfig,
    train_text_tokenizer,
)
from omnitrain.train.loop import train
from omnitrain.train.runlog import read_metrics

REPO = Path(__file__).resolve().parents[3]
PENDING: list[tuple[str, str]] = []  # (what, issue) of parts the demo cannot run yet; every part it covers has landed
N_STAGES = 11


@dataclass
class DemoConfig:
    run_dir: Path = Path("runs/demo")
    data: CorpusConfig = field(default_factory=CorpusConfig)  # what the demo renders and synthesises
    tokenizer: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    corpus: TextCorpusConfig = field(default_factory=TextCorpusConfig)  # the text tokenizer's training text
    image: ImageTrainConfig = field(default_factory=ImageTrainConfig)  # its run_dir and data.source are set by the demo
    audio: AudioTrainConfig = field(default_factory=AudioTrainConfig)  # its run_dir and data.source are set by the demo
    media: MediaConfig = field(default_factory=MediaConfig)  # image_size is set per shard set (see image_sizes)
    photo_size: int = 64  # longest side of the photos in the shards (forms: 128; digits: their rendered width)
    report_languages: list[str] = field(default_factory=list)  # tokenizer report; empty: all 20
    train_steps: int = 600  # steps of `omnitrain train experiment=demo` (0: stop after the shards)
    audio_layout: Literal["flat", "delay", "depth"] = "delay"  # the trained model's model.audio_layout (recipes/demo.yaml says why)
    train_overrides: list[str] = field(default_factory=list)  # more overrides for the training recipe
    eval_every: int = 100  # in-training eval (perplexity, reading) every N training steps, for the report's curves; 0: off
    eval_batch_size: int = 16
    workers: int = 1  # shard-building processes
    # torch threads for the image tokenizer and the audio codec: these small conv nets ran faster on 1
    # thread than on 2 (audio codec, 400 steps: 255 s on 1 thread with the CPU busy, 392 s on 2 with it half idle)
    tokenizer_threads: int = 1


def image_sizes(cfg: DemoConfig) -> dict[str, int]:
    """The longest image side each shard set is built at (and each eval prompt is prepared at)."""
    return {"photo_caption": cfg.photo_size, "reading": cfg.data.digits_length * CELL_W, "digits_to_image": cfg.data.digits_length * CELL_W,
            "doc_qa": 8 * CELL_W}  # fmt: skip


class Stages:
    """Numbered stage headers and one summary line per stage, with timings kept for the report."""

    def __init__(self) -> None:
        self.k, self.t0, self.times = 0, 0.0, {}

    def start(self, name: str, what: str) -> None:
        self.k += 1
        self.name, self.t0 = name, time.perf_counter()
        print(f"\n== [{self.k}/{N_STAGES}] {what}", flush=True)

    def done(self, line: str) -> float:
        secs = round(time.perf_counter() - self.t0, 1)
        self.times[self.name] = secs
        print(f"-> {self.name} ({secs:.1f}s): {line}", flush=True)
        return secs


def _with_threads(n: int, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` with ``n`` torch threads (0: leave torch's setting), restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def _records(name: str, template: str, paths: list[str], kind: str = "records", columns: dict | None = None) -> PipelineConfig:
    data = yaml.safe_load((REPO / "data_pipelines" / "pipeline" / "records.yaml").read_text())
    data.update(name=name, template=template)
    data["source"].update(kind=kind, paths=paths, columns=columns or {})
    return from_dict(PipelineConfig, data)


def _pipeline(name: str, **changes: object) -> PipelineConfig:
    data = yaml.safe_load((REPO / "data_pipelines" / "pipeline" / f"{name}.yaml").read_text())
    data["source"].update(changes)
    return from_dict(PipelineConfig, data)


def shard_jobs(cfg: DemoConfig, corpus: dict[str, Any]) -> dict[str, PipelineConfig]:
    """Shard set name -> pipeline (every template the demo trains on)."""
    return {
        "text_lm": _pipeline("debian_text", paths=corpus["text"]["train"]),
        "photo_caption": _records("photo_caption", "caption", [corpus["photos"]], kind="image_folder"),
        "reading": _records("reading", "caption", [corpus["digits"]["train"]]),
        "digits_to_image": _records("digits_to_image", "text_to_image", [corpus["digits"]["train"]]),
        "doc_qa": _records("doc_qa", "doc_qa", [corpus["forms"]["train"]], columns={"question": "prompted_question"}),
        "asr": _records("asr", "asr", [corpus["speech"]["digits_train"]]),  # sentences: the codec only (recipes/data/demo.yaml)
        "librivox_asr": _pipeline("librivox_asr"),
        "tts": _records("tts", "tts", [corpus["speech"]["tts_train"]]),  # digit strings in the assistant's voice
        "s2s": _records("s2s", "chat", [corpus["s2s"]["train"]]),  # spoken question -> [answer text] spoken answer
    }


# (command name, overrides) -> (that command's validated config, the plain mapping it was made from)
Compose = Callable[[str, list[str]], tuple[Any, dict[str, Any]]]


def run_demo(cfg: DemoConfig, compose: Compose) -> dict:
    """Run every stage; ``compose`` turns a command's overrides into its config exactly as ``omnitrain
    <command>`` does (the CLI passes its Hydra composition, so Hydra stays in ``cli.py``)."""
    t_start = time.perf_counter()
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    st = Stages()
    summary: dict[str, Any] = {"load_average_start": os.getloadavg(), "cpus": os.cpu_count()}

    st.start("corpus", "corpus: rendered digits and forms, flite speech and spoken questions, handbook text, scikit-image photos")
    corpus = make_corpus(run / "data", cfg.data)
    c = corpus["counts"]
    summary["corpus"] = c
    st.done(", ".join(f"{k} {v['train']}+{v['test']} held out" if isinstance(v, dict) else f"{k} {v}" for k, v in c.items()))

    st.start("text_tokenizer", "text tokenizer: SentencePiece BPE on Debian's multilingual text")
    tok_dir = run / "tokenizer" / "text"
    tok = train_text_tokenizer(TrainTextTokenizerConfig(run_dir=tok_dir, tokenizer=cfg.tokenizer, corpus=cfg.corpus))
    st.done(f"vocabulary {tok.vocab_size}")

    image_list, audio_list = tokenizer_inputs(run / "data", corpus)
    st.start("image_tokenizer", "image tokenizer: VQ autoencoder on photos and rendered pages")
    cfg.image.run_dir, cfg.image.data.source = run / "tokenizer" / "image", str(image_list)
    img_metrics = _with_threads(cfg.tokenizer_threads, train_image_tokenizer, cfg.image)
    summary["image_tokenizer"] = {"init": img_metrics["init"], "trained": img_metrics["final"]}
    st.done(f"held-out PSNR {img_metrics['init'].get('psnr', float('nan')):.1f} -> {img_metrics['final'].get('psnr', float('nan')):.1f} dB")

    st.start("audio_codec", "audio codec: RVQ on flite speech and LibriVox read speech")
    cfg.audio.run_dir, cfg.audio.data.source = run / "tokenizer" / "audio", str(audio_list)
    aud_metrics = _with_threads(cfg.tokenizer_threads, train_audio_codec, cfg.audio)
    summary["audio_codec"] = {"init": aud_metrics["init"], "trained": aud_metrics["trained"]}
    st.done(", ".join(f"{k} {aud_metrics['init'][k]:.2f} -> {v:.2f}" for k, v in aud_metrics["trained"].items() if isinstance(v, float))[:200])

    st.start("layout", "token layout: one id space, and an exact serialize/parse round trip")
    image_ckpt, audio_ckpt = cfg.image.run_dir / "image_tokenizer.pt", cfg.audio.run_dir / "audio_codec.pt"
    tokenizers = TokenizerPaths(text=str(tok_dir), image=str(image_ckpt), audio=str(audio_ckpt))
    layout = bundle.load(tokenizers).layout
    layout.save(run / "layout.json")
    sample = "def add(a, b):\n    return a + b  # indentation survives\nBonjour, ça va ? नमस्ते 你好"
    segments = [SpecialSegment("bos"), TextSegment(np.array(tok.encode(sample))), SpecialSegment("eos")]
    back = layout.parse(layout.serialize(segments))
    if back != normalize(segments) or tok.decode(back[1].ids.tolist()) != sample:
        raise RuntimeError("layout round trip failed: this is a bug, please report it")
    print(layout.describe())
    summary["layout"] = {"hash": layout.hash, "vocab_size": layout.vocab_size}
    st.done(f"layout {layout.hash}, vocabulary {layout.vocab_size}")

    st.start("shards", "token shards: text LM, captioning, reading, text -> image, document QA, ASR, TTS, speech to speech")
    sizes = image_sizes(cfg)
    summary["shards"] = {}
    shutil.rmtree(run / "shards", ignore_errors=True)  # the tokenizers were just retrained: a new id space
    for name, pipeline in shard_jobs(cfg, corpus).items():
        out = run / "shards" / name
        media = MediaConfig(**{**vars(cfg.media), "image_size": sizes.get(name, cfg.media.image_size)})
        # the builder sets 1 torch thread in this process (its encoder runs here too): restore them for training
        stats = _with_threads(0, build_shards, BuildConfig(pipeline=pipeline, tokenizers=tokenizers, media=media, out_dir=out,
                                                           shard_samples=64, workers=cfg.workers))  # fmt: skip
        summary["shards"][name] = {"template": pipeline.template, "samples": stats["samples"], "tokens": stats["tokens"], "errors": stats["errors"]}
        inspect_shards(InspectConfig(shards=out, samples=1))
    n_tok = sum(sum(s["tokens"].values()) for s in summary["shards"].values())
    st.done(f"{len(summary['shards'])} shard sets, {sum(s['samples'] for s in summary['shards'].values()):,} samples, {n_tok:,} tokens")

    st.start("tokenizer_report", "tokenizer compression report (ours vs o200k_base vs cl100k_base)")
    langs = cfg.report_languages or TokenizerReportConfig().languages
    report = write_report(TokenizerReportConfig(tokenizer=tok_dir, languages=langs, out_dir=run / "tokenizer" / "report"))
    mean = {k: float(np.mean([r[k] for r in report["rows"]])) for k in ("ours", "o200k_base", "cl100k_base")}
    summary["compression_mean_tokens_per_char"] = mean
    st.done(f"mean tokens/char over {len(report['rows'])} languages: ours {mean['ours']:.3f}, o200k_base {mean['o200k_base']:.3f}, "
            f"cl100k_base {mean['cl100k_base']:.3f}")  # fmt: skip

    if cfg.train_steps:
        _train_eval_generate(cfg, run, corpus, tokenizers, layout, st, summary, compose)

    summary["pending"] = [w for w, _ in PENDING]
    summary["stage_seconds"] = st.times
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    summary["load_average_end"] = os.getloadavg()
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if cfg.train_steps:
        report_path = write_demo_report(run, summary)
        print(f"report -> {report_path}")
    if PENDING:
        print("\n== not yet in omnitrain (the demo grows as they land):")
        for what, issue in PENDING:
            print(f"   - {what} ({issue})")
    trained = ""
    if cfg.train_steps:
        t = summary["train"]
        trained = f", trained {t['step']} steps (loss {t['first_loss']:.2f} -> {t['loss']:.2f}), evaluated before/after"
    print(f"\ndemo done in {summary['seconds']}s: 3 tokenizers, layout {layout.hash} (vocab {layout.vocab_size}), "
          f"{len(summary['shards'])} shard sets{trained} -> {run}")  # fmt: skip
    return summary


def in_training_overrides(cfg: DemoConfig, corpus: dict[str, Any], tokenizers: TokenizerPaths) -> list[str]:
    """``eval_in_training``: held-out text perplexity and reading on the training model every ``eval_every`` steps
    (small limits: the curves cost a few seconds each time), for the report's benchmark curves."""
    if not cfg.eval_every:
        return []
    texts = ",".join(f"'{p}'" for p in corpus["text"]["test"])
    tasks = (f"{{perplexity:{{limit:4,chunk_chars:{TEXT_CHUNK_CHARS},paths:[{texts}]}},"
             f"reading:{{limit:8,path:'{corpus['digits']['test']}',image_size:{image_sizes(cfg)['reading']},max_new_tokens:{ANSWER_MAX_TOKENS}}}}}")
    return [f"eval_in_training.every={cfg.eval_every}", "~eval_in_training.tasks", f"+eval_in_training.tasks={tasks}",
            f"eval_in_training.tokenizers.text={tokenizers.text}", f"eval_in_training.tokenizers.image={tokenizers.image}",
            f"eval_in_training.tokenizers.audio={tokenizers.audio}"]  # fmt: skip


def _train_eval_generate(cfg: DemoConfig, run: Path, corpus: dict[str, Any], tokenizers: TokenizerPaths, layout: TokenLayout,
                         st: Stages, summary: dict[str, Any], compose: Compose) -> None:  # fmt: skip
    overrides = [f"run_dir={run / 'train'}", f"steps={cfg.train_steps}", "resume=never", f"init_from={run / 'init' / 'model'}",
                 *(f"data.sources.{k}.path={run / 'shards' / k}" for k in summary["shards"]),
                 f"model.audio_layout={cfg.audio_layout}", *in_training_overrides(cfg, corpus, tokenizers), *cfg.train_overrides]  # fmt: skip
    train_cfg, plain = compose("train", overrides)
    missing = set(summary["shards"]) ^ set(train_cfg.data.sources)
    if missing:
        raise ValueError(f"recipes/data/demo.yaml and the demo's shard sets differ in {sorted(missing)}: keep them in step")

    st.start("eval_init", "evaluation of the untrained model (the weights training starts from) on the held-out sets")
    torch.manual_seed(train_cfg.seed)
    train_cfg.model.vocab_size = layout.vocab_size
    init = Transformer(train_cfg.model)
    init.set_modalities(layout.modality_of(np.arange(layout.vocab_size)))
    save_model(init, run / "init" / "model", run, {"step": 0, "tokens": 0})
    before = evaluate(run / "init", run / "eval" / "init", corpus, tokenizers, image_sizes(cfg), compose, cfg.eval_batch_size)
    summary["codec_ceiling"] = codec_ceiling(corpus, tokenizers, run / "eval" / "codec_ceiling", cfg.data.tts_test)
    trip = summary["codec_ceiling"]
    st.done(_eval_line(before) + f"; codec round trip heard at WER {trip['round_trip']['value']:.3f} (recordings {trip['recorded']['value']:.3f})")

    st.start("train", "training: the tiny omni model on all shard sets (recipes/experiment/demo.yaml, Fabric)")
    shutil.rmtree(run / "train", ignore_errors=True)  # new tokenizers, new shards: a new run
    result = train(train_cfg, plain, evaluator=build_evaluator(train_cfg))
    rows = [r for r in read_metrics(run / "train") if "loss" in r]  # (step 0: the in-training eval's baseline, no loss)
    drops = loss_drop(rows)
    summary["train"] = {"step": result["step"], "tokens": result["tokens"], "first_loss": rows[0]["loss"], "loss": rows[-1]["loss"],
                        "params": sum(p.numel() for p in init.parameters()), "loss_by_modality": drops,
                        "tokens_per_s": result["tokens"] / max(result["seconds"], 1e-9)}  # fmt: skip
    st.done(f"{result['step']} steps, {result['tokens']:,} tokens at {summary['train']['tokens_per_s']:.0f} tokens/s; loss "
            + ", ".join(f"{m} {d['first']:.2f} -> {d['last']:.2f}" for m, d in drops.items()))  # fmt: skip

    st.start("eval_trained", "evaluation of the trained model on the same held-out sets")
    after = evaluate(run / "train", run / "eval" / "trained", corpus, tokenizers, image_sizes(cfg), compose, cfg.eval_batch_size)
    summary["eval"] = {"init": before, "trained": after}
    st.done(_eval_line(after))

    st.start("generate", "generation: a held-out number written as an image, spoken (TTS), a spoken question answered, a photo captioned")
    digits = read_jsonl(corpus["digits"]["test"])[0]["caption"]
    question = read_jsonl(corpus["s2s"]["test"])[0]
    grid = [1 * 24 // 8, len(digits) * CELL_W // 8]  # [h, w] codes of one rendered line
    outputs = {}
    for name, changes in {
        "digits_to_image": {"text": digits, "output": "image", "image_grid": grid},
        "tts": {"text": spoken_digits(digits), "output": "audio"},
        # the chat template's prefix, as the s2s training records: the reply is [its text] then its speech
        "s2s": {"audios": [question["audio"]], "chat": True, "output": "text", "what": f"{question['question']} ({question['voice']})"},
        "caption": {"images": [str(Path(corpus["photos"]) / "astronaut.png")], "text": "Caption:", "output": "text"},  # the caption template's prompt
    }.items():
        what = changes.pop("what", None)
        gen = GenerateConfig(run=run / "train", tokenizers=tokenizers, out_dir=run / "generate" / name, **changes,
                             media=MediaConfig(**{**vars(cfg.media), "image_size": cfg.photo_size}))  # fmt: skip
        gen.sampling.max_new_tokens, gen.sampling.temperature, gen.sampling.top_k = 400, 0.8, 50
        prompt = changes["images"][0] if "images" in changes else changes["audios"][0] if "audios" in changes else changes["text"]
        outputs[name] = {"prompt": prompt, "parts": run_generate(gen)["samples"][0]["parts"], **({"what": what} if what else {})}
    summary["generate"] = outputs
    st.done("; ".join(f"{k}: {' '.join(v['parts'])[:80]}" for k, v in outputs.items()))


def _eval_line(results: dict[str, Any]) -> str:
    return ", ".join(f"{task} {name} {m['value']:.3f}" for task, r in results.items() for name, m in list(r["metrics"].items())[:1])
