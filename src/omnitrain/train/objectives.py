"""Starting from a pretrained text LLM, and what the training loop computes: its objective and validation.

Continued pretraining (AnyGPT from LLaMA-2, SpeechGPT, Mini-Omni from Qwen2): import a Hugging Face
Llama-architecture checkpoint (:func:`init_from_hf`), grow its vocabulary to the layout's (the new
rows are the layout's specials, image and audio ids, appended after the LLM's own text ids, see
``omnitrain.tokenizer.hf_text``), optionally train only those new rows for ``freeze_warmup_steps``
(:func:`freeze_old_weights`), then everything, on an omni mixture that keeps a share of text.

Objectives. The loop in ``train.py`` is the same for every recipe; what it optimises is an
objective with three methods: ``count(batch)`` (what the step's loss is normalised by: weighted
target tokens for the LM loss, pairs for DPO), ``loss(model, batch, denom)`` -> (loss, a tensor of
additive sums, one per name of ``keys``) and ``summary(sums, count)`` -> the logged row. Sums are
additive so that micro-batches and ranks are summed before anything is divided.
:class:`LMObjective` is pretraining, continued pretraining and SFT (SFT differs only in its data:
loss weights 1 on assistant tokens, whole conversations per row); ``omnitrain.train.dpo`` has DPO.

Validation. ``val.sources`` are held-out shard sets; the same ``val.batches`` batches of each are
scored before training, every ``val.every`` steps and at the end, logged as ``val/<source>/...``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from omnitrain.data.loader import LoaderConfig, OmniLoader, SourceSpec
from omnitrain.model.io import resolve_path
from omnitrain.model.loss import LOSS_KEYS, level_metrics
from omnitrain.model.transformer import ModelConfig, Transformer
from omnitrain.model.weights import GrownVocabulary, WeightSource, hf_weights, materialise
from omnitrain.tokenizer.layout import MODALITIES, TokenLayout


@dataclass
class HFInitConfig:
    path: str | None = None  # a Hugging Face Llama folder, hub id, the folder holding gguf_file, or package:NAME (None: no import)
    gguf_file: str | None = None  # a GGUF file name inside path (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)
    seed: int = 0  # draws the new embedding rows


@dataclass
class ValConfig:
    sources: dict[str, SourceSpec] = field(default_factory=dict)  # held-out shard sets, scored one by one
    every: int = 0  # steps between evaluations (0: before training and at the end only)
    batches: int = 2  # batches per source (the same ones every time)


# ----------------------------------------------------------------------------- from a text LLM
# ModelConfig field -> the quantity of the architecture it decides (n_kv_heads None means n_heads; ffn_dim
# None means a size derived from dim and multiple_of), compared with the imported checkpoint's
_ARCHITECTURE = {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "n_kv_heads": "kv_heads", "ffn_dim": "hidden_dim",
                 "multiple_of": "hidden_dim", "norm_eps": "norm_eps", "rope_theta": "rope_theta",
                 "tie_embeddings": "tie_embeddings", "qk_norm": "qk_norm"}  # fmt: skip


def hf_start(cfg: HFInitConfig, model_cfg: ModelConfig, layout: TokenLayout) -> tuple[ModelConfig, WeightSource, int]:
    """(the architecture of the LLM with its vocabulary grown to ``layout.vocab_size``, its weights, the first new row).

    The architecture is the checkpoint's; the training options of ``model_cfg`` (z-loss, activation
    checkpointing, the attention backend) are kept. The weights are read one tensor at a time
    (``omnitrain.model.weights``), so that FSDP2 ranks materialise their shards without a full copy.

    Raises:
        ValueError: ``model_cfg`` sets an architecture field (away from ``ModelConfig``'s default, e.g. a
            ``model=1b`` recipe or ``model.dim=...``) that the checkpoint has otherwise: it would be dropped.
    """
    imported, weights = hf_weights(resolve_path(cfg.path), gguf_file=cfg.gguf_file)
    check_architecture(model_cfg, imported, f"hf_init.path={cfg.path}")
    n_text = imported.vocab_size
    if layout.text_vocab_size != n_text:
        raise ValueError(f"hf_init.path={cfg.path} has {n_text} token embeddings but the layout's text range has "
                         f"{layout.text_vocab_size} ids: build the layout and shards with the LLM's own tokenizer "
                         f"(tokenizers.text=<its folder or .gguf>) so that text ids keep their meaning")  # fmt: skip
    grown = replace(imported, vocab_size=layout.vocab_size, z_loss=model_cfg.z_loss, attention=model_cfg.attention,
                    activation_checkpointing=model_cfg.activation_checkpointing, audio_layout=model_cfg.audio_layout,
                    depth_layers=model_cfg.depth_layers, depth_dim=model_cfg.depth_dim)  # fmt: skip
    source: WeightSource = GrownVocabulary(weights, layout.vocab_size, cfg.seed)
    if grown.audio_layout == "depth":  # a text LLM has no depth transformer: it starts fresh
        source = FreshDepth(source, grown, cfg.seed)
    return grown, source, n_text


class FreshDepth:
    """``source`` with the depth transformer (``depth.*``, ``model.audio_layout=depth``) drawn fresh, as
    ``Transformer.init_weights`` draws it (N(0, init_std), the residual outputs scaled by 1/sqrt(2 n_layers), norms
    ones), from a generator seeded with ``seed``, in ``named_parameters`` order (the same on every rank)."""

    def __init__(self, source: WeightSource, cfg: ModelConfig, seed: int) -> None:
        from omnitrain.model.depth import DepthTransformer

        with torch.device("meta"):  # shapes only
            shapes = {f"depth.{n}": p.shape for n, p in DepthTransformer(cfg).named_parameters()}
        gen, std = torch.Generator().manual_seed(seed + 1), cfg.init_std  # (+1: not the grown rows' draws)
        self.source, self.fresh = source, {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                self.fresh[name] = torch.ones(shape)
            else:
                scale = 1 / math.sqrt(2 * cfg.n_layers) if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 1.0
                self.fresh[name] = torch.empty(shape).normal_(0.0, std * scale, generator=gen)

    def tensor(self, name: str) -> torch.Tensor:
        return self.fresh[name] if name in self.fresh else self.source.tensor(name)


def init_from_hf(cfg: HFInitConfig, model_cfg: ModelConfig, layout: TokenLayout) -> tuple[Transformer, int]:
    """``hf_start``'s model materialised on CPU, in training mode. Returns (model, first new row)."""
    grown, weights, n_text = hf_start(cfg, model_cfg, layout)
    return materialise(Transformer(grown, device="meta"), "cpu", weights).train(), n_text


def check_architecture(given: ModelConfig, imported: ModelConfig, source: str) -> None:
    """Refuse architecture settings the imported checkpoint overrides. A field counts as set when it differs
    from ``ModelConfig``'s default: ``model=hf`` sets none, a size recipe such as ``model=1b`` sets many."""
    blank = ModelConfig()
    conflicts = []
    for name, quantity in _ARCHITECTURE.items():
        if getattr(given, name) != getattr(blank, name) and getattr(given, quantity) != getattr(imported, quantity):
            conflicts.append(f"model.{name}={getattr(given, name)} (the checkpoint's {quantity}: {getattr(imported, quantity)})")
    if conflicts:
        raise ValueError(f"{source} brings its own architecture, which the model config contradicts: "
                         f"{', '.join(conflicts)}. These settings would be dropped: use model=hf (the checkpoint's "
                         "architecture; only model.z_loss, model.attention and model.activation_checkpointing apply) instead of a model "
                         "size recipe, and drop the model.* overrides")  # fmt: skip


@torch.no_grad()
def freeze_old_weights(model: Transformer, new_from: int) -> None:
    """Before the optimizer step of a warm-up step: only embedding / output rows >= ``new_from`` learn.

    The rows live in one matrix with the pretrained ones, so their gradients are masked (the new
    rows still see the gradient of the softmax over all ids); every other parameter drops its
    gradient, which AdamW then skips (no moment update, no weight decay)."""
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name in ("tok_embeddings.weight", "output.weight"):
            p.grad[:new_from] = 0
        else:
            p.grad = None


@contextmanager
def pretrained_rows_kept(model: Transformer, new_from: int) -> Iterator[None]:
    """Around the optimizer step of a warm-up step: the embedding / output rows below ``new_from`` come out
    as they went in, so that a weight decay on an untied output matrix cannot move them either."""
    mats = {id(m.weight): m.weight for m in (model.tok_embeddings, model.output)}
    kept = [(w, w.data[:new_from].clone()) for w in mats.values()]
    yield
    for weight, rows in kept:
        weight.data[:new_from] = rows


# ----------------------------------------------------------------------------- the LM objective
class LMObjective:
    """Next-token cross entropy weighted by ``loss_weights`` (pretraining, continued pretraining, SFT)."""

    # the model holds what the loss needs (its modality table, cfg.z_loss) and computes it in forward
    keys = LOSS_KEYS

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["loss_weights"].sum().float()

    def loss(self, model: Any, batch: dict[str, torch.Tensor], denom: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        # chunked output projection + CE inside the model: no [B, T, V] logits. A batch the loader found to hold one
        # document a row (``one_document``, a host-side bool) runs plain causal attention, without the document mask
        doc_ids = None if batch.get("one_document", False) else batch["doc_ids"]
        # frames: audio_layout=depth's frame rows, found on the host by the trainer (train.step.host_side; None: the model finds them)
        return model(batch["input_ids"], doc_ids, batch["targets"], batch["loss_weights"], denom, frames=batch.get("frames"))

    def summary(self, sums: torch.Tensor, count: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
        """(row: loss, loss/<modality>, acc/<modality>; tokens per modality)."""
        s = dict(zip(self.keys, sums.tolist(), strict=True))
        row = {"loss": (s["sum_weighted"] + s["sum_z"]) / float(count)}
        tokens = {m: int(s[f"tokens/{m}"]) for m in MODALITIES}
        for m in MODALITIES:
            if tokens[m]:
                row[f"loss/{m}"], row[f"acc/{m}"] = s[f"sum_loss/{m}"] / tokens[m], s[f"sum_correct/{m}"] / tokens[m]
        row.update(level_metrics(s))  # delay / depth audio layouts: loss, accuracy and targets per audio level
        return row, tokens


# ----------------------------------------------------------------------------- validation
class Validation:
    """Fixed held-out batches per source, scored with the training objective."""

    def __init__(self, cfg: ValConfig, data: LoaderConfig, make_loader: Any, rank: int, world_size: int, layout_hash: str) -> None:
        self.cfg, self.batches = cfg, {}
        for name, spec in cfg.sources.items():
            one = copy.deepcopy(data)  # held-out shards must be built under the training layout (checked)
            one.sources, one.modality_shares, one.workers, one.layout_hash = {name: spec}, None, 0, layout_hash
            loader = make_loader(one, rank, world_size)
            self.batches[name] = [next(loader) for _ in range(cfg.batches)]
            loader.close()

    def due(self, step: int, last: bool) -> bool:
        return bool(self.batches) and (last or step == 0 or (self.cfg.every > 0 and step % self.cfg.every == 0))

    @torch.no_grad()
    def run(self, fabric: Any, model: Any, objective: Any) -> dict[str, float]:
        row: dict[str, float] = {}
        model.eval()
        for name, batches in self.batches.items():
            sums = torch.zeros(len(objective.keys), device=fabric.device)
            count = torch.zeros((), device=fabric.device)
            for b in batches:
                b = fabric.to_device(b)
                c = objective.count(b)
                _, s = objective.loss(model, b, denom=c.clamp(min=1.0))
                sums, count = sums + s, count + c
            if fabric.world_size > 1:
                sums, count = fabric.all_reduce(sums, reduce_op="sum"), fabric.all_reduce(count, reduce_op="sum")
            summary, _ = objective.summary(sums, count.clamp(min=1.0))
            row.update({f"val/{name}/{k}": v for k, v in summary.items()})
        model.train()
        return row


def make_lm_loader(data: LoaderConfig, rank: int, world_size: int) -> OmniLoader:
    return OmniLoader(data, rank=rank, world_size=world_size)
