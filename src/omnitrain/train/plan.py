"""``omnitrain plan``: will this training job start and fit, and how fast will it go? Answered on a login node,
in seconds, before the queue wait (issue 20).

    omnitrain plan experiment=pretrain cluster.nodes=4 cluster.gpus_per_node=8 cluster.gpu=h100

It prints, per GPU: the memory of parameters, gradients, optimizer state, activations (with and without
activation checkpointing), the fused loss and the communication buffers, for the strategy and precision of
the config; FLOPs and tokens per step, step time and tokens/s at an assumed MFU; per data source, shards
against readers and whether every path exists. It exits non-zero, with one line per reason, when the job
cannot start (missing data, layout or vocabulary mismatch, too few shards) or will not fit in GPU memory.

Nothing is built and no process group is started: parameter counts, FLOPs and memory are arithmetic over
the config (``param_counts`` is tested against the model's own count).

The arithmetic (parameters, FLOPs, the memory model, what the audio layouts add) is ``omnitrain.train.cost``'s.
Audio layouts (``model.audio_layout``, issue 23): the plan also says how many positions an audio frame takes and,
with ``audio_frame_rate`` (or the frame rate of the omnitrain codec the shards record), how many an audio second
takes, and the share of positions that are frames (from the manifests' tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnitrain.model.transformer import ModelConfig
from omnitrain.train.cost import (  # noqa: F401 (the arithmetic, re-exported: plan.memory, plan.flops_per_token, ...)
    AudioShape,
    block_bytes_per_token,
    depth_config,
    depth_params,
    flops_per_token,
    memory,
    param_counts,
)
from omnitrain.train.loop import TrainConfig
from omnitrain.train.strategy import DEVICE_NAMES, GPU, GPUS, StrategyConfig, gpu_of  # noqa: F401 (the GPU table, re-exported)
from omnitrain.train.strategy import gpu_peak_flops as peak_flops

GiB = 1024**3
CUDA_RESERVE = 2 * GiB  # CUDA context, NCCL, allocator fragmentation (not modelled; not checked on CPU)
DEFAULT_VOCAB = 65_536  # the plan's vocabulary when the data's layout.json cannot be read


@dataclass
class ClusterConfig:
    nodes: int = 0  # 0: strategy.num_nodes
    gpus_per_node: int = 0  # 0: strategy.devices
    gpu: str = "h100"  # a key of omnitrain.train.plan.GPUS
    mfu: float = 0.40  # assumed model FLOPs utilisation, for step time and tokens/s

    def __post_init__(self) -> None:
        if self.gpu not in GPUS:
            raise ValueError(f"cluster.gpu={self.gpu!r} is not known; choose one of {', '.join(GPUS)}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"cluster.mfu={self.mfu} must be in (0, 1], e.g. 0.40")
        if self.nodes < 0 or self.gpus_per_node < 0:
            raise ValueError("cluster.nodes and cluster.gpus_per_node must be >= 1 (0: take them from strategy)")


@dataclass
class PlanConfig(TrainConfig):
    """``omnitrain plan``: a training config plus the cluster it is planned for."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    audio_frame_rate: float = 0.0  # the codec's frames per second (e.g. 12.5 for Mimi), for positions per audio second
    # (0: the omnitrain codec the shards' manifest records, if it is one)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.audio_frame_rate < 0:
            raise ValueError(f"audio_frame_rate={self.audio_frame_rate}: the audio codec's frames per second (e.g. 12.5), or 0")


# ----------------------------------------------------------------------------- data
def check_data(cfg: TrainConfig, world: int) -> tuple[list[str], list[str], Any]:
    """(report lines, problems, the data's TokenLayout or None): the token layout, and per source its manifest
    and how its shards split over the readers (``omnitrain.data.loader.readers_report``), and its shard files."""
    from omnitrain.data.loader import readers_report
    from omnitrain.data.shards import read_manifest
    from omnitrain.tokenizer.layout import TokenLayout

    lines, problems, layout = [], [], None
    if not cfg.data.sources:
        return lines, ["no training data: set data.sources (see recipes/data/)"], None
    first = Path(next(iter(cfg.data.sources.values())).path)
    try:
        layout = TokenLayout.load(first, expect_hash=cfg.data.layout_hash)
        vocab = layout.vocab_size
        if cfg.model.vocab_size not in (0, vocab):
            problems.append(f"model.vocab_size={cfg.model.vocab_size} but the data's layout ({first}/layout.json) has {vocab} ids: "
                            "drop model.vocab_size")  # fmt: skip
    except (OSError, ValueError) as e:
        problems.append(f"token layout: {e}")
    for row in readers_report(cfg.data, world):
        name, path, spec = row["source"], Path(row["path"]), cfg.data.sources[row["source"]]
        if "shards" not in row:  # no readable manifest
            what = "does not exist" if not path.exists() else row["problem"]
            problems.append(f"source '{name}': {path} {what}" + (" (build it with `omnitrain data build`, or fix "
                            f"data.sources.{name}.path)" if not path.exists() else ""))  # fmt: skip
            lines.append(f"  {name:<20} MISSING  {path} {what}")
            continue
        where = "remote, not checked"
        if spec.url is None:
            try:
                read_manifest(path, check_files=True)
                where = "ok"
            except (FileNotFoundError, ValueError) as e:
                where = "shards missing"
                problems.append(f"source '{name}': {e}")
        if not row["ok"]:
            problems.append(f"source '{name}': {row['problem']}")
        share = f"{row['shards']} shards / {row['readers']} readers" + (f" ({row['readers_per_shard']} per shard)" if row["readers_per_shard"] > 1 else "")
        lines.append(f"  {name:<20} {share:<38} {row['samples']:>12,} samples  {where}")
    if cfg.data.audio_layout not in ("flat", cfg.model.audio_layout):  # (training's resolve refuses it too)
        problems.append(f"data.audio_layout={cfg.data.audio_layout} but model.audio_layout={cfg.model.audio_layout}: drop "
                        "data.audio_layout (it follows the model)")  # fmt: skip
    return lines, problems, layout


def frame_share(cfg: TrainConfig, levels: int) -> float | None:
    """The share of a grouped layout's positions whose target is an audio frame, estimated from the manifests' flat
    token counts per modality (audio tokens / K frames; the sources mixed by weight, or by ``data.modality_shares``);
    None when no manifest reads."""
    from omnitrain.data.shards import read_manifest

    shares = {}  # modality -> share of the flat tokens
    if cfg.data.modality_shares:
        shares = dict(cfg.data.modality_shares)
    else:
        for spec in cfg.data.sources.values():
            try:
                tokens = read_manifest(Path(spec.path), check_files=False)["tokens"]
            except (OSError, ValueError, KeyError):
                continue
            total = sum(tokens.values()) or 1
            for m, n in tokens.items():
                shares[m] = shares.get(m, 0.0) + spec.weight * n / total
    total = sum(shares.values())
    if not total:
        return None
    audio = shares.get("audio", 0.0) / total
    frames = audio / max(levels, 1)  # per flat token of the mix: K audio tokens make one frame position
    return frames / (1.0 - audio + frames)


# ----------------------------------------------------------------------------- the plan
def _gb(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def plan(cfg: PlanConfig, data_checks: bool = True) -> dict[str, Any]:
    """Print the plan of ``cfg``; returns it. Raises ValueError (one line per reason) when the job cannot start
    or will not fit. ``data_checks=False``: what this host cannot see of the data (paths only mounted on the compute
    nodes) is printed as unchecked instead of refusing the job."""
    cl, st = cfg.cluster, cfg.strategy
    nodes, per_node = cl.nodes or st.num_nodes, cl.gpus_per_node or st.devices
    if per_node < 1:
        raise ValueError("cluster.gpus_per_node is needed when strategy.devices is -1 (every GPU of the node)")
    world = nodes * per_node
    if st.name == "single" and world > 1:
        raise ValueError(f"strategy=single runs one process, the cluster has {world} GPUs: choose strategy=ddp, fsdp or deepspeed")
    if st.name == "fsdp" and world % st.hsdp_replicas:
        raise ValueError(f"strategy.hsdp_replicas={st.hsdp_replicas} does not divide {world} GPUs")
    readers = world * max(cfg.data.workers, 1)
    data_lines, problems, layout = check_data(cfg, world)
    vocab = layout.vocab_size if layout is not None else None
    unchecked, problems = (problems, []) if not data_checks else ([], problems)
    model = cfg.model
    assumed = ""
    if not model.vocab_size:
        assumed = "" if vocab else " assumed: no readable layout.json"
        model = ModelConfig(**{**model.__dict__, "vocab_size": vocab or DEFAULT_VOCAB})
    audio, audio_line = plan_audio(cfg, layout)
    on_gpu = st.accelerator != "cpu"
    B, T = cfg.data.batch_size, cfg.data.seq_len
    worst = AudioShape(audio.levels, audio.codes, 1.0) if audio is not None else None  # memory: a row can be all frames
    mem = memory(model, st, world, B, T, cfg.grad_accum, "cuda" if on_gpu else "cpu", worst)
    P, _ = param_counts(model)

    # throughput
    fpt = flops_per_token(model, T, audio)
    tokens = world * cfg.grad_accum * B * T
    flops = fpt * tokens
    peak = peak_flops(cl.gpu, st.precision)
    step_s = flops / (world * peak * cl.mfu)

    p = print
    p(f"omnitrain plan: {nodes} node(s) x {per_node} {cl.gpu} = {world} GPUs, strategy {st.name}"
      + (f" (ZeRO-{st.zero_stage}{', optimizer offloaded' if st.offload_optimizer else ''})" if st.name == "deepspeed" else "")
      + (f" (HSDP {st.hsdp_replicas} replicas)" if st.name == "fsdp" and st.hsdp_replicas > 1 else "")
      + f", precision {st.precision}")  # fmt: skip
    if (nodes, per_node) != (st.num_nodes, st.devices):
        p(f"  note: the config says strategy.num_nodes={st.num_nodes}, strategy.devices={st.devices}; planned for the cluster's {nodes} x {per_node}")
    p(f"model: {P / 1e6:,.1f}M params (dim {model.dim}, {model.n_layers} layers, vocab {model.vocab_size:,}{assumed}"
      + (f"; depth transformer {depth_params(model) / 1e6:,.1f}M" if model.audio_layout == "depth" else "")
      + f"), activation checkpointing {'on' if model.activation_checkpointing else 'off'}")  # fmt: skip
    if audio_line:
        p(audio_line)
    p(f"memory per GPU (micro-batch {B} x {T} tokens):")
    rows = [("parameters", "params"), ("gradients", "grads"), ("optimizer (AdamW)", "optimizer"), ("activations", "activations"),
            ("backward working set", "backward_working"), ("loss (chunk + grads)", "loss"), ("communication buffers", "comm")]  # fmt: skip
    if model.audio_layout != "flat":
        rows.append(("audio levels", "audio"))  # (depth: every position taken for a frame, said on the audio line)
    for label, key in rows:
        p(f"  {label:<24}{_gb(mem[key])}")
    ac_other = "without" if model.activation_checkpointing else "with"
    p(f"  {'peak estimate':<24}{_gb(mem['peak'])}   (activations {ac_other} checkpointing: {mem['activations_other'] / GiB:.2f} GiB)")
    if "cpu_optimizer" in mem:
        p(f"  host memory per node for the offloaded optimizer: {mem['cpu_optimizer'] * per_node / GiB:.1f} GiB")
    if on_gpu:
        budget = GPUS[cl.gpu].memory_gb * 1e9
        reserve = CUDA_RESERVE
        p(f"  {cl.gpu} memory {budget / GiB:.1f} GiB: {'fits' if mem['peak'] + reserve <= budget else 'DOES NOT FIT'} "
          f"({(mem['peak'] + reserve) / budget:.0%} with {reserve / GiB:.0f} GiB for the CUDA context and allocator)")
        if mem["peak"] + reserve > budget:
            hint = "turn on model.activation_checkpointing, " if not model.activation_checkpointing else ""
            problems.append(f"needs {(mem['peak'] + reserve) / GiB:.1f} GiB per GPU, a {cl.gpu} has {budget / GiB:.1f} GiB: {hint}"
                            "lower data.batch_size (raise grad_accum), or shard more (strategy=fsdp / deepspeed zero_stage=3)")  # fmt: skip
    else:
        p("  (strategy.accelerator=cpu: no GPU memory check)")
    unit = "token" if model.audio_layout == "flat" else "position"
    p(f"throughput: {tokens:,} {unit}s/step ({world} x {cfg.grad_accum} x {B} x {T}), {fpt / 1e9:.2f} GFLOP/{unit}, "
      f"{flops / 1e15:,.1f} PFLOP/step")  # fmt: skip
    p(f"  at MFU {cl.mfu:.0%} of {peak / 1e12:.0f} TFLOP/s ({cl.gpu}, {'tf32' if st.precision == '32-true' else 'bf16'} dense): "
      f"{step_s:.2f} s/step, {tokens / step_s:,.0f} {unit}s/s, {cfg.steps:,} steps in {cfg.steps * step_s / 3600:.1f} h")  # fmt: skip
    p(f"data: {len(cfg.data.sources)} source(s), {readers} readers ({world} ranks x {max(cfg.data.workers, 1)} workers)")
    for line in data_lines:
        p(line)
    result = {"world": world, "memory": mem, "tokens_per_step": tokens, "step_seconds": step_s, "problems": problems}
    for reason in unchecked:
        p(f"NOT CHECKED (data_checks=false): {reason}")
    if problems:
        for reason in problems:
            p(f"CANNOT START: {reason}")
        raise ValueError(f"the job cannot start or will not fit ({len(problems)} reason(s) above)")
    p("plan ok: the job can start and fits")
    return result


def plan_audio(cfg: PlanConfig, layout: Any) -> tuple[AudioShape | None, str]:
    """(the ``AudioShape`` of a grouped layout, None for flat; the plan's line on audio positions, "" without audio).
    Without a readable layout.json a grouped layout is planned for Mimi's K=8 levels of 2,048 codes."""
    al = cfg.model.audio_layout
    if layout is None and al == "flat":
        return None, ""
    fr, codec = (cfg.audio_frame_rate, "") if cfg.audio_frame_rate else recorded_frame_rate(cfg)
    K, C = (layout.audio_levels, layout.audio_codebook_size) if layout is not None else (8, 2048)
    if not K:
        if al == "flat":
            return None, ""
        raise ValueError(f"model.audio_layout={al} groups the audio levels of a frame, but the data's token layout has no audio: "
                         "use model.audio_layout=flat")  # fmt: skip
    share = frame_share(cfg, K) if layout is not None and al != "flat" else None
    shape = AudioShape(K, C, 1.0 if share is None else share)
    line = f"audio: K={K} levels x {C:,} codes{'' if layout is not None else ' (assumed: no layout.json)'}; " \
           f"model.audio_layout={al}: {shape.per_frame(al)}"  # fmt: skip
    if fr:
        per_second = fr * (K if al == "flat" else 1)
        line += f", {per_second:g} positions per audio second at {fr:g} frames/s{codec}" + (f" (flat: {fr * K:g})" if al != "flat" else "")
    if al == "flat":
        return None, line
    line += f"; {shape.frame_share:.0%} of positions are frames ({'from the manifests' if share is not None else 'assumed'}" \
            + ("; memory: all of them" if al == "depth" else "") + ")"
    if fr:
        line += f", {cfg.data.seq_len * shape.frame_share / fr:,.1f} audio seconds per row of {cfg.data.seq_len:,} positions"
    return shape, line


def recorded_frame_rate(cfg: TrainConfig) -> tuple[float, str]:
    """(frames per second, " (the codec's, <path>)") of the audio codec the first readable manifest records, when it
    is an omnitrain codec checkpoint (``omnitrain tokenizer train-audio``); (0.0, "") otherwise (e.g. a pretrained
    codec through an adapter: pass ``audio_frame_rate``)."""
    import json
    import pickle

    import torch

    from omnitrain.config import from_dict
    from omnitrain.tokenizer.audio import AudioCodecConfig

    for spec in cfg.data.sources.values():
        try:
            path = json.loads((Path(spec.path) / "manifest.json").read_text())["config"]["tokenizers"]["audio"]
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the weights stay on disk
            return float(from_dict(AudioCodecConfig, blob["config"]).frame_rate), f" (the codec's, {path})"
        except (OSError, KeyError, TypeError, ValueError, RuntimeError, pickle.UnpicklingError):  # not one: try the next
            continue
    return 0.0, ""


def available_bytes(device: Any, local_processes: int) -> float:
    """Memory one training process may use: the GPU's total minus ``CUDA_RESERVE`` bytes (context, allocator), or on
    CPU this host's MemAvailable shared by its ``local_processes``."""
    import torch  # (plan itself runs on a login node without touching a device)

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory - CUDA_RESERVE
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kb * 1024 / max(local_processes, 1)


def refuse_if_too_big(cfg: TrainConfig, world: int, device: Any, local_processes: int, layout: Any = None) -> None:
    """Before any memory is allocated (``train.build.build_run``): refuse a step that the plan's memory model says
    cannot fit (e.g. ``data.seq_len=100000000``, which would never finish step 0), in one line with what to change.
    ``layout``: the data's TokenLayout (a grouped audio layout's levels count, every position taken for a frame)."""
    audio = None
    if cfg.model.audio_layout != "flat" and layout is not None:
        audio = AudioShape(layout.audio_levels, layout.audio_codebook_size, 1.0)
    need = memory(cfg.model, cfg.strategy, world, cfg.data.batch_size, cfg.data.seq_len, cfg.grad_accum,
                  "cuda" if device.type == "cuda" else "cpu", audio)["peak"]  # fmt: skip
    have = available_bytes(device, local_processes)
    if need > have:
        raise ValueError(f"a training step needs about {_gb(need).strip()} per process (omnitrain plan's estimate at data.seq_len="
                         f"{cfg.data.seq_len}, data.batch_size={cfg.data.batch_size}), {_gb(have).strip()} are available on "
                         f"{device.type}: lower data.seq_len or data.batch_size, set model.activation_checkpointing=true, or "
                         "shard with strategy=fsdp (run `omnitrain plan` with the same overrides for the breakdown)")  # fmt: skip
