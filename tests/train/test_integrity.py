"""Nothing lost, nothing silent (issue 22): verified checkpoints and their fallback, one live run per run_dir,
one-line errors for disk full / read-only / not-a-directory with no ``.tmp`` left behind, a world-size change
on resume recorded with its global batch, and the minor messages."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omnitrain.cli import compose, main, recipes_dir
from omnitrain.train import checkpoint, lock
from omnitrain.train.loop import train
from omnitrain.train.runlog import read_metrics
from tests.synthetic import make_omni_sources
from tests.train.test_train import TRAIN, overrides

SHORT = ("steps=4", "ckpt_every=2")  # checkpoints at steps 2 and 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    return make_omni_sources(tmp_path_factory.mktemp("shards"))


def run(shards: dict[str, Path], run_dir: Path, *extra: str) -> dict:
    cfg, plain = compose(TRAIN, overrides(shards, run_dir, *SHORT, *extra), recipes_dir())
    return train(cfg, plain)


def cli(shards: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return ["train", *overrides(shards, run_dir, *SHORT, *extra)]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def error_line(err: str) -> str:
    """The CLI's error line; asserts it is the only thing printed about the error (no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (copied by the tests that damage it)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(shards, run_dir)
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


# ----------------------------------------------------------------------------- checksums and the fallback
def damage(ckpt: Path, how: str) -> Path:
    """Damage checkpoint folder ``ckpt`` as a disk, a kill or a stray write would; returns the damaged file."""
    state = ckpt / "state"
    if how == "truncated":
        data = state.read_bytes()
        state.write_bytes(data[: len(data) // 2])
        return state
    if how == "bit_flip":
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0x10  # one bit in the middle of the tensors
        state.write_bytes(bytes(data))
        return state
    if how == "unpicklable":
        rank = ckpt / "rank_00000.pt"
        rank.write_bytes(b"\x80\x05not a pickle" * 10)
        return rank
    if how == "meta_json":
        (ckpt / "meta.json").write_text('{"step": 4, oops')
        return ckpt / "meta.json"
    raise AssertionError(how)


def test_meta_json_lists_every_file_with_its_size_and_sha256(finished):
    for ckpt in checkpoint.complete_checkpoints(finished):
        meta = json.loads((ckpt / "meta.json").read_text())
        assert meta["schema_version"] == 2 and meta["batch"] == {"batch_size": 4, "grad_accum": 1, "seq_len": 128}
        on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json")
        assert sorted(meta["files"]) == on_disk == ["rank_00000.pt", "state"]
        for name, f in meta["files"].items():
            assert f["bytes"] == (ckpt / name).stat().st_size and f["sha256"] == checkpoint.sha256_file(ckpt / name)
        assert checkpoint.verify(ckpt) is None


@pytest.mark.parametrize("how", ["truncated", "bit_flip", "unpicklable", "meta_json"])
def test_resume_auto_sets_a_damaged_checkpoint_aside_and_resumes_from_the_previous_one_exactly(shards, finished, tmp_path, capsys, how):
    run_dir = copy_run(finished, tmp_path / "run")
    bad = damage(checkpoint.step_dir(run_dir, 4), how)
    capsys.readouterr()
    run(shards, run_dir)  # resume=auto, steps=4: steps 3 and 4 trained again from the step-2 checkpoint
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "is damaged" in line)
    assert str(bad) in line and "step_000000004.damaged" in line, line  # names the file and where it went
    attempts = json.loads((run_dir / "run.json").read_text())["attempts"]
    assert attempts[-1]["resumed_from"] == str(checkpoint.step_dir(run_dir, 2))
    assert losses(run_dir) == losses(finished)  # exact: the same batches, weights and optimizer state as the first time
    assert (run_dir / "checkpoints" / "step_000000004.damaged").is_dir()  # kept for inspection, never loaded
    assert checkpoint.verify(checkpoint.step_dir(run_dir, 4)) is None  # the step-4 checkpoint written again, intact


def test_resume_of_a_named_damaged_checkpoint_is_refused_in_one_line_naming_the_file(shards, finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    bad = damage(checkpoint.step_dir(run_dir, 4), "bit_flip")
    folder = checkpoint.step_dir(run_dir, 4)
    capsys.readouterr()
    assert main(cli(shards, run_dir, f"resume={folder}", "steps=6")) == 1
    line = error_line(capsys.readouterr().err)
    assert str(bad) in line and "checksum" in line and "resume=auto" in line
    assert line.count(str(folder)) == 2  # "resume=<folder> is damaged: <folder>/state fails...": never advised as the fix
    assert str(checkpoint.step_dir(run_dir, 2)) in line  # the intact one is offered instead
    assert (folder / "state").is_file() and losses(run_dir) == losses(finished)  # nothing changed, nothing trained


def test_no_intact_checkpoint_left_is_an_error_not_a_silent_fresh_start(shards, finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    for step in (2, 4):
        damage(checkpoint.step_dir(run_dir, step), "truncated")
    assert main(cli(shards, run_dir)) == 1
    line = error_line(capsys.readouterr().err)
    assert "no intact checkpoint" in line and "step_000000002.damaged" in line
    assert main(cli(shards, run_dir)) == 1  # still refused on the next start (the damaged folders are still there)
    assert losses(run_dir) == losses(finished)


@pytest.mark.parametrize("how", ["truncated", "unpicklable"])
def test_a_checkpoint_without_checksums_that_does_not_load_is_one_line_naming_the_file(shards, finished, tmp_path, capsys, how):
    """Schema 1 checkpoints (before checksums) still load; if a file of one does not, the line names it."""
    run_dir = copy_run(finished, tmp_path / "run")
    folder = checkpoint.step_dir(run_dir, 4)
    meta = json.loads((folder / "meta.json").read_text())
    meta["schema_version"] = 1
    del meta["files"], meta["batch"]
    (folder / "meta.json").write_text(json.dumps(meta))
    bad = damage(folder, how)
    assert main(cli(shards, run_dir)) == 1
    line = error_line(capsys.readouterr().err)
    assert f"{bad} cannot be loaded" in line and "damaged" in line and "step_000000002" in line
    assert line.count(str(folder)) == 1  # named as the broken file, not offered as the fix


def test_a_checkpoint_of_a_newer_schema_is_refused_not_set_aside_as_damaged(shards, finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    meta_file = checkpoint.step_dir(run_dir, 4) / "meta.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "schema_version": 99}))
    assert main(cli(shards, run_dir)) == 1
    line = error_line(capsys.readouterr().err)
    assert f"{meta_file}: schema_version 99" in line and "omnitrain version that wrote it" in line
    assert checkpoint.step_dir(run_dir, 4).is_dir()  # not moved aside


def test_a_checkpoint_of_another_layout_is_refused_before_any_state_is_loaded(shards, finished, tmp_path, monkeypatch):
    from lightning.fabric import Fabric

    run_dir = copy_run(finished, tmp_path / "run")
    meta_file = checkpoint.step_dir(run_dir, 4) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["layout_hash"] = "0123456789abcdef"
    meta_file.write_text(json.dumps(meta))

    def no_load(*args, **kwargs):
        raise AssertionError("state loaded before the layout check")

    monkeypatch.setattr(Fabric, "load", no_load)
    with pytest.raises(ValueError, match="trained with layout 0123456789abcdef, the data has"):
        run(shards, run_dir)


# ----------------------------------------------------------------------------- one live run per run_dir
def live_owner(pid: int, **extra) -> dict:
    return {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00", "slurm_job_id": None,
            "proc_start": lock._proc_start(pid), **extra}  # fmt: skip


def test_a_second_run_into_a_live_run_dir_is_refused_naming_the_owner(shards, finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    assert not (run_dir / lock.LOCK_NAME).exists()  # released when the run ended
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (run_dir / lock.LOCK_NAME).write_text(json.dumps(live_owner(owner.pid)))
        assert main(cli(shards, run_dir, "steps=6")) == 1
        line = error_line(capsys.readouterr().err)
        assert f"PID {owner.pid} on {socket.gethostname()}" in line and "in use by another run" in line
        assert losses(run_dir) == losses(finished)  # nothing written
    finally:
        owner.kill()
        owner.wait()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(shards, finished, tmp_path, capsys):
    run_dir = copy_run(finished, tmp_path / "run")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / lock.LOCK_NAME).write_text(json.dumps(live_owner(dead.pid, proc_start="1")))
    run(shards, run_dir, "steps=6")
    out = capsys.readouterr().out
    assert f"warning: taking over {run_dir / lock.LOCK_NAME} from a run that is gone (PID {dead.pid}" in out
    assert max(losses(run_dir)) == 6 and not (run_dir / lock.LOCK_NAME).exists()


def test_a_pid_reused_by_another_process_does_not_hold_the_lock(tmp_path):
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps(live_owner(os.getppid(), proc_start="12345")))
    _, note = lock.acquire(tmp_path)  # the parent is alive, but started at another time than the owner did
    assert note and "gone" in note


def test_under_slurm_a_requeued_job_takes_over_its_own_lock_and_another_job_is_refused(tmp_path, monkeypatch):
    elsewhere = {"pid": 4242, "host": "node-017", "started": "2026-01-01T00:00:00", "slurm_job_id": "777", "proc_start": "9"}
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps(elsewhere))
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(lock.RunDirBusy, match="PID 4242 on node-017, Slurm job 777.*cannot be checked from"):
        lock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the same job, requeued (possibly onto another node)
    path, note = lock.acquire(tmp_path)
    assert "earlier start of this Slurm job" in note and json.loads(path.read_text())["pid"] == os.getpid()
    lock.release(path)
    assert not path.exists()


class FakeFabric:
    """Two ranks seen from one of them: broadcast hands out what rank 0 sent."""

    def __init__(self, rank: int, sent: object = None) -> None:
        self.global_rank, self.world_size, self.sent = rank, 2, sent

    def broadcast(self, obj: object, src: int = 0) -> object:
        return obj if self.global_rank == 0 else self.sent


def test_every_rank_learns_that_the_lock_was_refused(tmp_path):
    owner = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / lock.LOCK_NAME).write_text(json.dumps(live_owner(owner.pid)))
        with pytest.raises(lock.RunDirBusy) as rank0:
            lock.take(FakeFabric(0), tmp_path)
        with pytest.raises(lock.RunDirBusy, match=f"PID {owner.pid}"):  # rank 1 raises too instead of going on to a collective
            lock.take(FakeFabric(1, sent=str(rank0.value)), tmp_path)
        assert lock.take(FakeFabric(1, sent=None), tmp_path) is None  # rank 1 never touches the lock itself
    finally:
        owner.kill()
        owner.wait()


@pytest.mark.slow
def test_two_concurrent_trainings_into_one_run_dir(shards, tmp_path):
    from tests.train.test_train import start, wait_for_step

    run_dir = tmp_path / "run"
    first = start(shards, run_dir, "steps=400")
    try:
        wait_for_step(first, run_dir, 3)
        second = subprocess.run([sys.executable, "-m", "omnitrain.cli", *cli(shards, run_dir, "steps=400")],
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert second.returncode == 1 and f"PID {first.pid}" in error_line(second.stderr)
        steps = [r["step"] for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())]
        assert steps == sorted(set(steps))  # one writer: no step logged twice
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


# ----------------------------------------------------------------------------- disk full, read-only, not a directory
def test_disk_full_while_saving_a_checkpoint_is_one_line_leaves_no_tmp_and_the_next_start_resumes(shards, finished, tmp_path,
                                                                                                     monkeypatch, capsys):  # fmt: skip
    run_dir = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step_000000004.tmp" in str(f):  # the rank file, after Fabric wrote the state into the .tmp folder
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(cli(shards, run_dir)) == 1
    line = error_line(capsys.readouterr().err)
    assert "cannot write checkpoint step 4" in line and "step_000000004.tmp" in line and "disk is full" in line
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_000000002"]  # no .tmp left, step 2 intact
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    assert main(cli(shards, run_dir)) == 0
    assert losses(run_dir) == losses(finished)


def test_disk_full_during_the_model_export_is_one_line_and_removes_the_tmp(shards, tmp_path, monkeypatch, capsys):
    from omnitrain.train import loop

    def full_disk(model, out_dir, *args, **kwargs):
        tmp = Path(out_dir).with_name("model.tmp")
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)  # half-written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "save_model", full_disk)
    run_dir = tmp_path / "run"
    assert main(cli(shards, run_dir)) == 1
    line = error_line(capsys.readouterr().err)
    assert f"cannot write the model export at {run_dir / 'model'}" in line and "disk is full" in line
    assert not (run_dir / "model.tmp").exists() and not (run_dir / "model").exists()


def test_run_dir_under_a_regular_file_is_one_line(shards, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    assert main(cli(shards, tmp_path / "afile" / "run")) == 1
    line = error_line(capsys.readouterr().err)
    assert str(tmp_path / "afile") in line and "is a file, not a folder" in line


def test_a_read_only_run_dir_is_one_line(shards, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        try:
            (parent / "probe").write_text("x")  # root ignores the mode bits: nothing to test then
            pytest.skip("running as root: a read-only folder is writable")
        except PermissionError:
            pass
        assert main(cli(shards, parent / "run")) == 1
        line = error_line(capsys.readouterr().err)
        assert str(parent / "run") in line and "no permission to write there" in line
    finally:
        parent.chmod(0o755)


def test_a_metrics_line_cut_short_by_a_full_disk_does_not_stop_the_next_start(shards, finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # the write that ran out of space
    run(shards, run_dir, "steps=6")
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- a world-size change on resume
@pytest.mark.slow
def test_a_change_of_world_size_on_resume_is_logged_and_recorded_with_the_new_global_batch(shards, tmp_path):
    launcher_vars = ("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    run_dir = tmp_path / "run"
    two = subprocess.run([sys.executable, "-m", "omnitrain.cli", *cli(shards, run_dir, "steps=2", "strategy=ddp",
                          "strategy.devices=2", "strategy.accelerator=cpu")], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "omnitrain.cli", *cli(shards, run_dir, "grad_accum=2")], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert ("world size changed on resume: step 2 was saved by 2 ranks, this run has 1; the global batch is now "
            "4 x 2 x 1 x 128 = 1,024 tokens per step") in one.stdout and "was 1,024" in one.stdout
    attempt = json.loads((run_dir / "run.json").read_text())["attempts"][-1]
    assert attempt["world_size"] == 1
    assert attempt["world_size_changed"] == {"from": 2, "to": 1, "step": 2, "global_batch_tokens": 1024, "was": 1024}


# ----------------------------------------------------------------------------- the minor row
def test_keep_last_negative_is_refused_and_zero_keeps_every_checkpoint(shards, tmp_path, capsys):
    assert main(cli(shards, tmp_path / "r", "keep_last=-1")) == 2
    assert "keep_last=-1" in capsys.readouterr().err
    run(shards, tmp_path / "all", "steps=6", "keep_last=0")
    assert len(checkpoint.complete_checkpoints(tmp_path / "all")) == 3


def test_a_missing_data_path_names_omnitrain_data_build(shards, tmp_path, capsys):
    args = [*cli(shards, tmp_path / "r"), "~data.sources", "+data.sources={x:{path:/no/such/shards}}"]
    assert main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert "data.sources.x.path=/no/such/shards" in line and "omnitrain data build" in line and "tokenizer layout" not in line


def test_eval_of_a_run_without_model_export_says_so_and_not_gguf(finished, tmp_path):
    from omnitrain.eval.harness import ModelSpec, load_system

    run_dir = copy_run(finished, tmp_path / "run")
    import shutil

    shutil.rmtree(run_dir / "model")
    with pytest.raises(FileNotFoundError) as err:
        load_system(ModelSpec(path=str(run_dir)))
    assert "without its model/ export" in str(err.value) and "GGUF" not in str(err.value)


def test_the_hash_of_a_file_is_sha256sum(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(os.urandom(3 * (8 << 20) + 5))  # more than one read chunk
    import hashlib

    assert checkpoint.sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- a second stop signal (item 5)
LONG_STEP = """
import sys, torch
from omnitrain.train.preemption import Preemption
from omnitrain.train.hardstop import watch_second_signal
torch.set_num_threads(1)
Preemption.install()  # the first TERM only asks for a save at the end of the step
watch_second_signal()
a = torch.randn(6000, 6000)
print("in the step", flush=True)
for _ in range(1000):
    a @ a  # ~10 s each on one core: a step that does not end soon
"""


def test_a_second_sigterm_ends_a_long_step_at_once():
    proc = subprocess.Popen([sys.executable, "-c", LONG_STEP], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "in the step"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # the first one waits for the end of the step (to save there)
        t = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.perf_counter() - t < 5  # inside one matmul: not after it
        assert "second stop signal (SIGTERM): exiting at once" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_the_second_signal_watch_is_undone_after_training(shards, tmp_path):
    before = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before)
    run(shards, tmp_path / "run", "steps=1", "ckpt_every=1")
    after = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(after)
    assert after == before


@pytest.mark.slow
def test_a_damaged_fsdp_shard_file_is_found_by_two_ranks_and_resume_falls_back(shards, tmp_path):
    """FSDP2 writes one distributed-checkpoint file per rank under state/: each is listed, hashed by one of the ranks,
    and verified on resume; a flipped bit in one makes both ranks fall back together (no rank left waiting)."""
    launcher_vars = ("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher_vars)}
    run_dir = tmp_path / "run"
    fsdp = ("strategy=fsdp", "strategy.devices=2", "strategy.accelerator=cpu")

    def train_2_ranks(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "omnitrain.cli", *cli(shards, run_dir, *fsdp, *extra)], env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    first = train_2_ranks("steps=2", "ckpt_every=1")
    assert first.returncode == 0, first.stderr[-3000:]
    newest = checkpoint.step_dir(run_dir, 2)
    files = json.loads((newest / "meta.json").read_text())["files"]
    shard_files = sorted(n for n in files if n.endswith(".distcp"))
    assert len(shard_files) == 2 and "rank_00001.pt" in files  # one file per rank, all listed
    data = bytearray((newest / shard_files[1]).read_bytes())
    data[len(data) // 2] ^= 0x01
    (newest / shard_files[1]).write_bytes(bytes(data))
    again = train_2_ranks("steps=3", "ckpt_every=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"checkpoint step_000000002 is damaged: {newest / shard_files[1]} fails its checksum" in again.stdout
    assert json.loads((run_dir / "run.json").read_text())["attempts"][-1]["start_step"] == 1


@pytest.mark.parametrize(("field", "value", "reason"), [("devices", 0, "strategy.devices=0: the processes"),
                                                        ("devices", -2, "strategy.devices=-2: the processes"),
                                                        ("num_nodes", 0, "strategy.num_nodes=0: the number of nodes")])  # fmt: skip
def test_a_device_or_node_count_of_zero_gets_its_own_reason(field, value, reason):
    """Before: strategy.devices=0 was told "strategy=single runs one process" (the wrong reason)."""
    from omnitrain.train.strategy import StrategyConfig

    for name in ("single", "ddp"):
        with pytest.raises(ValueError, match=reason):
            StrategyConfig(name=name, **{field: value})


def test_a_sequence_length_that_cannot_fit_is_refused_before_step_0(shards, tmp_path, capsys):
    """Before: data.seq_len=100000000 never finished step 0 (4.2 GB RSS after 20 min). Now omnitrain plan's memory
    model refuses it before anything is allocated, in one line."""
    assert main(cli(shards, tmp_path / "run", "data.seq_len=100000000")) != 0
    line = error_line(capsys.readouterr().err)
    assert "a training step needs about" in line and "lower data.seq_len" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_fresh_start_in_a_used_run_dir_keeps_no_row_of_the_earlier_run(shards, tmp_path):
    """Before: resume=never (or resume=auto killed before its first checkpoint) appended to the old metrics.jsonl, so
    readers mixed steps of two runs (read_metrics keeps the last row of each step: the old run's other steps stayed)."""
    run(shards, tmp_path / "run", "steps=6", "log_every=3")
    run(shards, tmp_path / "run", "resume=never", "steps=4", "log_every=2")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2, 4]
