"""Audio layouts ``model.audio_layout = flat | delay | depth`` at equal training compute on the demo's speech data
(issue 23, item 5).

    python benchmarks/run_all.py audio_layouts          # records the rows in RESULTS.md (~15 min on 2 quiet cores)
    python benchmarks/bench_audio_layouts.py --tiny     # the whole code path at a tiny size (tests/model/test_audio_layouts_bench.py)

Data: the ``asr`` (spoken digit strings -> transcript) and ``tts`` (digit strings and handbook sentences -> flite
speech) shard sets of ``omnitrain demo``, mixed by their weights in ``recipes/data/demo.yaml``. The shards are
reused from ``runs/demo`` or ``runs/demo_shards`` when a finished demo build is there (its ``summary.json``), else
built into ``runs/demo_shards`` by the demo itself with ``train_steps=0`` (~4 min). The shards are the same for every
layout: the loader regroups them (``omnitrain.data.audio_regroup``).

Equal training compute = equal training FLOPs, counted per batch as the code computes them (forward + backward,
6 x matmul weights x positions, plus 12 L D T per position for attention, PaLM's count, as
``Transformer.flops_per_token``; the arithmetic is ``omnitrain.train.cost.flops_per_token``'s):

* every layout: every processed position (``doc_ids >= 0``) runs the main model and its V x D output head;
* ``delay``: + K-1 level heads of C x D on every position (``grouped_loss`` scores all rows against level l's rows);
* ``depth``: + per frame target (``targets[..., 1] >= 0``) the depth transformer over K-1 steps (its blocks, its
  in/out projections, attention over the K-1 steps) and K-1 level heads of C x D.

Each layout is built from the same seed (the main model's initial weights are identical) and gets its own cosine
schedule over its own step count: flat trains ``flat_steps`` steps, and delay / depth the number of steps whose summed
FLOPs first reach flat's total, counted in advance on the very batches they will see (the loader is a pure function of
its seed). The three train in one process with the trainer's own pieces (``build_run``, ``train_step``: the
forward, loss, backward, clip, optimizer and schedule of ``omnitrain train``; no checkpoints or logging, which
``bench_train.py`` holds within 5 %), in turns of a few steps, the order of the layouts rotating every round, so that
drift on a shared machine hits all three alike.

Figures, per layout:

* positions per audio second: the loader's rows (whole documents) counted over every position of an audio span
  (``<boa>``, the codes, ``<eoa>``, delay's K-1 tail positions), over the audio seconds they hold (frames / the
  codec's frame rate); and the code positions alone (exactly K x fps in flat, fps in delay / depth);
* training throughput: audio seconds in the input rows (level-0 codes / fps) per second of training, the median over
  the turns after each layout's first;
* ASR WER: the ``speech_wer`` eval task on the held-out spoken digit strings (as the demo scores it);
* TTS intelligibility WER: the ``tts`` eval task (``omnitrain.eval.speech_output``: generated speech decoded by the
  codec, transcribed by pocketsphinx restricted to the digit words, as the demo scores it) on the held-out digit
  strings; its ``latency_ms`` (first chunk + its decode);
* time to first audio chunk: ``GenerationResult.time_to_first_audio_chunk`` of ``omnitrain.model.generate`` on the TTS
  prompt (``<bos> text <boa>``), one prompt at a time, greedy, prefill included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
LAYOUTS = ("flat", "delay", "depth")
SPEECH = ("asr", "tts")  # the demo's speech shard sets trained here (librivox_asr: 5 long clips, left out)
DEMO_DIRS = (REPO / "runs" / "demo", REPO / "runs" / "demo_shards")  # reused when finished; the second is built if none is


@dataclass(frozen=True)
class Size:
    flat_steps: int  # the compute budget: the FLOPs flat spends in this many steps
    turn: int  # steps per turn of the round robin
    asr_items: int
    tts_items: int
    ttfa_prompts: int
    count_batches: int  # loader batches (whole documents) counted for positions per audio second
    train: tuple[str, ...] = ()  # more overrides of the training recipe
    demo: tuple[str, ...] = ()  # overrides of `omnitrain demo` when the benchmark builds the shards
    tts_seconds: float = 6.0  # tts.max_audio_seconds


SIZES = {
    "full": Size(flat_steps=240, turn=20, asr_items=40, tts_items=20, ttfa_prompts=12, count_batches=40),
    "quick": Size(flat_steps=30, turn=10, asr_items=8, tts_items=4, ttfa_prompts=2, count_batches=10, train=("optim.warmup_steps=5",)),
    # the code path in ~2 min: a reduced demo corpus and codec, rows of 128, 2 steps per turn
    "tiny": Size(flat_steps=4, turn=2, asr_items=2, tts_items=2, ttfa_prompts=1, count_batches=4, tts_seconds=1.0,
                 train=("data.seq_len=128", "data.batch_size=2", "optim.warmup_steps=1"),
                 demo=("data.digits_train=30", "data.digits_test=2", "data.forms_train=10", "data.forms_test=2",
                       "data.speech_digits_train=24", "data.speech_digits_test=3", "data.sentences_train=8",
                       "data.sentences_test=2", "data.text_docs=1", "data.text_test_docs=1", "tokenizer.vocab_size=4000",
                       "image.steps=2", "audio.steps=4", "audio.data.max_eval_seconds=2", "report_languages=[fr]", "workers=1")),
}  # fmt: skip


def _compose(name: str, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """A command's config exactly as ``omnitrain <name> overrides...`` composes it."""
    from omnitrain.cli import COMMANDS, compose, recipes_dir

    return compose(next(c for c in COMMANDS if c.name == name), overrides, recipes_dir())


# ----------------------------------------------------------------------------- the demo's shards and tokenizers
def demo_ready(run: Path) -> bool:
    """A finished ``omnitrain demo`` build in ``run`` (summary.json is written last) with the speech shards."""
    return (run / "summary.json").is_file() and all((run / "shards" / s / "manifest.json").is_file() for s in SPEECH)


def demo_dir(size: Size, given: Path | None) -> Path:
    """The demo build to use: ``given`` (built there if missing), else the first finished one of ``DEMO_DIRS``, else
    ``DEMO_DIRS[-1]`` built now. A folder with a build in progress (no summary.json) is never built over."""
    candidates = [given] if given is not None else list(DEMO_DIRS)
    for run in candidates:
        if demo_ready(run):
            return run
    target = candidates[-1]
    if target.exists():
        raise ValueError(f"{target} holds an unfinished demo build (no summary.json or no shards/asr, shards/tts): wait "
                         f"for the build running there, or remove {target} to let the benchmark build it")  # fmt: skip
    from omnitrain.demo.run import run_demo

    print(f"building the demo's shards into {target} (omnitrain demo train_steps=0)", flush=True)
    cfg, _ = _compose("demo", [f"run_dir={target}", "train_steps=0", *size.demo])
    run_demo(cfg, _compose)
    return target


def _path(p: str, run: Path) -> Path:
    """A corpus.json path: absolute, or relative to the folder the demo ran in (the checkout, for the README's)."""
    path = Path(p)
    for cand in (path, REPO / path, run.parent.parent / path):
        if cand.exists():
            return cand.resolve()
    raise FileNotFoundError(f"{p} (in {run}/data/corpus.json) does not exist: rebuild the demo there, or remove {run}")


# ----------------------------------------------------------------------------- counting
@dataclass
class Counts:
    """What a stream of batches holds: processed positions, audio frames, the positions of audio spans."""

    positions: int = 0  # non-padding input positions
    frames: int = 0  # level-0 audio codes (one per frame) among them
    code_positions: int = 0  # positions holding an audio code in channel 0 (flat: every level; delay / depth: level 0)
    span_positions: int = 0  # + <boa>, <eoa> and delay's tail positions (no channel-0 token, a delayed level)
    depth_frames: int = 0  # positions whose target is a frame (what the depth transformer runs on)
    spans: int = 0  # <boa> positions
    batches: int = 0

    def add(self, batch: dict[str, Any], layout: Any) -> None:
        ids, valid = batch["input_ids"], batch["doc_ids"] >= 0
        c0 = ids if ids.dim() == 2 else ids[..., 0]  # [B, T]: each position's own token
        C, base, sp = layout.audio_codebook_size, layout.audio_base, layout.specials
        code = valid & (c0 >= base)
        self.positions += int(valid.sum())
        self.frames += int((code & (c0 < base + C)).sum())
        self.code_positions += int(code.sum())
        marks = valid & ((c0 == sp["boa"]) | (c0 == sp["eoa"]) | (c0 < 0))  # c0 < 0: a delay tail position
        self.span_positions += int(code.sum() + marks.sum())
        self.spans += int((valid & (c0 == sp["boa"])).sum())
        if ids.dim() == 3:
            self.depth_frames += int((valid & (batch["targets"][..., 1] >= 0)).sum())
        self.batches += 1


def positions_per_second(data: Any, layout: Any, fps: float, n_batches: int) -> dict[str, float]:
    """Through the loader, documents kept whole (no audio span cut at a row's end): positions of audio spans per
    audio second, and code positions per audio second."""
    from omnitrain.data.loader import OmniLoader

    cfg = replace(data, split_documents=False, seq_len=max(data.seq_len, 512))
    loader, c = OmniLoader(cfg), Counts()
    try:
        for _ in range(n_batches):
            c.add(next(loader), layout)
        truncated = loader.packing_stats().get("truncated", 0)
    finally:
        loader.close()
    if truncated:
        raise ValueError(f"{truncated} documents were longer than a row of {cfg.seq_len}: raise data.seq_len for the count")
    seconds = c.frames / fps
    return {"span": c.span_positions / seconds, "code": c.code_positions / seconds, "seconds": seconds, "spans": c.spans}


def flops_rates(model_cfg: Any, layout: Any, seq_len: int) -> tuple[float, float]:
    """(training FLOPs per processed position, extra FLOPs per depth-transformer frame) of ``model_cfg``'s layout: the
    plan's arithmetic (``omnitrain.train.cost.flops_per_token``), its frame share split out so that each batch is
    counted with the frames it holds."""
    from omnitrain.train.cost import AudioShape, flops_per_token

    shape = AudioShape(layout.audio_levels, layout.audio_codebook_size, frame_share=0.0)
    per_position = flops_per_token(model_cfg, seq_len, shape)
    per_frame = flops_per_token(model_cfg, seq_len, replace(shape, frame_share=1.0)) - per_position
    return per_position, per_frame


# ----------------------------------------------------------------------------- training, in turns
class Counted:
    """The run's loader, counting what each batch holds (and the batch's FLOPs) as the trainer reads it."""

    def __init__(self, loader: Any, layout: Any, rates: tuple[float, float]) -> None:
        self.loader, self.layout, self.rates, self.counts, self.flops = loader, layout, rates, Counts(), 0.0

    def __next__(self) -> dict[str, Any]:
        batch = next(self.loader)
        before = (self.counts.positions, self.counts.depth_frames)
        self.counts.add(batch, self.layout)
        self.flops += (self.counts.positions - before[0]) * self.rates[0] + (self.counts.depth_frames - before[1]) * self.rates[1]
        return batch

    def __getattr__(self, name: str) -> Any:  # state_dict, close, ... of the loader
        return getattr(self.loader, name)


def batch_flops(data: Any, layout: Any, rates: tuple[float, float], steps: int, budget: float = float("inf")) -> list[float]:
    """Summed training FLOPs after each of the first ``steps`` batches the loader gives (the batches training will
    read: the loader is a pure function of its seed), stopping at the first that reaches ``budget``."""
    from omnitrain.data.loader import OmniLoader

    loader = OmniLoader(data)
    counter, out = Counted(loader, layout, rates), []
    try:
        while len(out) < steps and (not out or out[-1] < budget):
            next(counter)
            out.append(counter.flops)
    finally:
        loader.close()
    return out


def steps_for(budget: float, data: Any, layout: Any, rates: tuple[float, float], limit: int) -> int:
    """The number of steps whose summed FLOPs come nearest to ``budget``."""
    summed = batch_flops(data, layout, rates, limit, budget)
    if summed[-1] < budget:
        raise ValueError(f"{limit} steps did not reach the budget of {budget:.3g} FLOPs: this is a bug")
    return max(range(1, len(summed) + 1), key=lambda n: -abs(summed[n - 1] - budget))


@dataclass
class Trainee:
    layout: str
    cfg: Any  # TrainConfig, resolved
    run: Any = None  # omnitrain.train.build.Run
    step: int = 0
    turns: list[tuple[float, float]] = field(default_factory=list)  # (seconds, audio seconds) per turn
    loss: float = float("nan")


def build(cfg: Any) -> Any:
    """A Run as ``omnitrain train`` builds it (resolve, strategy, model from cfg.seed, optimizer, loader)."""
    from omnitrain.train.build import build_run, resolve
    from omnitrain.train.strategy import Strategy

    cfg, layout = resolve(cfg)
    strategy = Strategy(cfg.strategy, grad_clip=cfg.optim.grad_clip, grad_accum=cfg.grad_accum)
    strategy.launch()
    return build_run(cfg, layout, strategy)


def train_in_turns(trainees: list[Trainee], turn: int, fps: float, rates: dict[str, tuple[float, float]]) -> None:
    """Every layout's steps, ``turn`` at a time, the order of the layouts rotating each round."""
    from omnitrain.train.step import train_step

    for t in trainees:
        t.run = build(t.cfg)
        t.run.loader = Counted(t.run.loader, t.run.layout, rates[t.layout])
    r = 0
    while any(t.step < t.cfg.steps for t in trainees):
        order = trainees[r % len(trainees) :] + trainees[: r % len(trainees)]
        for t in order:
            n = min(turn, t.cfg.steps - t.step)
            if n <= 0:
                continue
            counts = t.run.loader.counts
            f0, t0 = counts.frames, time.perf_counter()
            for _ in range(n):
                out = train_step(t.run, t.step, 0)
                t.step += 1
            seconds = time.perf_counter() - t0
            t.turns.append((seconds, (counts.frames - f0) / fps))
            t.loss = out.summary(t.run.objective)["loss"]
            print(f"  round {r} {t.layout:5s}: steps {t.step:4d}/{t.cfg.steps}, loss {t.loss:.3f}, "
                  f"{t.turns[-1][1] / seconds:.2f} audio-s/s", flush=True)  # fmt: skip
        r += 1


def export(t: Trainee, shards: Path) -> Path:
    from omnitrain.model.io import save_model

    out = Path(t.cfg.run_dir) / "model"
    save_model(t.run.strategy.unwrap(), out, shards, {"step": t.step, "tokens": t.run.loader.counts.positions})
    t.run.loader.close()
    return Path(t.cfg.run_dir)


# ----------------------------------------------------------------------------- evaluation
def tts_args(corpus: dict[str, Any], run: Path, size: Size) -> list[str]:
    """The demo's TTS intelligibility eval (``omnitrain.demo.report``): the held-out digit strings as words, spoken by
    the model, heard by pocketsphinx restricted to the ten digit words. (Open vocabulary, pocketsphinx heard no word
    right of any layout's speech after 240 steps: WER 1.00 / 1.00 / 0.98.)"""
    return [f"tts.source={_path(corpus['speech']['tts_test'], run)}", "tts.normalizer=basic", "tts.asr=pocketsphinx_digits",
            f"tts.max_audio_seconds={size.tts_seconds}"]  # fmt: skip


def evaluate(run_dir: Path, out: Path, task: str, argv: list[str], limit: int, paths: Any) -> dict[str, Any] | None:
    """One ``omnitrain eval`` task on the trained model (None: the task is not in this checkout yet)."""
    from omnitrain.eval.harness import run_eval
    from omnitrain.eval.tasks import TASKS

    if task not in TASKS:
        return None
    cfg, _ = _compose("eval run", ["model.kind=omnitrain", f"model.path={run_dir}", f"model.tokenizers.text={paths.text}",
                                   f"model.tokenizers.image={paths.image}", f"model.tokenizers.audio={paths.audio}",
                                   f"tasks=[{task}]", *argv, f"limit={limit}", "batch_size=16", f"out_dir={out / task}",
                                   "report=false", "resume=false", "progress=false"])  # fmt: skip
    return run_eval(cfg)["tasks"][task]["metrics"]


def time_to_first_audio(run_dirs: dict[str, Path], texts: list[str], paths: Any) -> dict[str, list[float]]:
    """Seconds from the call to the first audio chunk, per layout and TTS prompt (batch 1, greedy; a span that ends
    before a chunk is left out). The layouts take turns on each prompt, the order rotating, after one untimed
    generation each (the first calls of a fresh process ran 5-20x slower here)."""
    from omnitrain.eval.harness import ModelSpec, OmniModel
    from omnitrain.model import generate as gen

    systems = {n: OmniModel(ModelSpec(kind="omnitrain", path=str(d), tokenizers=paths), 1) for n, d in run_dirs.items()}
    chunk = 5  # frames: 200 ms at the demo codec's 25 Hz (the tts task's chunk_frames)
    out: dict[str, list[float]] = {n: [] for n in systems}
    names = list(systems)
    for k, text in enumerate([texts[0], *texts]):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            s = systems[name]
            sp, K = s.layout.specials, s.layout.audio_levels
            prompt = [sp["bos"], *s.text_tok.encode(text), sp["boa"]]  # data_pipelines/template/tts.yaml's prefix
            cfg = gen.SamplingConfig(max_new_tokens=(chunk + 1) * K + 1, greedy=True, stop=[[sp["eoa"]]], audio_chunk_frames=chunk)
            res = gen.generate(s.model, s.layout, [prompt], cfg)
            if k and res.time_to_first_audio_chunk is not None:
                out[name].append(res.time_to_first_audio_chunk)
    return out


# ----------------------------------------------------------------------------- the benchmark
def run(quick: bool = False, tiny: bool = False, demo: Path | None = None, work: Path | None = None) -> list[dict]:
    import torch
    from _table import print_rows

    from omnitrain.demo.report import ASR_MAX_TOKENS
    from omnitrain.tokenizer import bundle
    from omnitrain.tokenizer.bundle import TokenizerPaths
    from omnitrain.train.build import resolve

    size = SIZES["tiny" if tiny else "quick" if quick else "full"]
    run_dir = demo_dir(size, demo)
    work = work or REPO / "benchmarks" / "runs" / "audio_layouts"
    shards = run_dir / "shards"
    corpus = json.loads((run_dir / "data" / "corpus.json").read_text())
    paths = TokenizerPaths(text=str(run_dir / "tokenizer" / "text"), image=str(run_dir / "tokenizer" / "image" / "image_tokenizer.pt"),
                           audio=str(run_dir / "tokenizer" / "audio" / "audio_codec.pt"))  # fmt: skip
    codec = bundle.load(paths).audio
    fps = float(codec.frame_rate)

    cfgs, rates, layout = {}, {}, None
    for name in LAYOUTS:
        cfg, _ = _compose("train", [f"run_dir={work / name}", "resume=never", "wandb.mode=disabled", f"model.audio_layout={name}",
                                    *size.train])  # fmt: skip
        cfg.data.sources = {s: replace(cfg.data.sources[s], path=str(shards / s)) for s in SPEECH}
        cfgs[name], layout = resolve(cfg)
        rates[name] = flops_rates(cfgs[name].model, layout, cfgs[name].data.seq_len)
    K, T = layout.audio_levels, cfgs["flat"].data.seq_len

    # the budget: flat's FLOPs over its steps; delay / depth: the steps that first reach it, on their own batches
    budget = batch_flops(cfgs["flat"].data, layout, rates["flat"], size.flat_steps)[-1]
    steps = {"flat": size.flat_steps, **{n: steps_for(budget, cfgs[n].data, layout, rates[n], 10 * size.flat_steps) for n in LAYOUTS[1:]}}
    for name in LAYOUTS:
        cfgs[name] = replace(cfgs[name], steps=steps[name])
    pps = {n: positions_per_second(cfgs[n].data, layout, fps, size.count_batches) for n in LAYOUTS}

    threads = torch.get_num_threads()
    note = (f"demo speech shards {', '.join(SPEECH)} ({run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir}, "
            f"layout {layout.hash}); codec K={K} at {fps:g} frames/s; recipes/model/tiny; rows {cfgs['flat'].data.batch_size} x {T} "
            f"positions; equal training FLOPs {budget:.3g} (flat {steps['flat']}, delay {steps['delay']}, depth {steps['depth']} steps); "
            f"turns of {size.turn} steps, order rotating; torch threads {threads}")  # fmt: skip
    print(f"config: {note}", flush=True)
    trainees = [Trainee(n, cfgs[n]) for n in LAYOUTS]
    train_in_turns(trainees, size.turn, fps, rates)

    tts_test = _path(corpus["speech"]["tts_test"], run_dir)
    tts_texts = [json.loads(line)["text"] for line in tts_test.read_text().splitlines() if line.strip()]
    results: dict[str, dict[str, Any]] = {}
    for t in trainees:
        done = export(t, shards / SPEECH[0])
        res = {"steps": t.step, "flops": t.run.loader.flops, "loss": t.loss,
               "audio_s_per_s": statistics.median(a / s for s, a in (t.turns[1:] or t.turns)),
               "audio_seconds": t.run.loader.counts.frames / fps, "turns": len(t.turns)}  # fmt: skip
        res["asr"] = evaluate(done, done / "eval", "speech_wer", [f"speech_wer.source={_path(corpus['speech']['digits_test'], run_dir)}",
                              "speech_wer.normalizer=basic", "speech_wer.prompt=Transcript:", f"speech_wer.max_new_tokens={ASR_MAX_TOKENS}"],
                              size.asr_items, paths)  # fmt: skip
        res["tts"] = evaluate(done, done / "eval", "tts", tts_args(corpus, run_dir, size), size.tts_items, paths)
        results[t.layout] = res
        print(f"  {t.layout}: {json.dumps({k: v for k, v in res.items() if k not in ('asr', 'tts')}, default=str)}", flush=True)
    ttfa = time_to_first_audio({n: work / n for n in LAYOUTS}, tts_texts[: size.ttfa_prompts], paths)
    for name in LAYOUTS:
        results[name]["ttfa"] = ttfa[name]

    rows = table(results, pps, K, fps, note)
    print_rows(rows, baseline_label="flat", notes=True)
    return rows


def _m(metrics: dict[str, Any] | None, key: str) -> tuple[float, str]:
    if metrics is None:
        return float("nan"), "task not in this checkout yet"
    m = metrics[key]
    return float(m["value"]), f"n {m['n']}" + (f", stderr {m['stderr']:.3f}" if m.get("stderr") is not None else "")


def table(results: dict[str, dict[str, Any]], pps: dict[str, dict[str, float]], K: int, fps: float, note: str) -> list[dict]:
    """The rows (run_all.py's convention), flat's figure as every row's baseline, then one row per figure naming its winner."""
    figures: dict[str, tuple[str, bool]] = {}  # metric -> (unit, higher is better)
    rows = []
    for name in LAYOUTS:
        r, p = results[name], pps[name]
        ttfa = r["ttfa"]
        asr, asr_note = _m(r["asr"], "wer")
        tts, tts_note = _m(r["tts"], "wer")
        lat, lat_note = _m(r["tts"], "latency_ms")
        for metric, value, unit, better_high, extra in (
            ("positions per audio second", p["span"], "positions/s", False,
             f"whole spans (<boa>, codes, <eoa>, delay tail) over {p['seconds']:.0f} audio-s; code positions {p['code']:.2f}/s"),
            ("code positions per audio second", p["code"], "positions/s", False, f"K x fps = {K * fps:g}, fps = {fps:g}"),
            ("audio trained", r["audio_seconds"], "audio-s", True, "audio seconds in the input rows of all its steps"),
            ("training throughput", r["audio_s_per_s"], "audio-s/s", True,
             f"median over {max(r['turns'] - 1, 1)} turns after the first; {r['steps']} steps, "
             f"{r['audio_seconds']:.0f} audio-s trained, {r['flops']:.3g} FLOPs, last loss {r['loss']:.3f}"),
            ("ASR WER", asr, "WER", False, f"speech_wer, held-out spoken digit strings; {asr_note}"),
            ("TTS intelligibility WER", tts, "WER", False, f"tts task, held-out digit strings, pocketsphinx (digit words); {tts_note}"),
            ("time to first audio chunk", 1e3 * statistics.median(ttfa) if ttfa else float("nan"), "ms", False,
             f"generate(), 5 frames, batch 1, greedy, layouts in turns; median of {len(ttfa)} prompts"),
            ("voice latency (tts task)", lat, "ms", False, f"first chunk + its codec decode; GPT-4o 320 ms; {lat_note}"),
        ):  # fmt: skip
            figures[metric] = (unit, better_high)
            base = None if name == "flat" else next(x["value"] for x in rows if x["metric"] == f"flat: {metric}")
            rows.append({"metric": f"{name}: {metric}", "value": float(value), "unit": unit, "baseline": base,
                         "note": (note + "; " if not rows else "") + extra})  # fmt: skip
    for metric, (unit, high) in figures.items():
        vals = {n: next(x["value"] for x in rows if x["metric"] == f"{n}: {metric}") for n in LAYOUTS}
        vals = {n: v for n, v in vals.items() if v == v}  # NaN: not measured
        if len(vals) < 2 or metric in ("code positions per audio second", "audio trained"):
            continue
        ranked = sorted(vals, key=lambda n: -vals[n] if high else vals[n])
        best, second = ranked[0], ranked[1]
        ratio = vals[best] / vals[second] if vals[second] else float("inf")
        tied = [n for n in ranked if vals[n] == vals[best]]
        who = " = ".join(tied) + " (tied)" if len(tied) > 1 else f"{best}, {ratio:.2f}x {second}'s"
        rows.append({"metric": f"winner: {metric}", "value": vals[best], "unit": unit, "baseline": vals[second],
                     "note": f"{who} ({'higher' if high else 'lower'} is better; baseline: the runner-up)"})  # fmt: skip
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, a smoke run")
    ap.add_argument("--tiny", action="store_true", help="the code path at a tiny size (builds a reduced demo unless --demo is given)")
    ap.add_argument("--demo", type=Path, help="a finished `omnitrain demo` folder to take the shards from (built there if missing)")
    ap.add_argument("--work", type=Path, help="where the three runs go (default benchmarks/runs/audio_layouts)")
    args = ap.parse_args()
    run(args.quick, args.tiny, args.demo, args.work)
