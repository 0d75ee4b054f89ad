"""``omnitrain train`` against a bare PyTorch loop, side by side in one run (CPU, fp32, medians of repeats).

Both train the same model (``recipes/model/tiny.yaml``, the same seed) on the same loader batches
(seq 512 x 4 rows) with AdamW, gradient clipping and the same number of torch threads. The bare loop
is what a researcher writes by hand: forward, weighted cross-entropy (+ the recipe's z-loss), backward, clip, step. Ours is the
full ``train()``: Fabric, per-modality metrics, metrics.jsonl, the progress bar, the preemption check.
Throughput of both is measured over the steps after a warm-up, from wall-clock time (ours: the
``elapsed`` column of metrics.jsonl, so logging is included). Target: ours >= 0.95x the bare loop.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _table import print_rows  # benchmarks/ is on sys.path when these run

WARMUP = 3


def _config(sources: dict[str, Path], run_dir: Path, steps: int, threads: int):
    import yaml

    from omnitrain.config import from_dict
    from omnitrain.train import TrainConfig

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    model = yaml.safe_load((recipes / "model" / "tiny.yaml").read_text())
    return from_dict(TrainConfig, {
        "run_dir": str(run_dir), "model": model, "steps": steps, "threads": threads, "ckpt_every": 10**6, "export": False,
        "wandb": {"mode": "disabled"}, "optim": {"lr": 1e-3, "warmup_steps": 2},
        "data": {"sources": {k: {"path": str(v)} for k, v in sources.items()}, "seq_len": 512, "batch_size": 4},
    })  # fmt: skip


def _ours(cfg) -> float:
    from omnitrain.runlog import read_metrics
    from omnitrain.train import train

    train(cfg)
    rows = read_metrics(cfg.run_dir)
    a, b = rows[WARMUP - 1], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed"] - a["elapsed"])


def _bare(cfg) -> float:
    import torch
    import torch.nn.functional as F

    from omnitrain.data import OmniLoader
    from omnitrain.model import Transformer
    from omnitrain.optim import build_optimizer
    from omnitrain.tokenizer.layout import TokenLayout

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.model.vocab_size = TokenLayout.load(next(iter(cfg.data.sources.values())).path).vocab_size
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    loader = OmniLoader(cfg.data)
    tokens, t0 = 0, 0.0
    for step in range(cfg.steps):
        if step == WARMUP:
            tokens, t0 = 0, time.perf_counter()
        batch = next(loader)
        logits = model(batch["input_ids"], batch["doc_ids"])  # [B, T, V]
        w = batch["loss_weights"]
        ce = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
        loss = (ce * w.flatten()).sum() / w.sum()
        if cfg.model.z_loss:  # the same objective as ours (the tiny recipe has z-loss on, as Chameleon)
            z = torch.logsumexp(logits, dim=-1)  # [B, T]
            loss = loss + cfg.model.z_loss * ((z**2) * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int((w > 0).sum())
    loader.close()
    return tokens / (time.perf_counter() - t0)


def run(quick: bool = False) -> list[dict]:
    import torch

    from omnitrain.synthetic import make_omni_sources

    steps, repeats, threads = (8, 1, 2) if quick else (20, 3, 2)
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        sources = make_omni_sources(Path(tmp) / "shards", per_shard=64)
        for r in range(repeats):  # alternate, so that a busy machine slows both alike
            bare.append(_bare(_config(sources, Path(tmp) / f"bare{r}", steps, threads)))
            ours.append(_ours(_config(sources, Path(tmp) / f"ours{r}", steps, threads)))
    o, b = statistics.median(ours), statistics.median(bare)
    note = f"recipes/model/tiny, seq 512 x 4, AdamW + clip, fp32, {threads} threads, {steps - WARMUP} timed steps, median of {repeats}"
    rows = [
        {"metric": "bare PyTorch loop tokens/s", "value": b, "unit": "tokens/s", "baseline": None, "note": note},
        {"metric": "omnitrain train tokens/s", "value": o, "unit": "tokens/s", "baseline": b, "note": "single strategy, metrics.jsonl + progress bar included"},
        {"metric": "omnitrain train / bare loop", "value": o / b, "unit": "x", "baseline": 0.95, "note": f"target >= 0.95; torch {torch.__version__}"},
    ]  # fmt: skip
    print_rows(rows)
    return rows


if __name__ == "__main__":
    run()
