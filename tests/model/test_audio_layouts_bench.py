"""The audio-layout benchmark (benchmarks/bench_audio_layouts.py, issue 23 item 5): what it counts (positions per
audio second, training FLOPs) is what the layouts and the code compute, and its whole path runs at a tiny size."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

from omnitrain.data.loader import LoaderConfig, SourceSpec
from omnitrain.model.transformer import ModelConfig, Transformer
from tests.model.test_audio_layouts import make_speech_shards, speech_layout

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = ("flat", "delay", "depth")
FPS = 25.0


sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks import each other as scripts do (_table.py)
bench = importlib.import_module("bench_audio_layouts")


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    layout = speech_layout(K=3)
    return layout, make_speech_shards(tmp_path_factory.mktemp("speech") / "speech", layout)


@pytest.mark.parametrize("audio_layout", LAYOUTS)
def test_positions_per_audio_second_count_every_span_position(speech, audio_layout):
    """Code positions: K x fps in flat, fps in delay / depth, exactly; whole spans add <boa> and <eoa> (delay: its
    K-1 tail positions, the first holding <eoa>) once per span."""
    layout, path = speech
    K = layout.audio_levels
    data = LoaderConfig(sources={"speech": SourceSpec(str(path))}, seq_len=128, batch_size=4, audio_layout=audio_layout)
    p = bench.positions_per_second(data, layout, FPS, n_batches=6)
    frames = round(p["seconds"] * FPS)
    assert p["code"] == pytest.approx(K * FPS if audio_layout == "flat" else FPS, rel=1e-12)
    per_span = {"flat": 2, "depth": 2, "delay": K}[audio_layout]  # positions besides the codes, per span
    spans = (p["span"] - p["code"]) * p["seconds"] / per_span
    assert spans == pytest.approx(p["spans"]) and p["spans"] > 10 and frames > 100


def test_flops_count_what_the_layouts_compute():
    """Flat: the trainer's own count per position (Transformer.flops_per_token); delay: + K-1 level heads of C x D on
    every position; depth: its per-frame cost is what torch's FLOP counter sees in the depth transformer's forward
    and backward (its attention over K-1 steps aside) plus K-1 level heads, within its norms' weights (counted as
    6 FLOPs per weight, as the main model's are, where the counter sees no matmul)."""
    layout = speech_layout(K=3)
    K, C, D, T = 3, layout.audio_codebook_size, 64, 96
    cfgs = {n: ModelConfig(vocab_size=layout.vocab_size, dim=D, n_layers=2, n_heads=4, n_kv_heads=2, audio_layout=n, depth_layers=1)
            for n in LAYOUTS}  # fmt: skip
    rates = {n: bench.flops_rates(cfgs[n], layout, T) for n in LAYOUTS}
    assert rates["flat"] == (Transformer(cfgs["flat"]).flops_per_token(T), 0.0)
    assert rates["delay"] == (rates["flat"][0] + 6.0 * (K - 1) * C * D, 0.0)
    assert rates["depth"][0] == rates["flat"][0]
    from torch.utils.flop_counter import FlopCounterMode

    depth = Transformer(cfgs["depth"]).depth
    N = 7
    h, prev = torch.randn(N, D, requires_grad=True), torch.randn(N, K - 1, D, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        depth(h, prev).sum().backward()
    attention = 12.0 * 1 * D * (K - 1) ** 2  # 1 depth layer; scaled_dot_product_attention is not counted on CPU
    heads = 6.0 * (K - 1) * C * D
    assert rates["depth"][1] == pytest.approx(counter.get_total_flops() / N + attention + heads, rel=5e-3)


def test_equal_compute_gives_each_layout_the_steps_nearest_the_budget(speech):
    layout, path = speech
    data = {n: LoaderConfig(sources={"speech": SourceSpec(str(path))}, seq_len=64, batch_size=2, audio_layout=n) for n in LAYOUTS}
    cfg = ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, audio_layout="depth", depth_layers=2)
    rates = bench.flops_rates(cfg, layout, 64)
    budget = bench.batch_flops(data["flat"], layout, bench.flops_rates(ModelConfig(**{**vars(cfg), "audio_layout": "flat"}), layout, 64), 6)[-1]
    n = bench.steps_for(budget, data["depth"], layout, rates, 60)
    summed = bench.batch_flops(data["depth"], layout, rates, n + 1)
    assert n < 6  # a depth step costs more than a flat one: fewer steps for the same FLOPs
    assert abs(summed[n - 1] - budget) <= min(abs(summed[n] - budget), abs((summed[n - 2] if n > 1 else 0.0) - budget))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("flite") is None, reason="flite missing: run `bash setup.sh` as root")
def test_the_benchmark_runs_at_a_tiny_size_and_reports_every_figure(tmp_path):
    """--tiny: a reduced demo built by the demo itself, the three layouts trained at equal FLOPs in turns, the evals,
    the table. Figures of what a tiny run learns are not asserted; the counts the layouts fix are."""
    rows = bench.run(tiny=True, demo=tmp_path / "demo", work=tmp_path / "work")
    got = {r["metric"]: r for r in rows}
    figures = ("positions per audio second", "code positions per audio second", "training throughput", "ASR WER",
               "TTS intelligibility WER", "time to first audio chunk", "voice latency (tts task)")  # fmt: skip
    for name in LAYOUTS:
        for f in figures:
            assert f"{name}: {f}" in got, f"{name}: {f}"
        assert (tmp_path / "work" / name / "model" / "model.safetensors").is_file()
    K = 2  # the demo codec's levels (recipes/demo.yaml: n_levels 2, 25 frames/s)
    assert got["flat: code positions per audio second"]["value"] == pytest.approx(K * FPS)
    for name in ("delay", "depth"):
        assert got[f"{name}: code positions per audio second"]["value"] == pytest.approx(FPS)
        assert got[f"{name}: positions per audio second"]["value"] < got["flat: positions per audio second"]["value"]
    assert got["flat: training throughput"]["value"] > 0 and "winner: training throughput" in got
