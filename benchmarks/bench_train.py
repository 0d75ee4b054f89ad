"""``omnitrain train`` against a bare PyTorch loop doing the same work, side by side in one run (CPU, fp32).

Both train the same model (``recipes/model/tiny.yaml``, the same seed) on the same loader batches
(seq 512 x 4 rows) with the same optimizer (``build_optimizer``: AdamW), the same learning-rate
schedule, gradient clipping and the same number of torch threads. And the same objective computed
the same way: the model's forward with targets (the chunked output projection fused with the cross
entropy and the recipe's z-loss, ``omnitrain.model.loss.linear_cross_entropy``), as ``train()`` calls it.
(A bare loop that builds the full [B, T, V] logits and calls ``F.cross_entropy`` measures the loss
implementation, not the trainer: that made ``train()`` look 1.04-1.08x faster.) The bare loop is
forward, backward, clip, step; ours is the full ``train()``: Fabric, per-modality metrics,
metrics.jsonl, the progress bar, the preemption check. Throughput of both is measured over the steps
after a warm-up, from wall-clock time (ours: the ``elapsed`` column of metrics.jsonl, so logging is
included). The two alternate ABBA over the repeats; medians. Target: ours >= 0.95x the bare loop.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from _table import print_rows  # benchmarks/ is on sys.path when these run

# tests.synthetic (the learnable shard sets the tests train on) lives in the checkout, not the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WARMUP = 3


def _config(sources: dict[str, Path], run_dir: Path, steps: int, threads: int):
    import yaml

    from omnitrain.config import from_dict
    from omnitrain.train.loop import TrainConfig

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    model = yaml.safe_load((recipes / "model" / "tiny.yaml").read_text())
    return from_dict(TrainConfig, {
        "run_dir": str(run_dir), "model": model, "steps": steps, "threads": threads, "ckpt_every": 10**6, "export": False,
        "wandb": {"mode": "disabled"}, "optim": {"lr": 1e-3, "warmup_steps": 2},
        "data": {"sources": {k: {"path": str(v)} for k, v in sources.items()}, "seq_len": 512, "batch_size": 4},
    })  # fmt: skip


def _ours(cfg) -> float:
    from omnitrain.train.loop import train
    from omnitrain.train.runlog import read_metrics

    train(cfg)
    rows = read_metrics(cfg.run_dir)
    a, b = rows[WARMUP - 1], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed"] - a["elapsed"])


def _bare(cfg) -> float:
    import torch

    from omnitrain.data.loader import OmniLoader
    from omnitrain.model.transformer import Transformer
    from omnitrain.tokenizer.layout import TokenLayout
    from omnitrain.train.optim import build_optimizer, lr_at

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
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.optim)
        batch = next(loader)
        w = batch["loss_weights"]
        # the objective as train() computes it: weighted CE + z-loss, fused with the output projection
        loss, _ = model(batch["input_ids"], batch["doc_ids"], batch["targets"], w, w.sum().clamp(min=1.0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int((w > 0).sum())
    loader.close()
    return tokens / (time.perf_counter() - t0)


def run(quick: bool = False) -> list[dict]:
    import torch

    from tests.synthetic import make_omni_sources

    steps, repeats, threads = (8, 2, 2) if quick else (20, 4, 2)
    note = (f"recipes/model/tiny, seq 512 x 4, same objective (forward with targets: fused chunked CE + z-loss), "
            f"AdamW + lr schedule + clip, fp32, torch threads {threads}, {steps - WARMUP} timed steps, ABBA x {repeats}, medians")
    print(f"config: {note}", flush=True)
    ours, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        sources = make_omni_sources(Path(tmp) / "shards", per_shard=64)
        for r in range(repeats):  # ABBA: the order alternates, so that drift on a shared machine hits both alike
            for side in ("bare", "ours") if r % 2 == 0 else ("ours", "bare"):
                cfg = _config(sources, Path(tmp) / f"{side}{r}", steps, threads)
                (bare if side == "bare" else ours).append(_bare(cfg) if side == "bare" else _ours(cfg))
                print(f"  repeat {r} {side}: {(bare if side == 'bare' else ours)[-1]:.0f} tokens/s", flush=True)
    o, b = statistics.median(ours), statistics.median(bare)
    rows = [
        {"metric": "bare PyTorch loop tokens/s", "value": b, "unit": "tokens/s", "baseline": None, "note": note},
        {"metric": "omnitrain train tokens/s", "value": o, "unit": "tokens/s", "baseline": b, "note": "single strategy, metrics.jsonl + progress bar included"},
        {"metric": "omnitrain train / bare loop", "value": o / b, "unit": "x", "baseline": 0.95, "note": f"target >= 0.95; torch {torch.__version__}"},
    ]  # fmt: skip
    print_rows(rows)
    return rows


if __name__ == "__main__":
    run()
