"""The loader's start-up and shard integrity (issues 20 and 22): readers share the shards of a small
source by sample striding (exactly once per epoch, exact resume, re-split on a change of readers);
start-up reads manifests only; every shard is checked against its manifest when opened (a short or
flipped shard is an error naming it, or skipped and counted with data.on_corrupt=skip); remote
reads are retried, then fail with the loader state intact; `data inspect` reports a bad shard."""

from __future__ import annotations

import contextlib
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from omnitrain.config import from_dict
from omnitrain.data.loader import LoaderConfig, OmniLoader, ShardReadError, SourceSpec, readers_report
from omnitrain.data.shards import read_manifest, shard_checksum, shard_name
from tests.synthetic import cut_shard, make_shard_set, same_batch, small_layout

LAYOUT = small_layout()


def make_source(folder: Path, n_shards: int, per_shard: int, seed: int = 0) -> Path:
    return make_shard_set(folder, "s", LAYOUT, n_shards, per_shard, lengths=(20, 120), seed=seed)


def epoch_reads(cfg: LoaderConfig, world_size: int, epoch: int) -> list[str]:
    """The origins every reader (rank x worker) reads in ``epoch``, read stream by stream."""
    seen = []
    for rank in range(world_size):
        loader = OmniLoader(cfg, rank=rank, world_size=world_size)
        for slot in range(loader.n_slots):
            src = loader.make_stream(slot).sources["s"]
            while True:
                meta = src.next()[1]
                if src.last[0] > epoch:
                    break
                if src.last[0] == epoch:
                    seen.append(meta["origin"])
    return seen


def batches(loader: OmniLoader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert same_batch(a, b), k


# ----------------------------------------------------------------------------- sample striding
@pytest.mark.parametrize(("n_shards", "per_shard"), [(1, 10), (3, 5)])
def test_fewer_shards_than_readers_every_sample_once_per_epoch_over_2_ranks_x_2_workers(tmp_path, n_shards, per_shard):
    cfg = LoaderConfig(sources={"s": SourceSpec(str(make_source(tmp_path / "s", n_shards, per_shard)))}, workers=2, seq_len=64)
    everything = sorted(f"s:{k}" for k in range(n_shards * per_shard))
    for epoch in (0, 1):
        assert sorted(epoch_reads(cfg, 2, epoch)) == everything  # all, none twice, over the 4 readers
    stream = OmniLoader(cfg, rank=1, world_size=2).make_stream(1).sources["s"]
    assert stream.parts == math.ceil(4 / n_shards)  # readers sharing each shard


@pytest.mark.parametrize("split", [True, False])
def test_a_one_shard_source_resumes_mid_epoch_with_the_same_continuation(tmp_path, split):
    src = make_source(tmp_path / "s", 1, 10)
    cfg = LoaderConfig(sources={"s": SourceSpec(str(src))}, workers=2, seq_len=64, batch_size=2, seed=3,
                       split_documents=split, pack_buffer=3)  # fmt: skip
    full = batches(OmniLoader(cfg, rank=1, world_size=2), 12)  # several epochs of this rank's two quarters
    for cut in (3, 7):
        first = OmniLoader(cfg, rank=1, world_size=2)
        batches(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        resumed = OmniLoader(cfg, rank=1, world_size=2)
        resumed.load_state_dict(state)
        assert_same(batches(resumed, 12 - cut), full[cut:])
        resumed.close()


@pytest.mark.parametrize(("world_size", "workers"), [(1, 3), (3, 2)])
def test_a_one_shard_source_re_split_over_other_readers_repeats_nothing_within_the_epoch(tmp_path, world_size, workers):
    """2 ranks x 2 workers (4 quarters of the shard) stop mid-epoch; other readers resume from all old states."""
    cfg = LoaderConfig(sources={"s": SourceSpec(str(make_source(tmp_path / "s", 1, 12)))}, workers=2, seq_len=64)
    read, rest, old_states, rng = [], 0, [], np.random.default_rng(world_size)
    for rank in range(2):
        loader = OmniLoader(cfg, rank=rank, world_size=2)
        for slot in range(2):
            stream = loader.make_stream(slot)
            src = stream.sources["s"]
            for _ in range(int(rng.integers(0, 3))):  # a quarter holds 3
                read.append(src.next()[1]["origin"])
            rest += 3 - src.sample if src.sample else 0  # the unread rest of a part in progress may be skipped
            loader.states[slot] = stream.state()
        old_states.append(loader.state_dict())
    new_cfg = LoaderConfig(sources=cfg.sources, workers=workers, seq_len=64)
    for rank in range(world_size):
        resumed = OmniLoader(new_cfg, rank=rank, world_size=world_size)
        resumed.load_state_dict(old_states)
        for slot in range(workers):
            stream = resumed.make_stream(slot)
            stream.load(resumed.states[slot])
            src = stream.sources["s"]
            while True:
                meta = src.next()[1]
                if src.last[0] > 0:
                    break
                read.append(meta["origin"])
    assert len(read) == len(set(read))  # nothing twice within the epoch
    assert 0 <= 12 - len(read) <= rest  # only the rest of parts that were in progress


def test_a_source_with_fewer_samples_than_readers_is_refused_at_start_up(tmp_path):
    cfg = LoaderConfig(sources={"s": SourceSpec(str(make_source(tmp_path / "s", 1, 3)))}, workers=2)
    with pytest.raises(ValueError, match="has 3 samples for 4 readers"):
        OmniLoader(cfg, rank=0, world_size=2)


# ----------------------------------------------------------------------------- manifests
def test_start_up_reads_the_manifests_only_and_a_missing_shard_is_named_when_read(tmp_path):
    src = make_source(tmp_path / "s", 2, 4)
    for tar in src.glob("*.tar"):
        tar.unlink()  # a rank that stat'ed (or opened) the shards would fail here
    cfg = LoaderConfig(sources={"s": SourceSpec(str(src))}, seq_len=64)
    loader = OmniLoader(cfg, rank=0, world_size=2)
    assert [r["ok"] for r in readers_report(cfg, world_size=2)] == [True]
    with pytest.raises(ValueError, match=r"shard-p000-00000[01]\.tar is listed in the manifest but missing; rebuild it with `omnitrain data build`"):
        next(loader)


def test_the_manifest_records_each_shards_size_and_checksum(tmp_path):
    src = make_source(tmp_path / "s", 2, 4)
    for entry in read_manifest(src)["shards"]:
        data = (src / entry["name"]).read_bytes()
        assert (entry["samples"], entry["bytes"], entry["crc32"]) == (4, len(data), shard_checksum(data))


def test_an_old_manifest_without_sizes_loads_with_a_warning_and_still_catches_a_short_shard(tmp_path):
    src = make_source(tmp_path / "s", 2, 4)
    manifest = json.loads((src / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["bytes"], entry["crc32"]
    (src / "manifest.json").write_text(json.dumps(manifest))
    cut_shard(src / shard_name(0, 1), keep=2)
    with pytest.warns(UserWarning, match="records no shard sizes and checksums.*omnitrain data build"):
        loader = OmniLoader(LoaderConfig(sources={"s": SourceSpec(str(src))}, seq_len=64))
    with pytest.raises(ValueError, match=rf"{shard_name(0, 1)} is corrupt or truncated \(2 samples, the manifest lists 4\)"):
        batches(loader, 20)


def test_readers_report_states_shards_vs_readers_per_source_from_manifests(tmp_path):
    cfg = LoaderConfig(sources={"one": SourceSpec(str(make_source(tmp_path / "one", 1, 10))),
                                "tiny": SourceSpec(str(make_source(tmp_path / "tiny", 1, 3))),
                                "gone": SourceSpec(str(tmp_path / "nowhere"))}, workers=2)  # fmt: skip
    one, tiny, gone = readers_report(cfg, world_size=2)
    assert one["ok"] and (one["shards"], one["samples"], one["readers"], one["readers_per_shard"]) == (1, 10, 4, 4)
    assert one["checksums"] and one["bytes"] == (tmp_path / "one" / shard_name(0, 0)).stat().st_size
    assert not tiny["ok"] and "3 samples in 1 shards for 4 readers" in tiny["problem"]
    assert not gone["ok"] and "no manifest.json" in gone["problem"]


# ----------------------------------------------------------------------------- integrity
@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_cut_at_a_member_boundary_is_an_error_naming_it(tmp_path, workers):
    src = make_source(tmp_path / "s", 2, 4)
    cut_shard(src / shard_name(0, 0), keep=2)  # parses cleanly: 2 of its 4 samples
    loader = OmniLoader(LoaderConfig(sources={"s": SourceSpec(str(src))}, seq_len=64, workers=workers))
    with pytest.raises(ValueError, match="rebuild it with `omnitrain data build`") as err:
        batches(loader, 20)
    assert f"{shard_name(0, 0)} is corrupt or truncated (2 samples, the manifest lists 4)" in str(err.value)
    assert "\n" not in str(err.value)  # one line, also from a worker process


def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path):
    src = make_source(tmp_path / "s", 2, 4)
    tar = src / shard_name(0, 1)
    with tarfile.open(tar) as t:
        ids = next(m for m in t.getmembers() if m.name.endswith(".ids.npy"))
    data = bytearray(tar.read_bytes())
    data[ids.offset_data + 130] ^= 0x01  # a token id, not a header: same size, same sample count
    tar.write_bytes(bytes(data))
    loader = OmniLoader(LoaderConfig(sources={"s": SourceSpec(str(src))}, seq_len=64))
    with pytest.raises(ValueError, match=rf"{shard_name(0, 1)} is corrupt or truncated \(CRC-32 [0-9a-f]+, the manifest lists"):
        batches(loader, 20)


def test_on_corrupt_skip_skips_the_shard_counts_it_and_resumes_exactly(tmp_path):
    src = make_source(tmp_path / "s", 4, 4)
    cut_shard(src / shard_name(0, 2), keep=2)
    cfg = LoaderConfig(sources={"s": SourceSpec(str(src))}, seq_len=64, batch_size=2, on_corrupt="skip")
    with pytest.warns(UserWarning, match=rf"{shard_name(0, 2)} is corrupt or truncated .*skipped \(data.on_corrupt=skip\)"):
        assert sorted(epoch_reads(cfg, 1, epoch=0)) == sorted(f"s:{k}" for k in range(16) if not 8 <= k < 12)
    with pytest.warns(UserWarning, match="skipped"):
        full_loader = OmniLoader(cfg)
        full = batches(full_loader, 14)  # a few epochs: the shard is met (and counted) in each
    assert full_loader.skipped_shards() >= 2 and full_loader.skipped_samples() == 4 * full_loader.skipped_shards()
    first = OmniLoader(cfg)
    with pytest.warns(UserWarning, match="skipped"):
        batches(first, 6)
    resumed = OmniLoader(cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.skipped_shards() == first.skipped_shards() >= 1  # the count survives a resume
    with pytest.warns(UserWarning, match="skipped"):
        assert_same(batches(resumed, 8), full[6:])
    assert (resumed.skipped_shards(), resumed.skipped_samples()) == (full_loader.skipped_shards(), full_loader.skipped_samples())
    with pytest.raises(ValueError, match=r"data.on_corrupt='ignore' is not one of \['error', 'skip'\]"):
        LoaderConfig(on_corrupt="ignore")


# ----------------------------------------------------------------------------- remote shards
def test_a_remote_shard_that_fails_once_is_retried_and_reads_the_same(tmp_path):
    src, flags = make_source(tmp_path / "s", 4, 4), tmp_path / "flags"
    flags.mkdir()
    # each shard's first read fails (exit 1), the second succeeds
    url = f"pipe:if [ -e {flags}/{{name}} ]; then cat {src}/{{name}}; else touch {flags}/{{name}}; exit 1; fi"
    local = LoaderConfig(sources={"s": SourceSpec(str(src))}, seq_len=64, batch_size=2)
    flaky = LoaderConfig(sources={"s": SourceSpec(str(src), url=url)}, seq_len=64, batch_size=2, retry_wait=0.01)
    with pytest.warns(UserWarning, match=r"shard-p000-00000\d\.tar.*: the command exited with status 1; retry 1/3 in 0.01 s"):
        got = batches(OmniLoader(flaky), 10)
    assert_same(got, batches(OmniLoader(local), 10))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_remote_store_down_fails_after_the_retries_and_loses_no_sample(tmp_path, workers):
    src, down = make_source(tmp_path / "s", 8, 4), tmp_path / "down"
    url = f"pipe:test ! -e {down} && cat {src}/{{name}}"
    cfg = LoaderConfig(sources={"s": SourceSpec(str(src), url=url)}, seq_len=64, batch_size=2, workers=workers,
                       read_retries=2, retry_wait=0.01)  # fmt: skip
    full = batches(OmniLoader(cfg), 24)
    loader = OmniLoader(cfg)
    got = batches(loader, 3)
    down.touch()
    before = json.dumps(loader.state_dict())
    warned = pytest.warns(UserWarning, match="retry 2/2") if not workers else contextlib.nullcontext()  # (workers warn in their process)
    with warned, pytest.raises(ShardReadError, match="could not be read in 3 attempt") as err:
        for _ in range(21):
            got.append(next(loader))
            before = json.dumps(loader.state_dict())
    assert "\n" not in str(err.value) and "resume from the checkpoint" in str(err.value)
    assert json.dumps(loader.state_dict()) == before  # the state stands after the last batch handed out
    down.unlink()
    resumed = OmniLoader(cfg)
    resumed.load_state_dict(json.loads(before))
    assert_same(batches(resumed, 24 - len(got)), full[len(got) :])  # a checkpoint taken now loses nothing
    assert_same(got + batches(loader, 24 - len(got)), full)  # and the same loader carries on where it stood


# ----------------------------------------------------------------------------- data inspect
def test_data_inspect_reports_a_short_shard(tmp_path, text_tokenizer_dir, capsys):
    from omnitrain.data.pipeline.build import BuildConfig, PipelineConfig, build_shards
    from omnitrain.data.pipeline.inspect import InspectConfig, inspect_shards
    from omnitrain.tokenizer.bundle import TokenizerPaths
    from tests.conftest import REPO

    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"line number {i}"}) + "\n" for i in range(8)))
    cfg = BuildConfig(pipeline=from_dict(PipelineConfig, {"name": "t", "source": {"kind": "text", "paths": [str(tmp_path / "d.jsonl")]},
                                                          "template": "text_lm"}),
                      tokenizers=TokenizerPaths(text=text_tokenizer_dir), out_dir=tmp_path / "shards",
                      templates_dir=REPO / "data_pipelines" / "template", shard_samples=4)  # fmt: skip
    build_shards(cfg)
    assert inspect_shards(InspectConfig(shards=cfg.out_dir, samples=1))["samples"]
    assert "2 of 2 shard(s) match the manifest (sample counts, sizes, CRC-32)" in capsys.readouterr().out
    short = sorted(cfg.out_dir.glob("*.tar"))[1]
    cut_shard(short, keep=2)
    with pytest.raises(ValueError, match=rf"1 of 2 shard\(s\) do not match manifest.json, e.g. shard .*{short.name} is corrupt"):
        inspect_shards(InspectConfig(shards=cfg.out_dir, samples=1))
    out = capsys.readouterr().out
    assert f"BAD shard {short} is corrupt or truncated (2 samples, the manifest lists 4)" in out and "1 of 2 shard(s) match" in out


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_two_ddp_ranks_train_on_a_one_shard_source(tmp_path):
    """Issue 21 item 8: `omnitrain train ... strategy=ddp strategy.devices=2` on a 1-shard source (as the
    demo's text_lm) stopped with "source 'text_lm' has 1 shards for 2 readers"."""
    import os
    import subprocess
    import sys

    src = make_shard_set(tmp_path / "text_lm", "text_lm", LAYOUT, n_shards=1, per_shard=24)
    launcher_vars = ("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    args = [f"run_dir={tmp_path / 'run'}", "steps=3", "ckpt_every=3", "threads=1", "wandb.mode=disabled", "model=tiny",
            "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "data.seq_len=64", "data.batch_size=2",
            "strategy=ddp", "strategy.devices=2", "strategy.accelerator=cpu", "~data.sources",
            f"+data.sources={{text_lm:{{path:'{src}'}}}}"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "omnitrain.cli", "train", *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
