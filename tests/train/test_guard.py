"""The forgetting guard (issue 24, item 2): watched metrics against their step-0 baselines; warn, rebalance the
mixture (part of the loader's exact-resume state), or stop with a checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from omnitrain.data.loader import LoaderConfig, OmniLoader, SourceSpec
from omnitrain.train import checkpoint
from omnitrain.train.guard import Guard, GuardConfig, WatchConfig
from omnitrain.train.runlog import read_metrics
from tests.synthetic import make_omni_sources, make_shard_set, same_batch, small_layout
from tests.train.eval_helpers import eval_overrides, make_eval_assets, slow_after
from tests.train.test_eval_in_training import run_in_process
from tests.train.test_train import start, wait_for_step


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return make_omni_sources(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    return make_shard_set(tmp_path_factory.mktemp("heldout") / "text", "text_heldout", small_layout(), 1, 16, seed=9)


def loader(shards: dict[str, Path], workers: int = 0, split: bool = True) -> OmniLoader:
    cfg = LoaderConfig(sources={k: SourceSpec(str(v)) for k, v in shards.items()}, seq_len=64, batch_size=2, workers=workers,
                       split_documents=split, pack_buffer=8)  # fmt: skip
    return OmniLoader(cfg)


def test_a_degraded_metric_warns_rebalances_toward_its_sources_within_bounds_and_keeps_its_baseline(shards):
    said: list[str] = []
    data = loader(shards)
    before = dict(data.shares)
    cfg = GuardConfig(watch={"eval/mmlu/acc": WatchConfig(tolerance=0.05), "val/text/loss/text": WatchConfig(tolerance=0.1)},
                      action="rebalance", step=0.2, max_share=0.6, rebalance_at=1.0)  # fmt: skip
    guard = Guard(cfg, data, said.append)
    assert guard.targets("eval/mmlu/acc") == ["text"]  # the source whose tokens are mostly text
    assert guard.observe(0, {"eval/mmlu/acc": 0.40, "val/text/loss/text": 3.0}) == ({"guard/degraded": 0.0}, False)
    assert guard.observe(5, {"eval/mmlu/acc": 0.36, "val/text/loss/text": 3.05}) == ({"guard/degraded": 0.0}, False)  # within
    row, stop = guard.observe(10, {"eval/mmlu/acc": 0.30})  # accuracy: higher is better; 0.10 below its baseline
    assert not stop and row["guard/degraded"] == 1.0
    assert data.shares["text"] == pytest.approx(before["text"] + 0.2) and row["share_target/text"] == data.shares["text"]
    assert sum(data.shares.values()) == pytest.approx(1.0)
    ratio = before["caption"] / before["speech"]  # the others scaled down in proportion
    assert data.shares["caption"] / data.shares["speech"] == pytest.approx(ratio)
    guard.observe(15, {"val/text/loss/text": 3.5})  # a loss: lower is better
    assert data.shares["text"] == pytest.approx(0.6)  # max_share
    guard.observe(20, {"val/text/loss/text": 3.5})
    assert data.shares["text"] == pytest.approx(0.6) and "at its bound" in said[-1]
    assert said[0].startswith("guard: eval/mmlu/acc = 0.3000 at step 10 is 0.1000 worse than its step-0 0.4000")
    state = guard.state_dict()
    again = Guard(cfg, loader(shards), said.append)
    again.load_state_dict(state)
    assert again.baseline == {"eval/mmlu/acc": 0.40, "val/text/loss/text": 3.0} and len(again.changes) == 2
    stop_guard = Guard(GuardConfig(watch={"eval/mmlu/acc": WatchConfig()}, action="stop"), data, said.append)
    stop_guard.observe(0, {"eval/mmlu/acc": 0.5})
    assert stop_guard.observe(5, {"eval/mmlu/acc": 0.2})[1]


def test_rebalance_acts_at_its_fraction_of_the_tolerance_and_only_warns_at_the_tolerance(shards):
    said: list[str] = []
    data = loader(shards)
    before = data.shares["text"]
    cfg = GuardConfig(watch={"val/text/loss/text": WatchConfig(tolerance=0.2)}, action="rebalance", step=0.1, rebalance_at=0.5)
    guard = Guard(cfg, data, said.append)
    guard.observe(0, {"val/text/loss/text": 3.0})
    assert guard.observe(2, {"val/text/loss/text": 3.09})[0] == {"guard/degraded": 0.0} and data.shares["text"] == before
    row, stop = guard.observe(4, {"val/text/loss/text": 3.15})  # 0.15 worse: past 0.5 x 0.2, within the tolerance
    assert not stop and row["guard/degraded"] == 0.0 and data.shares["text"] == pytest.approx(before + 0.1)
    assert "past guard.rebalance_at=0.5 of its tolerance 0.2: rebalance" in said[0]
    row, _ = guard.observe(6, {"val/text/loss/text": 3.25})  # past the tolerance: counted as degraded, and rebalanced
    assert row["guard/degraded"] == 1.0 and data.shares["text"] == pytest.approx(before + 0.2)
    warn = Guard(GuardConfig(watch={"val/text/loss/text": WatchConfig(tolerance=0.2)}, action="warn"), loader(shards), said.append)
    warn.observe(0, {"val/text/loss/text": 3.0})
    n = len(said)
    assert warn.observe(4, {"val/text/loss/text": 3.15}) == ({"guard/degraded": 0.0}, False) and len(said) == n  # warn: silent within
    with pytest.raises(ValueError, match="rebalance_at=1.5"):
        GuardConfig(rebalance_at=1.5)


def test_rebalance_relaxes_back_to_the_recipe_mixture_once_the_metric_is_well_within(shards):
    said: list[str] = []
    data = loader(shards)
    origin = dict(data.shares)
    cfg = GuardConfig(watch={"val/text/loss/text": WatchConfig(tolerance=0.2)}, action="rebalance", step=0.3, rebalance_at=0.5)
    guard = Guard(cfg, data, said.append)
    guard.observe(0, {"val/text/loss/text": 3.0})
    guard.observe(2, {"val/text/loss/text": 3.15})  # past 0.1: raised by 0.3
    assert data.shares["text"] == pytest.approx(origin["text"] + 0.3) and guard.raised() == ["text"]
    guard.observe(4, {"val/text/loss/text": 3.07})  # within the trigger but not within half of it: held
    assert data.shares["text"] == pytest.approx(origin["text"] + 0.3)
    state = guard.state_dict()
    row, _ = guard.observe(6, {"val/text/loss/text": 3.04})  # within 0.05: back toward the recipe, never past it
    assert data.shares == pytest.approx(origin) and row["share_target/text"] == pytest.approx(origin["text"])
    assert "back toward the recipe" in said[-1] and guard.changes[-1]["metrics"] == ["relax"]
    assert guard.observe(8, {"val/text/loss/text": 2.9}) == ({"guard/degraded": 0.0}, False)  # at the recipe: nothing to do
    resumed = Guard(cfg, loader(shards), said.append)  # a resumed run: the recipe's mixture from the checkpoint
    resumed.loader.set_shares(dict(state["changes"][-1]["shares"]))
    resumed.load_state_dict(state)
    assert resumed.origin == pytest.approx(origin) and resumed.raised() == ["text"]
    held = Guard(GuardConfig(watch=cfg.watch, action="rebalance", step=0.3, rebalance_at=0.5, relax=False), loader(shards))
    held.observe(0, {"val/text/loss/text": 3.0})
    held.observe(2, {"val/text/loss/text": 3.15})
    held.observe(4, {"val/text/loss/text": 2.9})
    assert held.loader.shares["text"] == pytest.approx(origin["text"] + 0.3)  # relax=False: only ever raised


@pytest.mark.parametrize("workers,split", [(0, True), (2, True), (0, False)])
def test_a_share_change_is_part_of_the_loaders_exact_resume_state(shards, workers, split):
    """Shares changed at batch 4, the state saved at batch 6: a new loader resumed from it gives the same batches."""
    a = loader(shards, workers, split)
    batches, state = [], None
    for i in range(12):
        if i == 4:
            a.set_shares({"text": 0.8, "caption": 0.1, "speech": 0.1})
        if i == 6:
            state = copy.deepcopy(a.state_dict())
        batches.append(next(a))
    b = loader(shards, workers, split)
    b.load_state_dict(state)
    assert b.shares == pytest.approx({"text": 0.8, "caption": 0.1, "speech": 0.1})
    assert all(same_batch(x, next(b)) for x in batches[6:])
    a.close()
    b.close()


def test_the_mixture_counts_from_the_change_not_from_the_start(shards):
    """After set_shares the deficit scheduler starts over: no run of one source to catch up with the new share."""
    data = loader(shards)
    for _ in range(6):
        next(data)
    data.set_shares({"text": 0.5, "caption": 0.25, "speech": 0.25})
    picked = []
    stream = data.make_stream(0)
    stream.load(data.states[0])
    for _ in range(8):
        picked.append(stream._pick())
        stream.drawn[picked[-1]] += 100
    assert set(picked) == {"text", "caption", "speech"} and picked.count("text") == 4


GUARDED = ("val.every=4", "val.batches=1", "guard.action=rebalance", "guard.step=0.2",
           # a loss watched as if higher were better: it "degrades" as soon as training lowers it, at every val step
           "+guard.watch={val/text_heldout/loss/text:{tolerance:0.0,higher_is_better:true,sources:[text]}}")  # fmt: skip


def test_a_rebalanced_run_killed_and_resumed_trains_on_the_same_batches(shards, heldout, tmp_path):
    val = f"+val.sources={{text_heldout:{{path:'{heldout}'}}}}"
    ref = tmp_path / "ref"
    run_in_process(shards, ref, "steps=20", val, *GUARDED)
    rows = read_metrics(ref)
    changes = [r["step"] for r in rows if "share_target/text" in r]
    assert changes == [4, 8, 12]  # each val step after the baseline, until the bound (1/3 + 0.2 + 0.2 + 0.2, capped at 0.9)
    assert [r["share_target/text"] for r in rows if "share_target/text" in r] == pytest.approx([1 / 3 + 0.2, 1 / 3 + 0.4, 0.9])
    assert rows[-1]["share/text"] > rows[changes[0]]["share/text"]  # the realised text share follows

    killed = tmp_path / "killed"
    proc = start(shards, killed, "steps=20", "ckpt_every=10", val, *GUARDED, prelude=slow_after(13))
    wait_for_step(proc, killed, 13)
    proc.kill()
    proc.wait()
    run_in_process(shards, killed, "steps=20", "ckpt_every=10", val, *GUARDED)
    assert {r["step"]: r.get("loss") for r in read_metrics(killed)} == {r["step"]: r.get("loss") for r in rows}
    meta = checkpoint.read_meta(checkpoint.resolve_resume(killed, "auto"))
    assert meta["guard"]["baseline"]["val/text_heldout/loss/text"] == rows[0]["val/text_heldout/loss/text"]


def test_guard_stop_saves_a_checkpoint_and_ends_the_run(shards, tmp_path_factory, tmp_path):
    assets = make_eval_assets(tmp_path_factory.mktemp("assets"))
    run = tmp_path / "run"
    # perplexity watched as if higher were better: the first eval after the baseline "degrades" it
    summary = run_in_process(shards, run, "steps=20", *eval_overrides(assets, 5), "guard.action=stop",
                             "+guard.watch={eval/perplexity/perplexity:{tolerance:0.0,higher_is_better:true}}")  # fmt: skip
    assert summary["guard_stopped"] and summary["step"] == 5
    assert (run / "checkpoints" / "step_000000005" / "meta.json").is_file()
