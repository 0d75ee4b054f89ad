"""Parallelism for the training loop: Fabric from a ``StrategyConfig``, and :class:`Strategy`, the adapter
that holds everything single device, DDP, FSDP (FSDP2 ``fully_shard``) and DeepSpeed ZeRO 1/2/3 do differently.

Parallelism is applied from outside the model (torchtitan's rule): ``model.py`` knows nothing of it, and
``train.py`` calls :class:`Strategy` the same way for every strategy.

* ``ddp``: Fabric's DDPStrategy (NCCL on GPUs, gloo on CPU).
* ``fsdp``: Fabric's ModelParallelStrategy with a ``parallelize_fn`` (``fsdp_parallelize``) that shards with
  FSDP2 ``fully_shard`` in torchtitan's units: every transformer block, the embedding, the head (norm +
  output), then the root; bf16 parameters with fp32 gradient reduction under bf16 precision (the current FSDP;
  Fabric's FSDPStrategy is FSDP1 and refuses CPU). Checkpoints are distributed (one file per rank).

``compile=True`` (``Strategy.setup``) compiles each transformer block in place (``compile_blocks``), in
torchtitan's order: the activation-checkpoint wrapper (the model's ``checkpoint`` around each block call),
then ``torch.compile`` per block with ``fullgraph=True``, then ``fully_shard``. Compiling the whole model
before Fabric shards it (the former way) captured none of the blocks under FSDP2 + checkpointing (issue 19).
* ``deepspeed``: Fabric's DeepSpeedStrategy with ``zero_stage`` 1, 2 or 3 on GPUs, with one fix:
  ``optimizer.step()`` steps the DeepSpeedEngine, which owns gradient accumulation, clipping and the
  gradient norm (see ``EngineStepDeepSpeedStrategy``). On CPU it is ``CPUDeepSpeedStrategy``, which
  exists **only to verify the ZeRO code path on CPU** (tests, this 2-core machine): stock Fabric
  refuses a CPU accelerator, DeepSpeed itself runs ZeRO over gloo.
* Every strategy is checked against a single process (same global batch, same losses) and for exact
  resume by ``tests/train/test_distributed.py``.

Launching: under ``srun`` / ``torchrun`` the processes exist already and Fabric reads their
environment (Slurm needs ``--ntasks-per-node``); otherwise ``devices > 1`` makes Fabric start the
other local processes itself (it re-runs the command line).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

from omnitrain.train.optim import OptimConfig, build_optimizer


@dataclass
class StrategyConfig:
    name: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int = 1  # processes (GPUs) per node; -1: every GPU of the node
    num_nodes: int = 1
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    zero_stage: int = 2  # deepspeed: 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed: optimizer state in CPU memory, stepped there by DeepSpeedCPUAdam (ZeRO-Offload)
    overlap_comm: bool = True  # deepspeed ZeRO 2/3: reduce gradient buckets while backward runs (see deepspeed_config)
    bucket_size: int = 200_000_000  # deepspeed: elements per gradient-reduce / parameter all-gather bucket
    reshard_after_forward: bool = True  # fsdp: ZeRO-3 style (True) or keep parameters gathered until backward (ZeRO-2 style)
    fsdp_sync_each_microbatch: bool = True  # fsdp: reduce-scatter every micro-batch's gradients (False: hold them unsharded until the last)
    hsdp_replicas: int = 1  # fsdp: > 1 is HSDP: ranks split into this many replicas, each sharding within itself (a node)

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"strategy.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.bucket_size <= 0:
            raise ValueError(f"strategy.bucket_size must be a positive number of elements, got {self.bucket_size}")
        if self.devices == 0 or self.devices < -1:
            raise ValueError(f"strategy.devices={self.devices}: the processes (GPUs) per node, >= 1, or -1 for every GPU of the node")
        if self.num_nodes < 1:
            raise ValueError(f"strategy.num_nodes={self.num_nodes}: the number of nodes, >= 1")
        if self.hsdp_replicas < 1:
            raise ValueError(f"strategy.hsdp_replicas must be >= 1 (1: plain FSDP), got {self.hsdp_replicas}")
        if self.name == "single" and (self.devices != 1 or self.num_nodes != 1):
            raise ValueError("strategy=single runs one process: set strategy=ddp (or fsdp, deepspeed) for devices/num_nodes > 1")


class Strategy:
    """The adapter between the training loop and the engine: one interface, whatever ``cfg.name`` is.

    Per optimizer step the loop calls, for every strategy::

        for each micro-batch:
            with strategy.accumulating(last=...):
                strategy.backward(loss(..., denom=count / strategy.loss_scale))
        grad_norm = strategy.clip_gradients()
        strategy.optimizer_step(apply=finite)       # a non-finite step is skipped where strategy.can_skip

    What differs underneath:

    =========  ===================================  ============================  =============================
    strategy   micro-batches                        clip_gradients                optimizer_step
    =========  ===================================  ============================  =============================
    single     plain backward                       Fabric's (norm before clip)   step, zero_grad
    ddp        no gradient all-reduce but the last  Fabric's                      step, zero_grad
    fsdp       reduce-scatter every micro-batch     Fabric's (a DTensor norm)     step, zero_grad
               (``fsdp_sync_each_microbatch``; off:
               no reduce-scatter but the last); the
               optimizer holds the shards
    deepspeed  the engine accumulates; every        the engine's norm (it         nothing: the engine stepped at
               backward is an engine micro-step     clipped inside its step)      the last micro-batch, so a
                                                                                  non-finite step cannot be skipped
    =========  ===================================  ============================  =============================
    """

    def __init__(self, cfg: StrategyConfig, grad_clip: float, grad_accum: int) -> None:
        self.cfg, self.grad_clip, self.grad_accum = cfg, grad_clip, grad_accum
        self._materialise: Callable[[torch.nn.Module, torch.device], None] | None = None  # setup(materialise=...)
        self.fabric = make_fabric(cfg, grad_clip=grad_clip, grad_accum=grad_accum, after_sharding=self._after_sharding)
        # DeepSpeed's engine owns accumulation, clipping and the update: it steps inside backward()
        self.engine_steps = cfg.name == "deepspeed"
        self.can_skip = not self.engine_steps  # the update of a non-finite step has happened when its norm is known
        self.model: Any = None
        self.optimizer: Any = None

    def launch(self) -> None:
        """Start (or join) the processes; every rank returns from here."""
        self.fabric.launch()

    def setup(self, model: torch.nn.Module, optim_cfg: OptimConfig, compile: bool = False,
              materialise: Callable[[torch.nn.Module, torch.device], None] | None = None) -> tuple[Any, Any]:  # fmt: skip
        """(model, optimizer) wrapped by Fabric, the model sharded (FSDP) or inside a DeepSpeedEngine; with
        ``compile``, every transformer block compiled first (``compile_blocks``, so before ``fully_shard``).

        ``materialise(model, device)`` (FSDP only): ``model`` is on the meta device, and is given its storage and
        weights right after ``fully_shard``, so that each rank allocates only its shards (torchtitan's order:
        meta init, parallelise, ``to_empty``, ``init_weights``); ``omnitrain.model.weights`` does it.

        The optimizer is built from the parameters where they will step, so that AdamW is torch's fused one on
        CUDA: single / DDP / FSDP set the model up first (moved to its device; FSDP2 also shards it, and the
        optimizer must hold the shards), DeepSpeed takes model and optimizer at once, so the device is told."""
        if self.fabric.device.type == "cuda":
            allow_tf32()
        if materialise is not None and self.cfg.name != "fsdp":
            raise ValueError(f"a meta-device model is materialised after FSDP2 sharding: strategy={self.cfg.name} takes a built model")
        self._materialise = materialise
        if compile:
            compile_blocks(model)
        if self.cfg.name == "deepspeed":
            optimizer = build_optimizer(model, optim_cfg, device=self.fabric.device, cpu_offload=self.cfg.offload_optimizer)
            self.model, self.optimizer = self.fabric.setup(model, optimizer)
        else:
            self.model = self.fabric.setup_module(model)
            self.optimizer = self.fabric.setup_optimizers(build_optimizer(self.model.module, optim_cfg))
        return self.model, self.optimizer

    @property
    def loss_scale(self) -> float:
        """The factor each micro-batch's loss carries so that the engine's gradient averaging undoes it: the
        data-parallel size (every strategy averages over ranks), times grad_accum for DeepSpeed (it also
        divides by the accumulation steps). The loop divides its loss normaliser by it."""
        return self.fabric.world_size * (self.grad_accum if self.engine_steps else 1)

    @contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are synchronised on the ``last`` only."""
        # DeepSpeed accumulates by itself (and Fabric warns on every no_backward_sync call for it, even a disabled one).
        # FSDP2 by default reduce-scatters every micro-batch into the sharded gradients: skipping the sync would hold
        # every unsharded fp32 gradient until the last micro-batch (~4 bytes x all parameters per rank: +28 GB at 7B)
        sync_anyway = self.engine_steps or (self.cfg.name == "fsdp" and self.cfg.fsdp_sync_each_microbatch)
        sync = nullcontext() if sync_anyway else self.fabric.no_backward_sync(self.model, enabled=not last)
        with sync:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.fabric.backward(loss)
        if self.engine_steps:
            self.optimizer.step()  # DeepSpeed counts micro-steps and really steps (and clips) at the last one

    def _after_sharding(self, model: torch.nn.Module, device: torch.device) -> None:
        """Called by ``fsdp_parallelize`` once the model is sharded: materialise it there (``setup(materialise=...)``)."""
        if self._materialise is not None:
            self._materialise(model, device)
            self._materialise = None

    def clip_gradients(self) -> float | torch.Tensor:
        """The global gradient norm before clipping, after clipping the gradients to ``grad_clip`` (0: no clipping): a
        0-d tensor left on the device (read with the step's finiteness, or at log steps), DeepSpeed: the engine's number."""
        if self.engine_steps:  # clipped inside the engine's step already
            return float(_engine(self.model).get_global_grad_norm() or 0.0)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = self.fabric.clip_gradients(self.model, self.optimizer, max_norm=max_norm, error_if_nonfinite=False)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor

    def optimizer_step(self, apply: bool) -> None:
        """Update the weights (``apply=False``: drop this step's gradients instead) and clear the gradients."""
        if self.engine_steps:
            return  # done at the last micro-batch's backward
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def unwrap(self) -> Any:
        """The ``Transformer`` inside the Fabric / DeepSpeed / torch.compile wrappers (sharded under FSDP)."""
        inner = getattr(self.model, "module", self.model)  # _FabricModule -> the module or the DeepSpeedEngine
        inner = getattr(inner, "module", inner)  # DeepSpeedEngine.module
        return getattr(inner, "_orig_mod", inner)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded model weights on rank 0 (None elsewhere), for the consolidated export. A collective:
        every rank calls it."""
        rank0 = self.fabric.global_rank == 0
        inner = getattr(self.model, "module", self.model)  # _FabricModule -> the module (or the DeepSpeed engine)
        if self.cfg.name == "fsdp":
            # torch.distributed.checkpoint: ~0.5 s to import, FSDP only
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return sd if rank0 else None
        if self.cfg.name == "deepspeed":
            import deepspeed  # logs on import: DeepSpeed runs only

            engine_module = getattr(inner, "module", inner)
            with deepspeed.zero.GatheredParameters(list(engine_module.parameters()), modifier_rank=None):  # ZeRO-3: gather; 1/2: no-op
                return {k: v.detach().float().cpu().clone() for k, v in engine_module.state_dict().items()} if rank0 else None
        inner = getattr(inner, "_orig_mod", inner)
        return {k: v.detach().cpu() for k, v in inner.state_dict().items()} if rank0 else None


def _engine(model: Any) -> Any:
    """The DeepSpeedEngine inside Fabric's module wrapper."""
    return getattr(model, "_forward_module", model)


def allow_tf32() -> None:
    """TF32 tensor cores for the fp32 matmuls and convolutions on CUDA (Ampere and newer): what stays fp32
    under bf16-mixed (and all of 32-true) runs at ~8x the fp32 peak with a 10-bit mantissa, as in
    torchtitan and nanoGPT. Called by ``Strategy.setup`` (the training start) on CUDA only: CPU matmuls
    are left alone (``torch.set_float32_matmul_precision`` would switch oneDNN's fp32 matmuls too)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def on_gpu(cfg: StrategyConfig) -> bool:
    return cfg.accelerator == "cuda" or (cfg.accelerator == "auto" and torch.cuda.is_available())


def make_fabric(cfg: StrategyConfig, grad_clip: float = 0.0, grad_accum: int = 1,
                after_sharding: Callable[[torch.nn.Module, torch.device], None] | None = None) -> Any:  # fmt: skip
    """A launched-ready Fabric for ``cfg`` (call ``fabric.launch()`` next); ``after_sharding``: see ``fsdp_parallelize``."""
    # lightning: ~3 s; train.loop (TrainConfig) imports this module without a Fabric
    from lightning.fabric import Fabric

    gpu = on_gpu(cfg)
    accelerator = "cuda" if gpu else "cpu"
    if cfg.precision != "32-true" and not gpu and cfg.precision == "16-mixed":
        raise ValueError("precision=16-mixed needs a GPU; on CPU use 32-true, bf16-mixed or bf16-true")
    if cfg.precision.startswith("bf16") and gpu and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16: use precision=16-mixed or 32-true")
    backend = None if gpu else "gloo"
    if cfg.name == "single":
        strategy: Any = "auto"
    elif cfg.name == "ddp":
        from lightning.fabric.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend=backend)
    elif cfg.name == "fsdp":
        from lightning.fabric.strategies import ModelParallelStrategy

        # every process is one data-parallel shard ("auto" would mean one per node, the rest tensor parallel)
        world = (cfg.devices if cfg.devices > 0 else torch.cuda.device_count()) * cfg.num_nodes
        strategy = ModelParallelStrategy(parallelize_fn=fsdp_parallelize(cfg, after_sharding), data_parallel_size=world, tensor_parallel_size=1,
                                         process_group_backend=backend)  # fmt: skip
    else:
        strategy = _deepspeed(cfg, gpu, grad_clip, grad_accum)
    return Fabric(accelerator=accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=strategy, precision=cfg.precision)


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``: the parameter names keep no
    ``_orig_mod.`` prefix, so checkpoints and exports are unchanged), with ``fullgraph=True``: a graph break
    inside a block is an error, not a silent slowdown. The blocks share their code, so one graph serves them
    all. Everything outside the blocks (embedding, mask, norm, fused loss) stays eager, as in torchtitan."""
    for layer in model.layers:
        layer.compile(fullgraph=True)


def fsdp_parallelize(cfg: StrategyConfig, after_sharding: Callable[[torch.nn.Module, torch.device], None] | None = None) -> Any:
    """The ``parallelize_fn`` of Fabric's ModelParallelStrategy: ``(model, device_mesh) -> model`` sharded with
    FSDP2 in torchtitan's units (``torchtitan/models/llama3/infra/parallelize.py``, ``apply_fsdp``):

    * each transformer block: only one block's weights are gathered at a time;
    * the embedding (``tok_embeddings``), then the head (``norm`` + ``output``, one unit, not resharded after
      forward: backward needs it at once), then the root, which holds what is left (the buffers);
    * tied embeddings (``tok_embeddings.weight is output.weight``): one parameter can belong to one unit only,
      so embedding and head stay in the root unit, gathered once per step (the root is not resharded after
      forward either). torchtitan's Llama is untied; its Qwen3 / MuP parallelisers tie the weights after
      sharding instead (their docstrings), which a model that ties in ``__init__`` cannot do.

    HSDP (``hsdp_replicas`` > 1): a 2D mesh (replicate, shard), see ``hsdp_mesh``.

    Mixed precision: under ``bf16-mixed`` / ``bf16-true`` the units all-gather bf16 parameters and
    reduce-scatter gradients in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, as
    torchtitan); the sharded parameters and the optimizer stay in the module's dtype. Otherwise all fp32.

    ``after_sharding(model, device)`` runs last: a model built on the meta device gets its storage and weights
    there, each rank only its shards (``Strategy.setup(materialise=...)``); Fabric then finds nothing left
    on the meta device to materialise."""

    def parallelize(model: torch.nn.Module, device_mesh: Any) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # ~0.4 s: FSDP only

        bf16 = cfg.precision.startswith("bf16")
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        mesh, reshard = hsdp_mesh(device_mesh["data_parallel"], cfg.hsdp_replicas), cfg.reshard_after_forward
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
        if model.output.weight is not model.tok_embeddings.weight:
            fully_shard(model.tok_embeddings, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
            fully_shard([model.norm, model.output], mesh=mesh, reshard_after_forward=False, mp_policy=mp_policy)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
        if after_sharding is not None:
            cuda = device_mesh.device_type == "cuda"
            after_sharding(model, torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu"))
        return model

    return parallelize


def hsdp_mesh(data_parallel: Any, replicas: int) -> Any:
    """The FSDP2 mesh: ``data_parallel`` itself (1D: shard over every rank) for ``replicas`` 1; otherwise a 2D mesh
    (replicate, shard) of shape (replicas, world / replicas), so ``fully_shard`` runs HSDP: parameters sharded
    within groups of consecutive ranks (a node when world / replicas is the node's GPU count: launchers number
    a node's ranks consecutively), gradients reduce-scattered there and all-reduced across the replicas."""
    if replicas == 1:
        return data_parallel
    from torch.distributed.device_mesh import init_device_mesh  # FSDP only, like fully_shard

    world = data_parallel.size()
    if world % replicas:
        raise ValueError(f"strategy.hsdp_replicas={replicas} does not divide the {world} data-parallel ranks: "
                         "use a divisor, typically num_nodes (one replica per node)")  # fmt: skip
    return init_device_mesh(data_parallel.device_type, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))


def deepspeed_config(cfg: StrategyConfig, grad_clip: float, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed config of ``cfg``.

    ``overlap_comm`` (ZeRO 2/3) reduces each full gradient bucket on a side stream while backward goes on,
    instead of all of them after it; ZeRO-1 keeps its gradients whole until the step, so nothing overlaps.
    Buckets hold ``bucket_size`` elements (reduce, all-gather, ZeRO-3 prefetch). 2e8 is Lightning's
    DeepSpeedStrategy default (with overlap_comm on); DeepSpeed's own is 5e8, but with overlap_comm
    the buckets take ~4.5 x 2 x size x 2 bytes (Hugging Face's DeepSpeed guide): 9 GB at 5e8, 3.6 GB at 2e8.
    On CPU (gloo) the side stream is a no-op stream and the same code path runs in order: the distributed
    parity tests run it."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "contiguous_gradients": True,
                            "overlap_comm": cfg.overlap_comm and cfg.zero_stage >= 2,
                            "reduce_bucket_size": cfg.bucket_size}  # fmt: skip
    if cfg.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = cfg.bucket_size
    else:
        zero["allgather_bucket_size"] = cfg.bucket_size
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "gradient_clipping": grad_clip,  # DeepSpeed clips inside its step (Fabric's clip_gradients refuses DeepSpeed)
        "train_micro_batch_size_per_gpu": 1,  # Fabric feeds batches itself; the value only matters for DeepSpeed's logging
        "gradient_accumulation_steps": grad_accum,
        "zero_allow_untested_optimizer": True,  # torch's AdamW (fused on CUDA): DeepSpeed's FusedAdam needs a build
        "bf16": {"enabled": cfg.precision.startswith("bf16")},
        "fp16": {"enabled": cfg.precision == "16-mixed"},
    }


def _deepspeed(cfg: StrategyConfig, gpu: bool, grad_clip: float, grad_accum: int) -> Any:
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks its accelerator (on first use)
    # deepspeed on use: it picks its accelerator and logs as it is imported (after DS_ACCELERATOR, above); ~0.2 s
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:  # pragma: no cover - deepspeed is a core dependency
        raise ImportError("strategy=deepspeed needs `pip install deepspeed`") from e
    engine_step_strategy, cpu_strategy = _deepspeed_classes()
    config = deepspeed_config(cfg, grad_clip, grad_accum)
    return engine_step_strategy(config=config) if gpu else cpu_strategy(config=config, process_group_backend="gloo")


def _deepspeed_classes() -> tuple[type, type]:
    """Fabric's DeepSpeedStrategy with its optimizer step fixed, and a CPU variant of that (pinned: lightning 2.6)."""
    from lightning.fabric.strategies import DDPStrategy, DeepSpeedStrategy  # lightning: ~3 s, see make_fabric

    class EngineStepDeepSpeedStrategy(DeepSpeedStrategy):
        def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
            # Fabric's optimizer.step() should call DeepSpeedEngine.step() (count micro-batches; at the accumulation
            # boundary reduce, clip, step, record the gradient norm), but lightning 2.6 only does so when the engine
            # passes its Optimizable check, which DeepSpeed 0.19's engine fails (no param_groups): Fabric then steps the
            # ZeRO optimizer directly, on every micro-batch, and grad_accum > 1 crashes in the ZeRO optimizer.
            assert not kwargs, f"DeepSpeedEngine.step takes no closure, got {list(kwargs)}"
            return self.model.step()

    class CPUDeepSpeedStrategy(EngineStepDeepSpeedStrategy):
        """For verifying the ZeRO code path on CPU only: DeepSpeed runs ZeRO over gloo, stock Fabric refuses a CPU."""

        def setup_environment(self) -> None:
            DDPStrategy.setup_environment(self)  # skip DeepSpeedStrategy's "only supported on CUDA GPUs"

        def _setup_distributed(self) -> None:
            self._set_world_ranks()
            self._init_deepspeed_distributed()
            if not self._config_initialized:
                self._format_config()
                self._config_initialized = True

        @property
        def root_device(self) -> torch.device:
            return torch.device("cpu")

        def _initialize_engine(self, model: torch.nn.Module, optimizer: Any = None, scheduler: Any = None) -> tuple[Any, Any, Any]:
            import deepspeed  # see _deepspeed

            # Fabric passes root_device.index as DeepSpeed's device rank: None for "cpu", which DeepSpeed cannot compare
            engine, optimizer, _, scheduler = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
                lr_scheduler=scheduler, dist_init_required=False)  # fmt: skip
            return engine, optimizer, scheduler

    return EngineStepDeepSpeedStrategy, CPUDeepSpeedStrategy


@dataclass(frozen=True)
class GPU:
    memory_gb: float  # usable device memory, GB (1e9 bytes, as vendors state it)
    bf16_tflops: float  # dense bf16 / fp16 tensor-core peak; TF32 is half of it, fp32 without tensor cores ~1/16


# The one table of GPU peaks (MFU in training, omnitrain plan, benchmarks/bench_gpu.py): dense, no sparsity, datasheets
GPUS: dict[str, GPU] = {
    "h100": GPU(80, 989), "h100-pcie": GPU(80, 756), "h100-nvl": GPU(94, 835), "h200": GPU(141, 989),
    "b200": GPU(180, 2250), "a100": GPU(80, 312), "a100-40gb": GPU(40, 312), "l40s": GPU(48, 362),
    "a10g": GPU(24, 70), "l4": GPU(24, 121), "v100": GPU(32, 125),
}  # fmt: skip
# torch.cuda.get_device_name(...) substrings -> GPUS key, most specific first ("NVIDIA H100 PCIe" before "H100")
DEVICE_NAMES = [("H100 PCIe", "h100-pcie"), ("H100 NVL", "h100-nvl"), ("H100", "h100"), ("H200", "h200"), ("B200", "b200"),
                ("A100-SXM4-40GB", "a100-40gb"), ("A100-PCIE-40GB", "a100-40gb"), ("A100", "a100"), ("L40S", "l40s"),
                ("A10G", "a10g"), ("L4", "l4"), ("V100", "v100")]  # fmt: skip


def gpu_of(device_name: str) -> str | None:
    """The ``GPUS`` key of a CUDA device name (``torch.cuda.get_device_name``), None if unknown."""
    return next((key for sub, key in DEVICE_NAMES if sub in device_name), None)


def gpu_peak_flops(gpu: str, precision: str) -> float:
    """Dense peak FLOP/s of one GPU for ``precision``: bf16/fp16 tensor cores, or TF32 (half of that) for
    ``32-true``, since training allows TF32 on CUDA (``allow_tf32``). A V100 has no bf16 and no TF32: its
    figure is the fp16 tensor-core peak, which only ``16-mixed`` reaches."""
    tflops = GPUS[gpu].bf16_tflops
    if gpu == "v100" and precision != "16-mixed":
        return 15.7e12  # fp32 CUDA cores
    return (tflops / 2 if precision == "32-true" else tflops) * 1e12


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of one device for MFU (None when unknown, e.g. CPU: then only achieved FLOP/s is logged)."""
    if device.type != "cuda":
        return None
    gpu = gpu_of(torch.cuda.get_device_name(device))
    return gpu_peak_flops(gpu, precision) if gpu else None
