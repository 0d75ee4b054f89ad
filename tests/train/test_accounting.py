"""Throughput accounting and host syncs of the training loop: the FLOP count against a hand count, processed vs
learned tokens, and that a step between log steps reads nothing back from the device but its finiteness."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from omnitrain.cli import compose, recipes_dir
from omnitrain.data.loader import OmniLoader
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.train import loop
from omnitrain.train.objectives import LMObjective
from omnitrain.train.runlog import flops_per_token, read_metrics
from tests.synthetic import make_omni_sources
from tests.train.test_train import TRAIN, overrides, run_in_process


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return make_omni_sources(tmp_path_factory.mktemp("shards"), n_shards=2, per_shard=8)


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_count_the_output_projection_whether_tied_or_not(tied):
    V, D, L, Hkv, Dh, F, T = 100, 32, 2, 2, 8, 128, 64
    model = Transformer(ModelConfig(vocab_size=V, dim=D, n_layers=L, n_heads=4, n_kv_heads=Hkv, ffn_dim=F, tie_embeddings=tied))
    per_layer = D * D + 2 * D * Hkv * Dh + D * D + 3 * D * F + 2 * D  # wq, wk + wv, wo, w1 w2 w3, two norms
    by_hand = 6 * (L * per_layer + D + V * D) + 12 * L * D * T  # + the final norm and the output projection; attention
    assert flops_per_token(model, T) == by_hand


def test_processed_and_learned_tokens_are_counted_apart(shards, tmp_path):
    # audio carries no loss (like the speech input of ASR): processed, not learned
    extra = ("steps=2", "log_every=1", "data.modality_weights.audio=0.0")
    run_in_process(shards, tmp_path / "run", *extra)
    rows = read_metrics(tmp_path / "run")
    cfg, _ = compose(TRAIN, overrides(shards, tmp_path / "run", *extra), recipes_dir())
    cfg, _ = loop.resolve(cfg)
    loader = OmniLoader(cfg.data)  # the same stream the run read
    for row in rows:
        batch = next(loader)
        processed, learned = int((batch["doc_ids"] >= 0).sum()), int((batch["loss_weights"] > 0).sum())
        assert (row["processed_tokens"], row["learned_tokens"]) == (processed, learned)
        assert learned < 0.9 * processed  # the audio inputs are processed, not learned
        assert row["tokens_per_s/audio"] == 0 and row["learned_tokens_per_s"] < row["processed_tokens_per_s"]
        assert row["flops_per_s"] == pytest.approx(row["processed_tokens_per_s"] * flops_per_token_of(cfg), rel=1e-9)
    loader.close()


def flops_per_token_of(cfg: loop.TrainConfig) -> float:
    return flops_per_token(Transformer(cfg.model), cfg.data.seq_len)


# what reads a tensor back to the host (on a GPU each one waits for the device to finish the queued work)
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")
SRC = str(Path(loop.__file__).resolve().parents[1])  # src/omnitrain


def test_a_step_between_log_steps_reads_only_its_finiteness(shards, tmp_path, monkeypatch):
    step = {"now": 0}
    reads: Counter = Counter()  # (step, file under src/omnitrain) -> host reads
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            frame = sys._getframe(1)
            if "/torch/optim/" in frame.f_code.co_filename:  # AdamW's step counters: host tensors, also on a GPU
                return _original(self, *args, **kwargs)
            while frame is not None and not frame.f_code.co_filename.startswith(SRC):
                frame = frame.f_back  # torch / lightning internals: charge the omnitrain line that called them
            if frame is not None and "/data/" not in frame.f_code.co_filename:  # the loader's tensors are host data
                reads[step["now"], Path(frame.f_code.co_filename).relative_to(SRC).as_posix()] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train_step, summary = loop.train_step, LMObjective.summary
    summarised = []

    def step_counted(run, s, skipped, preempt=None):
        step["now"] = s + 1  # the loop's 1-based step: reads until the next step are this step's
        return train_step(run, s, skipped, preempt)

    def summary_counted(self, sums, count):
        summarised.append(step["now"])
        return summary(self, sums, count)

    monkeypatch.setattr(loop, "train_step", step_counted)
    monkeypatch.setattr(LMObjective, "summary", summary_counted)
    run_in_process(shards, tmp_path / "run", "steps=6", "log_every=3", "ckpt_every=100", "grad_accum=2")

    assert summarised == [3, 6, 6]  # stats read at log steps (and for the checkpoint's loss) only
    for s in (1, 2, 4, 5):  # not log steps
        of_step = {f: n for (k, f), n in reads.items() if k == s}
        # train/step.py: one read, whether the loss and gradient norm are finite (skip / stop are host decisions) and the
        # preemption signal the ranks agree on; nothing in train/strategy.py (the gradient norm stays a tensor)
        assert of_step.get("train/step.py") == 1, of_step
        assert of_step.get("train/runlog.py", 0) == 0 and of_step.get("train/strategy.py", 0) == 0, of_step
        assert set(of_step) <= {"train/step.py", "train/strategy.py", "model/transformer.py"}, of_step
    assert sum(n for (k, f), n in reads.items() if k in (3, 6) and f == "train/runlog.py") == 2  # Throughput.read


def test_the_loader_marks_batches_of_one_document_a_row_and_the_model_then_skips_the_mask(tmp_path):
    """Documents longer than a row give rows of one document each: the loader says so on the host (``one_document``),
    and the objective then runs plain causal attention, with the loss of the masked path. Packed rows are not marked."""
    from omnitrain.data.loader import LoaderConfig, SourceSpec
    from tests.synthetic import _id_range, make_text_shard_set, small_layout

    layout = small_layout()
    text = _id_range(layout, "text")
    g = torch.Generator().manual_seed(0)
    long_docs = [torch.randint(*text, (100,), generator=g).tolist() for _ in range(8)]
    short_docs = [torch.randint(*text, (9,), generator=g).tolist() for _ in range(40)]
    model = Transformer(ModelConfig(vocab_size=layout.vocab_size, dim=32, n_layers=2, n_heads=4, attention="sdpa"))
    for docs, one in ((long_docs, True), (short_docs, False)):
        path = make_text_shard_set(tmp_path / str(one), "text", layout, docs, n_shards=2)
        loader = OmniLoader(LoaderConfig(sources={"text": SourceSpec(str(path))}, seq_len=48, batch_size=2, workers=0))
        batch = next(loader)
        loader.close()
        assert batch["one_document"] is one
        fast, _ = LMObjective().loss(model, batch, denom=1.0)
        masked, _ = LMObjective().loss(model, {**batch, "one_document": False}, denom=1.0)
        assert fast.item() == pytest.approx(masked.item(), rel=1e-5)
