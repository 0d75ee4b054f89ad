"""``omnitrain plan`` (issue 20, item 3): its parameter and FLOP arithmetic against the model, its data checks
and exit status, the CLI, and its memory model against peak memory measured on CPU.

Measuring on CPU. There is no allocator peak counter for CPU tensors, so a step is measured by the kernel:
the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before the
model was built. ``MALLOC_MMAP_THRESHOLD_=65536`` makes glibc map every tensor above 64 KiB on its own pages
and return them when freed, so the resident set follows the live tensors instead of glibc's caches. What the
number still includes besides tensors: the code of torch's kernels the first step pages in (a warm-up
step of a small model before the baseline takes most of it, ~100 MB), small allocations (autograd nodes, Python objects, < 64 KiB tensors),
oneDNN / OpenMP scratch, gloo's buffers: a few MB against a step of ~300-600 MB here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from omnitrain.cli import main
from omnitrain.data.loader import LoaderConfig, SourceSpec
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.train.plan import (
    GPUS,
    AudioShape,
    ClusterConfig,
    PlanConfig,
    depth_params,
    flops_per_token,
    gpu_of,
    memory,
    param_counts,
    peak_flops,
    plan,
)
from omnitrain.train.runlog import flops_per_token as model_flops_per_token
from omnitrain.train.strategy import StrategyConfig
from tests.synthetic import make_omni_sources

OMNITRAIN = [sys.executable, "-m", "omnitrain.cli"]


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, qk_norm=True, n_kv_heads=2), dict(dim=96, n_heads=6, ffn_dim=200)])
def test_parameter_and_flop_arithmetic_equal_the_models(kw):
    cfg = ModelConfig(vocab_size=1000, dim=kw.pop("dim", 64), n_layers=3, n_heads=kw.pop("n_heads", 4), **kw)
    model = Transformer(cfg)
    total, block = param_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters()) and block == sum(p.numel() for p in model.layers[0].parameters())
    assert flops_per_token(cfg, 256) == model_flops_per_token(model, 256)


@pytest.mark.parametrize("kw", [dict(audio_layout="delay"), dict(audio_layout="depth"),
                                dict(audio_layout="depth", depth_dim=32, depth_layers=3, qk_norm=True, n_kv_heads=2)])
def test_parameter_counts_include_the_depth_transformer_and_delay_adds_none(kw):
    cfg = ModelConfig(vocab_size=1000, dim=64, n_layers=3, n_heads=4, **kw)
    model = Transformer(cfg)
    assert param_counts(cfg)[0] == sum(p.numel() for p in model.parameters())
    assert depth_params(cfg) == (sum(p.numel() for p in model.depth.parameters()) if model.depth is not None else 0)


@pytest.mark.parametrize("audio_layout", ["flat", "delay", "depth"])
@torch.no_grad()
def test_flops_per_position_match_the_matmuls_a_training_step_runs(audio_layout, tmp_path):
    """torch's FlopCounterMode counts every matmul of a forward + backward on a real grouped batch (the level heads on
    every position, the depth transformer on the frames only; the loss's in-place ``addmm_`` counted as ``addmm``); it
    does not count CPU attention or norm weights, so the plan's attention terms are taken out and the norms' share
    (< 0.5 %) is the tolerance."""
    from torch.utils.flop_counter import FlopCounterMode

    from tests.model.test_audio_layouts import loader, make_speech_shards, speech_layout

    layout = speech_layout()
    batch = next(loader(make_speech_shards(tmp_path / "speech", layout), audio_layout, seq_len=64))
    cfg = ModelConfig(vocab_size=layout.vocab_size, dim=64, n_layers=2, n_heads=4, depth_dim=32, audio_layout=audio_layout)
    model = Transformer(cfg)
    model.set_modalities(layout.modality_of(np.arange(layout.vocab_size)))
    B, T = batch["targets"].shape[:2]
    frames = int((batch["targets"][..., 1] >= 0).sum()) if audio_layout != "flat" else 0
    addmm_ = {torch.ops.aten.addmm_: lambda c, a, b, out_shape=None, **kw: 2 * a[0] * a[1] * b[1]}  # the loss's in-place weight grad
    with torch.enable_grad(), FlopCounterMode(display=False, custom_mapping=addmm_) as counter:
        loss, _ = model(batch["input_ids"], batch["doc_ids"], batch["targets"], batch["loss_weights"])
        loss.backward()
    K, C, S = layout.audio_levels, layout.audio_codebook_size, layout.audio_levels - 1
    audio = AudioShape(K, C, frames / (B * T)) if audio_layout != "flat" else None
    attention = B * T * 12 * cfg.n_layers * cfg.dim * T + (frames * 12 * cfg.depth_layers * 32 * S * S if audio_layout == "depth" else 0)
    planned = B * T * flops_per_token(cfg, T, audio) - attention
    assert counter.get_total_flops() == pytest.approx(planned, rel=5e-3)
    if audio_layout != "flat":
        assert frames > 0.2 * B * T and planned > 1.01 * (B * T * flops_per_token(ModelConfig(**{**cfg.__dict__, "audio_layout": "flat"}), T)
                                                          - B * T * 12 * cfg.n_layers * cfg.dim * T)  # the levels' work is counted


def test_grouped_layouts_add_their_level_memory_and_plan_positions_per_audio_second(tmp_path, capsys):
    m = ModelConfig(vocab_size=32000, dim=1024, n_layers=8, n_heads=8)
    st = StrategyConfig(name="ddp", devices=8, precision="bf16-mixed")
    flat = memory(m, st, 8, 2, 1024)
    audio = AudioShape(8, 2048, 1.0)
    delay = memory(ModelConfig(**{**m.__dict__, "audio_layout": "delay"}), st, 8, 2, 1024, audio=audio)
    depth = memory(ModelConfig(**{**m.__dict__, "audio_layout": "depth"}), st, 8, 2, 1024, audio=audio)
    assert flat["audio"] == 0 and delay["audio"] == 7 * (2048 * 1024 * 4 + 2048 * 4 * 1024)  # 7 level losses: [N, D], [C, D]
    assert delay["peak"] == flat["peak"] + delay["audio"]
    assert depth["params"] > flat["params"] and depth["audio"] > delay["audio"]  # its weights, and 7 steps a frame
    half = memory(ModelConfig(**{**m.__dict__, "audio_layout": "depth"}), st, 8, 2, 1024, audio=AudioShape(8, 2048, 0.5))
    assert half["audio"] < depth["audio"]

    from tests.model.test_audio_layouts import make_speech_shards, speech_layout

    layout = speech_layout()
    make_speech_shards(tmp_path / "speech", layout)
    manifest = json.loads((tmp_path / "speech" / "manifest.json").read_text())["tokens"]
    frames = manifest["audio"] / 3
    for audio_layout, per_frame, per_second in [("flat", "3 positions per audio frame", "37.5 positions per audio second"),
                                                ("delay", "1 position per audio frame (+ 2 per clip", "12.5 positions per audio second"),
                                                ("depth", "1 position per audio frame", "12.5 positions per audio second")]:  # fmt: skip
        cfg = PlanConfig(model=ModelConfig(dim=64, n_layers=2, n_heads=4, audio_layout=audio_layout), audio_frame_rate=12.5,
                         data=LoaderConfig(sources={"speech": SourceSpec(str(tmp_path / "speech"))}, seq_len=256, batch_size=2,
                                           audio_layout=audio_layout), strategy=StrategyConfig(accelerator="cpu"))  # fmt: skip
        result = plan(cfg)
        out = capsys.readouterr().out
        assert f"audio: K=3 levels x 32 codes; model.audio_layout={audio_layout}: {per_frame}" in out and per_second in out
        assert ("GFLOP/token" in out) == (audio_layout == "flat") and ("audio levels" in out) == (audio_layout != "flat")
        if audio_layout != "flat":
            share = frames / (manifest["text"] + frames)
            assert f"{share:.0%} of positions are frames (from the manifests" in out and "(flat: 37.5)" in out
            assert result["memory"]["audio"] > 0
    assert "depth transformer 0.1M" in out  # (the last, depth)

    # audio_frame_rate=0: the frame rate of the omnitrain codec the manifest records (here 16 kHz / (4 x 5 x 8) = 100 Hz)
    from omnitrain.tokenizer.audio import AudioCodecConfig, RVQAudioCodec

    RVQAudioCodec(AudioCodecConfig(channels=4, latent_dim=8, n_levels=3, codebook_size=32)).save(tmp_path / "codec.pt")
    manifest_file = tmp_path / "speech" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "config": {"tokenizers": {"audio": str(tmp_path / "codec.pt")}}}))
    plan(PlanConfig(**{**cfg.__dict__, "audio_frame_rate": 0.0}))
    out = capsys.readouterr().out
    assert f"100 positions per audio second at 100 frames/s (the codec's, {tmp_path / 'codec.pt'}) (flat: 300)" in out


def test_the_gpu_table_knows_sxm_from_pcie_and_tf32_is_half_of_bf16():
    assert gpu_of("NVIDIA H100 80GB HBM3") == "h100" and gpu_of("NVIDIA H100 PCIe") == "h100-pcie" and gpu_of("Tesla T4") is None
    assert gpu_of("NVIDIA A100-SXM4-40GB") == "a100-40gb" and gpu_of("NVIDIA A100-SXM4-80GB") == "a100"
    assert peak_flops("h100", "bf16-mixed") == 989e12 and peak_flops("h100-pcie", "bf16-true") == 756e12
    assert peak_flops("a100", "32-true") == 156e12 and GPUS["h100"].memory_gb == 80
    with pytest.raises(ValueError, match="cluster.gpu='h1000' is not known; choose one of h100"):
        ClusterConfig(gpu="h1000")


def test_sharding_divides_what_each_strategy_shards():
    m = ModelConfig(vocab_size=32000, dim=1024, n_layers=8, n_heads=8)
    P, _ = param_counts(m)
    one = memory(m, StrategyConfig(name="ddp", devices=8, precision="bf16-mixed"), 8, 2, 1024)
    fsdp = memory(m, StrategyConfig(name="fsdp", devices=8, precision="bf16-mixed"), 8, 2, 1024)
    z1, z2, z3 = (memory(m, StrategyConfig(name="deepspeed", devices=8, precision="bf16-mixed", zero_stage=z), 8, 2, 1024) for z in (1, 2, 3))
    assert (one["params"], one["grads"], one["optimizer"]) == (4 * P, 4 * P, 8 * P)
    assert (fsdp["params"], fsdp["grads"], fsdp["optimizer"]) == (4 * P / 8, 4 * P / 8, 8 * P / 8)
    assert (z1["params"], z1["grads"], z1["optimizer"]) == (2 * P, 2 * P, 12 * P / 8)
    assert (z2["grads"], z3["params"]) == (2 * P / 8, 2 * P / 8)
    off = memory(m, StrategyConfig(name="deepspeed", devices=8, precision="bf16-mixed", offload_optimizer=True), 8, 2, 1024)
    assert off["optimizer"] == 0 and off["cpu_optimizer"] > 0
    ckpt = memory(ModelConfig(**{**m.__dict__, "activation_checkpointing": True}), StrategyConfig(name="fsdp", devices=8, precision="bf16-mixed"), 8, 2, 1024)
    assert ckpt["activations"] < fsdp["activations"] / 3 and ckpt["activations_other"] == fsdp["activations"]
    hsdp = memory(m, StrategyConfig(name="fsdp", devices=8, num_nodes=2, hsdp_replicas=2, precision="bf16-mixed"), 16, 2, 1024)
    assert hsdp["params"] == fsdp["params"]  # sharded within a replica of 8


def _plan(*overrides: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*OMNITRAIN, "plan", *overrides], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_plan_of_pretrain_prints_memory_and_throughput_and_fails_on_missing_data():
    res = _plan("experiment=pretrain", "cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.gpu=h100")
    assert res.returncode == 1
    out = res.stdout
    for text in ("4 node(s) x 8 h100 = 32 GPUs, strategy fsdp", "optimizer (AdamW)", "activations without checkpointing",
                 "loss (chunk + grads)", "communication buffers", "1,048,576 tokens/step", "at MFU 40% of 989 TFLOP/s",
                 "128 readers (32 ranks x 4 workers)", "web_text             MISSING  /data/shards/web_text does not exist",
                 "CANNOT START: source 'tts': /data/shards/tts does not exist"):  # fmt: skip
        assert text in out, text
    assert "the job cannot start or will not fit" in res.stderr and "Traceback" not in res.stderr


def test_plan_passes_on_ready_data_and_fails_when_the_job_will_not_fit(tmp_path):
    make_omni_sources(tmp_path / "src", n_shards=4)
    srcs = ["~data.sources", "+data.sources={text:{path:src/text},caption:{path:src/caption},speech:{path:src/speech}}"]
    ok = _plan(*srcs, "strategy=fsdp", "cluster.nodes=1", "cluster.gpus_per_node=2", "data.workers=2", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "plan ok" in ok.stdout and "text                 4 shards / 4 readers" in ok.stdout and "samples  ok" in ok.stdout and "fits" in ok.stdout
    big = _plan(*srcs, "model=7b", "strategy=ddp", "strategy.devices=8", "cluster.gpu=a100", cwd=tmp_path)
    assert big.returncode == 1 and "DOES NOT FIT" in big.stdout
    assert "CANNOT START: needs" in big.stdout and "a a100 has 74.5 GiB" in big.stdout
    vocab = _plan(*srcs, "+model.vocab_size=123", cwd=tmp_path)
    assert vocab.returncode == 1 and "CANNOT START: model.vocab_size=123 but the data's layout" in vocab.stdout


def test_plan_refuses_unknown_keys_and_gpus_before_any_work(capsys):
    assert main(["plan", "cluster.gpus=8"]) == 2
    assert "unknown config key 'cluster.gpus'. Did you mean 'gpu'?" in capsys.readouterr().err
    assert main(["plan", "cluster.gpu=h1000"]) == 2
    assert "cluster.gpu='h1000' is not known" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the memory model against CPU
MEASURED = dict(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, qk_norm=True, z_loss=1e-5, attention="sdpa")
BATCH, SEQ = 4, 512


def _kib(field: str) -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":")) * 1024


AUDIO = AudioShape(levels=8, codes=512, frame_share=1.0)  # the last 8 x 512 ids of MEASURED's vocabulary; every position a frame


def _grouped(ids: torch.Tensor) -> torch.Tensor:
    """[B, T] ids -> [B, T, K]: channel 0 the ids, channel l >= 1 a code of audio level l (every position a frame)."""
    base = MEASURED["vocab_size"] - AUDIO.levels * AUDIO.codes
    levels = [base + lvl * AUDIO.codes + ids % AUDIO.codes for lvl in range(1, AUDIO.levels)]
    return torch.stack([ids, *levels], dim=-1)


def _measure_rank(rank: int, world: int, port: int, strategy: str, out: str, audio_layout: str = "flat") -> None:
    import torch
    import torch.distributed as dist

    from omnitrain.train.optim import OptimConfig, build_optimizer
    from omnitrain.train.strategy import fsdp_parallelize

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    ids = torch.randint(0, MEASURED["vocab_size"], (BATCH, SEQ + 1))
    doc_ids = (torch.arange(SEQ)[None] // 200).expand(BATCH, SEQ).contiguous()  # packed rows: 3 documents each
    batch = (ids[:, :-1], doc_ids, ids[:, 1:], torch.ones(BATCH, SEQ))
    if audio_layout != "flat":  # delay / depth: [B, T, K] batches
        batch = (_grouped(ids[:, :-1]), doc_ids, _grouped(ids[:, 1:]), torch.ones(BATCH, SEQ, AUDIO.levels))
    warm = Transformer(ModelConfig(**{**MEASURED, "dim": 64, "vocab_size": 512}))  # pages in the code a step runs
    warm(ids[:, :-1] % 512, doc_ids, ids[:, 1:] % 512, torch.ones(BATCH, SEQ), 1.0)[0].backward()
    build_optimizer(warm, OptimConfig()).step()
    del warm
    base = _kib("VmRSS")  # everything before the model: interpreter, torch and its code, the process group
    model = Transformer(ModelConfig(**MEASURED, audio_layout=audio_layout))
    table = torch.zeros(MEASURED["vocab_size"], dtype=torch.long)
    table[-AUDIO.levels * AUDIO.codes :] = 2  # audio (the level heads' rows)
    model.set_modalities(table)
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)  # what Fabric's DDPStrategy wraps (default arguments)
    elif strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        fsdp_parallelize(StrategyConfig(name="fsdp", devices=world))(model, init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",)))
    inner = getattr(model, "module", model)
    optimizer = build_optimizer(inner, OptimConfig())

    def step() -> None:
        loss, _ = model(*batch, BATCH * SEQ * world)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # creates AdamW's moments
    state = _kib("VmRSS") - base
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    step()
    peak = _kib("VmHWM") - base
    if rank == 0:
        Path(out).write_text(json.dumps({"state": state, "peak": peak}))
    if world > 1:
        dist.destroy_process_group()


def measure(strategy: str, world: int, tmp_path: Path, audio_layout: str = "flat") -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"{strategy}.json"
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc as each spawned process starts
    try:
        mp.spawn(_measure_rank, args=(world, port, strategy, str(out), audio_layout), nprocs=world)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("strategy, world", [("single", 1), ("ddp", 2), ("fsdp", 2)])
def test_the_memory_model_is_within_25_percent_of_the_measured_cpu_peak(strategy, world, tmp_path):
    got = measure(strategy, world, tmp_path)
    plan = memory(ModelConfig(**MEASURED), StrategyConfig(name=strategy, devices=world), world, BATCH, SEQ, device="cpu")
    state = plan["params"] + plan["optimizer"] + (plan["comm"] if strategy == "ddp" else 0)
    row = {"strategy": strategy, "world": world, "measured_state_mb": got["state"] / 2**20, "planned_state_mb": state / 2**20,
           "measured_peak_mb": got["peak"] / 2**20, "planned_peak_mb": plan["peak"] / 2**20}  # fmt: skip
    print(json.dumps(row))
    assert abs(plan["peak"] / got["peak"] - 1) <= 0.25, row


@pytest.mark.slow
@pytest.mark.parametrize("audio_layout", ["delay", "depth"])
def test_the_memory_model_of_the_grouped_layouts_is_within_25_percent_of_the_measured_cpu_peak(audio_layout, tmp_path):
    """The level losses of delay and the depth transformer's activations (K-1 = 7 steps a frame, every position a
    frame) measured as the flat model is. Measured here (2 CPU threads, loaded machine): delay 385 MB against 392
    planned (its 7 level losses, 18 MB planned, barely show); depth 1,155 MB against 1,094, of which the 'audio' row
    is 692 MB: without it the estimate would be a third of the peak."""
    got = measure("single", 1, tmp_path, audio_layout)
    cfg = ModelConfig(**MEASURED, audio_layout=audio_layout)
    plan = memory(cfg, StrategyConfig(name="single"), 1, BATCH, SEQ, device="cpu", audio=AUDIO)
    row = {"audio_layout": audio_layout, "measured_peak_mb": got["peak"] / 2**20, "planned_peak_mb": plan["peak"] / 2**20,
           "planned_audio_mb": plan["audio"] / 2**20}  # fmt: skip
    print(json.dumps(row))
    assert abs(plan["peak"] / got["peak"] - 1) <= 0.25, row
