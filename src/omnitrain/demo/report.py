"""The demo's evaluation (before and after training, on held-out data) and ``report.md``.

The evaluation is ``omnitrain eval`` itself: its config composed from ``recipes/eval.yaml`` with the
demo's overrides (:func:`eval_overrides`), four harness tasks on splits no training sample comes from:

* ``reading``: the digits of a held-out rendered number (exact match, and characters right in place);
* ``docvqa``: a question about a held-out rendered form (ANLS, and exact match);
* ``speech_wer``: held-out flite utterances of spoken digit strings (connected digits, as TIDIGITS;
  corpus WER, ``basic`` normaliser so that each spoken digit stays a word). The handbook sentences
  train TTS and the codec, not ASR: open-vocabulary ASR is out of this budget's reach (measured, see
  ``recipes/data/demo.yaml``);
* ``perplexity``: held-out handbook pages (teacher-forced, per text token; and bits per byte);
* ``s2s``: held-out spoken questions ("what comes after four", at speaking rates never heard in training):
  the spoken part of the model's reply, decoded by the codec and heard by pocketsphinx (the ten digit words), must be the answer;
* ``tts``: held-out digit strings as words ("four zero seven"): the model speaks them, pocketsphinx (the ten
  digit words) transcribes, WER against the text (``basic`` normaliser, as ``speech_wer``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnitrain.eval.harness import run_eval
from omnitrain.eval.report import CompareConfig, compare, write_report
from omnitrain.eval.results import metric, read_samples, write_results
from omnitrain.tokenizer.bundle import TokenizerPaths
from omnitrain.train.runlog import read_metrics

ASR_MAX_TOKENS, ANSWER_MAX_TOKENS = 40, 8  # the longest reference is ~15 text tokens / 4
TEXT_CHUNK_CHARS = 1200  # held-out text is scored in windows of about this many characters (~300 tokens)
MODALITY_ORDER = ("text", "image", "audio")
S2S_METRIC = "exact_match"  # omnitrain eval's s2s: the heard answer equals the expected one (normalised)


def eval_overrides(model_path: Path, out_dir: Path, corpus: dict[str, Any], paths: TokenizerPaths, image_sizes: dict[str, int],
                   batch_size: int) -> list[str]:  # fmt: skip
    """The ``omnitrain eval`` command line of the demo's tasks: reading, document QA, speech WER, text
    perplexity, speech to speech and TTS intelligibility, each image task at the size its training shards
    were built at."""
    return ["model.kind=omnitrain", f"model.path={model_path}", f"model.tokenizers.text={paths.text}",
            f"model.tokenizers.image={paths.image}", f"model.tokenizers.audio={paths.audio}",
            "tasks=[reading,docvqa,speech_wer,perplexity,s2s,tts]",
            f"reading.path={corpus['digits']['test']}", f"reading.image_size={image_sizes['reading']}",
            f"reading.max_new_tokens={ANSWER_MAX_TOKENS}",
            f"docvqa.path={corpus['forms']['test']}", f"docvqa.image_size={image_sizes['doc_qa']}",
            f"docvqa.max_new_tokens={ANSWER_MAX_TOKENS}",
            f"speech_wer.source={corpus['speech']['digits_test']}", "speech_wer.normalizer=basic", "speech_wer.prompt=Transcript:",
            f"speech_wer.max_new_tokens={ASR_MAX_TOKENS}",
            f"perplexity.paths=[{','.join(str(p) for p in corpus['text']['test'])}]", f"perplexity.chunk_chars={TEXT_CHUNK_CHARS}",
            # answers and TTS texts are digit words: heard as connected digits (pocketsphinx restricted to the ten digit
            # words, as TIDIGITS is scored; open vocabulary it writes "for" and "to", evals/tts.yaml)
            f"s2s.path={corpus['s2s']['test']}", "s2s.normalizer=basic", "s2s.asr=pocketsphinx_digits",
            f"tts.source={corpus['speech']['tts_test']}", "tts.normalizer=basic", "tts.asr=pocketsphinx_digits",
            # one torch thread: s2s / tts generate one item at a time (their latency is per item); on a busy 2-core machine
            # 2 threads took 35-53 s per s2s item, 1 thread 2.7 s (the untrained demo model, load average 7)
            "threads=1", f"batch_size={batch_size}", f"out_dir={out_dir}", "report=false", "resume=false"]  # fmt: skip


def evaluate(model_path: Path, out_dir: Path, corpus: dict[str, Any], paths: TokenizerPaths, image_sizes: dict[str, int],
             compose: Callable[[str, list[str]], tuple[Any, dict[str, Any]]], batch_size: int = 16) -> dict[str, Any]:  # fmt: skip
    """Every demo task on the held-out splits through ``omnitrain eval`` itself (composed from
    ``recipes/eval.yaml`` as the command line does), into ``results.json`` + ``samples.jsonl`` in
    ``out_dir``; adds the document-QA exact match and the s2s replies' text accuracy of the same samples; returns the
    ``tasks`` part of the results."""
    argv = eval_overrides(model_path, out_dir, corpus, paths, image_sizes, batch_size)
    eval_cfg, _ = compose("eval run", argv)
    threads = torch.get_num_threads()
    try:
        results = run_eval(eval_cfg)
    finally:
        torch.set_num_threads(threads)  # the eval sets its own (eval_overrides): training gets the demo's back
    samples = read_samples(Path(out_dir) / "samples.jsonl")

    results["tasks"]["docvqa"]["metrics"]["exact_match"] = metric([float(s["output"].strip().lower() in [a.lower() for a in s["target"]])
                                              for s in samples if s["task"] == "docvqa"])  # fmt: skip
    # the reply's text before its speech (inner monologue): is the answer right in words, whatever the codec makes of the audio
    results["tasks"]["s2s"]["metrics"]["monologue_exact_match"] = metric([float(" ".join(s["monologue"].lower().split()) in s["target"])
                                                                 for s in samples if s["task"] == "s2s"])  # fmt: skip
    write_results(out_dir, results)
    write_report(results, Path(out_dir), None)
    print(f"eval {results['model']['name']} (step {results['model']['checkpoint_step']}): " + ", ".join(
        f"{t} {next(iter(r['metrics']))} {next(iter(r['metrics'].values()))['value']:.3f}" for t, r in results["tasks"].items()))  # fmt: skip
    return results["tasks"]


def codec_ceiling(corpus: dict[str, Any], paths: TokenizerPaths, out_dir: Path, n: int) -> dict[str, Any]:
    """The best the speech-output rows can score with the demo's codec: the held-out recordings of the first ``n``
    digit strings (the texts the ``tts`` row speaks, in the four flite voices) and their codec round trip, heard by
    the same ASR as the ``tts`` and ``s2s`` rows (pocketsphinx on the digit words, ``basic`` normaliser)."""
    from omnitrain.demo.corpus import read_jsonl
    from omnitrain.eval.speech_output import TTSConfig, load_asr
    from omnitrain.eval.speech_output import codec_ceiling as measure
    from omnitrain.tokenizer.audio import load_audio_codec

    asr = load_asr(TTSConfig(source=str(corpus["speech"]["tts_test"]), asr="pocketsphinx_digits"))
    items = read_jsonl(corpus["speech"]["digits_test"])[:n]
    return measure(load_audio_codec(paths.audio), items, asr, out_dir, normalizer="basic")


# ----------------------------------------------------------------------------- training curves
def loss_drop(rows: list[dict[str, Any]], window: int = 10) -> dict[str, dict[str, float]]:
    """Per modality: mean loss over the first and the last ``window`` logged steps that saw it."""
    out = {}
    for mod in MODALITY_ORDER:
        vals = [r[f"loss/{mod}"] for r in rows if f"loss/{mod}" in r]
        if vals:
            k = max(1, min(window, len(vals) // 3))
            out[mod] = {"first": float(np.mean(vals[:k])), "last": float(np.mean(vals[-k:])), "steps": len(vals)}
    return out


def plot_losses(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib  # ~0.3 s with pyplot; the Agg backend is chosen here, not on import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mod in MODALITY_ORDER:
        pts = [(r["step"], r[f"loss/{mod}"]) for r in rows if f"loss/{mod}" in r]
        if pts:
            steps, vals = zip(*pts, strict=True)
            k = max(1, len(vals) // 30)  # a running mean: the per-step loss swings with the mixture of the batch
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            ax.plot(steps, vals, alpha=0.25)
            ax.plot(steps[k - 1 :], smooth, label=f"{mod}", color=ax.lines[-1].get_color())
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="training loss per modality (learned tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


EVAL_CURVES = [("eval/perplexity/perplexity", "held-out text perplexity", True), ("eval/reading/char_accuracy", "reading: digits right in place", False),
               ("eval/reading/exact_match", "reading: numbers read exactly", False)]  # (metrics.jsonl key, title, log scale)


def plot_eval_curves(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """The in-training eval (``eval_in_training``) over the steps, one panel per benchmark; None when there is none."""
    curves = [(k, title, log) for k, title, log in EVAL_CURVES if any(k in r for r in rows)]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False)
    for ax, (key, title, log) in zip(axes[0], curves, strict=True):
        steps, vals = zip(*[(r["step"], r[key]) for r in rows if key in r], strict=True)
        ax.plot(steps, vals, marker="o")
        ax.set(xlabel="step", title=title, yscale="log" if log else "linear")
        ax.grid(alpha=0.3)
    fig.suptitle("benchmarks during training (the training model, held-out data)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- report.md
TABLE = [  # (task, metric, label, higher is better)
    ("reading", "exact_match", "reading: held-out numbers read exactly", True),
    ("reading", "char_accuracy", "reading: digits right in place", True),
    ("docvqa", "anls", "document QA: ANLS on held-out forms", True),
    ("docvqa", "exact_match", "document QA: exact match", True),
    ("speech_wer", "wer", "ASR: WER on held-out spoken digit strings (flite, 4 voices)", False),
    ("speech_wer", "cer", "ASR: character error rate, same utterances", False),
    ("perplexity", "perplexity", "text: perplexity on held-out handbook pages", False),
    ("s2s", S2S_METRIC, "speech to speech: held-out spoken questions answered right in speech (pocketsphinx, digit words)", True),
    ("s2s", "monologue_exact_match", "speech to speech: the reply's text (inner monologue) is the answer", True),
    ("tts", "wer", "TTS intelligibility: pocketsphinx WER (digit words) on held-out digit strings the model speaks", False),
]


def comparison(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for task, name, label, higher in TABLE:
        b, a = before[task]["metrics"][name], after[task]["metrics"][name]
        better = a["value"] > b["value"] if higher else a["value"] < b["value"]
        rows.append({"task": task, "metric": name, "label": label, "before": b["value"], "after": a["value"], "n": a["n"],
                     "higher_is_better": higher, "better": better})  # fmt: skip
    return rows


def _rel(path: str | Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def write_demo_report(run: Path, summary: dict[str, Any]) -> Path:
    """``run/report.md`` with the loss curves, the before/after table, the samples and the timings."""
    run = Path(run)
    all_rows = read_metrics(run / "train")
    rows = [r for r in all_rows if "loss" in r]  # (step 0 of the in-training eval has no training loss)
    plot_losses(rows, run / "loss_curves.png")
    curves = plot_eval_curves(all_rows, run / "eval_curves.png")
    table = comparison(summary["eval"]["init"], summary["eval"]["trained"])
    summary["comparison"] = table
    t = summary["train"]
    lines = [
        "# omnitrain demo report", "",
        f"Wall time **{summary['seconds'] / 60:.1f} min** on {summary['cpus']} CPU(s) (load average at start "
        f"{summary['load_average_start'][0]:.1f}, at end {summary['load_average_end'][0]:.1f}). Layout `{summary['layout']['hash']}`, "
        f"vocabulary {summary['layout']['vocab_size']}; model {t['params'] / 1e6:.1f}M parameters, {t['step']} steps, "
        f"{t['tokens']:,} tokens at {t['tokens_per_s']:.0f} tokens/s.", "",
        "## Before / after training (held-out data, greedy decoding)", "",
        "| task | untrained | trained | n | better |", "|---|---:|---:|---:|:---:|",
    ]  # fmt: skip
    for r in table:
        lines.append(f"| {r['label']} ({'higher' if r['higher_is_better'] else 'lower'} is better) | {r['before']:.3f} | "
                     f"{r['after']:.3f} | {r['n']} | {'yes' if r['better'] else '**no**'} |")  # fmt: skip
    ceiling = summary.get("codec_ceiling")
    if ceiling:
        rec, trip = ceiling["recorded"], ceiling["round_trip"]
        lines += ["", f"The speech-output rows (speech to speech, TTS) are heard through the demo's codec: pocketsphinx hears its "
                  f"round trip (encode, decode) of {trip['n']} held-out digit-string recordings at WER **{trip['value']:.3f}** "
                  f"(the recordings themselves: {rec['value']:.3f}). A model that spoke the exact codes of a recording would "
                  f"score the former: it bounds these rows (wavs: `eval/codec_ceiling/`)."]  # fmt: skip
    compare(CompareConfig(results=[str(run / "eval" / "init"), str(run / "eval" / "trained")], out_dir=run / "eval" / "compare"))
    lines += ["", "Results: `eval/init/results.json`, `eval/trained/results.json` (per-item outputs in `samples.jsonl`; "
              "`omnitrain eval compare` of the two: `eval/compare/`).", "",
              "## Training loss per modality", "", "![loss curves](loss_curves.png)", "",
              "| modality | first steps | last steps |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {m} | {d['first']:.3f} | {d['last']:.3f} |" for m, d in t["loss_by_modality"].items()]
    if curves is not None:
        lines += ["", "## Benchmarks during training", "", "The training model itself, every `eval_every` steps (`eval_in_training`; "
                  "step 0 is the untrained model; each step's results in `train/eval/step_N/`).", "", "![eval curves](eval_curves.png)"]  # fmt: skip
    lines += ["", "## Generated by the trained model", ""]
    for name, g in summary.get("generate", {}).items():
        parts = []
        for p in g["parts"]:
            if "->" in p and p.endswith(".png]"):
                path = p.rsplit("-> ", 1)[1][:-1]
                parts.append(f"![{name}]({_rel(path, run)})")
            elif "->" in p and p.endswith(".wav]"):
                path = p.rsplit("-> ", 1)[1][:-1]
                parts.append(f"[{p.split(' ->')[0][1:]}]({_rel(path, run)})")
            elif not p.startswith("<"):
                parts.append(f"`{p[:160]}`" + (" ..." if len(p) > 160 else ""))
        prompt = f"[{g.get('what', 'audio')}]({_rel(g['prompt'], run)})" if str(g["prompt"]).endswith(".wav") else f"`{_rel(g['prompt'], run)}`"
        lines.append(f"- **{name}** (prompt {prompt}): " + " ".join(parts))
    lines += ["", "## Data", "", "| shard set | template | samples | text | image | audio tokens |", "|---|---|---:|---:|---:|---:|"]
    for name, s in summary["shards"].items():
        tok = s["tokens"]
        lines.append(f"| {name} | {s['template']} | {s['samples']:,} | {tok['text']:,} | {tok['image']:,} | {tok['audio']:,} |")
    lines += ["", "## Stage timings", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["stage_seconds"].items()]
    lines += [f"| **total** | **{summary['seconds']:.1f}** |", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path
