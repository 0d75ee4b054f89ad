"""Speech-output evals of ``omnitrain eval`` (issue 23, item 3): what the model *says*, heard by an independent ASR.

Legend: F audio frames, K codec levels, S samples.

* ``tts`` (intelligibility): ``<bos> text <boa>``, exactly the prefix ``data_pipelines/template/tts.yaml`` trains on,
  then an audio span generated under the layout constraint (``model.audio_layout`` flat / delay / depth:
  ``generate.generate`` dispatches), decoded by the run's codec to a 16 kHz wav, transcribed (pocketsphinx offline,
  or Whisper through transformers) and scored: corpus WER and CER against the prompt text after the reference
  normaliser (``omnitrain.eval.metrics.corpus_wer``).
* ``s2s`` (spoken answers): the question audio as a user turn, then the opening of the assistant turn (the chat
  template's prefix, as ``data_pipelines/template/chat.yaml`` builds the S2S records); the reply may be text first
  (an inner monologue, as Moshi's) then audio, or audio only. The first audio span of the reply is decoded,
  transcribed and scored by normalised exact match against the answer(s) and WER; the monologue is kept.
* ``latency_ms``: voice response latency, from the end of the user's audio (the whole prompt fed) to the first
  decoded audio chunk: the generator's time to its first chunk of ``chunk_frames`` frames (prefill included; a
  monologue too) plus the codec's decode of that chunk. One prompt at a time, as a voice assistant answers. The
  codec's encoding of the user's audio is not in it: a streaming system encodes the question while it is spoken.
  Median and p90, with the model's size, layout and device, beside GPT-4o's published 320 ms average.

The generated wavs go to ``<out_dir>/<task>_wavs/`` (``omnitrain eval`` sets ``out_dir``; without one, e.g. inside
training, they are transcribed from a temporary folder and not kept); transcripts and monologues are in
``samples.jsonl``.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from omnitrain.eval.results import metric
from omnitrain.eval.speech import SENTENCES, jsonl_rows

SAMPLE_RATE = 16_000  # what the ASR systems hear
# OpenAI, "Hello GPT-4o" (2024-05-13): "It can respond to audio inputs in as little as 232 milliseconds, with an
# average of 320 milliseconds, which is similar to human response time in a conversation."
GPT4O_LATENCY_MS = 320.0
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ASR_SYSTEMS = ("pocketsphinx", "pocketsphinx_digits", "whisper")
# Connected digits, as TIDIGITS is scored: pocketsphinx restricted to the ten digit words. On the demo's 40 held-out
# flite digit strings it hears WER 0.017 where the open vocabulary hears 0.208 (basic normaliser, measured 2026-12-06;
# evals/tts.yaml): the ceiling a TTS model that speaks digit strings can be held to.
DIGITS_JSGF = "#JSGF V1.0;\ngrammar digits;\npublic <digits> = ( zero | one | two | three | four | five | six | seven | eight | nine )+ ;\n"


@dataclass
class SpeechOutputConfig:
    """What the speech-output tasks share: the ASR that listens, the scoring, the sampling and the latency chunk."""

    # pocketsphinx (offline baseline, open vocabulary) | pocketsphinx_digits (spoken digit strings only: a grammar of
    # the digit words) | whisper (transformers; whisper_model names it)
    asr: str = "pocketsphinx"
    whisper_model: str | None = None  # asr=whisper: a local Whisper folder, or a hub id already in the HF cache
    normalizer: str = "whisper"  # whisper | basic | none (basic keeps spoken digits as words: "four seven two")
    max_audio_seconds: float = 6.0  # the longest audio span generated (frames = seconds x the codec's frame rate)
    chunk_frames: int = 5  # frames in the first audio chunk, the one latency waits for (5 at 25 Hz: 200 ms of audio)
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    seed: int = 0

    def check(self, task: str) -> None:
        if self.asr not in ASR_SYSTEMS:
            raise ValueError(f"{task}.asr={self.asr!r}; choose from {', '.join(ASR_SYSTEMS)}")
        if self.asr == "whisper" and not self.whisper_model:
            raise ValueError(f"{task}.asr=whisper needs {task}.whisper_model=<local Whisper folder, or a hub id in the cache>")
        if self.max_audio_seconds <= 0 or self.chunk_frames < 1 or self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"{task}: max_audio_seconds={self.max_audio_seconds} must be > 0, chunk_frames={self.chunk_frames} "
                             f">= 1, temperature={self.temperature} and top_k={self.top_k} >= 0")  # fmt: skip


@dataclass
class TTSConfig(SpeechOutputConfig):
    # sentences (eval/speech.py's 32 plain sentences) | digits[:N] (N spoken 3-digit strings, the demo's style;
    # default 20) | a jsonl of {id, text}
    source: str = "sentences"


@dataclass
class S2SConfig(SpeechOutputConfig):
    path: str | None = None  # jsonl of {id, audio: question wav, answer: text, answers: [text, ...] optional}
    mode: str = "auto"  # auto: the model may say its text first, then speak | audio: the reply opens with <boa>
    max_text_tokens: int = 32  # the longest text monologue before the audio (a reply that says more has no speech)
    max_audio_seconds: float = 4.0


@dataclass
class Spoken:
    """One generated reply: its monologue, its first audio span and when the first chunk of it was heard."""

    text: str  # the text before the audio span (s2s monologue; "" for tts)
    codes: np.ndarray  # [F, K] (F may be 0: no audio span, or an empty one)
    wav: np.ndarray  # [S] at 16 kHz
    latency_ms: float | None  # None: no audio
    new_tokens: int
    seconds: float  # wall time of the whole generation
    note: str | None = None


# ----------------------------------------------------------------------------- items
def tts_items(source: str) -> list[dict[str, Any]]:
    """``[{id, text}]`` of a tts source (see ``TTSConfig.source``)."""
    if source == "sentences":
        return [{"id": f"sentence/{i}", "text": s} for i, s in enumerate(SENTENCES)]
    if source == "digits" or source.startswith("digits:"):
        n = source.removeprefix("digits").removeprefix(":") or "20"
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"tts.source={source!r}: digits:<N> takes a count >= 1, e.g. digits:20")
        rng = random.Random(0)
        return [{"id": f"digits/{i}", "text": " ".join(rng.choice(DIGIT_WORDS) for _ in range(3))} for i in range(int(n))]
    rows = _jsonl(Path(source), ("text",), what="tts.source")
    for i, r in enumerate(rows):
        if not isinstance(r["text"], str) or not r["text"].strip():
            raise ValueError(f"{source}:{r['_line']}: tts needs a non-empty text to speak, got {r['text']!r}")
        r.setdefault("id", f"tts/{i}")
    return rows


def s2s_items(path: str | None) -> list[dict[str, Any]]:
    """``[{id, audio (absolute), answers: [..]}]`` of an s2s manifest."""
    if not path:
        raise ValueError("task s2s needs s2s.path=<jsonl of {id, audio: question wav, answer: text}>")
    rows = _jsonl(Path(path), ("audio",), what="s2s.path")
    for r in rows:
        answers = r.get("answers") or ([r["answer"]] if r.get("answer") else [])
        if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(f"{path}:{r['_line']}: an s2s row needs answer: <text> (or answers: [<text>, ...]); "
                             f"it has {sorted(k for k in r if k != '_line')}")  # fmt: skip
        audio = Path(r["audio"])
        r["audio"] = str(audio if audio.is_absolute() else Path(path).parent / audio)
        if not Path(r["audio"]).is_file():
            raise FileNotFoundError(f"{path}:{r['_line']}: question audio {r['audio']} does not exist")
        r["answers"] = list(answers)
        r.setdefault("id", Path(r["audio"]).stem)
    return rows


def _jsonl(path: Path, needed: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """The rows of a tts / s2s jsonl (``omnitrain.eval.speech.jsonl_rows``), each with its ``_line``; none is an error."""
    rows = [{**r, "_line": i} for i, r in jsonl_rows(path, needed, what)]
    if not rows:
        raise ValueError(f"{what}={path} holds no rows")
    return rows


# ----------------------------------------------------------------------------- ASR
class WhisperASR:
    """Whisper through transformers (an independent ASR where weights exist): 16 kHz wav paths -> transcripts."""

    def __init__(self, model_id: str, device: str = "cpu") -> None:
        try:
            from transformers import WhisperForConditionalGeneration, WhisperProcessor  # noqa: I001 (optional: the hf extra)
        except ImportError as e:
            raise ImportError("asr=whisper needs transformers: pip install -e '.[hf]' (bash setup.sh does)") from e
        try:
            self.processor = WhisperProcessor.from_pretrained(model_id)
            self.model = WhisperForConditionalGeneration.from_pretrained(model_id).to(device).eval()
        except (OSError, ValueError) as e:  # not there, no network, not a Whisper checkpoint
            raise ValueError(f"asr=whisper: the Whisper weights {model_id!r} cannot be loaded ({type(e).__name__}: "
                             f"{str(e)[:300]}). Without hub access pass whisper_model=<a local folder with a Whisper "
                             "checkpoint and its processor files (config.json, model.safetensors, tokenizer, "
                             "preprocessor_config.json)>, or use asr=pocketsphinx") from e  # fmt: skip
        self.device = device

    def transcribe(self, paths: list[str]) -> list[str]:
        import torch

        out = []
        for p in paths:
            wav = read_16k(p)
            feats = self.processor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features.to(self.device)
            with torch.no_grad():
                ids = self.model.generate(feats)
            out.append(self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
        return out


def load_asr(cfg: SpeechOutputConfig, device: str = "cpu") -> Any:
    """The ASR that listens to the generated speech: ``transcribe([wav paths]) -> [text]``."""
    if cfg.asr == "whisper":
        return WhisperASR(cfg.whisper_model, device)
    from omnitrain.eval.baselines import PocketsphinxASR

    if cfg.asr == "pocketsphinx_digits":
        with tempfile.TemporaryDirectory(prefix="omnitrain-digits-") as tmp:  # the decoder reads the grammar once, here
            (Path(tmp) / "digits.gram").write_text(DIGITS_JSGF)
            return PocketsphinxASR(jsgf=str(Path(tmp) / "digits.gram"))
    return PocketsphinxASR()


def read_16k(path: str | Path) -> np.ndarray:
    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(wav.mean(axis=1), sr)


def resample(wav: np.ndarray, rate: int) -> np.ndarray:
    """[S] at ``rate`` -> [S'] float32 at 16 kHz."""
    if rate == SAMPLE_RATE:
        return wav.astype(np.float32)
    from scipy.signal import resample_poly  # ~0.6 s to import: only for a codec not at 16 kHz

    g = gcd(rate, SAMPLE_RATE)
    return resample_poly(wav, SAMPLE_RATE // g, rate // g).astype(np.float32)


# ----------------------------------------------------------------------------- the codec's ceiling
def codec_ceiling(codec: Any, items: list[dict[str, Any]], asr: Any, out_dir: str | Path, normalizer: str = "whisper") -> dict[str, Any]:
    """What the speech-output scores can reach at best with this codec: reference recordings (``items``: ``audio``
    path, ``text``) and their codec round trip (encode, decode) heard by the same ASR, WER against the text. A model
    that spoke every item's exact codes would score the round trip's WER; the recordings' WER is the ASR's own floor.
    The round trips are written to ``out_dir`` as 16 kHz wavs."""
    import torch

    from omnitrain.eval.metrics import corpus_wer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = int(codec.sample_rate)
    trips = []
    for i, it in enumerate(items):
        wav = read_16k(it["audio"])
        if rate != SAMPLE_RATE:
            from scipy.signal import resample_poly

            g = gcd(rate, SAMPLE_RATE)
            wav = resample_poly(wav, rate // g, SAMPLE_RATE // g).astype(np.float32)
        with torch.no_grad():
            y = codec.decode(codec.encode(torch.from_numpy(wav)[None, None]))[0, 0, : len(wav)].float().cpu().numpy()
        trips.append(str(out_dir / f"{i:05d}.wav"))
        sf.write(trips[-1], resample(y, rate), SAMPLE_RATE)
    refs = [it["text"] for it in items]
    recorded, round_trip = asr.transcribe([str(it["audio"]) for it in items]), asr.transcribe(trips)
    wer = {name: corpus_wer(refs, hyps, normalizer=normalizer) for name, hyps in (("recorded", recorded), ("round_trip", round_trip))}
    return {name: {"value": w["wer"], "stderr": w["stderr"], "n": w["n"]} for name, w in wer.items()} | {
        "samples": [{"text": r, "recorded": a, "round_trip": b, "wav": t} for r, a, b, t in zip(refs, recorded, round_trip, trips, strict=True)]}


# ----------------------------------------------------------------------------- generation
def split_reply(new: list[int], layout: Any, opened: bool) -> tuple[list[int], np.ndarray, bool]:
    """Generated ids -> (text ids before the first audio span, that span's codes [F, K], whether it was closed).

    ``opened``: the prompt ended with ``<boa>`` (the span starts at ``new[0]``). A span cut by the token budget keeps
    its whole frames."""
    sp, K = layout.specials, layout.audio_levels
    specials = set(sp.values())
    start = 0 if opened else next((i + 1 for i, t in enumerate(new) if t == sp["boa"]), None)
    head = new if start is None else new[: max(start - 1, 0)]
    text = [t for t in head if t < layout.text_vocab_size and t not in specials]
    if start is None:
        return text, np.zeros((0, K), dtype=np.int64), False
    body = new[start:]
    closed = sp["eoa"] in body
    body = body[: body.index(sp["eoa"])] if closed else body[: len(body) - len(body) % K]
    ids = np.asarray(body, dtype=np.int64).reshape(-1, K)  # [F, K], frame-major as the layout writes audio
    codes = ids - layout.audio_base - np.arange(K) * layout.audio_codebook_size
    assert ((codes >= 0) & (codes < layout.audio_codebook_size)).all(), "constrained decoding left the audio ranges"
    return text, codes, closed


def generation_model(system: Any) -> Any:
    """The ``Transformer`` to generate with: an ``OmniModel``'s, or the training model unwrapped (in training)."""
    if getattr(system, "lockstep", False):
        raise ValueError("tts / s2s inside training generate with the whole model on each rank: run them with "
                         "strategy=ddp or one process, or evaluate the checkpoints with `omnitrain eval`")  # fmt: skip
    inner = getattr(system, "inner", None)
    return inner if inner is not None else system.model


class _NoSpeech(Exception):
    """Raised from the generation's event callback to end a reply that has not opened an audio span in time."""


def speak(system: Any, prompt: list[int], cfg: SpeechOutputConfig, max_new_tokens: int, stop: list[str], max_frames: int,
          max_text_tokens: int | None = None) -> Spoken:  # fmt: skip
    """Generate one reply (batch 1, KV cache), decode its first audio span (at most ``max_frames``) to a 16 kHz wav,
    time its first chunk. ``max_text_tokens``: a reply that says more than this before opening an audio span is
    ended there, without speech (an untrained model would otherwise talk text for the whole budget)."""
    from omnitrain.model import generate as gen  # looked up per call: tests may wrap gen.generate

    layout, media = system.layout, system.media()
    sp = layout.specials
    heard: dict[str, float] = {}
    said: list[int] = []  # the ids before the audio span (what an aborted reply said)
    t0 = time.perf_counter()

    def on_event(row: int, kind: str, payload: object) -> None:
        if kind == "token" and payload == sp["eoa"] and "eoa" not in heard:
            heard["eoa"] = time.perf_counter() - t0  # a span shorter than a chunk: its end is its first chunk
        if max_text_tokens is not None and "boa" not in heard:
            if kind == "token" and payload == sp["boa"]:
                heard["boa"] = time.perf_counter() - t0
            elif isinstance(payload, int):
                said.append(payload)
                if len(said) > max_text_tokens:
                    raise _NoSpeech

    sampling = gen.SamplingConfig(max_new_tokens=max_new_tokens, greedy=cfg.temperature == 0, temperature=max(cfg.temperature, 1e-6),
                                  top_k=cfg.top_k, stop=[[sp[s]] for s in stop], constrain=True,
                                  audio_chunk_frames=cfg.chunk_frames, seed=cfg.seed)  # fmt: skip
    try:
        res = gen.generate(generation_model(system), layout, [prompt], sampling, on_event)
    except _NoSpeech:
        text = system.decode([t for t in said if t < layout.text_vocab_size and t not in sp.values()]).strip()
        return Spoken(text, np.zeros((0, layout.audio_levels), dtype=np.int64), np.zeros(0, dtype=np.float32), None, len(said),
                      time.perf_counter() - t0, f"no audio span within max_text_tokens={max_text_tokens}")  # fmt: skip
    seconds = time.perf_counter() - t0
    new = res.tokens[0]
    text_ids, codes, closed = split_reply(new, layout, opened=prompt[-1] == sp["boa"])
    closed, codes = closed and len(codes) <= max_frames, codes[:max_frames]
    note = None if closed or not len(codes) else "the audio span reached max_audio_seconds (cut at its last whole frame)"
    latency = None
    if len(codes):
        first = res.time_to_first_audio_chunk if res.time_to_first_audio_chunk is not None else heard.get("eoa", seconds)
        t1 = time.perf_counter()
        media.decode_audio(codes[: cfg.chunk_frames])  # the first chunk, as a streaming player would decode it
        latency = (first + time.perf_counter() - t1) * 1e3
        wav = resample(media.decode_audio(codes)[0].float().cpu().numpy(), media.audio.sample_rate)  # [1, S] -> [S]
    else:
        wav = np.zeros(0, dtype=np.float32)
    return Spoken(system.decode(text_ids).strip(), codes, wav, latency, len(new), seconds, note)


def audio_budget(model: Any, layout: Any, frames: int) -> int:
    """Positions that ``frames`` audio frames and the closing ``<eoa>`` take in the model's audio layout."""
    K = layout.audio_levels
    return {"flat": frames * K + 1, "delay": frames + K, "depth": frames + 1}[model.cfg.audio_layout]


def check_speaker(system: Any, task: str) -> Any:
    """The system's media tokenizers; a clear error for a system that cannot speak."""
    if not hasattr(system, "media") or not hasattr(system, "layout"):
        raise ValueError(f"task {task} needs an omnitrain model that generates audio; {system.info['name']} "
                         f"({system.info['kind']}) cannot: pass model.path=<omnitrain run or model folder>")  # fmt: skip
    media = system.media()
    if media is None or media.audio is None or not system.layout.audio_levels:
        raise ValueError(f"task {task}: {system.info['name']} has no audio codec, so its audio codes cannot become "
                         "speech: pass model.tokenizers.audio=<the codec its shards were built with> (or a model "
                         "whose layout has audio)")  # fmt: skip
    return media


# ----------------------------------------------------------------------------- ranks (inside training)
def _mine(system: Any, n: int) -> list[int]:
    """The item indices this rank generates (all of them in one process)."""
    return list(range(n))[getattr(system, "rank", 0) :: getattr(system, "world", 1)]


def _gather(system: Any, rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Every rank's records in item order, on every rank."""
    world = getattr(system, "world", 1)
    if world == 1:
        return rows
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, rows)
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        for i, row in zip(list(range(n))[r::world], part, strict=True):
            out[i] = row
    return out


# ----------------------------------------------------------------------------- the tasks
class _SpeechOutputTask:
    name = ""

    def __init__(self, cfg: SpeechOutputConfig) -> None:
        cfg.check(self.name)
        self.cfg = cfg
        self.out_dir: Path | None = None  # omnitrain eval sets it: the wavs are kept in <out_dir>/<task>_wavs
        self._asr: Any = None

    def _say_all(self, system: Any, prompts: list[list[int]], ids: list[str], max_new: int, stop: list[str], frames: int,
                 progress: bool, max_text_tokens: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
        """Generate, decode, write and transcribe every prompt; records in item order and the latency context."""
        if self._asr is None:
            self._asr = load_asr(self.cfg, str(system.spec.device))
        model = generation_model(system)
        keep = self.out_dir is not None
        tmp = None if keep else tempfile.TemporaryDirectory(prefix=f"omnitrain-{self.name}-")
        folder = Path(self.out_dir) / f"{self.name}_wavs" if keep else Path(tmp.name)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            rows = []
            mine = _mine(system, len(prompts))
            for i in tqdm(mine, desc=self.name, unit="item", disable=not progress, mininterval=2.0):
                s = speak(system, prompts[i], self.cfg, max_new, stop, frames, max_text_tokens)
                wav = folder / f"{ids[i].replace('/', '_')}.wav"
                sf.write(str(wav), s.wav if len(s.wav) else np.zeros(1, np.float32), SAMPLE_RATE, subtype="PCM_16")
                heard = self._asr.transcribe([str(wav)])[0] if len(s.codes) else ""
                rows.append({"transcript": heard, "monologue": s.text, "latency_ms": s.latency_ms, "frames": len(s.codes),
                             "audio_seconds": len(s.wav) / SAMPLE_RATE, "new_tokens": s.new_tokens, "seconds": s.seconds,
                             "wav": str(wav) if keep else None, "note": s.note})  # fmt: skip
        finally:
            if tmp is not None:
                tmp.cleanup()
        import torch

        context = {"model_parameters": sum(p.numel() for p in model.parameters()), "audio_layout": model.cfg.audio_layout,
                   "device": str(next(model.parameters()).device), "threads": torch.get_num_threads(),
                   "asr": self.cfg.asr if self.cfg.asr != "whisper" else f"whisper:{self.cfg.whisper_model}",
                   "chunk_frames": self.cfg.chunk_frames, "chunk_ms": 1e3 * self.cfg.chunk_frames / system.media().audio.frame_rate,
                   "gpt4o_latency_ms": GPT4O_LATENCY_MS, "wav_dir": str(folder) if keep else None}  # fmt: skip
        return _gather(system, rows, len(prompts)), context


def latency_metrics(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``latency_ms`` (median) and ``latency_ms_p90`` over the items that spoke."""
    got = [r["latency_ms"] for r in rows if r["latency_ms"] is not None]
    if not got:
        return {"latency_ms": {"value": float("nan"), "stderr": None, "n": 0}, "latency_ms_p90": {"value": float("nan"), "stderr": None, "n": 0}}
    return {"latency_ms": {"value": statistics.median(got), "stderr": None, "n": len(got)},
            "latency_ms_p90": {"value": float(np.percentile(got, 90)), "stderr": None, "n": len(got)}}  # fmt: skip


class TTSTask(_SpeechOutputTask):
    name = "tts"

    def __init__(self, cfg: TTSConfig) -> None:
        super().__init__(cfg)
        if not cfg.source.startswith(("sentences", "digits")):
            tts_items(cfg.source)  # a bad manifest fails before the model loads

    def run(self, system: Any, limit: int | None, progress: bool = True) -> Any:
        from omnitrain.eval.metrics import corpus_cer, corpus_wer
        from omnitrain.eval.tasks import TaskOutput

        media = check_speaker(system, self.name)
        items = tts_items(self.cfg.source)[:limit]
        layout, sp = system.layout, system.layout.specials
        # <bos> text <boa>: data_pipelines/template/tts.yaml's prompt part (the text unlearned), then the span it learns
        prompts = [[sp["bos"], *system.text_tok.encode(it["text"]), sp["boa"]] for it in items]
        frames = max(1, round(self.cfg.max_audio_seconds * media.audio.frame_rate))
        max_new = audio_budget(generation_model(system), layout, frames)
        rows, context = self._say_all(system, prompts, [str(it["id"]) for it in items], max_new, ["eoa"], frames, progress)
        refs, hyps = [it["text"] for it in items], [r["transcript"] for r in rows]
        wer, cer = corpus_wer(refs, hyps, normalizer=self.cfg.normalizer), corpus_cer(refs, hyps)
        samples = [{"task": self.name, "id": it["id"], "prompt": it["text"], "output": r["transcript"], "target": it["text"],
                    "score": corpus_wer([it["text"]], [r["transcript"]], normalizer=self.cfg.normalizer)["wer"], **r}
                   for it, r in zip(items, rows, strict=True)]  # fmt: skip
        metrics = {"wer": {"value": wer["wer"], "stderr": wer["stderr"], "n": wer["n"]},
                   "cer": {"value": cer["cer"], "stderr": cer["stderr"], "n": cer["n"]}, **latency_metrics(rows)}  # fmt: skip
        return TaskOutput(metrics, samples, {}, len(items), context)


class S2STask(_SpeechOutputTask):
    name = "s2s"

    def __init__(self, cfg: S2SConfig) -> None:
        super().__init__(cfg)
        if cfg.mode not in ("auto", "audio"):
            raise ValueError(f"s2s.mode={cfg.mode!r}; choose auto (text may come first) or audio (the reply opens with <boa>)")
        if cfg.max_text_tokens < 0:
            raise ValueError(f"s2s.max_text_tokens={cfg.max_text_tokens} must be >= 0")
        s2s_items(cfg.path)  # a bad manifest fails before the model loads

    def run(self, system: Any, limit: int | None, progress: bool = True) -> Any:
        from omnitrain.eval.metrics import corpus_cer, corpus_wer
        from omnitrain.eval.normalizers import get_normalizer
        from omnitrain.eval.tasks import TaskOutput
        from omnitrain.model.generate_command import GenerateConfig, build_prompt

        media = check_speaker(system, self.name)
        items = s2s_items(self.cfg.path)[:limit]
        layout = system.layout
        output = "audio" if self.cfg.mode == "audio" else "text"
        # <bos> <user> question audio <end_of_turn> <assistant> [<boa>]: the chat template's prefix of a training record
        prompts = [build_prompt(GenerateConfig(audios=[it["audio"]], chat=True, output=output), layout, system.text_tok, media)
                   for it in items]  # fmt: skip
        frames = max(1, round(self.cfg.max_audio_seconds * media.audio.frame_rate))
        model = generation_model(system)
        # text, <boa>, audio, the end of the turn (a monologue shorter than max_text_tokens leaves its room to the audio)
        max_new = (self.cfg.max_text_tokens + 1 if output == "text" else 0) + audio_budget(model, layout, frames) + 1
        stop = [layout.chat_template.stop, "eos"]
        rows, context = self._say_all(system, prompts, [str(it["id"]) for it in items], max_new, stop, frames, progress,
                                      self.cfg.max_text_tokens if output == "text" else None)
        norm = get_normalizer(self.cfg.normalizer)
        say = lambda t: " ".join(norm(t).split())  # noqa: E731
        exact = [float(any(say(r["transcript"]) == say(a) for a in it["answers"])) for it, r in zip(items, rows, strict=True)]
        refs, hyps = [it["answers"][0] for it in items], [r["transcript"] for r in rows]
        wer, cer = corpus_wer(refs, hyps, normalizer=self.cfg.normalizer), corpus_cer(refs, hyps)
        samples = [{"task": self.name, "id": it["id"], "prompt": it["audio"], "output": r["transcript"], "target": it["answers"],
                    "score": e, **r} for it, r, e in zip(items, rows, exact, strict=True)]  # fmt: skip
        metrics = {"exact_match": metric(exact), "wer": {"value": wer["wer"], "stderr": wer["stderr"], "n": wer["n"]},
                   "cer": {"value": cer["cer"], "stderr": cer["stderr"], "n": cer["n"]},
                   "spoke": metric([float(r["frames"] > 0) for r in rows]), **latency_metrics(rows)}  # fmt: skip
        return TaskOutput(metrics, samples, {}, len(items), context)
