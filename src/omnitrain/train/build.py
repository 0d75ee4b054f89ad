"""Building a training run: the data's token layout (``resolve``), then on every rank the model (fresh, imported
from Hugging Face, or loaded; built on the meta device and materialised one parameter at a time, under FSDP2 after
sharding: ``omnitrain.model.weights``), its objective, the optimizer and the loaders (``build_run``).
``omnitrain.train.loop.train`` calls these before its loop."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from omnitrain.data.loader import OmniLoader
from omnitrain.model.transformer import Transformer
from omnitrain.model.weights import WeightSource, materialise, omnitrain_weights
from omnitrain.tokenizer.layout import TokenLayout
from omnitrain.train import checkpoint
from omnitrain.train.dpo import DPOObjective, make_preference_loader, precompute_reference
from omnitrain.train.objectives import LMObjective, Validation, hf_start, make_lm_loader
from omnitrain.train.runlog import flops_per_token
from omnitrain.train.strategy import Strategy, peak_flops

if TYPE_CHECKING:  # the loop imports this module
    from omnitrain.train.loop import TrainConfig


@dataclass
class Run:
    """What :func:`train` builds before its loop, on every rank."""

    cfg: TrainConfig  # resolved: the layout's vocabulary and hash; with hf_init, the imported architecture
    layout: TokenLayout
    strategy: Strategy
    model: Any  # as set up by the strategy (wrapped, maybe sharded)
    optimizer: Any
    objective: Any  # LMObjective | DPOObjective
    loader: OmniLoader
    validation: Validation
    resume_from: Path | None  # the checkpoint this attempt continues (None: a fresh start)
    new_rows_from: int  # hf_init: the first embedding row the layout added (the freeze warm-up trains rows >= it)
    n_params: int
    flops_per_token: float  # per processed token, of the whole model (counted before sharding; runlog.flops_per_token;
    # delay / depth: plan.flops_per_token, with depth's share of frame positions estimated from the manifests)
    peak_flops: float | None  # of one device, for MFU (None: unknown)
    notes: dict[str, Any] = field(default_factory=dict)  # set by resume(): more keys for this attempt in run.json

    @property
    def fabric(self) -> Any:
        return self.strategy.fabric


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, TokenLayout]:
    """A copy of ``cfg`` completed from the data, and the token layout (``layout.json`` beside the first
    source's shards): the layout decides the vocabulary size, and every shard must carry its hash."""
    if not cfg.data.sources:
        raise ValueError("no training data: set data.sources (see recipes/data/) to shard folders made by `omnitrain data build`")
    name, first = next((k, v.path) for k, v in cfg.data.sources.items())
    if not (Path(first) / "layout.json").is_file():  # (TokenLayout.load's advice is for tokenizer folders)
        raise FileNotFoundError(f"data.sources.{name}.path={first} is not a shard folder (no layout.json there): build the "
                                "shards with `omnitrain data build`, or fix the path")  # fmt: skip
    layout = TokenLayout.load(first, expect_hash=cfg.data.layout_hash)
    if cfg.model.vocab_size not in (0, layout.vocab_size):
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size}, but the token layout of the data ({first}/layout.json) has "
                         f"{layout.vocab_size} ids: drop model.vocab_size, training takes it from the layout")  # fmt: skip
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size, cfg.data.layout_hash = layout.vocab_size, layout.hash
    cfg.data.audio_layout = data_audio_layout(cfg)
    return cfg, layout


def data_audio_layout(cfg: TrainConfig) -> str:
    """The loader's audio layout: the model's (``model.audio_layout`` is the one switch; the recipes interpolate
    ``data.audio_layout: ${model.audio_layout}``, a config built in Python may leave the loader's default, flat).

    Raises:
        ValueError: ``data.audio_layout`` is set to a grouped layout other than the model's.
    """
    model, data = cfg.model.audio_layout, cfg.data.audio_layout
    if data not in ("flat", model):  # flat is LoaderConfig's default: a config that never set it follows the model
        raise ValueError(f"data.audio_layout={data} but model.audio_layout={model}: the loader must group audio as the model "
                         f"reads it. Drop data.audio_layout (it follows the model) or set model.audio_layout={data}")  # fmt: skip
    return model


def build_run(cfg: TrainConfig, layout: TokenLayout, strategy: Strategy) -> Run:
    """The model (fresh, imported from Hugging Face, or loaded), its objective, the optimizer and the loaders."""
    fabric = strategy.fabric
    fabric.seed_everything(cfg.seed)  # the same initial weights on every rank
    resume_from = checkpoint.choose(fabric, Path(cfg.run_dir), cfg.resume)  # verified; auto falls back past damaged ones
    if resume_from is not None:  # before anything is built: the checkpoint's audio layout is the run's
        checkpoint.check_audio_layout(resume_from, cfg.model.audio_layout)
    model, weights, new_rows_from = build_model(cfg, layout, resume_from)
    cfg = replace(cfg, model=model.cfg)  # hf_init: the run records the imported architecture
    from omnitrain.train.plan import refuse_if_too_big  # (plan imports the loop, which imports this module)

    refuse_if_too_big(cfg, fabric.world_size, fabric.device, fabric.world_size // max(cfg.strategy.num_nodes, 1), layout)
    modalities = layout.modality_of(torch.arange(layout.vocab_size).numpy())

    def give_weights(m: Transformer, device: torch.device) -> None:  # one full parameter at a time (model.weights)
        materialise(m, device, weights).set_modalities(modalities)

    later = sharded_init(cfg)
    if not later:  # the whole model on this process's CPU, as the strategy expects it
        give_weights(model, torch.device("cpu"))
    objective, make_loader = build_objective(cfg, model, layout, fabric)
    flops = flops_per_token(model, cfg.data.seq_len)  # before sharding: from the full parameter counts (meta too)
    if cfg.model.audio_layout != "flat":  # + the level heads / the depth transformer on the frames (plan's arithmetic)
        from omnitrain.train.cost import AudioShape
        from omnitrain.train.cost import flops_per_token as planned_flops
        from omnitrain.train.plan import frame_share

        share = frame_share(cfg, layout.audio_levels)  # of the positions, from the manifests (None: every one)
        audio = AudioShape(layout.audio_levels, layout.audio_codebook_size, 1.0 if share is None else share)
        flops = planned_flops(model.cfg, cfg.data.seq_len, audio)
    n_params = sum(p.numel() for p in model.parameters())
    # compile: per block, before sharding; sharded init: after fully_shard, each rank its own shards
    model, optimizer = strategy.setup(model, cfg.optim, compile=cfg.compile, materialise=give_weights if later else None)
    rank, world = fabric.global_rank, fabric.world_size
    loader: OmniLoader = make_loader(cfg.data, rank, world)
    validation = Validation(cfg.val, cfg.data, make_loader, rank, world, layout.hash)
    return Run(cfg, layout, strategy, model, optimizer, objective, loader, validation, resume_from, new_rows_from, n_params,
               flops, peak_flops(fabric.device, cfg.strategy.precision))  # fmt: skip


def build_model(cfg: TrainConfig, layout: TokenLayout, resume_from: Path | None) -> tuple[Transformer, WeightSource | None, int]:
    """(the model training starts from, on the meta device: shapes, no memory yet; the source of its weights,
    None for a fresh one; the first embedding row new to it: 0 unless imported with hf_init). ``build_run``
    materialises it (``omnitrain.model.weights``). When resuming, the checkpoint's weights replace these later."""
    model_cfg, weights, new_rows_from = cfg.model, None, 0
    if cfg.hf_init.path:  # continued pretraining: the LLM with its vocabulary grown to the layout's
        model_cfg, weights, new_rows_from = hf_start(cfg.hf_init, cfg.model, layout)
    if cfg.init_from and resume_from is None:
        init_cfg, weights = omnitrain_weights(cfg.init_from)
        if init_cfg.audio_layout != model_cfg.audio_layout:  # (delay has flat's weights: the config is the only record)
            raise ValueError(f"init_from={cfg.init_from} holds a model trained with model.audio_layout={init_cfg.audio_layout}, "
                             f"this run builds model.audio_layout={model_cfg.audio_layout}: set model.audio_layout="
                             f"{init_cfg.audio_layout} (the shards serve every layout), or start without init_from")  # fmt: skip
        if init_cfg != model_cfg:
            raise ValueError(f"init_from={cfg.init_from} holds a model with {init_cfg}, this run builds {model_cfg}: "
                             "choose the matching model= recipe or override its fields")  # fmt: skip
    return Transformer(model_cfg, device="meta"), weights, new_rows_from


def sharded_init(cfg: TrainConfig) -> bool:
    """Whether each rank materialises only its own shards, after FSDP2 has sharded the meta model (``init_device``)."""
    if cfg.init_device == "auto":
        return cfg.strategy.name == "fsdp" and cfg.objective == "lm"
    return cfg.init_device == "meta"


def build_objective(cfg: TrainConfig, model: Transformer, layout: TokenLayout, fabric: Any) -> tuple[Any, Callable[..., OmniLoader]]:
    """(objective, its loader factory ``(data, rank, world_size) -> loader``). DPO's frozen reference is the
    model as it starts, also when resuming: a copy run on every batch, or its scores precomputed once."""
    if cfg.objective == "lm":
        return LMObjective(), make_lm_loader
    reference, table = None, None
    if cfg.dpo.reference == "on_the_fly":
        reference = copy.deepcopy(model).eval().requires_grad_(False).to(fabric.device)
    else:
        ref_file = Path(cfg.dpo.reference_logps or Path(cfg.run_dir) / "reference_logps.json")
        pad = layout.specials["pad"]
        if fabric.global_rank == 0:
            precompute_reference(copy.deepcopy(model).to(fabric.device), cfg.data, pad, ref_file, fabric.device)
        fabric.barrier()
        table = precompute_reference(model, cfg.data, pad, ref_file, fabric.device)  # reads the file
    return DPOObjective(cfg.dpo, model.modality_table.to(fabric.device), reference), make_preference_loader(table)
