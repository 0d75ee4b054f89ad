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

The memory model, per GPU (P parameters, S shards, N = batch x seq_len tokens of one micro-batch):

* parameters / gradients / AdamW's two moments in their dtypes (fp32, or bf16 for ``bf16-true``; DeepSpeed
  keeps bf16 weights and gradients and an fp32 master copy with the moments: 2 + 2 + 12 bytes per parameter),
  divided by S where the strategy shards them (FSDP2: all three; ZeRO 1: optimizer, 2: + gradients, 3: + weights);
* activations: what each block saves for backward (``block_bytes_per_token``: the residual stream, the norms'
  inputs and outputs, q/k/v, the attention output, SwiGLU's four [N, F] tensors), times the layers; with
  activation checkpointing only each block's input, plus one block recomputed during backward;
* the loss (``omnitrain.model.loss``): one chunk of logits (fp32 logits and log-softmax, 8 x rows x V bytes,
  rows from the same byte budget ``chunk_rows`` uses), the fp32 [V, D] output gradient and the [N, D] hidden
  gradient it computes in forward;
* communication: DDP's gradient buckets (a second copy of the gradients); FSDP2's all-gather of a block
  (and the next, prefetched) in the compute dtype, the head's gathered weight and a block's fp32
  reduce-scatter; DeepSpeed's reduce / all-gather buckets of ``bucket_size`` elements (x 4.5 with ``overlap_comm``).

Checked against measured peak memory on CPU (``tests/train/test_plan.py``): single, DDP and FSDP within 25 %.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnitrain.model.loss import chunk_rows
from omnitrain.model.transformer import ModelConfig
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


# ----------------------------------------------------------------------------- memory
def param_counts(model: ModelConfig) -> tuple[int, int]:
    """(all parameters, one block's) of ``Transformer(model)``, by arithmetic (tests hold it equal to the model's count)."""
    D, F, hd, V = model.dim, model.hidden_dim, model.head_dim, model.vocab_size
    Dkv = model.kv_heads * hd
    block = 2 * D * D + 2 * D * Dkv + 3 * D * F + 2 * D + (2 * hd if model.qk_norm else 0)  # wq wo, wk wv, w1 w2 w3, norms
    return V * D * (1 if model.tie_embeddings else 2) + D + model.n_layers * block, block


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """``omnitrain.train.runlog.flops_per_token`` from the config: 6 x the matmul weights (the blocks, the final
    norm and the V x D output projection, tied or not) + 12 L D T."""
    P, _ = param_counts(model)
    matmul = P - model.vocab_size * model.dim * (1 if model.tie_embeddings else 2) + model.vocab_size * model.dim
    return 6.0 * matmul + 12.0 * model.n_layers * model.dim * seq_len


def _dtypes(strategy: StrategyConfig) -> tuple[int, int, bool]:
    """(compute bytes, residual-stream bytes, fused fp32 norms) of a step: under ``bf16-mixed`` single/DDP keep
    fp32 weights under autocast (an fp32 residual stream), FSDP2 and DeepSpeed compute with bf16 weights."""
    if strategy.precision == "32-true":
        return 4, 4, True
    low_weights = strategy.precision == "bf16-true" or strategy.name in ("fsdp", "deepspeed")
    return 2, (2 if low_weights else 4), not low_weights


def block_bytes_per_token(model: ModelConfig, strategy: StrategyConfig, device: str) -> float:
    """Bytes one transformer block saves for backward per token (see the module docstring)."""
    c, r, fused = _dtypes(strategy)
    D, H, F = model.dim, model.n_heads, model.hidden_dim
    Dkv = model.kv_heads * model.head_dim
    norm = r if fused else 6  # fused fp32 rms_norm saves its input; otherwise the fp32 upcast and the normalised output
    kv = D if device == "cpu" and Dkv != D and model.attention != "flex" else Dkv  # CPU masked path repeats k/v per head
    out = 2 * norm * D + 2 * c * D  # the two norms, and their outputs (the inputs of wq/wk/wv and of w1/w3)
    out += c * (D + 2 * kv) + 2 * c * D + 4 * H  # q, k, v after RoPE; attention output and its copy (wo's input); lse
    out += 4 * c * F  # SwiGLU: w1(x), w3(x), silu(w1 x), the product (w2's input)
    if model.qk_norm:
        out += (4 if fused else 6) * (D + Dkv)
    return out


def memory(model: ModelConfig, strategy: StrategyConfig, world: int, batch: int, seq_len: int, grad_accum: int = 1,
           device: str = "cuda") -> dict[str, float]:  # fmt: skip
    """Bytes per GPU (``device="cpu"``: per process, the CPU code paths) by component; ``peak`` sums a step's."""
    P, P_block = param_counts(model)
    c, r, fused = _dtypes(strategy)
    N, V, D, L = batch * seq_len, model.vocab_size, model.dim, model.n_layers
    mixed = strategy.precision != "32-true"
    name, zero = strategy.name, strategy.zero_stage
    # weights, gradients, optimizer (bytes per parameter), then what the strategy shards
    if name == "deepspeed" and mixed:
        w, g, o = 2, 2, 12  # bf16 weights and gradients; fp32 master weights + two fp32 moments
    else:
        pb = 2 if strategy.precision == "bf16-true" else 4
        w, g, o = pb, pb, 2 * pb
    shards = {"single": 1, "ddp": 1, "fsdp": world // max(strategy.hsdp_replicas, 1)}.get(name, world)
    sw = shards if name == "fsdp" or (name == "deepspeed" and zero == 3) else 1
    sg = shards if name == "fsdp" or (name == "deepspeed" and zero >= 2) else 1
    so = shards if name in ("fsdp", "deepspeed") else 1
    out = {"params": P * w / sw, "grads": P * g / sg, "optimizer": 0.0 if strategy.offload_optimizer and name == "deepspeed" else P * o / so}
    if name == "fsdp" and not strategy.fsdp_sync_each_microbatch and grad_accum > 1:
        out["grads"] = P * 4  # unsharded fp32 gradients held until the last micro-batch
    # activations of one micro-batch
    per_layer = block_bytes_per_token(model, strategy, device) * N
    outside = N * D * (r if fused else 6) + 2 * N * model.head_dim * 4 * 2  # final norm; RoPE cos/sin [B, 1, T, Dh]
    if device == "cpu" or model.attention == "sdpa":
        outside += batch * seq_len * seq_len * c  # the additive document mask [B, 1, T, T]
    plain, checkpointed = L * per_layer + outside, L * N * D * r + per_layer + outside  # ckpt: block inputs + one recomputed
    out["activations"] = checkpointed if model.activation_checkpointing else plain
    out["activations_other"] = plain if model.activation_checkpointing else checkpointed  # the other setting, for comparison
    out["backward_working"] = per_layer  # the gradients of one block's activations while it is back-propagated
    # the fused loss: one chunk of logits, its gradients computed in forward, the low-precision copies
    rows = chunk_rows(N, V, device)
    # fp32 logits + log-softmax of a chunk; fp32 [V, D] and [N, D] gradients; in 16 bits a [V, D] copy (the weight cast
    # for the matmuls, or the gradient cast back) and, under autocast, the hidden states cast
    out["loss"] = 8 * rows * V + 4 * V * D + N * D * r + (2 * V * D if c == 2 else 0) + (2 * N * D if c == 2 and r == 4 else 0)
    # communication buffers
    if name == "ddp":
        out["comm"] = P * g  # DDP's gradient buckets: a flat copy of every gradient
    elif name == "fsdp":
        head = V * D * c  # the head (or the tied embedding) stays gathered through the loss
        # a block and the prefetched next one; without resharding after forward every block stays gathered until backward
        gathered = 2 * P_block * c if strategy.reshard_after_forward else L * P_block * c
        out["comm"] = gathered + head + P_block * 4  # + one block's fp32 gradients being reduce-scattered
    elif name == "deepspeed":
        elems = min(strategy.bucket_size, P)
        out["comm"] = (4.5 if strategy.overlap_comm and zero >= 2 else 1.0) * 2 * elems * (2 if mixed else 4)
    else:
        out["comm"] = 0.0
    out["peak"] = sum(out[k] for k in ("params", "grads", "optimizer", "activations", "backward_working", "loss", "comm"))
    if name == "deepspeed" and strategy.offload_optimizer:
        out["cpu_optimizer"] = P * (12 if mixed else 8) / shards + P * 4 / shards  # per rank, in host memory: + fp32 gradients
    return out


# ----------------------------------------------------------------------------- data
def check_data(cfg: TrainConfig, world: int) -> tuple[list[str], list[str], int | None]:
    """(report lines, problems, the layout's vocabulary or None): the token layout, and per source its manifest
    and how its shards split over the readers (``omnitrain.data.loader.readers_report``), and its shard files."""
    from omnitrain.data.loader import readers_report
    from omnitrain.data.shards import read_manifest
    from omnitrain.tokenizer.layout import TokenLayout

    lines, problems, vocab = [], [], None
    if not cfg.data.sources:
        return lines, ["no training data: set data.sources (see recipes/data/)"], None
    first = Path(next(iter(cfg.data.sources.values())).path)
    try:
        vocab = TokenLayout.load(first, expect_hash=cfg.data.layout_hash).vocab_size
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
    return lines, problems, vocab


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
    data_lines, problems, vocab = check_data(cfg, world)
    unchecked, problems = (problems, []) if not data_checks else ([], problems)
    model = cfg.model
    assumed = ""
    if not model.vocab_size:
        assumed = "" if vocab else " assumed: no readable layout.json"
        model = ModelConfig(**{**model.__dict__, "vocab_size": vocab or DEFAULT_VOCAB})
    on_gpu = st.accelerator != "cpu"
    B, T = cfg.data.batch_size, cfg.data.seq_len
    mem = memory(model, st, world, B, T, cfg.grad_accum, "cuda" if on_gpu else "cpu")
    P, _ = param_counts(model)

    # throughput
    fpt = flops_per_token(model, T)
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
    p(f"model: {P / 1e6:,.1f}M params (dim {model.dim}, {model.n_layers} layers, vocab {model.vocab_size:,}{assumed}), "
      f"activation checkpointing {'on' if model.activation_checkpointing else 'off'}")  # fmt: skip
    p(f"memory per GPU (micro-batch {B} x {T} tokens):")
    rows = [("parameters", "params"), ("gradients", "grads"), ("optimizer (AdamW)", "optimizer"), ("activations", "activations"),
            ("backward working set", "backward_working"), ("loss (chunk + grads)", "loss"), ("communication buffers", "comm")]  # fmt: skip
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
    p(f"throughput: {tokens:,} tokens/step ({world} x {cfg.grad_accum} x {B} x {T}), {fpt / 1e9:.2f} GFLOP/token, "
      f"{flops / 1e15:,.1f} PFLOP/step")  # fmt: skip
    p(f"  at MFU {cl.mfu:.0%} of {peak / 1e12:.0f} TFLOP/s ({cl.gpu}, {'tf32' if st.precision == '32-true' else 'bf16'} dense): "
      f"{step_s:.2f} s/step, {tokens / step_s:,.0f} tokens/s, {cfg.steps:,} steps in {cfg.steps * step_s / 3600:.1f} h")  # fmt: skip
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


def available_bytes(device: Any, local_processes: int) -> float:
    """Memory one training process may use: the GPU's total minus ``CUDA_RESERVE`` bytes (context, allocator), or on
    CPU this host's MemAvailable shared by its ``local_processes``."""
    import torch  # (plan itself runs on a login node without touching a device)

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory - CUDA_RESERVE
    with open("/proc/meminfo") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kb * 1024 / max(local_processes, 1)


def refuse_if_too_big(cfg: TrainConfig, world: int, device: Any, local_processes: int) -> None:
    """Before any memory is allocated (``train.build.build_run``): refuse a step that the plan's memory model says
    cannot fit (e.g. ``data.seq_len=100000000``, which would never finish step 0), in one line with what to change."""
    need = memory(cfg.model, cfg.strategy, world, cfg.data.batch_size, cfg.data.seq_len, cfg.grad_accum,
                  "cuda" if device.type == "cuda" else "cpu")["peak"]  # fmt: skip
    have = available_bytes(device, local_processes)
    if need > have:
        raise ValueError(f"a training step needs about {_gb(need).strip()} per process (omnitrain plan's estimate at data.seq_len="
                         f"{cfg.data.seq_len}, data.batch_size={cfg.data.batch_size}), {_gb(have).strip()} are available on "
                         f"{device.type}: lower data.seq_len or data.batch_size, set model.activation_checkpointing=true, or "
                         "shard with strategy=fsdp (run `omnitrain plan` with the same overrides for the breakdown)")  # fmt: skip
